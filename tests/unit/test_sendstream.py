"""tupper.store.sendstream: btrfs send streams made by hand (a small encoder here, with a crc32c of its own)
are applied onto a plain directory faithfully; malformed or unsafe ones are refused with StreamError, nothing
is written outside the target, and no fd is left open."""

from __future__ import annotations

import io
import os
import shutil
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tupper.store import sendstream
from tupper.store.sendstream import (
    A_ATIME,
    A_CLONE_CTRANSID,
    A_CLONE_LEN,
    A_CLONE_OFFSET,
    A_CLONE_PATH,
    A_CLONE_UUID,
    A_CTIME,
    A_CTRANSID,
    A_DATA,
    A_FILE_OFFSET,
    A_GID,
    A_INO,
    A_MODE,
    A_MTIME,
    A_PATH,
    A_PATH_LINK,
    A_PATH_TO,
    A_RDEV,
    A_SIZE,
    A_UID,
    A_UUID,
    A_XATTR_DATA,
    A_XATTR_NAME,
    C_CHMOD,
    C_CHOWN,
    C_CLONE,
    C_END,
    C_LINK,
    C_MKDIR,
    C_MKFIFO,
    C_MKFILE,
    C_MKNOD,
    C_MKSOCK,
    C_REMOVE_XATTR,
    C_RENAME,
    C_RMDIR,
    C_SET_XATTR,
    C_SNAPSHOT,
    C_SUBVOL,
    C_SYMLINK,
    C_TRUNCATE,
    C_UNLINK,
    C_UPDATE_EXTENT,
    C_UTIMES,
    C_WRITE,
    StreamError,
    apply,
)

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="chown and mknod need root")
UUID = bytes(range(16))
PARENT_UUID = bytes(range(16, 32))
FOREIGN_UUID = bytes(range(32, 48))
T1 = 1_600_000_000_123_456_789
T2 = 1_500_000_000_000_000_001


# ---- the encoder ----------------------------------------------------------------------------------


def _crc32c(data: bytes) -> int:
    """Bit by bit, independently of the module: Castagnoli, seed 0, no final inversion (btrfs' flavour)."""
    crc = 0
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("<HH", kind, len(value)) + value


def path(p: str, kind: int = A_PATH) -> bytes:
    return tlv(kind, p.encode())


def u64(kind: int, v: int) -> bytes:
    return tlv(kind, struct.pack("<Q", v))


