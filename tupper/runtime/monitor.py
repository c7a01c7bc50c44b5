"""What watching over a container takes, used by the store's keeper (tupper.runtime.keeper, the parent
of every container's systemd-nspawn) and by the runtime: the start gate, finding PID 1, waiting on
processes, placing component processes in their cgroups (v1), the last step after nspawn's exit.

(A monitor process per container did all of this before the keeper: hence the name.)
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tupper import proc
from tupper.container import cgroups
from tupper.errors import Failed, NotFound
from tupper.runtime import records

GATE_TIMEOUT = 120.0  # seconds nspawn may wait at a gate (Gate) before the start is called off


class Gate:
    """Work that must be done before nspawn runs, done while the keeper is asked to start it:
    `Keeper.spawn(..., gate=g.fd)` hands the gate to the keeper, which starts nspawn's process once
    `work()` (run in a thread of this process) has returned. Where `work()` raises, nspawn is never
    started, `spawn` fails, and `join()` raises work's exception.
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


def parse_reply(text: str) -> tuple[int, int]:
    """The monitor's reply: "MONITOR_PID NSPAWN_PID", or why nspawn could not be started."""
    reply = text.split()
    if len(reply) != 2 or not all(x.isdigit() for x in reply):
        raise Failed(f"could not start systemd-nspawn: {' '.join(reply) or 'the monitor died'}")
    return int(reply[0]), int(reply[1])


def after_exit(store_root: str, cdir: Path) -> subprocess.Popen | None:
    """The keeper's last step when nspawn exited: where no tupper process is stopping or removing
    the container (it ended by itself: poweroff inside, a crash), its network goes now (the process
    doing it is returned: the keeper reaps it)."""
    try:
        rec = records.Record.load(cdir)
    except (NotFound, ValueError, KeyError, TypeError):
        rec = None
    if rec is not None and rec.phase in ("stopping", "removing", "starting", "creating") and rec.owner_alive():
        return None  # that process releases it
    if rec is not None and rec.network.mode == "private":
        import sys

        # A fresh process (see tupper.runtime.network.main), bounded in time, not waited for: the
        # keeper answers whoever waits for this container now (a recovering tupperd holding the
        # store's lock is not kept waiting by a sync that needs that lock).
        return proc.popen(["timeout", "60", sys.executable, "-m", "tupper.runtime.network", "--root", store_root, "sync"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return None


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
