"""Work in another process's network namespace without a process in it: a short-lived thread enters
the namespace with setns(2), does the work and ends (whatever namespace it is left in goes with it).
Sockets made there, netlink ones included, stay in that namespace after the thread is gone."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def same_netns(pid: int) -> bool:
    """Process `pid` is in our own network namespace."""
    try:
        a, b = os.stat(f"/proc/{pid}/ns/net"), os.stat("/proc/self/ns/net")
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"process {pid} is gone") from None
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def run_in(pid: int, fn: Callable[[], T]) -> T:
    """fn() in the network namespace of process `pid` (in this thread where that is ours)."""
    if same_netns(pid):
        return fn()
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    done: list[T] = []
    failed: list[BaseException] = []

    def enter() -> None:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            failed.append(OSError(err, f"cannot enter the network namespace of {pid}: {os.strerror(err)}"))
            return
        try:
            done.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            failed.append(exc)

    try:
        t = threading.Thread(target=enter, name=f"netns-{pid}")
        t.start()
        t.join()
    finally:
        os.close(target)
    if failed:
        raise failed[0]
    return done[0]
