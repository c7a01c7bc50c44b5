"""The store: a loopback btrfs pool where the root is not on btrfs, created once and reused; the overlay
backend where no pool can be made, or where asked for."""

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


# Inside another container: no loop devices in /dev (a tmpfs with the few nodes a container gets).
_NO_LOOP_DEVICES = """set -e
mount -t tmpfs -o mode=0755 container-dev /dev
for n in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
    mknod -m 0666 /dev/${n%%:*} c $(echo $n | cut -d: -f2) $(echo $n | cut -d: -f3)
done
exec "$@"
"""


def test_where_no_loop_pool_can_be_made_the_store_falls_back_to_the_overlay_backend(scratch_root, tmp_path):
    """A root that is not on btrfs, on a host without loop devices: the store is made with the overlay
    backend (said once), keeps it, and `store info` names it; `store init --backend` refuses the other one."""
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _NO_LOOP_DEVICES, "sh",
            sys.executable, "-m", "tupper", "--root", str(scratch_root), "store", "info", "--json"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent.parent)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert (info["backend"], info["backing"], info["pool_file"]) == ("overlay", "directory", None)
    assert "no loopback pool can be made here" in p.stderr and "using the overlay backend" in p.stderr
    assert not (scratch_root.parent / "store.img").exists(), "no pool file is left behind"
    assert not _loops_backed_by(scratch_root.parent / "store.img")
    # From then on it is an overlay store, with loop devices or without.
    again = _tupper(scratch_root, "store", "info")
    assert again.returncode == 0 and "backend:  overlay" in again.stdout and "overlay backend" not in again.stderr
    refused = _tupper(scratch_root, "store", "init", "--backend", "btrfs")
    assert refused.returncode == 2 and "uses the overlay backend, not btrfs" in refused.stderr
    same = _tupper(scratch_root, "store", "init", "--backend", "overlay", "--json")
    assert same.returncode == 0 and json.loads(same.stdout)["backend"] == "overlay"


def test_store_init_makes_the_backend_asked_for_and_probes_the_filesystem(scratch_root, tmp_path):
    p = _tupper(scratch_root, "store", "init", "--backend", "overlay", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["backend"] == "overlay" and (scratch_root / ".backend").read_text() == "overlay\n"
    assert not _mounted(scratch_root) and list((scratch_root / "tmp").iterdir()) == [], "the probe's overlay is gone"
    # A filesystem that cannot hold an upper layer (overlayfs itself) is refused with what to do.
    lower, upper, work, merged = (tmp_path / d for d in ("l", "u", "w", "m"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], check=True)
    try:
        bad = _tupper(merged / "store", "store", "init", "--backend", "overlay")
        assert bad.returncode == 1 and "cannot hold overlayfs layers" in bad.stderr and "hint:" in bad.stderr, bad.stderr
        assert not (merged / "store" / ".backend").exists()
    finally:
        subprocess.run(["umount", str(merged)], check=True)
