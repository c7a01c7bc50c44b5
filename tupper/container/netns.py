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
    try:
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"process {pid} is gone") from None
    try:
        return run_in_fd(target, fn, f"process {pid}")
    finally:
        os.close(target)


def run_in_fd(target: int, fn: Callable[[], T], what: str = "a container") -> T:
    """fn() in the network namespace open as file descriptor `target`, in a thread of its own."""
    done: list[T] = []
    failed: list[BaseException] = []

    def enter() -> None:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            failed.append(OSError(err, f"cannot enter the network namespace of {what}: {os.strerror(err)}"))
            return
        try:
            done.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            failed.append(exc)

    t = threading.Thread(target=enter, name="netns")
    t.start()
    t.join()
    if failed:
        raise failed[0]
    return done[0]


def new() -> int:
    """A new, empty network namespace (only a loopback, down), as an open file descriptor: it lives
    while the descriptor is open or a process is in it (systemd-nspawn joins it by path)."""
    fds: list[int] = []
    failed: list[OSError] = []

    def make() -> None:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            failed.append(OSError(err, f"cannot make a network namespace: {os.strerror(err)}"))
            return
        fds.append(os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC))

    t = threading.Thread(target=make, name="netns-new")
    t.start()
    t.join()
    if failed:
        raise failed[0]
    return fds[0]
