"""tupper.store.treetar: image trees as tar streams, full and incremental; whatever an untrusted stream
holds, nothing is made outside the tree it is extracted into."""

from __future__ import annotations

import io
import os
import random
import shutil
import stat
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from tupper.store import treetar
from tupper.store.imagestream import tree_digest
from tupper.store.treetar import TarError, extract, write

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="owners, devices and security xattrs need root")
REAL_IMAGE = Path("/var/lib/tupper-test/images/debian-bookworm")
ODD = os.fsdecode(b"odd \xff\xfe name\nwith a newline")
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service=ep (VFS_CAP_REVISION_2)
BIG = 3 * 1024 * 1024 + 17


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _set_times(root: Path, when: int = 1_700_000_000_123_456_789) -> None:
    """Fixed mtimes on every entry, deepest first (so a directory's is not changed after it is set)."""
    for top, dirs, files in os.walk(root, topdown=False):
        for name in files + dirs:
            os.utime(os.path.join(top, name), ns=(when, when), follow_symlinks=False)
            when += 1_000_001
        os.utime(top, ns=(when, when))
        when += 1


def build(root: Path) -> Path:
    """A small root file system with every kind of entry an image has."""
    root.mkdir()
    (root / "etc/deep/er/still").mkdir(parents=True)
    (root / "etc/deep/er/still/file").write_text("deep\n")
    (root / "etc/empty").write_bytes(b"")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/big").write_bytes(random.Random(BIG).randbytes(BIG))
    su = root / "usr/bin/su"
    su.write_bytes(b"#!/bin/sh\necho su\n")
    su.chmod(0o4755)
    ping = root / "usr/bin/ping"
    ping.write_bytes(b"ping")
    ping.chmod(0o755)
    os.setxattr(ping, "security.capability", CAPABILITY)
    owned = root / "etc/owned"
    owned.write_text("mine\n")
    os.chown(owned, 1234, 5678)
    owned.chmod(0o640)
    os.link(root / "usr/bin/su", root / "usr/bin/su-again")
    os.link(root / "usr/bin/su", root / "etc/su-link")
    os.symlink("/etc/passwd", root / "etc/abs-link")
    os.symlink("/nowhere/at/all", root / "etc/dangling")
    os.symlink("deep/er", root / "etc/dir-link")
    os.symlink("../../..", root / "etc/up-link")
    (root / "dev").mkdir()
    os.mkfifo(root / "dev/fifo", 0o620)
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    os.setxattr(root / "etc/owned", "user.note", b"a \x00 binary \xff value")
    os.setxattr(root / "etc/deep", "user.dir", b"on a directory")
    os.setxattr(root / "etc/deep", "user.empty", b"")
    (root / "with space").mkdir()
    (root / "with space" / ODD).write_text("odd\n")
    (root / "é utf-8").write_text("é\n")
    shifted = root / "etc/shifted"  # owners past the 7 octal digits of a ustar header: in pax records
    shifted.write_text("from a user namespace\n")
    os.chown(shifted, 3_000_000, 3_000_001)
    _set_times(root)
    os.utime(root / "etc/empty", ns=(-1_500_000_000, -1_500_000_000))  # before 1970, not whole seconds
    return root


def _xattrs(root: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for top, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                out[os.path.relpath(path, root)] = {n: os.getxattr(path, n) for n in sorted(os.listxattr(path))}
    return out


def _mtimes(root: Path) -> dict[str, int]:
    out = {}
    for top, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = os.path.join(top, name)
            out[os.path.relpath(path, root)] = os.lstat(path).st_mtime_ns
    return out


def _link_groups(root: Path) -> set[frozenset[str]]:
    by_inode: dict[int, set[str]] = {}
    for top, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(top, name))
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                by_inode.setdefault(st.st_ino, set()).add(os.path.relpath(os.path.join(top, name), root))
    return {frozenset(paths) for paths in by_inode.values()}


def assert_same(a: Path, b: Path) -> None:
    assert tree_digest(a) == tree_digest(b)
    assert _xattrs(a) == _xattrs(b)
    assert _mtimes(a) == _mtimes(b)
    assert _link_groups(a) == _link_groups(b)


