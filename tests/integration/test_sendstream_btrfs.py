"""tupper.store.sendstream against real `btrfs send` streams: a btrfs of this module's own (a loop file,
unmounted and removed after) holds a subvolume with much of what a file system can hold; its full stream
and then an incremental one are applied onto the host's file system (not btrfs) and the trees compared.
Where the test store's base image is there, its stream is applied too and the speed printed."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tupper.store.imagestream import tree_digest
from tupper.store.sendstream import apply

IMAGE = Path("/var/lib/tupper-test/images/debian-bookworm")
T = 1_700_000_000_000_000_000


def run(*args: str | Path) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}: {p.stderr.strip()}")
    return p


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@pytest.fixture(scope="module")
def btrfs() -> Iterator[Path]:
    """A 300 MB btrfs of our own, mounted on a temporary directory; nothing of it is left after."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not shutil.which("mkfs.btrfs"):
        pytest.skip("needs btrfs-progs")
    img = Path(f"/var/tmp/tupper-sendstream-{os.getpid()}.img")
    mnt = Path(tempfile.mkdtemp(prefix="tupper-sendstream-mnt-", dir="/var/tmp"))
    try:
        run("truncate", "-s", "300M", img)
        run("mkfs.btrfs", "-q", img)
        run("mount", "-o", "loop", img, mnt)
        yield mnt
    finally:
        if mounted(mnt):
            subprocess.run(["umount", str(mnt)], check=False)
        for line in subprocess.run(["losetup", "-j", str(img)], capture_output=True, text=True).stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)  # mount's autoclear missed it
        img.unlink(missing_ok=True)
        mnt.rmdir()
    assert not mounted(mnt)
    assert not subprocess.run(["losetup", "-j", str(img)], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    """Where streams are applied: the host's own file system, not btrfs."""
    d = Path(tempfile.mkdtemp(prefix="tupper-sendstream-work-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d)


def meta(root: Path) -> dict[str, tuple]:
    """What tree_digest leaves out: xattrs, mtimes, which names are hard links of one another."""
    out: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames] if dirpath == str(root) else [*dirnames, *filenames]:
            p = Path(dirpath, name)
            rel = os.path.normpath(os.path.relpath(p, root))
            st = p.lstat()
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {k: os.getxattr(p, k) for k in os.listxattr(p)}
            if stat.S_ISDIR(st.st_mode):  # a directory's size and link count differ between file systems
                out[rel] = (st.st_mtime_ns, xattrs)
            else:
                out[rel] = (st.st_mtime_ns, xattrs, st.st_nlink, inodes.setdefault(st.st_ino, rel), st.st_size)
    return out


def dump(stream: Path) -> str:
    return run("btrfs", "receive", "--dump", "-f", stream).stdout


def fill(src: Path) -> None:
    """A bit of everything."""
    (src / "a/b/c/d").mkdir(parents=True)
    (src / "empty").write_bytes(b"")
    (src / "small").write_text("hello\n")
    (src / "a/medium").write_bytes(os.urandom(100_000))
    (src / "a/b/big").write_bytes(os.urandom(5 << 20))
    run("cp", "--reflink=always", src / "a/b/big", src / "big-reflink")  # send emits CLONE for it
    with open(src / "sparse", "wb") as f:
        f.truncate(20 << 20)
        f.seek(7 << 20)
        f.write(b"middle" * 1000)
        f.seek((20 << 20) - 3)
        f.write(b"end")
    with open(src / "hole-at-end", "wb") as f:
        f.write(b"start")
        f.truncate(3 << 20)
    os.link(src / "a/medium", src / "a/b/c/medium-link")
    os.link(src / "a/medium", src / "medium-link2")
    os.symlink("../medium", src / "a/b/rel-link")
    os.symlink("/etc/passwd", src / "abs-link")
    os.symlink("does/not/exist", src / "dangling")
    os.symlink("a/b", src / "dir-link")
    os.mkfifo(src / "fifo", 0o640)
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(src / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(src / "sock"))
    (src / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chown(src / "a/medium", 1000, 1000)
    os.chown(src / "a/b/c", 65534, 65534)
    os.chown(src / "abs-link", 123, 456, follow_symlinks=False)
    os.chown(src / "setuid", 0, 50)
    os.chmod(src / "setuid", 0o4755)
    os.chmod(src / "a/b", 0o2775)
    os.chmod(src / "small", 0o600)
    os.setxattr(src / "small", "user.x", b"value of x")
    os.setxattr(src / "a", "user.dir", b"on a directory")
    (src / "with space").write_text("s")
    (src / os.fsdecode(b"caf\xe9")).write_text("latin-1 name")
    os.utime(src / "small", ns=(T, T))
    os.utime(src / "a/b/c/d", ns=(T, T + 1))


def change(dst: Path) -> None:
    """What a layer does to its parent."""
    with open(dst / "a/b/big", "r+b") as f:  # modify a file in the middle
        f.seek(1 << 20)
        f.write(b"changed" * 1000)
    (dst / "empty").unlink()  # delete one
    (dst / "small").rename(dst / "a/b/c/small-moved")  # rename one
    (dst / "new").write_bytes(os.urandom(70_000))  # add one
    os.chmod(dst / "a/b/c/small-moved", 0o644)  # change a mode
    os.link(dst / "a/b/big", dst / "big-hardlink")  # add a hard link
    shutil.rmtree(dst / "a/b/c/d")  # replace a directory with a file
    (dst / "a/b/c/d").write_text("now a file\n")
    os.rename(dst / "with space", dst / "swap")  # swap two names
    os.rename(dst / "hole-at-end", dst / "with space")
    os.rename(dst / "swap", dst / "hole-at-end")
    run("cp", "--reflink=always", dst / "big-reflink", dst / "a/from-parent")  # unchanged parent data: CLONE from it
    os.setxattr(dst / "new", "user.new", b"1")
    os.removexattr(dst / "small" if (dst / "small").exists() else dst / "a/b/c/small-moved", "user.x")


def test_full_then_incremental(btrfs: Path, work: Path) -> None:
    run("btrfs", "subvolume", "create", btrfs / "base")
    fill(btrfs / "base")
    run("btrfs", "property", "set", "-ts", btrfs / "base", "ro", "true")
    full = work / "base.stream"
    run("btrfs", "send", "-q", "-f", full, btrfs / "base")
    assert "\nclone " in "\n" + dump(full), "the stream has no CLONE: the test would not cover it"

    before = len(os.listdir("/proc/self/fd"))
    with open(full, "rb") as f:
        base = apply(f, work, "base")
    assert len(os.listdir("/proc/self/fd")) == before
    assert tree_digest(base) == tree_digest(btrfs / "base")
    assert meta(base) == meta(btrfs / "base")
    assert os.stat(base / "sparse").st_blocks * 512 < 1 << 20, "holes were filled"
    base_digest = tree_digest(base)

    run("btrfs", "subvolume", "snapshot", btrfs / "base", btrfs / "layer")
    change(btrfs / "layer")
    run("btrfs", "property", "set", "-ts", btrfs / "layer", "ro", "true")
    inc = work / "layer.stream"
    run("btrfs", "send", "-q", "-p", btrfs / "base", "-f", inc, btrfs / "layer")
    assert inc.stat().st_size < full.stat().st_size / 5
    with open(inc, "rb") as f:
        layer = apply(f, work, "layer", parent=base)
    assert len(os.listdir("/proc/self/fd")) == before
    assert tree_digest(layer) == tree_digest(btrfs / "layer")
    assert meta(layer) == meta(btrfs / "layer")
    assert tree_digest(base) == base_digest, "the parent tree changed"


class _Counting:
    """A pipe read through, counting the bytes."""

    def __init__(self, f) -> None:
        self.f, self.n = f, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.n += len(data)
        return data


def test_base_image_stream(work: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not mounted(IMAGE.parent.parent) or not IMAGE.is_dir():
        pytest.skip(f"{IMAGE} is not there")
    send = subprocess.Popen(["btrfs", "send", "-q", str(IMAGE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert send.stdout is not None
    reader = _Counting(send.stdout)
    start = time.monotonic()
    try:
        out = apply(reader, work, IMAGE.name)  # type: ignore[arg-type]
    finally:
        send.stdout.close()
        send.wait()
    took = time.monotonic() - start
    assert send.returncode == 0, send.stderr.read() if send.stderr else ""
    print(f"\nbtrfs send {IMAGE.name} | apply: {reader.n / 1e6:.0f} MB in {took:.1f} s = {reader.n / 1e6 / took:.0f} MB/s",
          file=sys.stderr)
    assert tree_digest(out) == tree_digest(IMAGE)
    shutil.rmtree(out)
