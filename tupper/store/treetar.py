"""Image trees as tar: the payload of image streams from a store without btrfs (tupper.store.overlay).

An image there is a plain directory tree holding a whole root file system (setuid binaries, device
nodes, hard links, symlinks pointing anywhere, file capabilities in xattrs). `write` turns one into an
uncompressed POSIX.1-2001 (pax) tar, `extract` makes the tree again, into a plain directory or a btrfs
subvolume. Python's tarfile reads and writes the records, in stream mode (one pass, no seeking: a pipe
from or to zstd); every file system change is made here, never by tarfile's extraction.

Format
    Members come in a fixed order: the root "." first, then depth first, the names of a directory sorted
    by their bytes; equal trees give equal tars. Owners are numeric (uid/gid, no names), modes have all
    twelve bits (setuid, setgid, sticky), mtimes are kept to the nanosecond (a pax `mtime` record where
    they are not whole seconds). A hard-link group is a regular file then hard-link members naming it;
    symlinks are stored as they are; devices and fifos as such. Xattrs (security.capability, ACLs,
    user.*) are pax records `SCHILY.xattr.NAME`, their value the raw bytes, as GNU tar writes them (tarfile
    reads and writes them as UTF-8 with surrogate escapes, which gives back the same bytes). A socket has
    no tar form: `write` refuses a tree holding one.

    Full: every entry of the tree.

    Incremental (`write(..., parent=P)`): the first member is `.tupper-deleted`, a regular file (mode
    0600) listing the paths of P that are gone (NUL-separated, relative; a directory once, not its
    contents; a path whose type changed is listed, then written anew). Then only the entries that are new
    or differ from P's (type, mode, owner, size, mtime, link target, device, xattrs, or the paths of the
    hard-link group: a group is written whole when any of its members changed), and the directories
    holding them or a deleted path (so that their mtimes are made again). Contents are not compared: a
    file changed in place with its size and mtime restored is missed, as rsync would miss it.

Safety (`extract`: streams come from other hosts)
    * A member path is relative, without "." or ".." or empty components, not empty, without NUL;
      "." alone names the root; a path may appear once.
    * Nothing is written through a symlink: a member's directory is opened with openat2(RESOLVE_IN_ROOT |
      RESOLVE_NO_SYMLINKS) under a descriptor of the tree, and every entry is made by a *at call on that
      directory that does not follow its last component (O_NOFOLLOW, O_EXCL, AT_SYMLINK_NOFOLLOW). A
      member below a symlink (`l/x` where `l -> /etc` or `l -> ..`) is refused, and so is one whose
      directory is missing (parents come before their contents).
    * A hard link names a regular file this stream made before it (inside the tree by the rules above).
    * An existing entry (in an incremental extract, onto a copy of the parent) is removed, never written
      through: a regular file is unlinked and made anew (so a file hard-linked elsewhere, as a copy may
      be, is never changed), a directory kept if the member is one, else removed without following links.
    * `.tupper-deleted` paths obey the same rules; each entry itself is removed (a symlink unlinked, a
      directory removed without following links); one missing already is fine.
    * Device nodes are made only by root; owners and modes are applied exactly (chown before chmod, so
      setuid bits stay; xattrs after chown, which drops security.capability); xattrs
      `trusted.overlay.*` are refused (they would change how overlayfs shows the image as a lower layer).
    * Only the member types an image tree has: regular files, directories, symlinks, hard links, char
      and block devices, fifos. Sparse and unknown types, a truncated tar (one that does not end with the
      end-of-archive block), a damaged header, data after the end: TarError.
    On TarError, `into` holds whatever was made so far: the caller removes it.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import stat
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Self, cast

from tupper.container.inroot import RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, openat2

DELETED = ".tupper-deleted"
XATTR = "SCHILY.xattr."
REFUSED_XATTRS = ("trusted.overlay.",)
CHUNK = 1 << 20  # file contents are copied in pieces of this size
MAX_DELETED = 64 << 20  # the largest `.tupper-deleted` read (it names directories once, not their contents)
MAX_PADDING = 1 << 20  # zero bytes allowed after the end-of-archive block (tar pads to 10240)
RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_NS = 1_000_000_000
# tarfile's stream buffer: it copies what it holds on every read and write. Measured (a 300 MB file, a
# Debian image of 8500 entries): 10 KiB (its default) writes a large file at 0.4 GB/s, 64 KiB at 1.4 GB/s;
# 1 MiB is faster still there but slows headers (512 bytes each) by a third, on writing and on reading.
_STREAM_BUFSIZE = 64 << 10
# Errors of the host, not of the stream: passed on as they are.
_HOST_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM, errno.EMFILE, errno.ENFILE})
_MTIME_RE = re.compile(r"(-?)(\d{1,15})(?:\.(\d+))?")
_TYPES = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.CONTTYPE: "file", tarfile.DIRTYPE: "directory",
          tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "char device",
          tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo"}
# What tarfile.next() stopped at (not in typeshed): the end-of-archive block, or a header it could not read.
_EOF_HEADER: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_INVALID_HEADER: type[Exception] = tarfile.InvalidHeaderError  # type: ignore[attr-defined]


class TarError(Exception):
    """A tar that is not one `write` makes, or that would write outside its tree: one line naming the member."""


# ---- write ----------------------------------------------------------------------------------------


class _Entry:
    __slots__ = ("path", "full", "st", "target", "xattrs")

    def __init__(self, path: str, full: str) -> None:
        self.path = path  # "." or "a/b"
        self.full = full
        self.st = os.lstat(full)
        self.target = os.readlink(full) if stat.S_ISLNK(self.st.st_mode) else None
        self.xattrs = {} if self.target is not None else _read_xattrs(full)

    def key(self, group: tuple[str, ...]) -> tuple:
        """What an incremental tar compares (contents only by size and mtime)."""
        st = self.st
        is_reg = stat.S_ISREG(st.st_mode)
        rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
        return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size if is_reg else 0,
                st.st_mtime_ns, self.target, rdev, tuple(sorted(self.xattrs.items())), group)


def _read_xattrs(full: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(full, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    return {name: os.getxattr(full, name, follow_symlinks=False) for name in sorted(names)}


def _scan(root: Path) -> list[_Entry]:
    """The tree's entries in tar order: the root, then depth first, names sorted by their bytes."""
    top = _Entry(".", os.fspath(root))
    if not stat.S_ISDIR(top.st.st_mode):
        raise TarError(f"{str(root)!r}: not a directory")
    entries = [top]
    stack = [_children(top.full, "")]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        entry = _Entry(*item)
        entries.append(entry)
        if stat.S_ISDIR(entry.st.st_mode):
            stack.append(_children(entry.full, entry.path))
    return entries