def _tar(tree: Path, **kwargs) -> bytes:
    out = io.BytesIO()
    write(tree, out, **kwargs)
    return out.getvalue()


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|", encoding="utf-8", errors="surrogateescape") as tar:
        return list(tar)


# ---- round trip ---------------------------------------------------------------------------------


@NEEDS_ROOT
def test_a_tree_comes_back_whole(tmp_path):
    src = build(tmp_path / "src")
    data = _tar(src)
    dst = tmp_path / "dst"
    dst.mkdir()
    fds = _open_fds()
    extract(io.BytesIO(data), dst)
    assert _open_fds() == fds
    assert_same(src, dst)
    assert os.stat(dst / "usr/bin/su").st_mode == stat.S_IFREG | 0o4755
    assert os.getxattr(dst / "usr/bin/ping", "security.capability") == CAPABILITY
    assert (os.stat(dst / "etc/owned").st_uid, os.stat(dst / "etc/owned").st_gid) == (1234, 5678)
    assert os.readlink(dst / "etc/up-link") == "../../.."
    assert stat.S_ISFIFO(os.lstat(dst / "dev/fifo").st_mode)
    assert os.lstat(dst / "dev/null").st_rdev == os.makedev(1, 3)
    assert (dst / "usr/bin/big").read_bytes() == (src / "usr/bin/big").read_bytes()
    assert (dst / "with space" / ODD).read_text() == "odd\n"


@NEEDS_ROOT
def test_the_tar_is_deterministic_numeric_and_in_order(tmp_path):
    src = build(tmp_path / "src")
    data = _tar(src)
    assert data == _tar(src)
    members = _members(data)
    names = [m.name for m in members]
    assert names[0] == "."
    assert names.index("etc") < names.index("etc/abs-link") < names.index("etc/deep") < names.index("etc/deep/er/still/file") < names.index("etc/dir-link")
    assert all(m.uname == "" and m.gname == "" for m in members)
    links = {m.name: m.linkname for m in members if m.islnk()}
    assert links == {"usr/bin/su": "etc/su-link", "usr/bin/su-again": "etc/su-link"}
    owned = next(m for m in members if m.name == "etc/owned")
    assert owned.pax_headers["SCHILY.xattr.user.note"].encode("utf-8", "surrogateescape") == b"a \x00 binary \xff value"
    assert owned.pax_headers["mtime"].endswith(str(os.lstat(src / "etc/owned").st_mtime_ns % 10**9).rjust(9, "0"))


def test_a_socket_is_refused_by_write(tmp_path):
    import socket

    root = tmp_path / "t"
    root.mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "sock"))
        with pytest.raises(TarError, match="'sock': a socket"):
            _tar(root)


# ---- incremental --------------------------------------------------------------------------------


def change(root: Path) -> None:
    (root / "é utf-8").write_text("longer now\n")  # modified
    (root / "etc/empty").unlink()  # deleted file
    shutil.rmtree(root / "etc/deep/er")  # deleted directory with contents (and the symlink into it dangles)
    os.rename(root / "etc/owned", root / "etc/owned-renamed")  # renamed
    (root / "usr/bin/new").write_text("new\n")  # added
    (root / "usr/bin/ping").chmod(0o700)  # chmod (keeps its capability)
    shutil.rmtree(root / "with space")  # a directory becomes a file
    (root / "with space").write_text("now a file\n")
    (root / "usr/bin/su-again").unlink()  # a file becomes a symlink
    os.symlink("su", root / "usr/bin/su-again")
    os.link(root / "usr/bin/new", root / "etc/new-link")  # a new hard link
    os.setxattr(root / "dev", "user.added", b"later")  # an xattr on a directory


