"""Running one health check against a running container (tupper.model.health holds the checks and
what their results mean).

http and tcp checks connect from the host, with a socket made in the container's network namespace
(a short-lived thread enters it with setns(2), makes the socket and ends; the socket stays in that
namespace; where the container shares the host's namespace, no thread): 127.0.0.1 is the container's own loopback, and no process runs inside. exec checks run
inside, as a transient unit of the container's systemd (its output captured in a memfd, killed by
systemd after the timeout), like `tupper exec`.
"""

from __future__ import annotations

import os
import socket
import time

import attrs

from tupper.container import netns
from tupper.container.inroot import find_command
from tupper.container.systemd import run_command
from tupper.errors import Failed
from tupper.model.health import HealthCheck, Target

DETAIL_MAX = 200  # characters of a check's output kept as its detail


@attrs.frozen
class Result:
    ok: bool
    detail: str  # for status and events: "HTTP 200", "connection refused", the command's last output line


def run(check: HealthCheck, leader: int) -> Result:
    """One check of the container whose PID 1 is `leader` (a host PID). Never raises for what the check
    finds; an error reaching the container at all (it stopped) is a failed check too. Blocking: a
    caller with an event loop runs it (or run_many) in a worker thread."""
    if check.kind == "exec":
        return _guarded_exec(check, leader)
    assert check.target is not None
    try:
        return _net(check.kind, check.target, check.timeout, leader)
    except OSError as exc:
        return Result(False, f"timed out after {check.timeout:g}s" if isinstance(exc, TimeoutError) else _why(exc))


def run_many(checks: list[tuple[HealthCheck, int]]) -> list[Result]:
    """Several checks one after the other: tupperd hands over the checks due at one moment in one go (a
    thread hand-off per check cost more than the check)."""
    return [run(check, leader) for check, leader in checks]


def _guarded_exec(check: HealthCheck, leader: int) -> Result:
    try:
        return _exec(check, leader)
    except OSError as exc:
        return Result(False, _why(exc))
    except Failed as exc:  # the container's bus went away (it stops)
        return Result(False, exc.message)


def _why(exc: OSError) -> str:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(exc, ProcessLookupError):
        return "the container's PID 1 is gone (it stopped)"
    # The errno's own words ("connection refused"), not the message around them.
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


def socket_in(pid: int, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket in the network namespace of process `pid`."""
    return netns.run_in(pid, lambda: socket.socket(family, kind))


def _net(kind: str, target: Target, timeout: float, leader: int) -> Result:
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return remaining

    with socket_in(leader, socket.AF_INET6 if target.family_v6 else socket.AF_INET) as sock:
        sock.settimeout(left())
        sock.connect((target.host, target.port))
        if kind == "tcp":
            return Result(True, f"connected to port {target.port}")
        host = f"[{target.host}]" if target.family_v6 else target.host
        sock.sendall(f"GET {target.path} HTTP/1.0\r\nHost: {host}:{target.port}\r\n"
                     "User-Agent: tupper-health\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n" not in head and len(head) < 4096:
            sock.settimeout(left())
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return Result(False, f"not an HTTP response: {line[:80]!r}" if line else "the connection closed without a response")
    code = int(parts[1])
    return Result(200 <= code < 400, f"HTTP {code}")


def _exec(check: HealthCheck, leader: int) -> Result:
    argv = check.argv or check.command
    path = find_command(f"/proc/{leader}/root", argv[0])
    if path is None:
        return Result(False, f"{argv[0]}: command not found in the container")
    out = os.memfd_create("tupper-health", os.MFD_CLOEXEC)
    try:
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        t0 = time.monotonic()
        try:
            code = run_command(leader, [path, *argv[1:]], stdin=null, stdout=out, stderr=out,
                               description="tupper health check", timeout=check.timeout, prefix="tupper-health")
        finally:
            os.close(null)
        took = time.monotonic() - t0
        size = os.fstat(out).st_size
        text = os.pread(out, 4096, max(0, size - 4096)).decode("utf-8", "replace")
    finally:
        os.close(out)
    last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")[:DETAIL_MAX]
    if code == 0:
        return Result(True, last or "exit status 0")
    why = f"timed out after {check.timeout:g}s" if code > 128 and took >= check.timeout else f"exit status {code}"
    return Result(False, f"{why}: {last}" if last else why)
