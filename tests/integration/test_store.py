"""The store: a loopback btrfs pool where the root is not on btrfs, created once and reused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _tupper(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tupper", "--root", str(root), *args], capture_output=True, text=True, timeout=120)


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@pytest.fixture
def scratch_root(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = tmp_path / "store"
    yield root
    if _mounted(root):
        _tupper(root, "store", "unmount")


def _loops_backed_by(path: Path, settle: float = 0.0) -> list[str]:
    """Loop devices on `path`; with `settle`, wait that long for the kernel's asynchronous autoclear."""
    deadline = time.monotonic() + settle
    while True:
        out = subprocess.run(["losetup", "-n", "-O", "NAME,BACK-FILE", "-l"], capture_output=True, text=True).stdout
        found = [line for line in out.splitlines() if str(path) in line]
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def test_store_on_a_non_btrfs_root_becomes_a_sparse_loopback_pool(scratch_root):
    p = _tupper(scratch_root, "store", "info", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    pool = scratch_root.parent / "store.img"
    assert info["backing"] == "loopback"
    assert info["pool_file"] == str(pool)
    assert info["size"] > 10 * 2**30 and 0 < info["free"] <= info["size"]
    assert os.stat(pool).st_blocks * 512 < 1 * 2**30, "the pool file is sparse"
    assert "loopback btrfs pool" in p.stderr, "tupper says once that it created the pool"
    assert _mounted(scratch_root) and _loops_backed_by(pool)

    again = _tupper(scratch_root, "store", "info")
    assert again.returncode == 0 and "loopback btrfs pool" not in again.stderr
    assert "backing:  loopback" in again.stdout

    assert _tupper(scratch_root, "store", "unmount").returncode == 0
    assert not _mounted(scratch_root)
    assert not _loops_backed_by(pool, settle=3), "unmounting releases the loop device"

    remount = _tupper(scratch_root, "store", "info", "--json")
    assert remount.returncode == 0 and "mounted the loopback btrfs pool" in remount.stderr
    assert _tupper(scratch_root, "store", "unmount").returncode == 0


def test_store_refuses_a_non_empty_non_btrfs_root(scratch_root):
    scratch_root.mkdir()
    (scratch_root / "precious").write_text("x")
    p = _tupper(scratch_root, "store", "info")
    assert p.returncode == 1
    assert "not on btrfs and is not empty" in p.stderr
    assert not _mounted(scratch_root)
    assert (scratch_root / "precious").read_text() == "x"


def test_store_on_a_real_btrfs_mount_is_used_directly(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    # A btrfs filesystem the admin mounted (here: made by the test), with the root a directory in it.
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    subprocess.run(["truncate", "-s", "300M", str(image)], check=True)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        root = mnt / "tupper"
        p = _tupper(root, "store", "info", "--json")
        assert p.returncode == 0, p.stderr
        info = json.loads(p.stdout)
        assert info["backing"] == "btrfs" and info["pool_file"] is None
        assert not (mnt / "tupper.img").exists(), "no pool file on a real btrfs"
        assert not _mounted(root)
        refused = _tupper(root, "store", "unmount")
        assert refused.returncode == 2 and "did not create" in refused.stderr
    finally:
        device = next(line.split()[0] for line in open("/proc/self/mounts") if line.split()[1] == str(mnt))
        subprocess.run(["umount", "-R", str(mnt)], check=True)
        subprocess.run(["losetup", "--detach", device], check=False)
    assert not _loops_backed_by(image, settle=3)
