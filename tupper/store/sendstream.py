"""Apply a btrfs send stream onto a plain directory, on any file system (ext4, xfs, tmpfs): how an image
exported from a btrfs store is imported into a store without btrfs, where `btrfs receive` cannot run.

The format (btrfs-progs kernel-shared/send.h, version 1: what `btrfs send` of btrfs-progs 6.2 writes)::

    header     "btrfs-stream\\0" and a le32 version
    commands   each: le32 length of its data, le16 command, le32 crc32c, then `length` bytes of TLVs
    TLV        le16 attribute, le16 length, value (integers le64, a timespec le64 s + le32 ns, uuids 16 bytes)

The crc is btrfs's: crc32c (Castagnoli) seeded with 0 and not inverted, over the command's header (its crc
field zeroed) and its data. It is checked for every command: in C by libext2fs' ext2fs_crc32c_le
(e2fsprogs, about 1.3 GB/s) where that library is there, else in Python (about 5 MB/s).

A stream makes one subvolume: it starts with SUBVOL (a full stream) or SNAPSHOT (incremental: the tree
the sender had as parent, changed), then creates entries under temporary names `o<ino>-<gen>-0`, renames,
links, writes, clones, sets owners, modes, xattrs and times, and ends with END. For an incremental stream
the parent tree is copied first (hard links, owners, modes, xattrs, times, device numbers and holes kept;
copy_file_range, which reflinks where the file system can), walked with the same openat2 rules as below.
Version 2 streams (`btrfs send --proto 2` or `--compressed-data`: encoded writes, fallocate, file flags)
are refused. A ctime cannot be set: it is the time of the apply.

The stream comes from another host and is not trusted. The rules here:

- Every path is relative to the tree being made; an absolute path, an empty component, "." or ".." is
  refused before anything is looked up. The empty path is the tree's root, for the commands that change an
  existing entry's owner, mode, times or xattrs.
- No symlink is ever followed, wherever it stands: a path's parent is opened with openat2(RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV) from a directory fd of the tree, and the last component is handled
  with the *at call that does not follow it (mkdirat, symlinkat, renameat, linkat without
  AT_SYMLINK_FOLLOW, fchownat/utimensat with AT_SYMLINK_NOFOLLOW). A symlink's target is only data.
- Data goes only into regular files: WRITE, CLONE and TRUNCATE open the entry O_PATH|O_NOFOLLOW, check it
  is a regular file, and only then reopen that very inode for writing (a device node is never opened).
  Modes and xattrs are set through such an O_PATH fd too; a symlink has neither (skipped, as Linux has no
  lchmod). CLONE copies only from a file of this tree or of the parent tree, named by their uuids.
- Xattrs named btrfs.* (file system properties) are skipped; overlayfs' own (trusted.overlay.*,
  user.overlay.*) are refused: the tree is to be an overlayfs layer and they would steer overlayfs.
- Anything malformed (bad magic, version, crc, lengths, attributes, a truncated command, no END, data after
  END, an unknown command, a second subvolume, another subvolume name) or refused raises StreamError with
  one line naming the command and path; so does any error of the file system while a command is applied.
  Nothing is written outside `into/name`, and every fd opened here is closed again.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from tupper.container.inroot import openat2

__all__ = ["StreamError", "apply", "crc32c"]

MAGIC = b"btrfs-stream\0"
VERSION = 1
MAX_CMD_V1 = 64 * 1024  # BTRFS_SEND_BUF_SIZE_V1: no v1 command (header included) is larger

_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_BENEATH = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_XDEV

_HEADER = struct.Struct("<13sI")
_CMD = struct.Struct("<IHI")
_TLV = struct.Struct("<HH")
_U64 = struct.Struct("<Q")
_TIMESPEC = struct.Struct("<qI")

# Commands (enum btrfs_send_cmd, version 1).
C_SUBVOL, C_SNAPSHOT, C_MKFILE, C_MKDIR, C_MKNOD, C_MKFIFO, C_MKSOCK, C_SYMLINK = 1, 2, 3, 4, 5, 6, 7, 8
C_RENAME, C_LINK, C_UNLINK, C_RMDIR, C_SET_XATTR, C_REMOVE_XATTR, C_WRITE, C_CLONE = 9, 10, 11, 12, 13, 14, 15, 16
C_TRUNCATE, C_CHMOD, C_CHOWN, C_UTIMES, C_END, C_UPDATE_EXTENT = 17, 18, 19, 20, 21, 22
CMD_NAMES = {1: "SUBVOL", 2: "SNAPSHOT", 3: "MKFILE", 4: "MKDIR", 5: "MKNOD", 6: "MKFIFO", 7: "MKSOCK", 8: "SYMLINK",
             9: "RENAME", 10: "LINK", 11: "UNLINK", 12: "RMDIR", 13: "SET_XATTR", 14: "REMOVE_XATTR", 15: "WRITE",
             16: "CLONE", 17: "TRUNCATE", 18: "CHMOD", 19: "CHOWN", 20: "UTIMES", 21: "END", 22: "UPDATE_EXTENT",
             23: "FALLOCATE", 24: "SETFLAGS", 25: "ENCODED_WRITE"}

# Attributes (BTRFS_SEND_A_*, version 1).
A_UUID, A_CTRANSID, A_INO, A_SIZE, A_MODE, A_UID, A_GID, A_RDEV = 1, 2, 3, 4, 5, 6, 7, 8
A_CTIME, A_MTIME, A_ATIME, A_OTIME, A_XATTR_NAME, A_XATTR_DATA = 9, 10, 11, 12, 13, 14
A_PATH, A_PATH_TO, A_PATH_LINK, A_FILE_OFFSET, A_DATA = 15, 16, 17, 18, 19
A_CLONE_UUID, A_CLONE_CTRANSID, A_CLONE_PATH, A_CLONE_OFFSET, A_CLONE_LEN = 20, 21, 22, 23, 24
A_MAX_V1 = 24
ATTR_NAMES = {1: "UUID", 2: "CTRANSID", 3: "INO", 4: "SIZE", 5: "MODE", 6: "UID", 7: "GID", 8: "RDEV", 9: "CTIME",
              10: "MTIME", 11: "ATIME", 12: "OTIME", 13: "XATTR_NAME", 14: "XATTR_DATA", 15: "PATH", 16: "PATH_TO",
              17: "PATH_LINK", 18: "FILE_OFFSET", 19: "DATA", 20: "CLONE_UUID", 21: "CLONE_CTRANSID", 22: "CLONE_PATH",
              23: "CLONE_OFFSET", 24: "CLONE_LEN"}


class StreamError(Exception):
    """The stream is malformed or unsafe, or a command of it could not be applied; one line says which."""


class _Bad(Exception):
    """A command's own problem; apply() names the command and path in front of it."""


