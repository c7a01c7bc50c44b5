"""Process supervision of one container: the monitor that owns systemd-nspawn, and waiting on processes.

`spawn` forks the monitor (twice, its own session, so it is nobody's child and survives tupperd and
the CLI); it starts nspawn, replies with both pids, waits for nspawn, records its exit in the
container's directory and removes what nspawn leaves (cgroups where tupper made them, runtime dirs).
`ps` shows it as `tupper-monitor NAME`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tupper import proc
from tupper.container import cgroups, mountns, nspawn
from tupper.errors import Failed, NotFound, TupperError
from tupper.runtime import records

GATE_TIMEOUT = 120.0  # seconds nspawn may wait at a gate (Gate) before the start is called off


class Gate:
    """Work that must be done before nspawn runs, done while the monitor is being made: `spawn(...,
    gate=g.fd)` forks the monitor and nspawn's process, which joins its cgroups and then waits here
    until `work()` (run in a thread of this process) has returned; only then is nspawn executed. Where
    `work()` raises, nspawn is never executed, `spawn` fails, and `join()` raises work's exception.
    Use it as a context manager: on leaving, the thread is waited for and the pipe closed."""

    def __init__(self, work: Callable[[], None]) -> None:
        self._r, self._w = os.pipe()
        self._failed: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(work,), name="gate")
        self._thread.start()

    @property
    def fd(self) -> int:
        return self._r

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
            os.write(self._w, b"1")
        except BaseException as exc:  # noqa: BLE001 - handed to join()
            self._failed.append(exc)
        finally:
            os.close(self._w)  # end of file: a waiter that read no "1" calls the start off

    def join(self) -> None:
        self._thread.join()
        if self._failed:
            raise self._failed[0]

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.join()
        finally:
            os.close(self._r)


def _pass(gate: int) -> None:
    """In nspawn's process before exec: wait for the gate's "go"."""
    if not select.select([gate], [], [], GATE_TIMEOUT)[0]:
        raise OSError(errno.ETIMEDOUT, "the container's network was not ready in time")
    if os.read(gate, 1) != b"1":
        raise OSError(errno.ECANCELED, "the start was called off")


def spawn(name: str, cdir: Path, argv: list[str], console: Path, cgroup: str | None,
          on_exit: Callable[[Path], None] | None = None, gate: int | None = None) -> tuple[int, int]:
    """Start the monitor of container `name` running `argv` (nspawn); (monitor pid, nspawn pid).
    `gate`: a Gate's fd: nspawn is executed once the gate opens (see Gate)."""
    import setproctitle  # noqa: F401 - imported here, once, not in each monitor (it imports logging: 20 ms in a fresh one)

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setsid()
            if os.fork() == 0:
                run_monitor(name, cdir, argv, w, console, cgroup, on_exit, gate)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - a forked child must never return into the caller
            os._exit(1)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return parse_reply(f.read())


def parse_reply(text: str) -> tuple[int, int]:
    """The monitor's reply: "MONITOR_PID NSPAWN_PID", or why nspawn could not be started."""
    reply = text.split()
    if len(reply) != 2 or not all(x.isdigit() for x in reply):
        raise Failed(f"could not start systemd-nspawn: {' '.join(reply) or 'the monitor died'}")
    return int(reply[0]), int(reply[1])


