"""Every subprocess tupper starts goes through `run()`: argv lists, a small environment, `--debug` tracing."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence

from tupper.errors import CommandFailed, Failed

log = logging.getLogger("tupper")

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(BASE_ENV)
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    capture: bool = True,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    timeout: float | None = None,
    binary: bool = False,
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess:
    """Run argv to completion; raise CommandFailed on a non-zero exit when `check`. With `binary`,
    input and output stay bytes (secrets: never decoded, never logged; only argv is traced)."""
    argv = [str(a) for a in argv]
    log.debug("+ %s", shlex.join(argv))
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL if input is None else None,
            input=input if binary or input is None else input.decode(),
            capture_output=capture,
            text=not binary,
            env=environment(env),
            timeout=timeout,
            check=False,
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError as exc:
        raise Failed(f"{argv[0]}: command not found", hint="run `make setup` to install tupper's dependencies") from exc
    except subprocess.TimeoutExpired as exc:
        raise Failed(f"{argv[0]} did not finish within {timeout:.0f}s") from exc
    if check and proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace") if binary and proc.stderr else (proc.stderr or "")
        raise CommandFailed(argv, proc.returncode, stderr)
    return proc


def popen(argv: Sequence[str], **kwargs) -> subprocess.Popen:
    """Start argv without waiting; same tracing and environment as run()."""
    argv = [str(a) for a in argv]
    log.debug("+ %s &", shlex.join(argv))
    kwargs.setdefault("env", environment())
    try:
        return subprocess.Popen(argv, **kwargs)
    except FileNotFoundError as exc:
        raise Failed(f"{argv[0]}: command not found", hint="run `make setup` to install tupper's dependencies") from exc


def pid_alive(pid: int, starttime: int | None = None) -> bool:
    """True if `pid` runs and is not a zombie; with `starttime`, also that it is the same process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return False
    return starttime is None or int(fields[19]) == starttime


def pid_starttime(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def is_root() -> bool:
    return os.geteuid() == 0