def _children(full: str, rel: str) -> Iterator[tuple[str, str]]:
    names = sorted(os.listdir(full), key=os.fsencode)
    return iter([(f"{rel}/{name}" if rel else name, os.path.join(full, name)) for name in names])


def _link_groups(entries: Iterable[_Entry]) -> dict[str, tuple[str, ...]]:
    """Each hard-linked regular file's path -> the paths of its group in the tree (in tar order)."""
    by_inode: dict[tuple[int, int], list[str]] = {}
    for e in entries:
        if stat.S_ISREG(e.st.st_mode) and e.st.st_nlink > 1:
            by_inode.setdefault((e.st.st_dev, e.st.st_ino), []).append(e.path)
    return {path: tuple(paths) for paths in by_inode.values() if len(paths) > 1 for path in paths}


def _ancestors(path: str) -> Iterator[str]:
    """The directories holding `path`: ".", then each prefix ("a/b/c" -> ".", "a", "a/b")."""
    if path == ".":
        return
    yield "."
    parts = path.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


def write(root: Path, out: BinaryIO, *, parent: Path | None = None) -> None:
    """Write the tree at `root` as an uncompressed pax tar to `out` (a stream: written in one pass, never
    seeked; the caller compresses). With `parent`: an incremental tar holding what changed since `parent`
    (see the module). A tree this format cannot carry (a socket, an xattr name tar cannot hold) is TarError;
    errors reading the tree are passed on. On any error the tar is left without its end: unreadable."""
    entries = _scan(root)
    groups = _link_groups(entries)
    deleted: list[str] | None = None
    include: set[str] | None = None
    if parent is not None:
        old_entries = _scan(parent)
        old_groups = _link_groups(old_entries)
        old = {e.path: e.key(old_groups.get(e.path, ())) for e in old_entries}
        new_types = {e.path: stat.S_IFMT(e.st.st_mode) for e in entries}
        gone = {path for path, key in old.items() if new_types.get(path) != key[0]}
        deleted = [e.path for e in old_entries if e.path in gone and not any(a in gone for a in _ancestors(e.path))]
        changed = {e.path for e in entries if old.get(e.path) != e.key(groups.get(e.path, ()))}
        for path in list(changed):
            changed.update(groups.get(path, ()))
        include = set(changed)
        for path in [*changed, *deleted]:
            include.update(_ancestors(path))
    tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape",
                       bufsize=_STREAM_BUFSIZE)
    cast(Any, tar).copybufsize = CHUNK  # a TarFile argument tarfile.open passes on, missing from typeshed's open
    with tar:  # on an exception the end-of-archive blocks are not written: a reader sees a truncated tar
        if deleted is not None:
            listing = b"\0".join(os.fsencode(path) for path in deleted)
            info = _info(DELETED, tarfile.REGTYPE, 0o600, 0, 0, 0)
            info.size = len(listing)
            tar.addfile(info, io.BytesIO(listing))
        first_of: dict[tuple[int, int], str] = {}
        for e in entries:
            if include is None or e.path in include:
                _add(tar, e, first_of)
    out.flush()