@NEEDS_ROOT
def test_an_incremental_tar_carries_the_changes_only(tmp_path):
    old = build(tmp_path / "old")
    new = build(tmp_path / "new")
    assert tree_digest(old) == tree_digest(new)
    change(new)
    full = _tar(new)
    inc = _tar(new, parent=old)
    print(f"\nfull {len(full)} bytes, incremental {len(inc)} bytes ({100 * len(inc) / len(full):.2f}%)")
    assert len(inc) < len(full) / 20
    members = _members(inc)
    assert members[0].name == treetar.DELETED and members[0].mode == 0o600
    deleted = _members(inc)[0]
    with tarfile.open(fileobj=io.BytesIO(inc), mode="r|") as tar:
        first = tar.next()
        assert first is not None and first.name == deleted.name
        f = tar.extractfile(first)
        assert f is not None
        listed = set(f.read().split(b"\0"))
    assert listed == {b"etc/empty", b"etc/deep/er", b"etc/owned", b"with space", b"usr/bin/su-again"}
    names = {m.name for m in members}
    assert "usr/bin/big" not in names and "etc/abs-link" not in names  # unchanged
    assert {"usr/bin/new", "etc/new-link", "etc/owned-renamed", "usr/bin/ping", "usr/bin", "etc", "."} <= names

    target = build(tmp_path / "target")
    big_inode = os.stat(target / "usr/bin/big").st_ino
    fds = _open_fds()
    extract(io.BytesIO(inc), target)
    assert _open_fds() == fds
    assert_same(new, target)
    assert os.stat(target / "usr/bin/big").st_ino == big_inode  # not rewritten
    assert os.getxattr(target / "usr/bin/ping", "security.capability") == CAPABILITY


@NEEDS_ROOT
def test_an_unchanged_tree_gives_an_empty_incremental(tmp_path):
    old = build(tmp_path / "old")
    new = build(tmp_path / "new")
    inc = _tar(new, parent=old)
    assert [m.name for m in _members(inc)] == [treetar.DELETED]
    target = build(tmp_path / "target")
    extract(io.BytesIO(inc), target)
    assert_same(new, target)


@NEEDS_ROOT
def test_a_hard_link_group_split_is_written_whole(tmp_path):
    old = build(tmp_path / "old")
    new = build(tmp_path / "new")
    # etc/su-link becomes a file of its own with the very same contents, mode and mtime: only the group changed
    st = os.stat(new / "etc/su-link")
    os.unlink(new / "etc/su-link")
    shutil.copy2(new / "usr/bin/su", new / "etc/su-link")
    os.utime(new / "etc/su-link", ns=(st.st_mtime_ns, st.st_mtime_ns))
    inc = _tar(new, parent=old)
    assert {m.name for m in _members(inc) if m.isreg() or m.islnk()} == {treetar.DELETED, "etc/su-link", "usr/bin/su", "usr/bin/su-again"}
    target = build(tmp_path / "target")
    extract(io.BytesIO(inc), target)
    assert_same(new, target)


# ---- refusals -----------------------------------------------------------------------------------


