"""A small process that forks container monitors for tupperd: `python -m tupper.runtime.spawner FD`.

A container's monitor (tupper.runtime.monitor) must be nobody's child that could go away: forked from
tupperd, it is forked twice, and each fork copies a threaded, 55 MB process whose every page the
child then writes to (Python's reference counts) is copied again: 11-21 ms before nspawn's process
even exists, on the critical path of every start. This process imports only what a monitor needs
and forks monitors on tupperd's request: one fork of a small process. It lives as long as tupperd
(the end of file on its socket ends it); the kernel reaps its children (SIGCHLD ignored here; each
monitor restores it before it starts nspawn). Monitors outlive it as they outlive tupperd.

Requests go over a SOCK_SEQPACKET pair, one message each way: the monitor's arguments as JSON (with
the gate's descriptor, where there is one, as SCM_RIGHTS), and the monitor's own reply ("MONITOR_PID
NSPAWN_PID" or "error: …"). Where the spawner is not running, tupperd forks the monitor itself.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

from tupper import proc
from tupper.errors import Failed
from tupper.runtime import monitor

MAX_REQUEST = 1 << 20  # a request is a few kB (nspawn's argv)


class SpawnerGone(Exception):
    """The spawner is not there (any more) and had not taken the request: fork the monitor here instead."""


class Spawner:
    """tupperd's end: start the spawner process, hand it monitors to fork."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            package_root = str(Path(__file__).resolve().parents[2])
            env = proc.environment({"PYTHONPATH": package_root})
            self.process = proc.popen([sys.executable, "-m", "tupper.runtime.spawner", str(theirs.fileno())],
                                      pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      env=env, start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.lock = threading.Lock()

    def spawn(self, name: str, cdir: Path, argv: list[str], console: Path, cgroup: str | None, store_root: str,
              gate: int | None = None) -> tuple[int, int]:
        """As monitor.spawn, with `store_root` for the monitor's last step (monitor.after_exit)."""
        request = json.dumps({"name": name, "cdir": str(cdir), "argv": argv, "console": str(console), "cgroup": cgroup,
                              "store_root": store_root}).encode()
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [gate]))] if gate is not None else []
        with self.lock:
            try:
                self.sock.sendmsg([request], fds)
            except OSError as exc:
                raise SpawnerGone(str(exc)) from None
            try:
                reply = self.sock.recv(4096)
            except OSError:
                reply = b""
        if not reply:
            # It took the request and died: a monitor may or may not exist. Not retried here.
            raise Failed(f"container {name!r}: the monitor spawner ended while starting it", hint=f"`tupper rm --force {name}` and start it again")
        return monitor.parse_reply(reply.decode(errors="replace"))

    def close(self) -> None:
        self.sock.close()  # its end of file: the spawner ends
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve(fd: int) -> None:
    """The spawner process: fork a monitor per request until the socket's end of file."""
    from setproctitle import setproctitle

    setproctitle("tupper-spawner")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the monitors
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    while True:
        try:
            msg, ancdata, _flags, _addr = sock.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(array.array("i", [0]).itemsize))
        except ConnectionResetError:
            return
        if not msg:
            return
        gate = None
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                gate = fds[0] if fds else None
        try:
            req = json.loads(msg)
            reply = _fork_monitor(req, gate)
        except Exception as exc:  # noqa: BLE001 - a bad request must not end the spawner
            reply = f"error: the spawner could not fork a monitor: {exc}".encode()
        finally:
            if gate is not None:
                os.close(gate)
        try:
            sock.send(reply or b"error: the monitor died")
        except OSError:  # tupperd is gone; the monitor it asked for runs on, and the next tupperd adopts it
            return


def _fork_monitor(req: dict, gate: int | None) -> bytes:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the monitor waits for nspawn
            os.setsid()
            monitor.run_monitor(req["name"], Path(req["cdir"]), req["argv"], w, Path(req["console"]), req["cgroup"],
                                partial(monitor.after_exit, req["store_root"]), gate)
        finally:
            os._exit(1)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        return f.read()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
