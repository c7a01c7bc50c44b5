"""Which process the OOM killer killed, and in which cgroup: the kernel says it in its log, one record
per kill (`oom-kill:constraint=CONSTRAINT_MEMCG,…,oom_memcg=/…/web-1,task_memcg=/…/web-1/hog,task=hog,
pid=13135,uid=0`). The counters (memory.events, memory.oom_control) only count; tupperd reads these
records from /dev/kmsg when a counter moves, to say which process died and in which component.
"""

from __future__ import annotations

import errno
import os

import attrs

KMSG = "/dev/kmsg"


@attrs.frozen
class OOMKill:
    pid: int  # in the host's PID namespace
    task: str  # the process's name (comm)
    memcg: str  # the cgroup whose limit was hit, as a path in its hierarchy ("/a/b")
    task_memcg: str  # the cgroup the killed process was in


def parse(record: str) -> OOMKill | None:
    """One /dev/kmsg record ("PRI,SEQ,USEC,FLAGS;MESSAGE"), or a dmesg line's message: the OOM kill it
    reports, or None."""
    message = record.split(";", 1)[1] if ";" in record.split(" ", 1)[0] else record
    message = message.split("\n", 1)[0].strip()
    if not message.startswith("oom-kill:"):
        return None
    fields: dict[str, str] = {}
    for part in message[len("oom-kill:"):].split(","):
        key, sep, value = part.partition("=")
        if sep:
            fields[key] = value
    try:
        return OOMKill(pid=int(fields["pid"]), task=fields.get("task", ""), memcg=fields.get("oom_memcg", ""),
                       task_memcg=fields.get("task_memcg", ""))
    except (KeyError, ValueError):
        return None


def below(path: str, top: str) -> str | None:
    """The first path element of `path` below `top` ("" for `top` itself), None when it is elsewhere."""
    top = top.rstrip("/")
    if path == top:
        return ""
    if not path.startswith(top + "/"):
        return None
    return path[len(top) + 1:].split("/", 1)[0]


class KernelLog:
    """The kernel's log from the moment it is opened on: OOM kill records as they come."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls) -> KernelLog:
        fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.lseek(fd, 0, os.SEEK_END)  # what happened before is not ours to report
        return cls(fd)

    def oom_kills(self) -> list[OOMKill]:
        """The OOM kills logged since the last call (never blocks)."""
        out: list[OOMKill] = []
        while True:
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # records were overwritten before we read them: go on with the next
                    continue
                raise
            if not record:
                return out
            kill = parse(record.decode("utf-8", "replace"))
            if kill is not None:
                out.append(kill)

    def close(self) -> None:
        os.close(self.fd)
