"""The store's keeper: one process that parents every container's systemd-nspawn (`ps`: tupper-keeper).

A container's nspawn must be the child of a process that outlives tupperd and the CLI: it records
nspawn's exit status, keeps the processes of the container's components in their cgroups on cgroup v1
(monitor.Placer), and cleans up after nspawn (the container's cgroups, nspawn's runtime directories,
the network where the container ended by itself). Until this module, a monitor process per container
did it: a fork of a Python process, 3.3 MB of PSS each (bench/density.py), a tenth of what the
container itself costs. The keeper does it for every container of a store in one process and one
thread (a poll loop), so the per-container cost is the few descriptors it holds.

Life: the first start of a container (tupperd's or the CLI's) starts it; it lives while a container it
parents runs or a client is connected (tupperd stays connected while it runs, so starts do not wait for
a fresh keeper) and ends IDLE_GRACE after neither is left. One per store: it holds
`RUN_DIR/keeper.lock` (flock) and listens on `RUN_DIR/keeper.sock`. Should it be killed, its
containers run on, reparented; the runtime then does what it would have done when they end
(Runtime.reap: exit status unknown), and the next start starts a new keeper.

Protocol (SOCK_SEQPACKET, one JSON message each way): on connecting, the keeper says "keeper PID"
(a client that reads no hello knows its request was never taken and may start a keeper and retry).
- {"op": "spawn", name, cdir, argv, console, cgroup} with the gate's descriptor (monitor.Gate) as
  SCM_RIGHTS where there is one: nspawn is started once the gate opens (its process joins the
  container's cgroups and takes its own mount namespace, mountns.confine, before exec); reply
  "KEEPER_PID NSPAWN_PID" or "error: …".
- {"op": "wait", "nspawn_pid": N}: reply "done" once the keeper has finished with that nspawn (exit
  recorded, clean-up done), at once where it has no such container.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import fcntl
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import attrs

from tupper import proc
from tupper.container import cgroups, mountns, nspawn
from tupper.errors import Failed
from tupper.runtime import monitor, records

LOCK, SOCKET, LOG = "keeper.lock", "keeper.sock", "keeper.log"
TITLE = "tupper-keeper"
HELLO = b"keeper "
IDLE_GRACE = 1.0  # seconds without a container or a client before the keeper ends
MAX_REQUEST = 1 << 20  # a request is a few kB (nspawn's argv)
START_TIMEOUT = 10.0  # seconds a client tries to reach a keeper, starting one where none answers
HELPER_TIMEOUT = 60  # seconds a network sync started after a container's own end may take


class KeeperGone(Failed):
    pass


# ---- the client: tupperd's and the CLI's end ------------------------------------------------------


class Keeper:
    """Reaches the store's keeper, starting it where none runs. Thread-safe: each request has a
    connection of its own (a spawn waiting at its gate holds up no other request)."""

    def __init__(self, store_root: Path, run_dir: Path, cgroup: str | None) -> None:
        """`cgroup`: the store's cgroup parent where tupper makes containers' cgroups (None on systemd hosts)."""
        self.store_root, self.run_dir, self.cgroup = store_root, run_dir, cgroup
        self.path = str(run_dir / SOCKET)
        self._starting = threading.Lock()
        self._held: socket.socket | None = None
        self.pid = 0  # the keeper's, as its hello said

    def _connect(self, start: bool = True) -> socket.socket:
        """A connection to the keeper; where none answers, one is started (`start`) or KeeperGone raised."""
        deadline = time.monotonic() + START_TIMEOUT
        why = ""
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            s.settimeout(5.0)
            try:
                s.connect(self.path)
                hello = s.recv(64)
                if hello.startswith(HELLO) and hello[len(HELLO):].isdigit():
                    self.pid = int(hello[len(HELLO):])
                    s.settimeout(None)
                    return s
                why = "it closed the connection"  # it was ending: start another
            except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError, TimeoutError) as exc:
                why = f"{type(exc).__name__}: {exc}"
            s.close()
            if not start or time.monotonic() > deadline:
                raise KeeperGone(f"cannot reach the store's keeper process at {self.path} ({why})",
                                 hint=f"see {self.run_dir / LOG}")
            self._start()

    def _start(self) -> None:
        """Start a keeper (it returns once it listens; it ends at once where another holds the lock)."""
        with self._starting:
            self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            package_root = str(Path(__file__).resolve().parents[2])
            with open(self.run_dir / LOG, "ab") as log:
                p = proc.popen([sys.executable, "-m", "tupper.runtime.keeper", "--root", str(self.store_root),
                                "--run-dir", str(self.run_dir), *(["--cgroup", self.cgroup] if self.cgroup else [])],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd="/",
                               env=proc.environment({"PYTHONPATH": package_root}), start_new_session=True)
            try:
                p.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            time.sleep(0.01)  # where another keeper was ending: let it go before the next try

    def hold(self) -> None:
        """Stay connected (tupperd, while it runs): the keeper stays up between containers."""
        if self._held is None:
            self._held = self._connect()

    def release(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    def spawn(self, name: str, cdir: Path, argv: list[str], console: Path, cgroup: str | None,
              gate: int | None = None) -> tuple[int, int]:
        """Start nspawn (`argv`) for container `name` under the keeper: (keeper pid, nspawn pid)."""
        request = json.dumps({"op": "spawn", "name": name, "cdir": str(cdir), "argv": argv, "console": str(console),
                              "cgroup": cgroup}).encode()
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [gate]))] if gate is not None else []
        with self._connect() as s:
            try:
                s.sendmsg([request], fds)
                reply = s.recv(4096)
            except OSError:
                reply = b""
        if not reply:
            # It took the request and ended: nspawn may or may not have been started. Not retried here.
            raise Failed(f"container {name!r}: the keeper process ended while starting it",
                         hint=f"see {self.run_dir / LOG}; `tupper rm --force {name}` and start it again")
        return monitor.parse_reply(reply.decode(errors="replace"))

    def wait(self, nspawn_pid: int, timeout: float) -> bool:
        """Until the keeper has finished with that nspawn (exit recorded, cleaned up): False on timeout.
        Where no keeper runs, there is nothing to wait for (none is started to be asked)."""
        try:
            with self._connect(start=False) as s:
                s.settimeout(timeout)
                s.send(json.dumps({"op": "wait", "nspawn_pid": nspawn_pid}).encode())
                s.recv(64)  # "done", or the end of file of a keeper that ended: nothing left to wait for
        except TimeoutError:
            return False
        except (KeeperGone, OSError):
            pass
        return True

    def parents(self, pid: int) -> bool:
        """Whether process `pid` is a keeper (a monitor of an older tupper is not)."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().startswith(TITLE.encode())
        except OSError:
            return False