# ---- crc32c ---------------------------------------------------------------------------------------


def _make_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def _crc32c_py(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """crc32c, table-driven in Python: about 5 MB/s (a minute for a 300 MB stream, measured), so only used
    where libext2fs is missing."""
    table = _TABLE
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def _load_ext2fs() -> Callable[[bytes | bytearray | memoryview, int], int] | None:
    """ext2fs_crc32c_le(seed, buf, len) of libext2fs (e2fsprogs, on every Debian system): the same raw
    crc32c (no inversion) in C, slice-by-8, about 1 GB/s."""
    try:
        lib = ctypes.CDLL("libext2fs.so.2")  # by soname: ctypes.util.find_library would run ldconfig
        fn = lib.ext2fs_crc32c_le
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_uint32
    fn.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_size_t]

    def crc(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
        if not isinstance(data, bytes):
            data = bytes(data)
        return int(fn(seed, data, len(data)))

    if crc(b"123456789", 0xFFFFFFFF) ^ 0xFFFFFFFF != 0xE3069283:  # the standard check value
        return None
    return crc


_crc32c_c = _load_ext2fs()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """btrfs' crc32c: Castagnoli, seeded with `crc` (btrfs send: 0), no final inversion; chains
    (crc32c(a + b) == crc32c(b, crc32c(a)))."""
    if _crc32c_c is not None:
        return _crc32c_c(data, crc)
    return _crc32c_py(data, crc)


# ---- paths ----------------------------------------------------------------------------------------


def _relpath(raw: bytes | memoryview, what: str = "path") -> str:
    """A stream path as a relative path, checked: "" is the tree's root."""
    raw = bytes(raw)
    if b"\0" in raw:
        raise _Bad(f"a NUL byte in the {what}")
    if not raw:
        return ""
    if raw.startswith(b"/"):
        raise _Bad(f"absolute {what} {os.fsdecode(raw)!r}")
    for part in raw.split(b"/"):
        if part in (b"", b".", b".."):
            raise _Bad(f"{what} {os.fsdecode(raw)!r} has an empty, '.' or '..' component")
    return os.fsdecode(raw)


def _split(rel: str) -> tuple[str, str]:
    if not rel:
        raise _Bad("the tree's root itself")
    head, _, last = rel.rpartition("/")
    return head or ".", last


def _open_beneath(root: int, rel: str, flags: int) -> int:
    """openat2 of `rel` beneath the directory fd `root`: no symlink followed, no '..', no mount crossed."""
    return openat2(root, rel or ".", flags, 0, _BENEATH)


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _open_regular(root: int, rel: str, flags: int) -> int:
    """Regular file `rel` beneath `root`, opened with `flags`: looked at through O_PATH first, so a symlink,
    a device or a fifo in its place is refused without ever being opened."""
    pfd = _open_beneath(root, rel, os.O_PATH | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(pfd).st_mode):
            raise _Bad(f"{rel!r} is not a regular file")
        if flags & os.O_ACCMODE == os.O_RDONLY:
            try:
                return os.open(_proc(pfd), flags | os.O_NOATIME | os.O_CLOEXEC)  # a copy keeps the source's atime
            except PermissionError:
                pass  # O_NOATIME needs CAP_FOWNER or the file's owner
        return os.open(_proc(pfd), flags | os.O_CLOEXEC)
    finally:
        os.close(pfd)


def _copy_range(src: int, src_off: int, dst: int, dst_off: int, length: int) -> int:
    """Copy up to `length` bytes (less at the source's end): copy_file_range (a reflink where the file system
    can), else read and write. Returns the bytes copied."""
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src, dst, min(length - done, 1 << 30), src_off + done, dst_off + done)
            if n == 0:
                return done
            done += n
        return done
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF):
            raise
    while done < length:
        chunk = os.pread(src, min(length - done, 1 << 20), src_off + done)
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            w = os.pwrite(dst, view, dst_off + done)
            view = view[w:]
            done += w
    return done


