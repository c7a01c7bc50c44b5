"""Process supervision of one container: the monitor that owns systemd-nspawn, and waiting on processes.

`spawn` forks the monitor (twice, its own session, so it is nobody's child and survives tupperd and
the CLI); it starts nspawn, replies with both pids, waits for nspawn, records its exit in the
container's directory and removes what nspawn leaves (cgroups where tupper made them, runtime dirs).
`ps` shows it as `tupper-monitor NAME`.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tupper import proc
from tupper.container import cgroups, nspawn
from tupper.errors import Failed, TupperError
from tupper.runtime import records


def spawn(name: str, cdir: Path, argv: list[str], console: Path, cgroup: str | None) -> tuple[int, int]:
    """Start the monitor of container `name` running `argv` (nspawn); (monitor pid, nspawn pid)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setsid()
            if os.fork() == 0:
                _monitor(name, cdir, argv, w, console, cgroup)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - a forked child must never return into the caller
            os._exit(1)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        reply = f.read().split()
    if len(reply) != 2 or not all(x.isdigit() for x in reply):
        raise Failed(f"could not start systemd-nspawn: {' '.join(reply) or 'the monitor died'}")
    return int(reply[0]), int(reply[1])


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


def _monitor(name: str, cdir: Path, argv: list[str], reply_fd: int, console: Path, cgroup: str | None) -> None:
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
        os.closerange(3, reply_fd)
        os.closerange(reply_fd + 1, 65536)
        out = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            p = proc.popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                close_fds=True,
                preexec_fn=(lambda: cgroups.join(name, parent=cgroup)) if cgroup else None,
            )
        except (OSError, TupperError) as exc:
            os.write(reply_fd, f"error: {exc}".encode())
            os._exit(1)
        os.write(reply_fd, f"{os.getpid()} {p.pid}\n".encode())
        os.close(reply_fd)
        rc = p.wait()
        if cdir.exists():
            try:
                records.mark_exit(cdir, rc)
            except OSError:  # a full store: the clean-up below matters more
                pass
        if cgroup:
            cgroups.remove(name, parent=cgroup)
        nspawn.remove_runtime_dirs(name)
        code = 0
    finally:
        os._exit(code)