def _info(name: str, kind: bytes, mode: int, uid: int, gid: int, mtime_ns: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.uname = info.gname = ""
    info.mtime = mtime_ns // _NS
    if mtime_ns % _NS:
        sign = "-" if mtime_ns < 0 else ""
        info.pax_headers = {"mtime": f"{sign}{abs(mtime_ns) // _NS}.{abs(mtime_ns) % _NS:09d}"}
    return info


def _add(tar: tarfile.TarFile, e: _Entry, first_of: dict[tuple[int, int], str]) -> None:
    st = e.st
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFREG and st.st_nlink > 1:
        first = first_of.setdefault((st.st_dev, st.st_ino), e.path)
        if first != e.path:
            link = tarfile.TarInfo(e.path)
            link.type, link.linkname, link.uname, link.gname = tarfile.LNKTYPE, first, "", ""
            link.mode, link.uid, link.gid, link.mtime = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns // _NS
            tar.addfile(link)
            return
    kinds = {stat.S_IFREG: tarfile.REGTYPE, stat.S_IFDIR: tarfile.DIRTYPE, stat.S_IFLNK: tarfile.SYMTYPE,
             stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE, stat.S_IFIFO: tarfile.FIFOTYPE}
    if fmt not in kinds:
        raise TarError(f"{e.path!r}: a socket: tar cannot carry one (remove it from the image)")
    info = _info(e.path, kinds[fmt], stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
    if e.xattrs:
        pax = dict(info.pax_headers)
        for name, value in e.xattrs.items():
            if not name or "=" in name or "\n" in name or not _utf8(name):
                raise TarError(f"{e.path!r}: xattr {name!r}: a name a pax record cannot hold")
            pax[XATTR + name] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = pax
    if fmt == stat.S_IFLNK:
        assert e.target is not None
        info.linkname = e.target
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    if fmt != stat.S_IFREG:
        tar.addfile(info)
        return
    info.size = st.st_size
    fd = os.open(e.full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb", buffering=0) as f:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino, now.st_size) != (st.st_dev, st.st_ino, st.st_size):
            raise TarError(f"{e.path!r}: changed while the tar was written")
        tar.addfile(info, f)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---- extract --------------------------------------------------------------------------------------


class _Info(tarfile.TarInfo):
    """Notes why tarfile stopped reading: it ends a stream quietly at a truncated or damaged header,
    not only at the end-of-archive block; the extract tells these apart."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> Self:
        try:
            info = super().fromtarfile(tar)
        except Exception as exc:
            tar._tupper_stop = exc  # type: ignore[attr-defined]
            raise
        tar._tupper_stop = None  # type: ignore[attr-defined]
        return info


def extract(stream: BinaryIO, into: Path) -> None:
    """Make the tree a tar from `write` holds in the existing directory `into`: empty for a full tar, a
    copy of the parent tree for an incremental one (`.tupper-deleted` applied first). The stream is read
    to its end. Whatever the stream does wrong, or would do outside `into`, is TarError (see the module);
    errors of the host (no space, I/O) are passed on as OSError."""
    root = os.open(into, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    ex = _Extractor(root)
    try:
        ex.run(stream)
    finally:
        ex.close()
        os.close(root)


class _Extractor:
    def __init__(self, root: int) -> None:
        self.root = root
        self.parent: tuple[str, int] | None = None  # the last member's directory, held open
        self.seen: set[str] = set()
        self.files: set[str] = set()  # regular files made: what a hard link may name
        self.dirs: list[tuple[str, int]] = []  # (path, mtime_ns), applied at the end
        self.is_root = os.geteuid() == 0

    def close(self) -> None:
        if self.parent is not None:
            os.close(self.parent[1])
            self.parent = None

    def run(self, stream: BinaryIO) -> None:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape", tarinfo=_Info,
                               bufsize=_STREAM_BUFSIZE)
        except tarfile.TarError as exc:
            raise TarError(f"not a tar, or one truncated at its start: {exc}") from None
        with tar:
            last, first = None, True
            while True:
                try:
                    member = tar.next()
                except tarfile.TarError as exc:
                    raise TarError(f"the tar is damaged or truncated after member {last!r}: {exc}") from None
                if member is None:
                    break
                cast(Any, tar).members.clear()  # tarfile keeps every member it read: not needed here
                try:
                    if first and member.name == DELETED:
                        self._deletions(tar, member)
                    else:
                        self._member(tar, member)
                except tarfile.TarError as exc:
                    raise TarError(f"tar member {member.name!r}: {exc} (truncated tar?)") from None
                except (ValueError, OverflowError) as exc:
                    raise TarError(f"tar member {member.name!r}: {exc}") from None
                except OSError as exc:
                    if exc.errno in _HOST_ERRNOS:
                        raise
                    raise TarError(f"tar member {member.name!r}: {exc.strerror or exc}") from None
                last, first = member.name, False
            stop = getattr(tar, "_tupper_stop", None)
            if isinstance(stop, _INVALID_HEADER):
                raise TarError(f"the tar is damaged: no valid header after member {last!r} ({stop})")
            if not isinstance(stop, _EOF_HEADER):
                raise TarError(f"the tar is truncated: it ends after member {last!r} without the end-of-archive block")
            self._rest(cast(BinaryIO, tar.fileobj))
        self._finish_dirs()

    @staticmethod
    def _rest(reader: BinaryIO) -> None:
        """What follows the end-of-archive block: zeros (padding to a record), then the stream's end."""
        total = 0
        while chunk := reader.read(64 << 10):
            total += len(chunk)
            if chunk.count(0) != len(chunk) or total > MAX_PADDING:
                raise TarError("data after the tar's end-of-archive block")

    # ---- members ----

    def _member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        name = m.name
        _check_path(name, f"tar member {name!r}", root_ok=True)
        if name in self.seen:
            raise TarError(f"tar member {name!r}: appears twice")
        self.seen.add(name)
        if m.type not in _TYPES or m.sparse is not None:
            raise TarError(f"tar member {name!r}: of type {m.type!r}{' (sparse)' if m.sparse is not None else ''}: not one an image tree has")
        if not m.isreg() and m.size:
            raise TarError(f"tar member {name!r}: a {_TYPES[m.type]} with {m.size} bytes of data")
        mode, uid, gid = m.mode & 0o7777, m.uid, m.gid
        for what, value in (("uid", uid), ("gid", gid)):
            if not 0 <= value < 0xFFFFFFFF:
                raise TarError(f"tar member {name!r}: {what} {value} out of range")
        mtime_ns = _mtime_ns(m)
        xattrs = _member_xattrs(m)
        if name == ".":
            if not m.isdir():
                raise TarError(f"tar member {name!r}: the root must be a directory, not a {_TYPES[m.type]}")
            fd = openat2(self.root, ".", os.O_RDONLY | os.O_DIRECTORY, resolve=_RESOLVE)
            try:
                _apply(fd, uid, gid, mode, xattrs)
            finally:
                os.close(fd)
            self.dirs.append((name, mtime_ns))
            return
        dirname, _, base = name.rpartition("/")
        pfd = self._dir(dirname, f"tar member {name!r}")
        if m.isdir():
            if not self._remove(pfd, base, keep_dir=True):
                os.mkdir(base, 0o700, dir_fd=pfd)
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                _apply(fd, uid, gid, mode, xattrs)
            finally:
                os.close(fd)
            self.dirs.append((name, mtime_ns))
        elif m.isreg():
            self._remove(pfd, base, keep_dir=False)
            fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            try:
                src = tar.extractfile(m)
                assert src is not None
                while chunk := src.read(CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                _apply(fd, uid, gid, mode, xattrs)
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)
            self.files.add(name)
        elif m.issym():
            if not m.linkname or "\0" in m.linkname:
                raise TarError(f"tar member {name!r}: a symlink to {m.linkname!r}")
            self._remove(pfd, base, keep_dir=False)
            os.symlink(m.linkname, base, dir_fd=pfd)
            os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False)
            os.utime(base, ns=(mtime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)
        elif m.islnk():
            self._link(m, pfd, dirname, base)
        else:
            self._node(m, pfd, base, uid, gid, mode, xattrs, mtime_ns)

    def _link(self, m: tarfile.TarInfo, pfd: int, dirname: str, base: str) -> None:
        target = m.linkname
        _check_path(target, f"tar member {m.name!r}: hard link target {target!r}", root_ok=False)
        if target not in self.files:
            raise TarError(f"tar member {m.name!r}: a hard link to {target!r}, which is no regular file of the tar before it")
        tdir, _, tbase = target.rpartition("/")
        sfd = pfd if tdir == dirname else self._open_dir(tdir, f"tar member {m.name!r}: hard link target {target!r}")
        try:
            if not stat.S_ISREG(os.stat(tbase, dir_fd=sfd, follow_symlinks=False).st_mode):
                raise TarError(f"tar member {m.name!r}: a hard link to {target!r}, which is no longer a regular file")
            self._remove(pfd, base, keep_dir=False)
            os.link(tbase, base, src_dir_fd=sfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            if sfd != pfd:
                os.close(sfd)

    def _node(self, m: tarfile.TarInfo, pfd: int, base: str, uid: int, gid: int, mode: int, xattrs: dict[str, bytes],
              mtime_ns: int) -> None:
        if m.isfifo():
            kind, device = stat.S_IFIFO, 0
        else:
            if not self.is_root:
                raise TarError(f"tar member {m.name!r}: a device node: only root can make one")
            kind, device = (stat.S_IFCHR if m.ischr() else stat.S_IFBLK), os.makedev(m.devmajor, m.devminor)
        self._remove(pfd, base, keep_dir=False)
        os.mknod(base, kind | 0o600, device, dir_fd=pfd)
        os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False)
        fd = os.open(base, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            if stat.S_IFMT(os.fstat(fd).st_mode) != kind:
                raise TarError(f"tar member {m.name!r}: replaced while it was made")
            path = f"/proc/self/fd/{fd}"  # an O_PATH descriptor: chmod and xattrs reach the node through procfs
            _set_xattrs(path, xattrs)
            os.chmod(path, mode)
        finally:
            os.close(fd)
        os.utime(base, ns=(mtime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)

    # ---- deletions ----

    def _deletions(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        if not m.isreg() or m.sparse is not None:
            raise TarError(f"tar member {DELETED!r}: not a regular file")
        if m.size > MAX_DELETED:
            raise TarError(f"tar member {DELETED!r}: {m.size} bytes (at most {MAX_DELETED})")
        src = tar.extractfile(m)
        assert src is not None
        listing = src.read()
        paths = listing.split(b"\0") if listing else []
        if paths and paths[-1] == b"":
            paths.pop()  # a terminating NUL
        for raw in paths:
            path = os.fsdecode(raw)
            _check_path(path, f"{DELETED}: {path!r}", root_ok=False)
            dirname, _, base = path.rpartition("/")
            try:
                pfd = openat2(self.root, dirname or ".", os.O_PATH | os.O_DIRECTORY, resolve=_RESOLVE)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue  # gone already
                if exc.errno == errno.ELOOP:
                    raise TarError(f"{DELETED}: {path!r}: {dirname!r} is a symlink in the tree: nothing is removed through one") from None
                raise
            try:
                self._remove(pfd, base, keep_dir=False)
            finally:
                os.close(pfd)

    # ---- helpers ----

    def _dir(self, dirname: str, what: str) -> int:
        """The member's directory, open; held until a member in another directory comes."""
        if not dirname:
            return self.root
        if self.parent is not None and self.parent[0] == dirname:
            return self.parent[1]
        fd = self._open_dir(dirname, what)
        self.close()
        self.parent = (dirname, fd)
        return fd

    def _open_dir(self, dirname: str, what: str) -> int:
        try:
            return openat2(self.root, dirname, os.O_PATH | os.O_DIRECTORY, resolve=_RESOLVE)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise TarError(f"{what}: {dirname!r} is a symlink in the tree: nothing is written through one") from None
            if exc.errno == errno.ENOENT:
                raise TarError(f"{what}: its directory {dirname!r} is not in the tree (it must come first)") from None
            if exc.errno == errno.ENOTDIR:
                raise TarError(f"{what}: {dirname!r} is not a directory in the tree") from None
            raise

    def _remove(self, pfd: int, base: str, *, keep_dir: bool) -> bool:
        """Remove entry `base` of directory `pfd` itself (True: a directory there, kept as asked)."""
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(base, dir_fd=pfd)
            return False
        if keep_dir:
            return True
        shutil.rmtree(base, dir_fd=pfd)  # descriptor-based: never follows a symlink inside
        return False

    def _finish_dirs(self) -> None:
        """Directory mtimes, once their contents are all made."""
        for path, mtime_ns in reversed(self.dirs):
            try:
                fd = openat2(self.root, path, os.O_RDONLY | os.O_DIRECTORY, resolve=_RESOLVE)
            except OSError as exc:
                if exc.errno in _HOST_ERRNOS:
                    raise
                raise TarError(f"tar member {path!r}: no longer a directory at the end (a later member replaced it)") from None
            try:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)


def _check_path(path: str, what: str, *, root_ok: bool) -> None:
    if path == "." and root_ok:
        return
    if not path:
        raise TarError(f"{what}: an empty name")
    if "\0" in path:
        raise TarError(f"{what}: a NUL in the name")
    if path.startswith("/"):
        raise TarError(f"{what}: an absolute path")
    parts = path.split("/")
    if ".." in parts:
        raise TarError(f"{what}: a '..' component")
    if "" in parts or "." in parts:
        raise TarError(f"{what}: an empty or '.' component")


def _mtime_ns(m: tarfile.TarInfo) -> int:
    raw = m.pax_headers.get("mtime")
    if raw is None:
        return int(m.mtime) * _NS
    match = _MTIME_RE.fullmatch(raw)
    if match is None:
        raise TarError(f"tar member {m.name!r}: mtime {raw!r} is not a number")
    sign, seconds, fraction = match.groups()
    ns = int(seconds) * _NS + int((fraction or "")[:9].ljust(9, "0"))
    return -ns if sign else ns


def _member_xattrs(m: tarfile.TarInfo) -> dict[str, bytes]:
    xattrs = {}
    for key, value in m.pax_headers.items():
        if not key.startswith(XATTR):
            continue
        name = key[len(XATTR):]
        if not name or "\0" in name:
            raise TarError(f"tar member {m.name!r}: xattr {name!r}: not a name")
        if name.startswith(REFUSED_XATTRS):
            raise TarError(f"tar member {m.name!r}: xattr {name!r}: overlayfs's own are refused")
        xattrs[name] = value.encode("utf-8", "surrogateescape")
    return xattrs if not m.issym() and not m.islnk() else {}


def _set_xattrs(target: int | str, xattrs: dict[str, bytes]) -> None:
    """Exactly `xattrs` on `target`: those missing set, others (a copy's, an inherited ACL) removed."""
    try:
        have = os.listxattr(target)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP) or xattrs:
            raise
        return
    for name in have:
        if name not in xattrs:
            os.removexattr(target, name)
    for name, value in xattrs.items():
        os.setxattr(target, name, value)


def _apply(fd: int, uid: int, gid: int, mode: int, xattrs: dict[str, bytes]) -> None:
    """Owner, xattrs, mode, in that order: chown drops setuid bits and security.capability."""
    os.chown(fd, uid, gid)
    _set_xattrs(fd, xattrs)
    os.chmod(fd, mode)