# ---- copying the parent tree ------------------------------------------------------------------------


def _copy_meta(sfd: int, dfd: int, name: str, st: os.stat_result) -> None:
    """Owner, xattrs, mode and times of `name` in `sfd` onto `name` in `dfd` (in that order: chown clears
    setuid bits and file capabilities)."""
    os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        src = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
        try:
            dst = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                for key in os.listxattr(_proc(src)):
                    os.setxattr(_proc(dst), key, os.getxattr(_proc(src), key))
                os.chmod(_proc(dst), stat.S_IMODE(st.st_mode))
            finally:
                os.close(dst)
        finally:
            os.close(src)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)


def _copy_file_data(src: int, dst: int, size: int) -> None:
    """The data of a regular file, holes kept holes (SEEK_DATA/SEEK_HOLE)."""
    off = 0
    while off < size:
        try:
            data = os.lseek(src, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break  # a hole up to the end
            raise
        hole = os.lseek(src, data, os.SEEK_HOLE)
        _copy_range(src, data, dst, data, hole - data)
        off = hole
    os.ftruncate(dst, size)


def _copy_tree(src_root: int, dst_root: int) -> None:
    """Copy the tree under directory fd `src_root` into the empty directory `dst_root`: hard links kept,
    owners, modes, xattrs, times and device numbers kept, no symlink followed. Iterative, holding two fds at
    a time, so a tree of any depth is copied."""
    links: dict[tuple[int, int], str] = {}
    dirs: list[tuple[str, os.stat_result]] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        sfd = _open_beneath(src_root, rel, os.O_RDONLY | os.O_DIRECTORY)
        try:
            dfd = _open_beneath(dst_root, rel, os.O_PATH | os.O_DIRECTORY)
            try:
                for name in sorted(os.listdir(sfd)):
                    st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
                    child = f"{rel}/{name}" if rel else name
                    mode = st.st_mode
                    if stat.S_ISDIR(mode):
                        os.mkdir(name, 0o700, dir_fd=dfd)
                        dirs.append((child, st))
                        stack.append(child)
                        continue
                    if st.st_nlink > 1:
                        first = links.setdefault((st.st_dev, st.st_ino), child)
                        if first != child:
                            head, last = _split(first)
                            lfd = _open_beneath(dst_root, head, os.O_PATH | os.O_DIRECTORY)
                            try:
                                os.link(last, name, src_dir_fd=lfd, dst_dir_fd=dfd, follow_symlinks=False)
                            finally:
                                os.close(lfd)
                            continue
                    if stat.S_ISREG(mode):
                        s = _open_regular(sfd, name, os.O_RDONLY)
                        try:
                            d = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
                            try:
                                _copy_file_data(s, d, os.fstat(s).st_size)
                            finally:
                                os.close(d)
                        finally:
                            os.close(s)
                    elif stat.S_ISLNK(mode):
                        os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
                    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                        os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dfd)
                    else:
                        raise _Bad(f"parent tree: {child!r} is of an unknown type")
                    _copy_meta(sfd, dfd, name, st)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
    # Directories last, deepest first: making their entries changed their times.
    for rel, st in reversed(dirs):
        head, last = _split(rel)
        sfd = _open_beneath(src_root, head, os.O_PATH | os.O_DIRECTORY)
        try:
            dfd = _open_beneath(dst_root, head, os.O_PATH | os.O_DIRECTORY)
            try:
                _copy_meta(sfd, dfd, last, st)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
    _copy_meta(src_root, dst_root, ".", os.fstat(src_root))