def _info(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = "", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mode = kind, len(data), linkname, mode
    return info, data


def _raw_tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def _state(d: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for top, dirs, files in os.walk(d):
        for name in dirs + files:
            p = os.path.join(top, name)
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_mtime_ns, os.readlink(p) if os.path.islink(p) else Path(p).read_bytes() if stat.S_ISREG(st.st_mode) else None)
    return out


@pytest.fixture
def arena(tmp_path):
    """`into` (empty) beside a sentinel directory `outside`: nothing outside `into` may change."""
    work = tmp_path / "work"
    (work / "outside").mkdir(parents=True)
    (work / "outside/x").write_text("keep me\n")
    (work / "outside/passwd").write_text("root:x:0:0\n")
    into = work / "into"
    into.mkdir()

    def refused(data: bytes, says: str) -> None:
        before = _state(work / "outside"), sorted(os.listdir(work)), sorted(os.listdir(tmp_path))
        fds = _open_fds()
        with pytest.raises(TarError, match=says) as caught:
            extract(io.BytesIO(data), into)
        assert "\n" not in str(caught.value)
        assert _open_fds() == fds
        assert (_state(work / "outside"), sorted(os.listdir(work)), sorted(os.listdir(tmp_path))) == before

    return work, into, refused


ROOT = _info(".", tarfile.DIRTYPE, mode=0o755)


@pytest.mark.parametrize("name, says", [
    ("../evil", "'../evil': a '..' component"),
    ("/abs", "'/abs': an absolute path"),
    ("a/../../x", "'a/../../x': a '..' component"),
    ("./x", "an empty or '.' component"),
    ("a//b", "an empty or '.' component"),
])
def test_paths_out_of_the_tree_are_refused(arena, name, says):
    _, _, refused = arena
    refused(_raw_tar(ROOT, _info("a", tarfile.DIRTYPE), _info(name, data=b"evil")), says)


def test_nothing_is_written_through_a_symlink(arena):
    work, into, refused = arena
    outside = str(work / "outside")
    refused(_raw_tar(ROOT, _info("l", tarfile.SYMTYPE, linkname=outside), _info("l/x", data=b"evil")),
            r"'l/x': 'l' is a symlink in the tree")
    shutil.rmtree(into)
    into.mkdir()
    refused(_raw_tar(ROOT, _info("l", tarfile.SYMTYPE, linkname=".."), _info("l/x", data=b"evil")),
            r"'l/x': 'l' is a symlink in the tree")
    shutil.rmtree(into)
    into.mkdir()
    refused(_raw_tar(ROOT, _info("l", tarfile.SYMTYPE, linkname=".."), _info("l/outside", tarfile.DIRTYPE)),
            r"'l/outside': 'l' is a symlink")
    # a symlink already in the tree (an incremental onto a copy holding one) is no way out either
    shutil.rmtree(into)
    into.mkdir()
    os.symlink(outside, into / "l")
    refused(_raw_tar(_info("l/x", data=b"evil")), r"'l/x': 'l' is a symlink in the tree")
    # a member replacing a symlink replaces the link itself
    extract(io.BytesIO(_raw_tar(_info("l", data=b"a file now"))), into)
    assert (into / "l").read_bytes() == b"a file now" and (work / "outside/x").read_text() == "keep me\n"


@pytest.mark.parametrize("target, says", [
    ("../../etc/passwd", "'..' component"),
    ("/etc/passwd", "an absolute path"),
    ("nothere", "a hard link to 'nothere', which is no regular file of the tar before it"),
    ("d", "a hard link to 'd', which is no regular file"),
    ("l/passwd", "a hard link to 'l/passwd', which is no regular file"),
])
def test_hard_links_name_files_of_the_tar_only(arena, target, says):
    work, _, refused = arena
    refused(_raw_tar(ROOT, _info("d", tarfile.DIRTYPE), _info("l", tarfile.SYMTYPE, linkname=str(work / "outside")),
                     _info("h", tarfile.LNKTYPE, linkname=target)), says)


def test_a_hard_link_to_a_file_of_the_tar_is_made(tmp_path):
    into = tmp_path / "into"
    into.mkdir()
    extract(io.BytesIO(_raw_tar(ROOT, _info("d", tarfile.DIRTYPE), _info("d/f", data=b"x"), _info("h", tarfile.LNKTYPE, linkname="d/f"))), into)
    assert os.stat(into / "h").st_ino == os.stat(into / "d/f").st_ino


@pytest.mark.parametrize("listed, says", [
    (b"../x", r"\.tupper-deleted: '\.\./x': a '\.\.' component"),
    (b"/abs", "an absolute path"),
    (b"l/x", r"\.tupper-deleted: 'l/x': 'l' is a symlink in the tree"),
    (b"ok\0\0also", "an empty name"),
])
def test_deletions_stay_in_the_tree(arena, listed, says):
    work, into, refused = arena
    os.symlink(str(work / "outside"), into / "l")
    (into / "ok").write_text("")
    refused(_raw_tar(_info(treetar.DELETED, data=listed, mode=0o600), ROOT), says)


def test_a_deleted_symlink_is_removed_itself(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_text("keep\n")
    into = tmp_path / "into"
    into.mkdir()
    os.symlink(str(outside), into / "l")
    (into / "d/e").mkdir(parents=True)
    os.symlink(str(outside), into / "d/e/l")
    extract(io.BytesIO(_raw_tar(_info(treetar.DELETED, data=b"l\0d\0gone-already"), ROOT)), into)
    assert os.listdir(into) == [] and (outside / "x").read_text() == "keep\n"


def _good(tmp_path) -> bytes:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d/f").write_bytes(os.urandom(100_000))
    (src / "g").write_text("g\n")
    return _tar(src)


@pytest.mark.parametrize("cut", ["in a file", "after a member", "in a header", "without the end block"])
def test_a_truncated_tar_is_refused(arena, tmp_path, cut):
    _, _, refused = arena
    data = _good(tmp_path)
    members = _members(data)
    f = next(m for m in members if m.name == "d/f")
    g = next(m for m in members if m.name == "g")
    at = {"in a file": f.offset_data + 50_000, "after a member": g.offset, "in a header": g.offset + 100,
          "without the end block": g.offset_data + 512}[cut]
    refused(data[:at], "truncated")


def test_damage_after_the_members_is_refused(arena, tmp_path):
    _, _, refused = arena
    data = _good(tmp_path)
    g = next(m for m in _members(data) if m.name == "g")
    garbage = bytearray(data)
    garbage[g.offset_data + 512: g.offset_data + 1024] = b"x" * 512
    refused(bytes(garbage), "the tar is damaged: no valid header after member 'g'")
    refused(data + b"more", "data after the tar's end")
    refused(b"", "not a tar")
    refused(b"\x28\xb5\x2f\xfd" + b"compressed?" * 100, "not a tar")


def test_odd_member_types_are_refused(arena):
    _, _, refused = arena
    refused(_raw_tar(ROOT, _info("x", b"Z", data=b"")), "of type b'Z': not one an image tree has")
    refused(_raw_tar(ROOT, _info("s", tarfile.GNUTYPE_SPARSE, data=b"")), "not one an image tree has")
    refused(_raw_tar(ROOT, _info("f", data=b"1"), _info("f", data=b"2")), "'f': appears twice")
    refused(_raw_tar(ROOT, _info("missing/f", data=b"1")), "its directory 'missing' is not in the tree")
    refused(_raw_tar(_info(".", data=b"")), "the root must be a directory")
    over = tarfile.TarInfo("x")
    over.pax_headers = {"SCHILY.xattr.trusted.overlay.redirect": "/elsewhere"}
    refused(_raw_tar(ROOT, (over, b"")), "overlayfs's own are refused")
    bad_time = tarfile.TarInfo("t")
    bad_time.pax_headers = {"mtime": "soon"}
    refused(_raw_tar(ROOT, (bad_time, b"")), "mtime 'soon' is not a number")


def test_a_failed_extract_leaks_no_descriptor(tmp_path):
    into = tmp_path / "into"
    into.mkdir()
    (into / "a/b/c").mkdir(parents=True)
    fds = _open_fds()
    for data in (_raw_tar(ROOT, _info("a", tarfile.DIRTYPE), _info("a/b", tarfile.DIRTYPE), _info("a/b/c/x", data=b"1"),
                          _info("a/b/c/x", tarfile.LNKTYPE, linkname="zz")),
                 _raw_tar(ROOT, _info("a/b/c/y", data=b"1" * 2_000_000))[:1_000_000]):
        with pytest.raises(TarError):
            extract(io.BytesIO(data), into)
        assert _open_fds() == fds


# ---- a real image -------------------------------------------------------------------------------


@NEEDS_ROOT
@pytest.mark.skipif(not REAL_IMAGE.is_dir(), reason=f"no {REAL_IMAGE}")
def test_throughput_on_a_real_image():
    """Measured, not asserted: write and extract of the test suite's Debian image (read only)."""
    work = Path(tempfile.mkdtemp(prefix="treetar-", dir="/var/tmp"))
    try:
        tar_path = work / "image.tar"
        started = time.monotonic()
        with open(tar_path, "wb") as out:
            write(REAL_IMAGE, out)
        wrote = time.monotonic() - started
        size = tar_path.stat().st_size
        into = work / "tree"
        into.mkdir()
        started = time.monotonic()
        with open(tar_path, "rb") as stream:
            extract(stream, into)
        extracted = time.monotonic() - started
        mb = size / 1e6
        print(f"\n{REAL_IMAGE}: tar {mb:.0f} MB; write {wrote:.2f} s ({mb / wrote:.0f} MB/s), extract {extracted:.2f} s ({mb / extracted:.0f} MB/s)")
        assert tree_digest(into) == tree_digest(REAL_IMAGE)
    finally:
        shutil.rmtree(work)