# ---- the keeper process ---------------------------------------------------------------------------


@attrs.define(eq=False)
class Kept:
    """One container the keeper parents."""

    name: str
    pid: int  # its nspawn
    process: subprocess.Popen | None  # None: adopted (a killed keeper's child), its exit status unknown to us
    pidfd: int
    dir_fd: int  # its directory, held open: a pool container is renamed at its claim (monitor.held_dir)
    containers: str  # the directory its directory must still be in for its exit to be recorded
    cgroup: str | None
    out: int  # its console log, where the keeper's notes about it go
    placer: monitor.Placer | None
    next_sweep: float = 0.0
    waiters: list[socket.socket] = attrs.Factory(list)

    def exited(self) -> bool:
        if self.process is not None:
            return self.process.poll() is not None
        return not proc.pid_alive(self.pid)


@attrs.define(eq=False)
class Pending:
    """A spawn waiting for its gate to open."""

    conn: socket.socket
    request: dict
    gate: int
    deadline: float


class Server:
    def __init__(self, store_root: str, listener: socket.socket) -> None:
        self.store_root = store_root
        self.listener = listener
        self.poller = select.poll()
        self.conns: dict[int, socket.socket] = {}
        self.kept: dict[int, Kept] = {}  # by pidfd
        self.by_watch: dict[int, Kept] = {}  # by the placer's inotify descriptor
        self.pending: dict[int, Pending] = {}  # by gate descriptor
        self.helpers: list[subprocess.Popen] = []
        self.idle_since = time.monotonic()
        self.poller.register(listener, select.POLLIN)

    def run(self) -> None:
        while True:
            now = time.monotonic()
            if not (self.conns or self.kept or self.pending or self.helpers):
                if now - self.idle_since >= IDLE_GRACE:
                    return
            else:
                self.idle_since = now
            for fd, _events in self.poller.poll(self._timeout(now) * 1000):
                if fd == self.listener.fileno():
                    self._accept()
                elif fd in self.conns:
                    self._request(self.conns[fd])
                elif fd in self.pending:
                    self._gate(self.pending[fd])
                elif fd in self.kept:
                    if self.kept[fd].exited():  # (a descriptor reused within one poll's answer is not)
                        self._ended(self.kept.pop(fd))
                elif fd in self.by_watch:
                    kept = self.by_watch[fd]
                    assert kept.placer is not None and kept.placer.watch is not None
                    kept.placer.watch.drain()
                    self._sweep(kept)
            now = time.monotonic()
            for kept in self.kept.values():
                if kept.placer is not None and now >= kept.next_sweep:
                    self._sweep(kept)
            for gate, pending in list(self.pending.items()):
                if now > pending.deadline:
                    del self.pending[gate]
                    self.poller.unregister(gate)
                    os.close(gate)
                    self._refuse(pending, f"error: the container's network was not ready within {monitor.GATE_TIMEOUT:.0f}s")
            self.helpers = [h for h in self.helpers if h.poll() is None]

    def _timeout(self, now: float) -> float:
        waits = [IDLE_GRACE, *(k.next_sweep - now for k in self.kept.values() if k.placer is not None),
                 *(p.deadline - now for p in self.pending.values())]
        if self.helpers:
            waits.append(1.0)
        return max(0.0, min(waits))

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:  # BlockingIOError: nobody, after all
            return
        conn.setblocking(False)  # every descriptor here: an event that was not one must not stop the keeper
        try:
            conn.send(HELLO + str(os.getpid()).encode())
        except OSError:
            conn.close()
            return
        self.conns[conn.fileno()] = conn
        self.poller.register(conn, select.POLLIN)

    def _drop(self, conn: socket.socket) -> None:
        fd = conn.fileno()
        if self.conns.get(fd) is conn:
            with contextlib.suppress(KeyError):  # a spawn's connection is not polled
                self.poller.unregister(fd)
            del self.conns[fd]
        for kept in self.kept.values():
            if conn in kept.waiters:
                kept.waiters.remove(conn)
        conn.close()

    def _request(self, conn: socket.socket) -> None:
        try:
            msg, ancdata, _flags, _addr = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(array.array("i", [0]).itemsize))
        except BlockingIOError:
            return
        except OSError:
            msg, ancdata = b"", []
        gate = None
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                gate = fds[0] if fds else None
        if not msg:
            if gate is not None:
                os.close(gate)
            self._drop(conn)
            return
        try:
            req = json.loads(msg)
            op = req["op"]
        except (ValueError, KeyError, TypeError):
            self._reply(conn, b"error: a request the keeper does not understand")
            if gate is not None:
                os.close(gate)
            return
        if op == "spawn":
            self.poller.unregister(conn)  # one request per connection: answered below or at the gate
            if gate is None:
                self._spawn(conn, req)
            else:
                os.set_blocking(gate, False)
                self.pending[gate] = Pending(conn, req, gate, time.monotonic() + monitor.GATE_TIMEOUT)
                self.poller.register(gate, select.POLLIN)
        elif op == "wait":
            kept = next((k for k in self.kept.values() if k.pid == req.get("nspawn_pid")), None)
            if kept is None:
                self._reply(conn, b"done")
            else:
                kept.waiters.append(conn)
        else:
            self._reply(conn, f"error: no such request: {op}".encode())

    def _reply(self, conn: socket.socket, data: bytes) -> None:
        with contextlib.suppress(OSError):
            conn.send(data)

    def _gate(self, pending: Pending) -> None:
        try:
            go = os.read(pending.gate, 1) == b"1"
        except BlockingIOError:
            return
        except OSError:
            go = False
        del self.pending[pending.gate]
        self.poller.unregister(pending.gate)
        os.close(pending.gate)
        if go:
            self._spawn(pending.conn, pending.request)
        else:
            self._refuse(pending, "error: the start was called off")

    def _refuse(self, pending: Pending, why: str) -> None:
        self._reply(pending.conn, why.encode())
        self._drop(pending.conn)

    def _spawn(self, conn: socket.socket, req: dict) -> None:
        try:
            kept = self._start(req)
        except Exception as exc:  # noqa: BLE001 - answered to the client; the keeper goes on
            self._reply(conn, f"error: {exc}".encode())
        else:
            self._keep(kept)
            self._reply(conn, f"{os.getpid()} {kept.pid}\n".encode())
        self._drop(conn)

    def _keep(self, kept: Kept) -> None:
        self.kept[kept.pidfd] = kept
        self.poller.register(kept.pidfd, select.POLLIN)
        if kept.placer is not None and kept.placer.watch is not None:
            self.by_watch[kept.placer.watch.fileno()] = kept
            self.poller.register(kept.placer.watch.fileno(), select.POLLIN)

    def adopt(self, containers: Path, cgroup: str | None) -> None:
        """At the keeper's start: the running containers nobody parents any more (their keeper, or the
        monitor of an older tupper, was killed) are watched as if they were ours, but for their exit
        status, which only a parent sees: their components' processes placed (v1), their exit recorded
        ("unknown") and what they leave cleaned up."""
        try:
            dirs = sorted(containers.iterdir())
        except OSError:
            return
        for d in dirs:
            try:
                rec = records.Record.load(d)
            except (Failed, OSError, ValueError, KeyError, TypeError):
                continue
            if not rec.alive() or (rec.monitor_pid and proc.pid_alive(rec.monitor_pid)):
                continue
            try:
                pidfd = os.pidfd_open(rec.nspawn_pid)
            except OSError:
                continue
            if not rec.alive():  # gone, or its pid reused, between the two looks
                os.close(pidfd)
                continue
            dir_fd = out = -1
            try:
                dir_fd = os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                out = os.open(d / "console.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                placer = None
                if cgroup and cgroups.Layout.detect().kind != "v2":
                    placer = monitor.Placer(rec.boot_name, monitor.held_dir(dir_fd), cgroup, out)
            except Exception:  # noqa: BLE001 - not adopted: the runtime cleans up after it when it ends
                for fd in (pidfd, dir_fd, out):
                    if fd >= 0:
                        os.close(fd)
                continue
            os.write(out, f"tupper-keeper: adopted (pid {os.getpid()}): its parent was gone\n".encode())
            self._keep(Kept(rec.boot_name, rec.nspawn_pid, None, pidfd, dir_fd, str(containers), cgroup, out, placer))

    def _start(self, req: dict) -> Kept:
        name, argv, cgroup = str(req["name"]), [str(a) for a in req["argv"]], req.get("cgroup")
        boot_dir = Path(req["cdir"])
        containers = str(boot_dir.parent)
        writable = [str(boot_dir.parent.parent), "/run", *nspawn.writable_sources(argv)]

        def before_exec() -> None:  # in nspawn's process
            if cgroup:
                cgroups.join(name, parent=cgroup)
            mountns.confine(writable, private_under=containers, keep=str(boot_dir))  # see mountns.confine

        dir_fd = os.open(boot_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        out = -1
        try:
            out = os.open(req["console"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            p = proc.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, close_fds=True, preexec_fn=before_exec)
        except BaseException:
            os.close(dir_fd)
            if out >= 0:
                os.close(out)
            raise
        placer = None
        if cgroup and cgroups.Layout.detect().kind != "v2":
            placer = monitor.Placer(name, monitor.held_dir(dir_fd), cgroup, out)
        return Kept(name, p.pid, p, os.pidfd_open(p.pid), dir_fd, containers, cgroup, out, placer)

    def _sweep(self, kept: Kept) -> None:
        assert kept.placer is not None
        kept.placer.sweep()
        interval = monitor.PLACE_INTERVAL_WATCHED if kept.placer.watch is not None else monitor.PLACE_INTERVAL
        kept.next_sweep = time.monotonic() + interval

    def _ended(self, kept: Kept) -> None:
        """nspawn exited: its status recorded, what it leaves removed, its waiters answered."""
        self.poller.unregister(kept.pidfd)
        os.close(kept.pidfd)
        if kept.placer is not None and kept.placer.watch is not None:
            self.by_watch.pop(kept.placer.watch.fileno(), None)
            self.poller.unregister(kept.placer.watch.fileno())
            kept.placer.watch.close()
        rc = kept.process.wait() if kept.process is not None else None
        cdir = monitor.held_dir(kept.dir_fd)
        try:
            if monitor.still_in(kept.dir_fd, kept.containers):  # not removed (renamed to the trash) meanwhile
                with contextlib.suppress(OSError):  # a full store: the clean-up below matters more
                    if kept.process is not None:
                        records.mark_exit(cdir, rc)
                    elif not (cdir / records.EXIT).exists():
                        records.mark_exit(cdir, None, note="its keeper process was killed: the exit status is unknown")
            if kept.cgroup:
                cgroups.remove(kept.name, parent=kept.cgroup)
            nspawn.remove_runtime_dirs(kept.name)
            helper = monitor.after_exit(self.store_root, cdir)
            if helper is not None:
                self.helpers.append(helper)
        except Exception as exc:  # noqa: BLE001 - the next tupper command's sync catches up
            with contextlib.suppress(OSError):
                os.write(kept.out, f"tupper-keeper: clean-up after {kept.name} failed: {exc}\n".encode())
        finally:
            os.close(kept.dir_fd)
            os.close(kept.out)
            for conn in kept.waiters:
                self._reply(conn, b"done")
                self._drop(conn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tupper.runtime.keeper")
    parser.add_argument("--root", required=True)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--cgroup", help="the store's cgroup parent, where tupper makes containers' cgroups")
    args = parser.parse_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    lock = os.open(args.run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another keeper runs (or is ending): the client tries it, and again
    path = args.run_dir / SOCKET
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a killed keeper's (we hold the lock: no other keeper listens there)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(256)
    listener.setblocking(False)
    if os.fork():
        os._exit(0)  # the starter waits for this: it returns with the socket listening
    os.setsid()
    from setproctitle import setproctitle

    setproctitle(f"{TITLE} {args.root}")
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):  # as its containers' monitors did: only SIGKILL ends it
        signal.signal(sig, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)  # stderr stays: the keeper's log
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # a few descriptors per container
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    server = Server(args.root, listener)
    try:
        server.adopt(Path(args.root) / "containers", args.cgroup)
        server.run()
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        listener.close()
        os.close(lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
