"""A full store: run, image build and component install fail with a clear message and leave nothing;
stop, rm, ps and store info keep working. On a small store of the test's own, filled to the brim: a
1 GiB loopback pool (btrfs backend), a 1 GiB tmpfs (overlay backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, SERVICES, _clean_env, ensure_image, mounted

FULL_ROOT = Path("/var/lib/tupper-test-full")


@pytest.fixture(scope="module")
def full(store_root, backend):
    """A 1 GiB store with the base image (carried from the suite's store), used with --direct."""
    pool = FULL_ROOT.parent / f"{FULL_ROOT.name}.img"
    env = _clean_env(TUPPER_ROOT=str(FULL_ROOT), TUPPER_POOL_SIZE="1G", TUPPER_DIRECT="1")
    if backend == "overlay":
        FULL_ROOT.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1G,mode=0755", "tupper-test-full", str(FULL_ROOT)], check=True)
    ensure_image(FULL_ROOT, log=lambda text: None, source_root=store_root, env=env, backend=backend, seed=store_root)

    def tupper(*args, check: bool = False) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "tupper", *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        if check:
            assert p.returncode == 0, (args, p.stderr)
        return p

    yield tupper
    for c in json.loads(tupper("ps", "--json").stdout or "[]"):
        tupper("rm", "--force", c["name"])
    for net in json.loads(tupper("network", "ls", "--json").stdout or "[]"):  # the pool goes; its bridges must too
        tupper("network", "rm", net["name"], check=True)
    if mounted(FULL_ROOT):
        subprocess.run([sys.executable, "-m", "tupper", "store", "unmount"], env=env, cwd=REPO, check=False)  # the overlay backend's roots
        subprocess.run(["umount", str(FULL_ROOT)], check=False)
        for line in subprocess.run(["losetup", "-n", "-O", "NAME,BACK-FILE", "-l"], capture_output=True, text=True).stdout.splitlines():
            if str(pool) in line:
                subprocess.run(["losetup", "-d", line.split()[0]], check=False)
    pool.unlink(missing_ok=True)
    FULL_ROOT.rmdir()


def _fill(root: Path) -> Path:
    filler = root / "filler"
    with open(filler, "wb") as f:
        block = b"\xa5" * (1 << 20)
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError:
            pass
    return filler


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for d in ("containers", "tmp") for p in (root / d).iterdir())


def test_a_full_store_refuses_new_work_clearly_and_still_stops_and_removes(full, tmp_path):
    full("run", REPO / "examples/hello.toml", "--name", "full-a", check=True)
    before = _leftovers(FULL_ROOT)
    filler = _fill(FULL_ROOT)
    try:
        p = full("run", REPO / "examples/hello.toml", "--name", "full-b")
        assert p.returncode == 1, p.stderr
        assert "is full" in p.stderr and "internal error" not in p.stderr and "Traceback" not in p.stderr
        assert "hint:" in p.stderr

        p = full("image", "build", REPO / "images/debian-bookworm.toml", "--force")
        assert p.returncode == 1 and "is full" in p.stderr and "internal error" not in p.stderr, p.stderr

        component = tmp_path / "dist"
        component.mkdir()
        built = full("sdk", "build", SERVICES / "hello", "-o", component)
        assert built.returncode == 0, built.stderr
        p = full("component", "install", next(component.iterdir()))
        assert p.returncode == 1 and "is full" in p.stderr and "internal error" not in p.stderr, p.stderr
        assert _leftovers(FULL_ROOT) == before, "nothing half-made"

        assert full("ps").returncode == 0
        assert full("store", "info").returncode == 0
        p = full("stop", "full-a")
        assert p.returncode == 0, p.stderr
        # "exited" where not even the phase could be written: the container is down either way.
        assert json.loads(full("status", "full-a", "--json").stdout)["state"] in ("stopped", "exited")
        p = full("rm", "full-a")
        assert p.returncode == 0, p.stderr
        assert not (FULL_ROOT / "containers" / "full-a").exists()
    finally:
        os.unlink(filler)