def after_exit(store_root: str, cdir: Path) -> None:
    """The monitor's last step when nspawn exited: where no tupper process is stopping or removing
    the container (it ended by itself: poweroff inside, a crash), its network goes now."""
    try:
        rec = records.Record.load(cdir)
    except (NotFound, ValueError, KeyError, TypeError):
        rec = None
    if rec is not None and rec.phase in ("stopping", "removing", "starting", "creating") and rec.owner_alive():
        return  # that process releases it
    if rec is not None and rec.network.mode == "private":
        import sys

        # A fresh process (see tupper.runtime.network.main), bounded in time, not waited for: the
        # monitor ends now, so that whoever waits for it (a recovering tupperd holding the store's
        # lock) is not kept waiting by a sync that needs that lock.
        proc.popen(["timeout", "60", sys.executable, "-m", "tupper.runtime.network", "--root", store_root, "sync"],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def find_leader(nspawn_pid: int, alive: Callable[[], bool], console: Path, timeout: float = 10.0) -> int:
    """The container's PID 1 as the host sees it: nspawn's child that is PID 1 in its own namespace."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in proc.children(nspawn_pid):
            try:
                with open(f"/proc/{child}/status") as f:
                    nspid = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])
            except OSError:
                continue
            if len(nspid) >= 2 and nspid[-1] == "1":
                return child
        if not alive():
            raise Failed(f"systemd-nspawn exited before the container started: {tail(console)}")
        time.sleep(0.005)
    raise Failed(f"systemd-nspawn (pid {nspawn_pid}) did not start a container within {timeout:.0f}s")


def wait_exit(pid: int, alive: Callable[[], bool], deadline: float) -> bool:
    """Wait until `alive()` is false (True) or the deadline passes (False). A pidfd of `pid` wakes the
    wait the moment that process exits (polling every 5 ms noticed an exit 2.4 ms later on
    average). `alive()` stays the judge (a zombie, a reused pid); without a pidfd this polls as before."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone already, or a kernel without pidfd_open
        fd = None
    try:
        poller = None
        if fd is not None:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
        while alive():
            remaining = deadline - time.monotonic()
            if remaining < 0:
                return False
            if poller is not None:
                if poller.poll(min(remaining, 0.05) * 1000):
                    poller = None  # exited; the pidfd stays readable, so from here alive() decides
                continue
            time.sleep(0.001 if fd is not None else 0.005)
        return True
    finally:
        if fd is not None:
            os.close(fd)


def tail(path: Path, n: int = 3) -> str:
    """The last non-empty lines of a console log, on one line."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no output)"
    return " / ".join(lines[-n:]) or "(no output)"


PLACE_INTERVAL = 0.1  # seconds between two sweeps where no unit start can be noticed (no unified hierarchy)
PLACE_INTERVAL_WATCHED = 1.0  # ... and where it can: the sweep that catches processes systemd adds to a running unit


class Placer:
    """cgroup v1: keeps the processes of each component's units in the component's cgroups.

    systemd inside the container starts a unit's processes in the unit's cgroup of the `name=systemd`
    hierarchy (writable, its own), but sees the controller hierarchies read-only. The monitor reads the
    processes of each unit's cgroup there and moves the ones not yet in their component's cgroups into
    them (children forked after that are born there): at once when a unit starts (cgroups.UnitWatch:
    inotify on the unified hierarchy), and every PLACE_INTERVAL_WATCHED for processes systemd adds to
    a running unit (ExecReload=, ExecStartPost=). Until then a process runs in the container's cgroup,
    under the container's limits; its memory charge moves with it (memory.move_charge_at_immigrate)."""

    def __init__(self, name: str, cdir: Path, parent: str, log_fd: int) -> None:
        self.name, self.cdir, self.parent, self.log_fd = name, cdir, parent, log_fd
        self.layout = cgroups.Layout.detect()
        self.stamp: int | None = None
        # (component, its cgroups, its units); each unit's cgroup.procs path once found
        self.components: list[tuple[str, list[Path], tuple[str, ...]]] = []
        self.unit_procs: dict[str, str] = {}
        self.said: set[str] = set()
        self.watch: cgroups.UnitWatch | None = None
        top = self.layout.unified_dir(parent, name)
        if top is not None:
            try:
                self.watch = cgroups.UnitWatch(top, set())
            except OSError as exc:
                self._say(f"no inotify on {top} ({exc}): sweeping every {PLACE_INTERVAL}s")

    def _reload(self) -> None:
        """The components and their units, again when the record changed (a live upgrade, an update)."""
        try:
            stamp = os.stat(self.cdir / records.RECORD).st_mtime_ns
        except OSError:
            return
        if stamp != self.stamp:
            rec = records.Record.load(self.cdir)
            self.components = [(c.name, cgroups.component_dirs(self.name, c.name, self.parent, self.layout), c.units)
                               for c in rec.components]
            self.stamp = stamp
            if self.watch is not None:
                self.watch.units = set(rec.units)

    def sweep(self) -> None:
        """One pass: a few small reads per unit (measured: ~0.1 % of a CPU per container at 10 passes a second)."""
        try:
            self._reload()
            for component, dirs, units in self.components:
                if not dirs:
                    continue
                inside = _pids(str(dirs[0] / "cgroup.procs"))
                if inside is None:
                    continue  # not made (yet)
                for unit in units:
                    new = self._unit_pids(unit) - inside
                    if new:
                        cgroups.place(new, self.name, component, self.parent, self.layout)
        except Exception as exc:  # noqa: BLE001 - the monitor must outlive any surprise; say it once
            self._say(f"placing component processes: {type(exc).__name__}: {exc}")

    def _unit_pids(self, unit: str) -> set[int]:
        """The processes of a unit's cgroup (and of cgroups below it, should the unit make some)."""
        path = self.unit_procs.get(unit)
        if path is not None:
            pids = _pids(path)
            if pids is not None and not _has_subdirs(os.path.dirname(path)):
                return pids
        d = cgroups.unit_dir(self.name, unit, self.parent, self.layout)
        if d is None:
            self.unit_procs.pop(unit, None)
            return set()
        self.unit_procs[unit] = str(d / "cgroup.procs")
        return cgroups.tree_pids(d)

    def _say(self, text: str) -> None:
        if text not in self.said:
            self.said.add(text)
            with contextlib.suppress(OSError):
                os.write(self.log_fd, f"tupper-monitor: {text}\n".encode())


def _pids(procs_file: str) -> set[int] | None:
    try:
        with open(procs_file, "rb") as f:
            return {int(x) for x in f.read().split()}
    except OSError:
        return None


def _has_subdirs(path: str) -> bool:
    try:
        return os.stat(path).st_nlink > 2  # a directory's link count: 2 + its subdirectories (cgroupfs keeps it too)
    except OSError:
        return False


def _wait(p: subprocess.Popen, placer: Placer | None) -> int:
    """nspawn's exit status; meanwhile, the placer's sweeps."""
    if placer is None:
        return p.wait()
    fd = os.pidfd_open(p.pid)
    watch = placer.watch
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if watch is not None:
            poller.register(watch.fileno(), select.POLLIN)
        interval = (PLACE_INTERVAL_WATCHED if watch is not None else PLACE_INTERVAL) * 1000
        placer.sweep()
        while True:
            ready = {f for f, _ in poller.poll(interval)}
            if fd in ready:
                break
            if watch is not None and watch.fileno() in ready:
                watch.drain()
            placer.sweep()
    finally:
        os.close(fd)
        if watch is not None:
            watch.close()
    return p.wait()


def held_dir(fd: int) -> Path:
    """A path that reaches the directory open at `fd` in this process, wherever it has been renamed to."""
    return Path(f"/proc/{os.getpid()}/fd/{fd}")


def still_in(fd: int, parent: str) -> bool:
    """Whether the directory open at `fd` is still an entry of `parent` (not moved out, not deleted)."""
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return os.path.dirname(where) == parent.rstrip("/")


def run_monitor(name: str, cdir: Path, argv: list[str], reply_fd: int, console: Path, cgroup: str | None,
             on_exit: Callable[[Path], None] | None, gate: int | None = None) -> None:
    """The monitor process (forked twice, its own session): the parent of nspawn until it exits."""
    code = 1
    try:
        # `ps` says what this is (it is a fork of tupperd or of the CLI, and would show as one).
        from setproctitle import setproctitle

        setproctitle(f"tupper-monitor {name}")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        # Keep nothing of the caller's open: a pipe held here would keep the caller's reader waiting.
        low = 3
        for keep in sorted({reply_fd} | ({gate} if gate is not None else set())):
            os.closerange(low, keep)
            low = keep + 1
        os.closerange(low, 65536)
        # The container's directory, held open: a container claimed from a warm pool is renamed while it
        # runs, and everything below reaches its directory through this descriptor, wherever it now is.
        containers = str(cdir.parent)
        dir_fd = os.open(cdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        boot_dir = cdir
        cdir = held_dir(dir_fd)

        writable = [str(boot_dir.parent.parent), "/run", *nspawn.writable_sources(argv)]

        def before_exec() -> None:  # in nspawn's process
            if cgroup:
                cgroups.join(name, parent=cgroup)
            if gate is not None:
                _pass(gate)
            mountns.confine(writable, private_under=containers, keep=str(boot_dir))  # see mountns.confine

        out = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            p = proc.popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                close_fds=True,
                preexec_fn=before_exec,
            )
        except (OSError, TupperError, subprocess.SubprocessError) as exc:
            os.write(reply_fd, f"error: {exc}".encode())
            os._exit(1)
        if gate is not None:
            os.close(gate)
        os.write(reply_fd, f"{os.getpid()} {p.pid}\n".encode())
        os.close(reply_fd)
        placer = Placer(name, cdir, cgroup, out) if cgroup and cgroups.Layout.detect().kind != "v2" else None
        rc = _wait(p, placer)
        if still_in(dir_fd, containers):  # not removed (renamed to the trash) meanwhile
            try:
                records.mark_exit(cdir, rc)
            except OSError:  # a full store: the clean-up below matters more
                pass
        if cgroup:
            cgroups.remove(name, parent=cgroup)
        nspawn.remove_runtime_dirs(name)
        if on_exit is not None:
            try:
                on_exit(cdir)
            except Exception as exc:  # noqa: BLE001 - the next tupper command's sync catches up
                with contextlib.suppress(OSError):
                    os.write(out, f"tupper-monitor: network clean-up failed: {exc}\n".encode())
        code = 0
    finally:
        os._exit(code)