# ---- the stream -----------------------------------------------------------------------------------


class _Attrs:
    """A command's attributes, each read and checked on demand."""

    def __init__(self, values: dict[int, memoryview]) -> None:
        self.values = values

    def raw(self, attr: int) -> memoryview:
        try:
            return self.values[attr]
        except KeyError:
            raise _Bad(f"attribute {ATTR_NAMES[attr]} missing") from None

    def u64(self, attr: int) -> int:
        v = self.raw(attr)
        if len(v) != 8:
            raise _Bad(f"attribute {ATTR_NAMES[attr]} is {len(v)} bytes, not 8")
        return int(_U64.unpack(v)[0])

    def uuid(self, attr: int) -> bytes:
        v = self.raw(attr)
        if len(v) != 16:
            raise _Bad(f"attribute {ATTR_NAMES[attr]} is {len(v)} bytes, not 16")
        return bytes(v)

    def timespec(self, attr: int) -> int:
        v = self.raw(attr)
        if len(v) != _TIMESPEC.size:
            raise _Bad(f"attribute {ATTR_NAMES[attr]} is {len(v)} bytes, not {_TIMESPEC.size}")
        sec, nsec = _TIMESPEC.unpack(v)
        if nsec >= 1_000_000_000:
            raise _Bad(f"attribute {ATTR_NAMES[attr]} has {nsec} nanoseconds")
        return int(sec) * 1_000_000_000 + int(nsec)

    def path(self, attr: int = A_PATH) -> str:
        return _relpath(self.raw(attr))