def ts(kind: int, ns: int) -> bytes:
    return tlv(kind, struct.pack("<qI", ns // 1_000_000_000, ns % 1_000_000_000))


def cmd(c: int, *tlvs: bytes, crc: int | None = None) -> bytes:
    body = b"".join(tlvs)
    if crc is None:
        crc = _crc32c(struct.pack("<IHI", len(body), c, 0) + body)
    return struct.pack("<IHI", len(body), c, crc) + body


HEADER = b"btrfs-stream\0" + struct.pack("<I", 1)
END = cmd(C_END)


def subvol(name: str = "img", uuid: bytes = UUID) -> bytes:
    return cmd(C_SUBVOL, path(name), tlv(A_UUID, uuid), u64(A_CTRANSID, 7))


def snapshot(name: str = "img2", uuid: bytes = UUID, parent: bytes = PARENT_UUID) -> bytes:
    return cmd(C_SNAPSHOT, path(name), tlv(A_UUID, uuid), u64(A_CTRANSID, 9), tlv(A_CLONE_UUID, parent), u64(A_CLONE_CTRANSID, 7))


def mk(c: int, p: str, *more: bytes) -> bytes:
    return cmd(c, path(p), u64(A_INO, 300), *more)


def rename(a: str, b: str) -> bytes:
    return cmd(C_RENAME, path(a), path(b, A_PATH_TO))


def write(p: str, offset: int, data: bytes) -> bytes:
    return cmd(C_WRITE, path(p), u64(A_FILE_OFFSET, offset), tlv(A_DATA, data))


def chown(p: str, uid: int, gid: int) -> bytes:
    return cmd(C_CHOWN, path(p), u64(A_UID, uid), u64(A_GID, gid))


def chmod(p: str, mode: int) -> bytes:
    return cmd(C_CHMOD, path(p), u64(A_MODE, mode))


def utimes(p: str, atime: int, mtime: int) -> bytes:
    return cmd(C_UTIMES, path(p), ts(A_ATIME, atime), ts(A_MTIME, mtime), ts(A_CTIME, mtime))


def clone(p: str, offset: int, length: int, uuid: bytes, src: str, src_offset: int) -> bytes:
    return cmd(C_CLONE, path(p), u64(A_FILE_OFFSET, offset), u64(A_CLONE_LEN, length), tlv(A_CLONE_UUID, uuid),
               u64(A_CLONE_CTRANSID, 7), path(src, A_CLONE_PATH), u64(A_CLONE_OFFSET, src_offset))


def stream(*cmds: bytes, header: bytes = HEADER) -> io.BytesIO:
    return io.BytesIO(header + b"".join(cmds))


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def into(tmp_path: Path) -> Path:
    d = tmp_path / "into"
    d.mkdir()
    return d


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A directory outside `into`: nothing may appear in it or change."""
    d = tmp_path / "sentinel"
    d.mkdir()
    (d / "file").write_text("keep\n")
    os.chmod(d / "file", 0o644)
    return d


def snapshot_of(d: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(d):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            content = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out[str(p.relative_to(d))] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, content, sorted(os.listxattr(p, follow_symlinks=False)))
    return out


def full_stream(name: str = "img") -> list[bytes]:
    """Much of what btrfs send emits for a small tree: temporary o<ino>-<gen>-0 names renamed in place."""
    data = bytes(range(256)) * 300  # 76800 bytes: two WRITEs, as send splits them
    return [
        subvol(name),
        chown("", 0, 0), chmod("", 0o755),
        mk(C_MKDIR, "o257-7-0"), rename("o257-7-0", "d"), chown("d", 0, 0), chmod("d", 0o750),
        mk(C_MKDIR, "o258-7-0"), rename("o258-7-0", "d/e"),
        mk(C_MKFILE, "o259-7-0"), rename("o259-7-0", "d/f"),
        write("d/f", 0, data[:49152]), write("d/f", 49152, data[49152:]),
        cmd(C_SET_XATTR, path("d/f"), tlv(A_XATTR_NAME, b"user.x"), tlv(A_XATTR_DATA, b"val")),
        cmd(C_SET_XATTR, path("d/f"), tlv(A_XATTR_NAME, b"user.gone"), tlv(A_XATTR_DATA, b"1")),
        cmd(C_REMOVE_XATTR, path("d/f"), tlv(A_XATTR_NAME, b"user.gone")),
        cmd(C_SET_XATTR, path("d/f"), tlv(A_XATTR_NAME, b"btrfs.compression"), tlv(A_XATTR_DATA, b"zstd")),
        chown("d/f", 1000, 1001), chmod("d/f", 0o640), utimes("d/f", T2, T1),
        cmd(C_LINK, path("hard"), path("d/f", A_PATH_LINK)),
        mk(C_MKFILE, "o260-7-0"), rename("o260-7-0", "su"), write("su", 0, b"#!/bin/sh\n"),
        chown("su", 0, 0), chmod("su", 0o4755),
        mk(C_MKFILE, "o261-7-0"), rename("o261-7-0", "copy"),
        clone("copy", 0, 4096, UUID, "d/f", 4096), cmd(C_UPDATE_EXTENT, path("copy"), u64(A_FILE_OFFSET, 0), u64(A_SIZE, 10)),
        mk(C_MKFILE, "o262-7-0"), rename("o262-7-0", "sparse"), write("sparse", 1 << 20, b"end"),
        cmd(C_TRUNCATE, path("sparse"), u64(A_SIZE, 2 << 20)),
        mk(C_SYMLINK, "o263-7-0", path("/etc/passwd", A_PATH_LINK)), rename("o263-7-0", "abs"), chown("abs", 5, 6),
        mk(C_SYMLINK, "o264-7-0", path("../nowhere", A_PATH_LINK)), rename("o264-7-0", "d/dangling"),
        mk(C_MKFIFO, "o265-7-0"), rename("o265-7-0", "fifo"), chmod("fifo", 0o644),
        mk(C_MKNOD, "o266-7-0", u64(A_MODE, stat.S_IFCHR | 0o644), u64(A_RDEV, 0x103)), rename("o266-7-0", "null"),
        chmod("null", 0o666),
        mk(C_MKSOCK, "o267-7-0"), rename("o267-7-0", "sock"),
        mk(C_MKFILE, "o268-7-0"), rename("o268-7-0", "gone"), cmd(C_UNLINK, path("gone")),
        mk(C_MKDIR, "o269-7-0"), cmd(C_RMDIR, path("o269-7-0")),
        utimes("d/e", T1, T2), utimes("d", T1, T1), utimes("", T2, T2),
        END,
    ]


# ---- faithful -------------------------------------------------------------------------------------


def test_crc32c_is_btrfs_flavour() -> None:
    data = os.urandom(5000)
    assert sendstream.crc32c(data) == _crc32c(data) == sendstream._crc32c_py(data)
    assert sendstream.crc32c(data[3000:], sendstream.crc32c(data[:3000])) == _crc32c(data)
    assert sendstream.crc32c(b"123456789", 0xFFFFFFFF) ^ 0xFFFFFFFF == 0xE3069283  # the standard check value


@needs_root
def test_full_stream_applies(into: Path) -> None:
    before = fds()
    out = apply(stream(*full_stream()), into, "img")
    assert out == into / "img" and fds() == before
    data = bytes(range(256)) * 300
    st = os.stat(out)
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_mtime_ns == T2
    assert stat.S_IMODE(os.stat(out / "d").st_mode) == 0o750 and os.stat(out / "d").st_mtime_ns == T1
    assert os.stat(out / "d/e").st_mtime_ns == T2
    f = os.stat(out / "d/f")
    assert (out / "d/f").read_bytes() == data
    assert (stat.S_IMODE(f.st_mode), f.st_uid, f.st_gid, f.st_mtime_ns, f.st_atime_ns) == (0o640, 1000, 1001, T1, T2)
    assert os.getxattr(out / "d/f", "user.x") == b"val" and sorted(os.listxattr(out / "d/f")) == ["user.x"]
    assert os.stat(out / "hard").st_ino == f.st_ino and f.st_nlink == 2
    assert stat.S_IMODE(os.stat(out / "su").st_mode) == 0o4755
    assert (out / "copy").read_bytes() == data[4096:8192]
    sparse = os.stat(out / "sparse")
    assert sparse.st_size == 2 << 20 and sparse.st_blocks * 512 < 1 << 20
    assert (out / "sparse").read_bytes()[1 << 20:(1 << 20) + 3] == b"end"
    assert os.readlink(out / "abs") == "/etc/passwd" and os.lstat(out / "abs").st_uid == 5
    assert os.readlink(out / "d/dangling") == "../nowhere"
    assert stat.S_ISFIFO(os.stat(out / "fifo").st_mode) and stat.S_IMODE(os.stat(out / "fifo").st_mode) == 0o644
    null = os.stat(out / "null")
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_ISSOCK(os.stat(out / "sock").st_mode)
    assert sorted(os.listdir(out)) == ["abs", "copy", "d", "fifo", "hard", "null", "sock", "sparse", "su"]


@needs_root
def test_incremental_stream_on_a_copy_of_its_parent(tmp_path: Path, into: Path) -> None:
    parent = apply(stream(*full_stream("parent")), tmp_path, "parent", parent=None)
    os.setxattr(parent / "d/e", "user.dir", b"1")
    os.utime(parent / "d/e", ns=(T1, T1))
    was = snapshot_of(parent)
    before = fds()
    out = apply(stream(
        snapshot("img2", UUID, PARENT_UUID),
        write("d/f", 0, b"CHANGED"),
        mk(C_MKFILE, "o300-9-0"), rename("o300-9-0", "d/new"),
        clone("d/new", 0, 100, PARENT_UUID, "d/f", 0),  # from the parent: its data as it was
        rename("copy", "copy2"), cmd(C_UNLINK, path("sock")), chmod("su", 0o755),
        cmd(C_LINK, path("d/hard3"), path("hard", A_PATH_LINK)),
        utimes("d", T2, T2), utimes("", T1, T1),
        END,
    ), into, "img2", parent=parent)
    assert fds() == before
    assert snapshot_of(parent) == was, "the parent tree changed"
    data = bytes(range(256)) * 300
    assert (out / "d/f").read_bytes() == b"CHANGED" + data[7:]
    assert (out / "d/new").read_bytes() == data[:100]
    assert os.stat(out / "d/f").st_ino == os.stat(out / "hard").st_ino == os.stat(out / "d/hard3").st_ino
    assert os.stat(out / "hard").st_nlink == 3
    assert sorted(os.listdir(out)) == ["abs", "copy2", "d", "fifo", "hard", "null", "sparse", "su"]
    assert stat.S_IMODE(os.stat(out / "su").st_mode) == 0o755
    # what the stream did not touch is copied with everything: owners, modes, xattrs, times, devices, holes
    same = {k: v for k, v in snapshot_of(out).items() if k in ("abs", "fifo", "null", "d/e", "d/dangling", "sparse")}
    assert same == {k: v for k, v in was.items() if k in same} and len(same) == 6
    assert os.getxattr(out / "d/e", "user.dir") == b"1" and os.stat(out / "d/e").st_mtime_ns == T1
    assert os.stat(out / "sparse").st_blocks * 512 < 1 << 20
    assert stat.S_IMODE(os.stat(out / "d").st_mode) == 0o750 and os.stat(out / "d").st_mtime_ns == T2
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755 and os.stat(out).st_mtime_ns == T1


def test_the_tree_must_not_exist(into: Path) -> None:
    (into / "img").mkdir()
    (into / "img" / "mine").write_text("x")
    with pytest.raises(FileExistsError):
        apply(stream(subvol(), END), into, "img")
    assert (into / "img" / "mine").read_text() == "x"


# ---- refused --------------------------------------------------------------------------------------

BAD: dict[str, tuple[Callable[[str], list[bytes]], str]] = {
    "dotdot": (lambda S: [subvol(), mk(C_MKDIR, "d"), mk(C_MKFILE, "d/../../escape")], "'..'"),
    "absolute": (lambda S: [subvol(), mk(C_MKFILE, "/escape")], "absolute"),
    "empty component": (lambda S: [subvol(), mk(C_MKDIR, "d"), mk(C_MKFILE, "d//x")], "empty"),
    "through a symlink": (lambda S: [subvol(), mk(C_MKDIR, "d"), mk(C_SYMLINK, "d/l", path(S, A_PATH_LINK)), mk(C_MKFILE, "d/l/x")], "symlink"),
    "relative symlink": (lambda S: [subvol(), mk(C_SYMLINK, "l", path("../../sentinel", A_PATH_LINK)), mk(C_MKFILE, "l/x")], "symlink"),
    "rename through a symlink": (lambda S: [subvol(), mk(C_SYMLINK, "l", path(S, A_PATH_LINK)), mk(C_MKFILE, "f"), rename("f", "l/f")], "symlink"),
    "link through a symlink": (lambda S: [subvol(), mk(C_SYMLINK, "l", path(S, A_PATH_LINK)), cmd(C_LINK, path("x"), path("l/file", A_PATH_LINK))], "symlink"),
    "write to a symlink": (lambda S: [subvol(), mk(C_SYMLINK, "l", path(S + "/file", A_PATH_LINK)), write("l", 0, b"owned")], "not a regular file"),
    "truncate a symlink": (lambda S: [subvol(), mk(C_SYMLINK, "l", path(S + "/file", A_PATH_LINK)), cmd(C_TRUNCATE, path("l"), u64(A_SIZE, 0))], "not a regular file"),
    "write to a device": (lambda S: [subvol(), mk(C_MKNOD, "n", u64(A_MODE, stat.S_IFCHR | 0o600), u64(A_RDEV, 0x103)), write("n", 0, b"x")], "not a regular file"),
    "chmod through a symlink": (lambda S: [subvol(), mk(C_SYMLINK, "l", path(S, A_PATH_LINK)), chmod("l/file", 0o777)], "symlink"),
    "utimes through a symlink": (lambda S: [subvol(), mk(C_SYMLINK, "l", path(S, A_PATH_LINK)), utimes("l/file", 0, 0)], "symlink"),
    "clone from a foreign uuid": (lambda S: [subvol(), mk(C_MKFILE, "f"), clone("f", 0, 10, FOREIGN_UUID, "f", 0)], "neither this subvolume nor its parent"),
    "clone from a symlink": (lambda S: [subvol(), mk(C_SYMLINK, "l", path(S + "/file", A_PATH_LINK)), mk(C_MKFILE, "f"), clone("f", 0, 5, UUID, "l", 0)], "'l' is not a regular file"),
    "another name": (lambda S: [subvol("other")], "makes subvolume 'other'"),
    "subvol with a path": (lambda S: [subvol("../img")], "makes subvolume"),
    "a second subvol": (lambda S: [subvol(), subvol()], "second subvolume"),
    "no subvol first": (lambda S: [mk(C_MKFILE, "f")], "must start with SUBVOL"),
    "snapshot without parent": (lambda S: [snapshot("img")], "no parent tree"),
    "unknown command": (lambda S: [subvol(), cmd(99, path("f"))], "unknown command 99"),
    "a version 2 command": (lambda S: [subvol(), cmd(23, path("f"))], "FALLOCATE"),
    "unknown attribute": (lambda S: [subvol(), cmd(C_MKFILE, path("f"), tlv(40, b"x"))], "unknown attribute 40"),
    "short u64": (lambda S: [subvol(), cmd(C_MKFILE, path("f"), tlv(A_INO, b"\1\2"))], "not 8"),
    "missing attribute": (lambda S: [subvol(), cmd(C_MKFILE, u64(A_INO, 1))], "attribute PATH missing"),
    "bad crc": (lambda S: [subvol(), cmd(C_MKFILE, path("f"), u64(A_INO, 1), crc=1234)], "crc32c mismatch"),
    "missing END": (lambda S: [subvol(), mk(C_MKFILE, "f")], "without END"),
    "data after END": (lambda S: [subvol(), END, b"x"], "after END"),
    "overlay xattr": (lambda S: [subvol(), mk(C_MKDIR, "d"), cmd(C_SET_XATTR, path("d"), tlv(A_XATTR_NAME, b"trusted.overlay.opaque"), tlv(A_XATTR_DATA, b"y"))], "overlayfs"),
    "rmdir the root": (lambda S: [subvol(), cmd(C_RMDIR, path(""))], "root"),
    "mknod of a directory": (lambda S: [subvol(), mk(C_MKNOD, "n", u64(A_MODE, stat.S_IFDIR | 0o755), u64(A_RDEV, 0))], "not that of a device"),
    "chmod with type bits": (lambda S: [subvol(), mk(C_MKFILE, "f"), chmod("f", stat.S_IFREG | 0o644)], "more than permission bits"),
    "nul in a path": (lambda S: [subvol(), mk(C_MKFILE, "f\0g")], "NUL"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_refused(case: str, into: Path, sentinel: Path) -> None:
    make, message = BAD[case]
    cmds = make(str(sentinel))
    before_fds, before = fds(), snapshot_of(sentinel)
    with pytest.raises(StreamError, match=message) as err:
        apply(stream(*cmds), into, "img")
    assert "\n" not in str(err.value)
    assert fds() == before_fds, "an fd was left open"
    assert snapshot_of(sentinel) == before, "something outside the tree changed"
    assert sorted(os.listdir(into.parent)) == sorted(["into", "sentinel"])
    assert os.listdir(into) in ([], ["img"])


def test_truncated(into: Path) -> None:
    whole = HEADER + subvol() + mk(C_MKFILE, "f") + END
    for cut, message in ((len(whole) - 1, "truncated: command 2"), (len(whole) - len(END) - 3, "truncated: MKFILE"),
                         (len(HEADER) + 5, "truncated: command 0"), (len(HEADER) + len(subvol()), "without END"),
                         (8, "not a btrfs send stream")):
        before = fds()
        (into / str(cut)).mkdir()
        with pytest.raises(StreamError, match=message):
            apply(io.BytesIO(whole[:cut]), into / str(cut), "img")
        assert fds() == before


def test_attribute_longer_than_its_command(into: Path) -> None:
    body = struct.pack("<HH", A_PATH, 200) + b"f"
    bad = struct.pack("<IHI", len(body), C_MKFILE, _crc32c(struct.pack("<IHI", len(body), C_MKFILE, 0) + body)) + body
    with pytest.raises(StreamError, match="truncated"):
        apply(stream(subvol(), bad), into, "img")


def test_header_and_version(into: Path) -> None:
    with pytest.raises(StreamError, match="not a btrfs send stream"):
        apply(io.BytesIO(b"tar-stream\0\0\0\0\0\0\0"), into, "a")
    with pytest.raises(StreamError, match="version 2 is not supported"):
        apply(stream(subvol(), END, header=b"btrfs-stream\0" + struct.pack("<I", 2)), into, "b")
    with pytest.raises(StreamError, match="without END"):
        apply(stream(), into, "c")
    assert os.listdir(into) == []


def test_oversized_command(into: Path) -> None:
    big = cmd(C_WRITE, path("f"), u64(A_FILE_OFFSET, 0), tlv(A_DATA, b"x" * 65530))
    with pytest.raises(StreamError, match="more than a version 1 command"):
        apply(stream(subvol(), big), into, "img")


def test_symlink_metadata_never_reaches_its_target(into: Path, sentinel: Path) -> None:
    """chmod and xattrs of a symlink are skipped; chown and utimes change the link itself."""
    before = snapshot_of(sentinel)
    cmds = [subvol(), mk(C_SYMLINK, "l", path(str(sentinel / "file"), A_PATH_LINK)), chmod("l", 0o777),
            cmd(C_SET_XATTR, path("l"), tlv(A_XATTR_NAME, b"user.x"), tlv(A_XATTR_DATA, b"v")), utimes("l", T1, T1)]
    if ROOT:
        cmds.append(chown("l", 4242, 4242))
    out = apply(stream(*cmds, END), into, "img")
    assert snapshot_of(sentinel) == before
    assert os.lstat(out / "l").st_mtime_ns == T1
    if ROOT:
        assert os.lstat(out / "l").st_uid == 4242


def test_a_deep_parent_is_copied(tmp_path: Path, into: Path) -> None:
    """The parent's copy walks without recursion and holds few fds: deeper than Python's recursion limit."""
    parent = tmp_path / "parent"
    parent.mkdir()
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1100):  # Path.mkdir(parents=True) itself recurses
        os.mkdir("d", dir_fd=fd)
        fd, old = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
        os.close(old)
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    before = fds()
    try:
        out = apply(stream(snapshot("img"), END), into, "img", parent=parent)
        assert fds() == before
        assert os.stat(os.path.join(out, *["d"] * 1100, "f")).st_size == 0
    finally:
        for top in (parent, into / "img"):
            _remove_deep(top)


def _remove_deep(top: Path) -> None:
    """Remove a chain top/d/d/d/...: shutil.rmtree recurses too, so the chain is shortened from the top."""
    while (top / "d").exists():
        if (top / "d" / "d").exists():
            os.rename(top / "d" / "d", top / "x")
            shutil.rmtree(top / "d")
            os.rename(top / "x", top / "d")
        else:
            shutil.rmtree(top / "d")


def test_refused_incremental(tmp_path: Path, into: Path) -> None:
    """A stream that does not match what the caller says it is, or clones from elsewhere, is refused after
    the parent's copy as before it: fds closed, the parent untouched."""
    parent = tmp_path / "parent"
    (parent / "d").mkdir(parents=True)
    (parent / "d/f").write_text("parent data")
    before = fds()
    with pytest.raises(StreamError, match="a parent tree was given"):
        apply(stream(subvol("a"), END), into, "a", parent=parent)
    with pytest.raises(StreamError, match="neither this subvolume nor its parent"):
        apply(stream(snapshot("b"), mk(C_MKFILE, "g"), clone("g", 0, 4, FOREIGN_UUID, "d/f", 0), END), into, "b", parent=parent)
    with pytest.raises(StreamError, match="symlink"):
        apply(stream(snapshot("c"), mk(C_SYMLINK, "l", path(str(parent), A_PATH_LINK)), write("l/d/f", 0, b"owned"), END),
              into, "c", parent=parent)
    assert fds() == before
    assert (parent / "d/f").read_text() == "parent data" and sorted(os.listdir(parent)) == ["d"]
