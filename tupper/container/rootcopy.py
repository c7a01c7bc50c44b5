"""`tupper cp`: files and directories copied into and out of a container's root, never leaving it.

The container's side is reached through tupper.container.inroot: the path the user gives is resolved
with openat2(RESOLVE_IN_ROOT), so a symlink on the way (absolute, or `../../..`) resolves as it would
inside the container and can never lead to the host's files. Below that, both sides are walked one
entry at a time relative to directory fds, with O_NOFOLLOW: a symlink met while copying is copied as
a symlink, never followed, and a symlink where a file or directory is to be written is refused.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath

import attrs

from tupper.container.inroot import Root, openat2
from tupper.errors import InvalidInput

# Kernel API file systems: copying `/` out of a running container does not descend into them.
API_DIRS = frozenset({"/proc", "/sys", "/dev"})
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@attrs.define
class CopyResult:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[str] = attrs.Factory(list)  # special files (devices, fifos, sockets) and API file systems

    def to_json(self) -> dict:
        return attrs.asdict(self)


def container_path(path: str, where: str) -> str:
    """A path in the container as the user gave it: absolute, no '..'; returned relative to the root."""
    if not path.startswith("/"):
        raise InvalidInput(f"{where}: {path!r} must be an absolute path in the container")
    if ".." in PurePosixPath(path).parts:
        raise InvalidInput(f"{where}: {path!r} must not contain '..'")
    if "\0" in path:
        raise InvalidInput(f"{where}: a path cannot contain a NUL character")
    return "/".join(p for p in path.split("/") if p and p != ".")


def copy_out(root: Root, path: str, dest: str, where: str, root_name: str = "rootfs") -> CopyResult:
    """Copy `path` of the container (its root: `root`) to `dest` on the host (into it, if it is a directory;
    `root_name` is the name a copy of the root itself gets there)."""
    rel = container_path(path, where)
    result = CopyResult()
    src_dir, src_name, name = _container_source(root, rel, path, where, root_name)
    try:
        dst_dir, dst_name, shown = _host_dest(dest, name)
        try:
            _copy(src_dir, src_name, dst_dir, dst_name, where, shown, result, out=True)
        finally:
            os.close(dst_dir)
    finally:
        os.close(src_dir)
    return result


def copy_in(src: str, root: Root, path: str, where: str) -> CopyResult:
    """Copy `src` from the host to `path` in the container (into it, if it is a directory there)."""
    rel = container_path(path, where)
    result = CopyResult()
    src_dir, src_name, name = _host_source(src)
    try:
        dst_dir, dst_name, shown = _container_dest(root, rel, name, path, where)
        try:
            _copy(src_dir, src_name, dst_dir, dst_name, src, shown, result, out=False)
        finally:
            os.close(dst_dir)
    finally:
        os.close(src_dir)
    return result


# ---- where each side starts: a directory fd and a name in it ------------------------------------------

_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def _container_source(root: Root, rel: str, path: str, where: str, root_name: str) -> tuple[int, str, str]:
    """(directory fd, entry name, the name a copy gets) of the container's side. The last component is
    not followed (a symlink is copied as one) unless the path ends with '/' or is the root itself."""
    try:
        if not rel or path.endswith("/"):
            fd = openat2(root.fd, rel or ".", os.O_PATH | os.O_DIRECTORY)
            return fd, ".", rel.rsplit("/", 1)[-1] if rel else root_name
        parent, name = rel.rsplit("/", 1) if "/" in rel else (".", rel)
        fd = root.open_dir(parent)
    except OSError as exc:
        if exc.errno not in _MISSING:
            raise
        raise InvalidInput(f"{where}: no such {'directory' if path.endswith('/') else 'file or directory'} in the container") from None
    try:
        os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        os.close(fd)
        raise InvalidInput(f"{where}: no such file or directory in the container") from None
    return fd, name, name


def _container_dest(root: Root, rel: str, name: str, path: str, where: str) -> tuple[int, str, str]:
    """(directory fd, entry name, how to show it) to write to: into `path` where it is a directory (as
    the container resolves it), else `path` itself, in its parent."""
    try:
        return openat2(root.fd, rel or ".", os.O_PATH | os.O_DIRECTORY), name, f"{where.rstrip('/')}/{name}"
    except OSError as exc:
        if exc.errno not in _MISSING:
            raise
        if not rel or path.endswith("/"):
            raise InvalidInput(f"{where}: no such directory in the container") from None
    parent, last = rel.rsplit("/", 1) if "/" in rel else (".", rel)
    try:
        return root.open_dir(parent), last, where
    except OSError as exc:
        if exc.errno not in _MISSING:
            raise
        raise InvalidInput(f"{where}: no such directory /{parent} in the container") from None


def _host_source(src: str) -> tuple[int, str, str]:
    if not os.path.lexists(src):
        raise InvalidInput(f"{src}: no such file or directory")
    p = Path(src)
    if src.endswith("/") or p.name in ("", ".", ".."):
        if not p.is_dir():
            raise InvalidInput(f"{src}: not a directory")
        return os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), ".", Path(os.path.realpath(p)).name or "root"
    return os.open(p.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), p.name, p.name


def _host_dest(dest: str, name: str) -> tuple[int, str, str]:
    p = Path(dest)
    if p.is_dir():
        return os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), name, os.path.join(dest, name)
    if dest.endswith("/"):
        raise InvalidInput(f"{dest}: no such directory")
    if not p.parent.is_dir():
        raise InvalidInput(f"{dest}: no such directory {p.parent}")
    return os.open(p.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), p.name, dest


# ---- the copy: one entry, relative to directory fds, nothing followed ----------------------------------


def _kind(mode: int) -> str:
    return "a directory" if stat.S_ISDIR(mode) else "a symlink" if stat.S_ISLNK(mode) else "a file" if stat.S_ISREG(mode) else "a special file"


def _copy(sdir: int, sname: str, ddir: int, dname: str, src: str, dst: str, result: CopyResult, *, out: bool, top: bool = True) -> None:
    st = os.stat(sname, dir_fd=sdir, follow_symlinks=False)
    try:
        there: os.stat_result | None = os.stat(dname, dir_fd=ddir, follow_symlinks=False)
    except FileNotFoundError:
        there = None
    mode = stat.S_IMODE(st.st_mode) & (0o777 if out else 0o7777)  # no set-uid file lands on the host
    if stat.S_ISDIR(st.st_mode):
        if out and not top and src.partition(":")[2] in API_DIRS:  # src: NAME:/PATH
            result.skipped.append(src)
            return
        if there is None:
            os.mkdir(dname, 0o700, dir_fd=ddir)
        elif not stat.S_ISDIR(there.st_mode):
            raise InvalidInput(f"{dst}: exists as {_kind(there.st_mode)}; {src} is a directory")
        sfd = os.open(sname, _DIR, dir_fd=sdir)
        try:
            dfd = os.open(dname, _DIR, dir_fd=ddir)
            try:
                with os.scandir(sfd) as entries:
                    names = sorted(e.name for e in entries)
                for entry in names:
                    _copy(sfd, entry, dfd, entry, _join(src, entry), _join(dst, entry), result, out=out, top=False)
                os.fchmod(dfd, mode)
                os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        result.directories += 1
    elif stat.S_ISREG(st.st_mode):
        if there is not None and not stat.S_ISREG(there.st_mode):
            raise InvalidInput(f"{dst}: exists as {_kind(there.st_mode)}; {src} is a file")
        sfd = os.open(sname, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=sdir)
        try:
            if not stat.S_ISREG(os.fstat(sfd).st_mode):  # swapped since the stat above
                raise InvalidInput(f"{src}: changed while it was copied")
            flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if there is not None else os.O_CREAT | os.O_EXCL)
            dfd = os.open(dname, flags, 0o600, dir_fd=ddir)
            try:
                while chunk := os.read(sfd, 1 << 20):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(dfd, view):]
                    result.bytes += len(chunk)
                os.fchmod(dfd, mode)
                os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        result.files += 1
    elif stat.S_ISLNK(st.st_mode):
        target = os.readlink(sname, dir_fd=sdir)
        if there is not None:
            if not stat.S_ISLNK(there.st_mode):
                raise InvalidInput(f"{dst}: exists as {_kind(there.st_mode)}; {src} is a symlink")
            os.unlink(dname, dir_fd=ddir)
        os.symlink(target, dname, dir_fd=ddir)
        result.symlinks += 1
    else:
        if top:
            raise InvalidInput(f"{src}: a special file (device, fifo or socket): tupper cp copies files, directories and symlinks")
        result.skipped.append(src)


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"