def _read(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if data is None:
        data = b""
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


class _Applier:
    def __init__(self, into: Path, name: str, parent: Path | None) -> None:
        self.into, self.name, self.parent = into, name, parent
        self.into_fd = -1
        self.root = -1  # O_PATH fd of into/name, once made
        self.parent_fd = -1
        self.uuid = b""
        self.parent_uuid: bytes | None = None
        self.wpath: str | None = None  # the file WRITE last opened, kept open for the next WRITE
        self.wfd = -1
        self.handlers: dict[int, Callable[[_Attrs], None]] = {
            C_SUBVOL: self.subvol, C_SNAPSHOT: self.snapshot, C_MKFILE: self.mkfile, C_MKDIR: self.mkdir,
            C_MKNOD: self.mknod, C_MKFIFO: self.mkfifo, C_MKSOCK: self.mksock, C_SYMLINK: self.symlink,
            C_RENAME: self.rename, C_LINK: self.link, C_UNLINK: self.unlink, C_RMDIR: self.rmdir,
            C_SET_XATTR: self.set_xattr, C_REMOVE_XATTR: self.remove_xattr, C_WRITE: self.write,
            C_CLONE: self.clone, C_TRUNCATE: self.truncate, C_CHMOD: self.chmod, C_CHOWN: self.chown,
            C_UTIMES: self.utimes, C_UPDATE_EXTENT: lambda a: None,
        }

    def close(self) -> None:
        self.drop_writer()
        for attr in ("root", "parent_fd", "into_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    # -- the loop --

    def run(self, stream: BinaryIO) -> None:
        self.into_fd = os.open(self.into, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.stat(self.name, dir_fd=self.into_fd, follow_symlinks=False)
            raise FileExistsError(errno.EEXIST, "the tree to make exists already", str(self.into / self.name))
        except FileNotFoundError:
            pass
        head = _read(stream, _HEADER.size)
        if len(head) < _HEADER.size or not head.startswith(MAGIC):
            raise StreamError("not a btrfs send stream (no 'btrfs-stream' header)")
        version = _HEADER.unpack(head)[1]
        if version != VERSION:
            raise StreamError(f"btrfs send stream version {version} is not supported: only version 1 is "
                              "(btrfs send --proto 1, without --compressed-data)")
        index, offset = 0, _HEADER.size
        while True:
            hdr = _read(stream, _CMD.size)
            if not hdr:
                raise StreamError(f"the stream ends after {index} commands without END (truncated)")
            if len(hdr) < _CMD.size:
                raise StreamError(f"truncated: command {index} at byte {offset} has a partial header")
            length, cmd, crc = _CMD.unpack(hdr)
            cname = CMD_NAMES.get(cmd, f"command {cmd}")
            where = f"(command {index} at byte {offset})"
            if _CMD.size + length > MAX_CMD_V1:
                raise StreamError(f"{cname}: {length} bytes long, more than a version 1 command can be {where}")
            body = _read(stream, length)
            if len(body) < length:
                raise StreamError(f"truncated: {cname} of {length} bytes has only {len(body)} {where}")
            if crc32c(body, crc32c(hdr[:6] + b"\0\0\0\0")) != crc:
                raise StreamError(f"{cname}: crc32c mismatch, the stream is corrupt {where}")
            handler = self.handlers.get(cmd)
            if handler is None and cmd != C_END:
                version_2 = f" ({cname}, of version 2 streams)" if cmd in CMD_NAMES else ""
                raise StreamError(f"unknown command {cmd}{version_2} in a version 1 stream {where}")
            attrs = self.parse(cname, body, where)
            if handler is None:  # END
                if index == 0:
                    raise StreamError(f"END before SUBVOL or SNAPSHOT {where}")
                if _read(stream, 1):
                    raise StreamError(f"data after END {where}")
                return
            if index == 0 and cmd not in (C_SUBVOL, C_SNAPSHOT):
                raise StreamError(f"{cname}: the stream must start with SUBVOL or SNAPSHOT {where}")
            if index > 0 and cmd in (C_SUBVOL, C_SNAPSHOT):
                raise StreamError(f"{cname}: a second subvolume in the stream {where}")
            if cmd not in (C_WRITE, C_CLONE, C_TRUNCATE, C_UPDATE_EXTENT):
                self.drop_writer()
            try:
                handler(attrs)
            except (_Bad, OSError) as e:
                if isinstance(e, FileExistsError) and self.root < 0:
                    raise  # into/name was made meanwhile: not ours, not for the caller to remove
                raise StreamError(f"{cname} {self.describe(attrs)}: {self.reason(e)} {where}") from e
            index += 1
            offset += _CMD.size + length

    @staticmethod
    def parse(cname: str, body: bytes, where: str) -> _Attrs:
        values: dict[int, memoryview] = {}
        view = memoryview(body)
        pos = 0
        while pos < len(view):
            if len(view) - pos < _TLV.size:
                raise StreamError(f"truncated: {cname} has a partial attribute header {where}")
            kind, size = _TLV.unpack_from(view, pos)
            pos += _TLV.size
            if size > len(view) - pos:
                raise StreamError(f"truncated: {cname} attribute {ATTR_NAMES.get(kind, kind)} of {size} bytes is longer than the rest of the command {where}")
            if kind == 0 or kind > A_MAX_V1:
                raise StreamError(f"{cname}: unknown attribute {kind} {where}")
            if kind in values:
                raise StreamError(f"{cname}: attribute {ATTR_NAMES[kind]} twice {where}")
            values[kind] = view[pos:pos + size]
            pos += size
        return _Attrs(values)

    @staticmethod
    def describe(attrs: _Attrs) -> str:
        """The command's paths, for a message: 'a', or 'a' -> 'b' for RENAME, LINK and CLONE (from)."""
        out = []
        for attr, sep in ((A_PATH, ""), (A_PATH_TO, " -> "), (A_PATH_LINK, " -> "), (A_CLONE_PATH, " from ")):
            raw = attrs.values.get(attr)
            if raw is not None:
                out.append(sep + repr(os.fsdecode(bytes(raw))))
        return "".join(out) or "''"

    @staticmethod
    def reason(e: Exception) -> str:
        if isinstance(e, OSError):
            if e.errno == errno.ELOOP:
                return "a symlink in the way (the stream's paths never go through one)"
            if e.errno == errno.EXDEV:
                return "the path leaves the tree"
            return e.strerror or str(e)
        return str(e)

    # -- helpers --

    def at(self, rel: str) -> tuple[int, str]:
        """An O_PATH fd of `rel`'s parent directory (to close) and its last component."""
        head, last = _split(rel)
        return _open_beneath(self.root, head, os.O_PATH | os.O_DIRECTORY), last

    def do_at(self, rel: str, fn: Callable[[int, str], object]) -> None:
        fd, last = self.at(rel)
        try:
            fn(fd, last)
        finally:
            os.close(fd)

    def do_entry(self, rel: str, fn: Callable[[int, str], object]) -> None:
        """fn(dirfd, name) on `rel`, or on the tree's root for the empty path."""
        if not rel:
            fn(self.root, ".")
        else:
            self.do_at(rel, fn)

    def entry_fd(self, rel: str) -> int:
        """An O_PATH fd of `rel` itself (a symlink stays the symlink)."""
        return _open_beneath(self.root, rel, os.O_PATH | os.O_NOFOLLOW)

    def writer(self, rel: str) -> int:
        if self.wpath != rel:
            self.drop_writer()
            self.wfd = _open_regular(self.root, rel, os.O_WRONLY)
            self.wpath = rel
        return self.wfd

    def drop_writer(self) -> None:
        if self.wfd >= 0:
            os.close(self.wfd)
        self.wfd, self.wpath = -1, None

    def make_root(self, a: _Attrs) -> None:
        path = a.raw(A_PATH)
        if bytes(path) != os.fsencode(self.name):
            raise _Bad(f"the stream makes subvolume {os.fsdecode(bytes(path))!r}, not {self.name!r}")
        self.uuid = a.uuid(A_UUID)
        a.u64(A_CTRANSID)
        os.mkdir(self.name, 0o700, dir_fd=self.into_fd)
        self.root = os.open(self.name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.into_fd)

    # -- commands --

    def subvol(self, a: _Attrs) -> None:
        if self.parent is not None:
            raise _Bad("a full stream, but a parent tree was given for an incremental one")
        self.make_root(a)

    def snapshot(self, a: _Attrs) -> None:
        if self.parent is None:
            raise _Bad("an incremental stream, and no parent tree was given")
        self.parent_uuid = a.uuid(A_CLONE_UUID)
        a.u64(A_CLONE_CTRANSID)
        self.parent_fd = os.open(self.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.make_root(a)
        _copy_tree(self.parent_fd, self.root)

    def mkfile(self, a: _Attrs) -> None:
        a.u64(A_INO)
        self.do_at(a.path(), lambda d, n: os.close(os.open(n, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=d)))

    def mkdir(self, a: _Attrs) -> None:
        a.u64(A_INO)
        self.do_at(a.path(), lambda d, n: os.mkdir(n, 0o700, dir_fd=d))

    def mknod(self, a: _Attrs) -> None:
        a.u64(A_INO)
        mode, rdev = a.u64(A_MODE), a.u64(A_RDEV)
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK) or mode > 0o177777:
            raise _Bad(f"mode {mode:o} is not that of a device, fifo or socket")
        if rdev >> 32:
            raise _Bad(f"device number {rdev:#x} out of range")
        major, minor = (rdev >> 8) & 0xFFF, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)  # the kernel's new_encode_dev()
        self.do_at(a.path(), lambda d, n: os.mknod(n, kind | 0o600, os.makedev(major, minor), dir_fd=d))

    def mkfifo(self, a: _Attrs) -> None:
        a.u64(A_INO)
        self.do_at(a.path(), lambda d, n: os.mkfifo(n, 0o600, dir_fd=d))

    def mksock(self, a: _Attrs) -> None:
        a.u64(A_INO)
        self.do_at(a.path(), lambda d, n: os.mknod(n, stat.S_IFSOCK | 0o600, dir_fd=d))

    def symlink(self, a: _Attrs) -> None:
        a.u64(A_INO)
        target = bytes(a.raw(A_PATH_LINK))
        if not target or b"\0" in target:
            raise _Bad("an empty symlink target or one with a NUL byte")
        self.do_at(a.path(), lambda d, n: os.symlink(target, os.fsencode(n), dir_fd=d))

    def rename(self, a: _Attrs) -> None:
        src, dst = a.path(), a.path(A_PATH_TO)
        sfd, sname = self.at(src)
        try:
            dfd, dname = self.at(dst)
            try:
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    def link(self, a: _Attrs) -> None:
        new, existing = a.path(), a.path(A_PATH_LINK)  # PATH is made, a hard link to PATH_LINK
        efd, ename = self.at(existing)
        try:
            nfd, nname = self.at(new)
            try:
                os.link(ename, nname, src_dir_fd=efd, dst_dir_fd=nfd, follow_symlinks=False)
            finally:
                os.close(nfd)
        finally:
            os.close(efd)

    def unlink(self, a: _Attrs) -> None:
        self.do_at(a.path(), lambda d, n: os.unlink(n, dir_fd=d))

    def rmdir(self, a: _Attrs) -> None:
        self.do_at(a.path(), lambda d, n: os.rmdir(n, dir_fd=d))

    def xattr_name(self, a: _Attrs) -> str | None:
        raw = bytes(a.raw(A_XATTR_NAME))
        if not raw or b"\0" in raw:
            raise _Bad("an empty xattr name or one with a NUL byte")
        name = os.fsdecode(raw)
        if name.startswith(("trusted.overlay.", "user.overlay.")):
            raise _Bad(f"xattr {name!r} is overlayfs' own")
        if name.startswith("btrfs."):
            return None  # a btrfs property (btrfs.compression): nothing on another file system
        return name

    def set_xattr(self, a: _Attrs) -> None:
        path, name, value = a.path(), self.xattr_name(a), bytes(a.raw(A_XATTR_DATA))
        if name is None:
            return
        fd = self.entry_fd(path)
        try:
            if not stat.S_ISLNK(os.fstat(fd).st_mode):  # a symlink's xattrs: skipped (no safe lsetxattr by fd)
                os.setxattr(_proc(fd), name, value)
        finally:
            os.close(fd)

    def remove_xattr(self, a: _Attrs) -> None:
        path, name = a.path(), self.xattr_name(a)
        if name is None:
            return
        fd = self.entry_fd(path)
        try:
            if not stat.S_ISLNK(os.fstat(fd).st_mode):
                os.removexattr(_proc(fd), name)
        finally:
            os.close(fd)

    def write(self, a: _Attrs) -> None:
        path, offset, data = a.path(), a.u64(A_FILE_OFFSET), a.raw(A_DATA)
        if offset + len(data) > 1 << 62:
            raise _Bad(f"offset {offset} out of range")
        fd = self.writer(path)
        while data:
            n = os.pwrite(fd, data, offset)
            data, offset = data[n:], offset + n

    def clone(self, a: _Attrs) -> None:
        path, offset, length = a.path(), a.u64(A_FILE_OFFSET), a.u64(A_CLONE_LEN)
        uuid, src_path, src_offset = a.uuid(A_CLONE_UUID), a.path(A_CLONE_PATH), a.u64(A_CLONE_OFFSET)
        a.u64(A_CLONE_CTRANSID)
        if max(offset, src_offset) + length > 1 << 62:
            raise _Bad("range out of range")
        if uuid == self.uuid:
            src_root = self.root
        elif self.parent_uuid is not None and uuid == self.parent_uuid:
            src_root = self.parent_fd
        else:
            raise _Bad(f"clone source uuid {uuid.hex()} is neither this subvolume nor its parent")
        dst = self.writer(path)
        src = _open_regular(src_root, src_path, os.O_RDONLY)
        try:
            s, d = os.fstat(src), os.fstat(dst)
            if (s.st_dev, s.st_ino) == (d.st_dev, d.st_ino) and src_offset < offset + length and offset < src_offset + length:
                raise _Bad(f"clone within {src_path!r} onto an overlapping range")
            _copy_range(src, src_offset, dst, offset, length)
        finally:
            os.close(src)

    def truncate(self, a: _Attrs) -> None:
        path, size = a.path(), a.u64(A_SIZE)
        if size > 1 << 62:
            raise _Bad(f"size {size} out of range")
        os.ftruncate(self.writer(path), size)

    def chmod(self, a: _Attrs) -> None:
        path, mode = a.path(), a.u64(A_MODE)
        if mode & ~0o7777:
            raise _Bad(f"mode {mode:o} has more than permission bits")
        fd = self.entry_fd(path)
        try:
            if not stat.S_ISLNK(os.fstat(fd).st_mode):  # a symlink has no mode of its own
                os.chmod(_proc(fd), mode)
        finally:
            os.close(fd)

    def chown(self, a: _Attrs) -> None:
        path, uid, gid = a.path(), a.u64(A_UID), a.u64(A_GID)
        if uid >= 0xFFFFFFFF or gid >= 0xFFFFFFFF:
            raise _Bad(f"owner {uid}:{gid} out of range")
        self.do_entry(path, lambda d, n: os.chown(n, uid, gid, dir_fd=d, follow_symlinks=False))

    def utimes(self, a: _Attrs) -> None:
        path, atime, mtime = a.path(), a.timespec(A_ATIME), a.timespec(A_MTIME)
        a.timespec(A_CTIME)  # ctime cannot be set
        self.do_entry(path, lambda d, n: os.utime(n, ns=(atime, mtime), dir_fd=d, follow_symlinks=False))


def apply(stream: BinaryIO, into: Path, name: str, *, parent: Path | None = None) -> Path:
    """Apply the send stream read from `stream` (already decompressed) under directory `into`,
    making the tree `into / name` (which must not exist yet). A full stream starts with SUBVOL whose path
    must equal `name`; an incremental one starts with SNAPSHOT (path == name) and needs `parent`: the
    tree the stream was made against, copied first into `into/name` (preserving hard links, owners,
    modes, xattrs, times, devices; reflinked where the filesystem can: os.copy_file_range) and then
    changed by the stream. Returns into/name. Raises StreamError on anything malformed or unsafe (the
    caller removes into/name then).

    FileExistsError (not StreamError) where into/name exists already: it is not this call's to remove."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"{name!r} is not a name for a tree")
    applier = _Applier(Path(into), name, Path(parent) if parent is not None else None)
    try:
        applier.run(stream)
    finally:
        applier.close()
    return Path(into) / name
