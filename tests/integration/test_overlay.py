"""What only the overlay backend has: a container's root is an overlayfs mount (the image its lower
layer, the container's upper/ and work/ beside it), made again after `store unmount` (as after a
reboot), taken down by rm, and never held by another container's nspawn."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import REPO

from tupper.store.imagestream import tree_digest

HELLO = REPO / "examples/hello.toml"


@pytest.fixture(autouse=True)
def overlay_only(backend):
    if backend != "overlay":
        pytest.skip("the overlay backend's own behaviour")


def _overlay_mounts() -> dict[str, str]:
    """Mount point → options of every overlayfs mount on the host."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "overlay":
                out[left.split()[4]] = right.split()[2]
    return out


def _mounts_of(pid: int) -> list[str]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return [line.split()[4] for line in f]


def test_a_containers_root_is_an_overlay_on_its_image_and_its_changes_stay_its_own(tupper, names, store_root):
    name = names()
    image = store_root / "images" / "debian-bookworm"
    before = tree_digest(image)
    tupper("run", HELLO, "--name", name, check=True)
    cdir = store_root / "containers" / name
    options = _overlay_mounts()[str(cdir / "rootfs")]
    assert f"lowerdir={image}" in options and f"upperdir={cdir / 'upper'}" in options and "redirect_dir=on" in options
    # A change inside lands in the container's upper layer; the image stays as it was.
    assert tupper("exec", name, "--", "sh", "-c", "echo mine > /etc/motd && mv /opt /opt-moved && mv /opt-moved /opt").returncode == 0
    assert (cdir / "upper" / "etc" / "motd").read_text() == "mine\n"
    assert (image / "etc" / "motd").read_text() != "mine\n"
    tupper("stop", name, check=True)
    # Taken down (as by a reboot): made again by a store opened afresh, and by a start.
    for how in ("store opened", "start"):
        subprocess.run(["umount", str(cdir / "rootfs")], check=True)
        assert str(cdir / "rootfs") not in _overlay_mounts()
        if how == "store opened":
            assert json.loads(tupper("--direct", "status", name, "--json", check=True).stdout)["state"] == "stopped"
            assert str(cdir / "rootfs") in _overlay_mounts()
    tupper("start", name, check=True)
    assert str(cdir / "rootfs") in _overlay_mounts()
    assert tupper("exec", name, "--", "cat", "/etc/motd").stdout == "mine\n"
    tupper("rm", "-f", name, check=True)
    assert str(cdir / "rootfs") not in _overlay_mounts() and not cdir.exists()
    assert tree_digest(image) == before


def test_a_running_containers_nspawn_does_not_hold_the_roots_of_others(tupper, names, store_root):
    first, second = names("a"), names("b")
    tupper("run", HELLO, "--name", first, check=True)
    tupper("run", HELLO, "--name", second, check=True)
    tupper("stop", second, check=True)
    leader = tupper.json("status", first)["leader_pid"]
    nspawn = int(Path(f"/proc/{leader}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the leader's parent
    seen = _mounts_of(nspawn)
    assert str(store_root / "containers" / first / "rootfs") in seen
    assert not [m for m in seen if m.startswith(str(store_root / "containers" / second))], seen
    tupper("rm", second, check=True)
    assert str(store_root / "containers" / second / "rootfs") not in _overlay_mounts()


def test_store_info_names_the_backend(tupper):
    info = json.loads(tupper("store", "info", "--json", check=True).stdout)
    assert (info["backend"], info["backing"], info["pool_file"]) == ("overlay", "directory", None)
    assert "backend:  overlay" in tupper("store", "info", check=True).stdout
