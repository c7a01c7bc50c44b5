"""File operations inside a container's root from the host, that never leave that root.

A container's root is the container's to change: while it runs, its processes can turn any directory
into a symlink (`/etc/systemd/system -> /etc/cron.d`), and an image from elsewhere can ship one. A
host-side `open(rootfs / "etc/systemd/system/x.service")` follows such a link on the HOST. Here every
path is resolved by the kernel with openat2(RESOLVE_IN_ROOT): symlinks and ".." resolve as they would
inside the container (the same rule nspawn, journalctl --root and systemd's chase() apply), atomically,
so a symlink swapped in at any moment still cannot point outside the root. The last component is
never followed when writing or removing: a symlink there is replaced or removed itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

_SYS_OPENAT2 = 437  # x86_64, aarch64 and every other architecture since Linux 5.6
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS) -> int:
    """openat2(2); retried on EAGAIN (a rename raced the lookup, which the kernel refuses to guess about)."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    raw = os.fsencode(path)
    for _ in range(64):
        fd = _libc.syscall(_SYS_OPENAT2, dirfd, raw, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, "the path kept changing while it was resolved", path)


@contextlib.contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


class Root:
    """One container root, held open as a directory fd; paths are relative to it ("/etc/x" == "etc/x")."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _split(rel: str) -> tuple[str, str]:
        parts = [p for p in rel.split("/") if p and p != "."]
        if not parts or parts[-1] == "..":
            raise ValueError(f"{rel!r}: not a path to an entry in the root")
        return "/".join(parts[:-1]) or ".", parts[-1]

    def open_dir(self, rel: str) -> int:
        """An O_PATH fd of directory `rel`, resolved inside the root (ENOENT, ENOTDIR if it is not one)."""
        return openat2(self.fd, rel.lstrip("/") or ".", os.O_PATH | os.O_DIRECTORY)

    def makedirs(self, rel: str, mode: int = 0o755) -> int:
        """Directory `rel` and its parents, created inside the root where missing (as `mkdir -p` would in the
        container); returns an O_PATH fd of it."""
        parts = [p for p in rel.split("/") if p and p != "."]
        fd = os.dup(self.fd)
        try:
            for i, part in enumerate(parts):
                prefix = "/".join(parts[: i + 1])
                try:
                    nxt = openat2(self.fd, prefix, os.O_PATH | os.O_DIRECTORY)
                except FileNotFoundError:
                    if part == "..":
                        raise
                    try:
                        os.mkdir(part, mode, dir_fd=fd)  # mkdirat never follows a symlink in its last component
                    except FileExistsError:
                        pass  # made meanwhile, or a dangling symlink: the open below says which
                    try:
                        nxt = openat2(self.fd, prefix, os.O_PATH | os.O_DIRECTORY)
                    except FileNotFoundError:
                        raise NotADirectoryError(errno.ENOTDIR, "a symlink to nothing inside the container's root "
                                                 "stands where a directory is needed", f"/{prefix}") from None
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    def write_text(self, rel: str, text: str, mode: int = 0o644) -> None:
        """Write `rel` (parents made as needed). A symlink in its place is replaced, never followed."""
        parent, name = self._split(rel)
        with _fd(self.makedirs(parent)) as dfd:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    os.unlink(name, dir_fd=dfd)  # a symlink, a fifo, a device: not ours to write through
            except FileNotFoundError:
                pass
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
            with open(fd, "w", encoding="utf-8") as f:
                os.fchmod(fd, mode)
                f.write(text)

    def touch(self, rel: str, mode: int = 0o644) -> None:
        """Regular file `rel`, made empty where missing (parents made as needed), its content kept where it
        exists: a mount point for a file. A symlink or a directory in its place is an error (ELOOP, EISDIR)."""
        parent, name = self._split(rel)
        with _fd(self.makedirs(parent)) as dfd:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=dfd))

    def read_text(self, rel: str) -> str | None:
        """The content of regular file `rel`; None where it is absent or not a regular file."""
        parent, name = self._split(rel)
        try:
            pfd = self.open_dir(parent)
        except (FileNotFoundError, NotADirectoryError):
            return None
        with _fd(pfd) as dfd:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            except (FileNotFoundError, OSError):
                return None
            with open(fd, encoding="utf-8", errors="replace") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return None
                return f.read()

    def unlink(self, rel: str) -> None:
        """Remove `rel` if it is a file or a symlink (the link itself); a missing path is fine."""
        parent, name = self._split(rel)
        try:
            pfd = self.open_dir(parent)
        except (FileNotFoundError, NotADirectoryError):
            return
        with _fd(pfd) as dfd:
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                pass  # a directory where a file was: not ours to remove

    def symlink(self, rel: str, target: str) -> None:
        """Make `rel` a symlink to `target` unless it already is a symlink (parents made as needed)."""
        parent, name = self._split(rel)
        with _fd(self.makedirs(parent)) as dfd:
            try:
                if stat.S_ISLNK(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                    return
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
            os.symlink(target, name, dir_fd=dfd)

    def exists(self, rel: str) -> bool:
        """Whether `rel` exists, following symlinks as the container would."""
        try:
            os.close(openat2(self.fd, rel.lstrip("/") or ".", os.O_PATH))
            return True
        except OSError:
            return False


DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def find_command(root: str | Path, command: str, path: str = DEFAULT_PATH) -> str | None:
    """The absolute path of `command` inside the root (searched on PATH unless it has a '/'), as systemd
    needs one; None where there is no such executable file."""
    with Root(root) as r:
        candidates = [command] if "/" in command else [f"{d}/{command}" for d in path.split(":")]
        for candidate in candidates:
            if not candidate.startswith("/"):
                return None  # relative to what? exec has no working directory to resolve it in
            try:
                fd = openat2(r.fd, candidate.lstrip("/"), os.O_PATH)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                return candidate
    return None
