"""Cgroup layouts read from /proc/self/cgroup and mountinfo (fake trees in tmp_path), per-container and
per-component paths below our own cgroup, and the mapping of limits to cgroup v2, v1 and systemd."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tupper.container import cgroups
from tupper.container.cgroups import Layout
from tupper.model.resources import UNLIMITED, Resources, parse_mapping


def _mountinfo(root: Path, mounts: list[tuple[str, str, str]]) -> str:
    """mounts: (directory below root, fstype, super options)."""
    return "\n".join(f"{30 + i} 20 0:{40 + i} / {root / d} rw,nosuid - {fs} cgroup {opts}" for i, (d, fs, opts) in enumerate(mounts))


def v2(root: Path, own: str = "/") -> Layout:
    root.mkdir(parents=True, exist_ok=True)
    return Layout.read(f"0::{own}\n", _mountinfo(root.parent, [(root.name, "cgroup2", "rw,nsdelegate")]))


def hybrid(root: Path, memory_own: str = "/") -> Layout:
    dirs = [("systemd", "cgroup", "rw,xattr,name=systemd"), ("unified", "cgroup2", "rw"), ("memory", "cgroup", "rw,memory"),
            ("cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"), ("pids", "cgroup", "rw,pids"), ("blkio", "cgroup", "rw,blkio"),
            ("devices", "cgroup", "rw,devices")]
    for d, _, _ in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    text = f"9:name=systemd:/\n8:pids:/\n7:blkio:/\n5:devices:/\n4:memory:{memory_own}\n2:cpu,cpuacct:/\n0::/\n"
    return Layout.read(text, _mountinfo(root, dirs))


def legacy(root: Path) -> Layout:
    dirs = [("systemd", "cgroup", "rw,xattr,name=systemd"), ("memory", "cgroup", "rw,memory"), ("pids", "cgroup", "rw,pids")]
    for d, _, _ in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    return Layout.read("3:name=systemd:/\n2:pids:/\n1:memory:/\n", _mountinfo(root, dirs))


def test_kinds(tmp_path):
    assert v2(tmp_path / "a").kind == "v2"
    assert hybrid(tmp_path / "b").kind == "hybrid"
    assert legacy(tmp_path / "c").kind == "legacy"


def test_v2_puts_a_container_below_our_own_cgroup_in_the_unified_hierarchy(tmp_path):
    lay = v2(tmp_path / "cg", own="/system.slice/tupperd.service")
    own = tmp_path / "cg" / "system.slice/tupperd.service"
    assert lay.container_dirs("tupper", "web") == [own / "tupper/web"]
    assert lay.v1_hierarchies() == [] and cgroups.component_dirs("web", "db", layout=lay) == []
    assert cgroups.controller_dirs("web", layout=lay) == {"unified": own / "tupper/web"}


def test_hybrid_uses_systemds_hierarchies_and_each_v1_controller_once_below_our_own(tmp_path):
    root = tmp_path / "cg"
    lay = hybrid(root, memory_own="/process_api/abc")
    assert lay.container_dirs("tupper-1", "web") == [
        root / "systemd/tupper-1/web", root / "unified/tupper-1/web", root / "memory/process_api/abc/tupper-1/web",
        root / "cpu,cpuacct/tupper-1/web", root / "blkio/tupper-1/web", root / "pids/tupper-1/web"]
    assert cgroups.component_dirs("web", "db", "tupper-1", lay)[0] == root / "memory/process_api/abc/tupper-1/web/db"
    dirs = cgroups.controller_dirs("web", "tupper-1", component="db", layout=lay)
    assert dirs["cpu"] == dirs["cpuacct"] == root / "cpu,cpuacct/tupper-1/web/db"
    assert lay.systemd_dir("tupper", "web") == root / "systemd/tupper/web"
    assert lay.unified_dir("tupper", "web") == root / "unified/tupper/web"


def test_a_hierarchy_mounted_from_below_its_root_counts_from_the_mount(tmp_path):
    """Inside a container: memory is mounted from /process_api/abc, and we are in /process_api/abc/x."""
    (tmp_path / "memory").mkdir()
    info = f"30 20 0:40 /process_api/abc {tmp_path / 'memory'} ro - cgroup cgroup rw,memory\n"
    lay = Layout.read("4:memory:/process_api/abc/x\n", info)
    assert lay.hierarchies[0].own == tmp_path / "memory/x"
    # Our cgroup outside what is mounted: that hierarchy is not ours to use.
    assert Layout.read("4:memory:/elsewhere\n", info).hierarchies == ()


def test_legacy_has_no_unified_hierarchy(tmp_path):
    lay = legacy(tmp_path / "cg")
    assert [h.mount.name for h in lay.systemd_hierarchies()] == ["systemd"]
    assert lay.unified_dir("tupper", "w") is None


@pytest.mark.parametrize("make", [v2, hybrid, legacy])
def test_create_then_remove_leaves_no_directory(tmp_path, make):
    lay = make(tmp_path / "cg")
    made = cgroups.create("web", layout=lay)
    assert made == lay.container_dirs("tupper", "web")
    assert made and all(p.is_dir() for p in made)
    (made[0] / "payload").mkdir()  # nspawn makes sub-cgroups; remove() goes bottom-up
    cgroups.create_component("web", "db", layout=lay)
    assert cgroups.remove("web", kill=False, layout=lay) is True
    assert not any(p.exists() for p in made)
    assert not any(p.parent.exists() for p in made)  # the shared tupper/ parent goes with the last container


def test_remove_keeps_the_shared_parent_while_another_container_uses_it(tmp_path):
    lay = v2(tmp_path / "cg")
    cgroups.create("a", layout=lay)
    cgroups.create("b", layout=lay)
    assert cgroups.remove("a", kill=False, layout=lay)
    assert not (tmp_path / "cg/tupper/a").exists()
    assert (tmp_path / "cg/tupper/b").is_dir()
    assert cgroups.names(layout=lay) == {"b"}


def test_procs_reads_every_cgroup_procs_below_the_container(tmp_path):
    lay = v2(tmp_path / "cg")
    (p,) = cgroups.create("web", layout=lay)
    (p / "cgroup.procs").write_text("")
    (p / "payload").mkdir()
    (p / "payload" / "cgroup.procs").write_text("101\n102\n")
    (p / "supervisor").mkdir()
    (p / "supervisor" / "cgroup.procs").write_text("100\n")
    assert cgroups.procs("web", layout=lay) == {100, 101, 102}
    assert cgroups.procs("other", layout=lay) == set()


def test_unit_dir_is_found_below_payload_in_systemds_tree(tmp_path):
    lay = hybrid(tmp_path / "cg")
    top = tmp_path / "cg/systemd/tupper/web/payload"
    (top / "system.slice/web.service").mkdir(parents=True)
    (top / "app.slice/db.service").mkdir(parents=True)
    assert cgroups.unit_dir("web", "web.service", layout=lay) == top / "system.slice/web.service"
    assert cgroups.unit_dir("web", "db.service", layout=lay) == top / "app.slice/db.service"
    assert cgroups.unit_dir("web", "gone.service", layout=lay) is None


# ---- the mappings ----------------------------------------------------------------------------

ALL = parse_mapping({"memory_min": "64M", "memory_low": "128M", "memory_high": "768M", "memory_max": "1G", "memory_swap_max": "256M",
                     "cpu_weight": 200, "cpu_max": "150%", "io_weight": 50, "pids_max": 64}, "r")


def test_v2_files():
    assert cgroups.v2_files(ALL) == [
        ("memory.min", str(64 << 20)), ("memory.low", str(128 << 20)), ("memory.high", str(768 << 20)), ("memory.max", str(1 << 30)),
        ("memory.swap.max", str(256 << 20)), ("cpu.weight", "200"), ("cpu.max", "150000 100000"), ("io.weight", "default 50"),
        ("pids.max", "64")]
    unlimited = Resources(memory_max=UNLIMITED, cpu_max=math.inf, pids_max=UNLIMITED)
    assert cgroups.v2_files(unlimited) == [("memory.max", "max"), ("cpu.max", "max 100000"), ("pids.max", "max")]
    assert cgroups.v2_files(Resources()) == []


def test_v1_files_and_what_v1_cannot_do():
    files, notes = cgroups.v1_files(ALL)
    assert files == {
        "memory": [("memory.soft_limit_in_bytes", str(128 << 20)), ("memory.limit_in_bytes", str(1 << 30)),
                   ("memory.memsw.limit_in_bytes", str((1 << 30) + (256 << 20)))],
        "cpu": [("cpu.shares", "2048"), ("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "150000")],
        "blkio": [("blkio.bfq.weight", "250")],
        "pids": [("pids.max", "64")],
    }
    assert [n.split(":")[0] for n in notes] == ["memory_min", "memory_high"]
    _, notes = cgroups.v1_files(Resources(memory_swap_max=0))
    assert notes == ["memory_swap_max: cgroup v1 limits memory and swap together; set memory_max too; not applied"]
    _, notes = cgroups.v1_files(Resources(memory_max=1 << 30, memory_swap_max=0), swap_accounting=False)
    assert "does not account swap" in notes[0]
    files, _ = cgroups.v1_files(Resources(memory_max=UNLIMITED, cpu_max=math.inf, pids_max=UNLIMITED))
    assert files == {"memory": [("memory.limit_in_bytes", "-1")], "cpu": [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "-1")],
                     "pids": [("pids.max", "max")]}


@pytest.mark.parametrize(("weight", "shares", "blkio"), [(1, 10, 10), (100, 1024, 500), (200, 2048, 1000), (10000, 102400, 1000)])
def test_weights_map_as_systemd_maps_them(weight, shares, blkio):
    assert cgroups.cpu_shares(weight) == shares
    assert cgroups.blkio_weight(weight) == blkio


def test_systemd_properties():
    assert cgroups.systemd_properties(ALL) == [
        ("MemoryMin", str(64 << 20)), ("MemoryLow", str(128 << 20)), ("MemoryHigh", str(768 << 20)), ("MemoryMax", str(1 << 30)),
        ("MemorySwapMax", str(256 << 20)), ("CPUWeight", "200"), ("CPUQuota", "150%"), ("IOWeight", "50"), ("TasksMax", "64")]
    assert cgroups.systemd_properties(Resources(cpu_max=math.inf, pids_max=UNLIMITED)) == [("CPUQuota", ""), ("TasksMax", "infinity")]


def test_apply_writes_v1_files_and_orders_memory_and_swap(tmp_path):
    d = {c: tmp_path / c for c in ("memory", "cpu", "pids", "blkio")}
    for p in d.values():
        p.mkdir()
    for f in ("memory/memory.soft_limit_in_bytes", "memory/memory.limit_in_bytes", "memory/memory.memsw.limit_in_bytes", "cpu/cpu.shares",
              "cpu/cpu.cfs_period_us", "cpu/cpu.cfs_quota_us", "pids/pids.max", "blkio/blkio.weight"):  # no bfq: the legacy file
        (tmp_path / f).write_text("")
    notes = cgroups.apply(d, ALL, "hybrid")
    assert (d["memory"] / "memory.limit_in_bytes").read_text() == str(1 << 30)
    assert (d["memory"] / "memory.memsw.limit_in_bytes").read_text() == str((1 << 30) + (256 << 20))
    assert (d["cpu"] / "cpu.cfs_quota_us").read_text() == "150000"
    assert (d["blkio"] / "blkio.weight").read_text() == "250"
    assert (d["pids"] / "pids.max").read_text() == "64"
    assert len(notes) == 2


def test_apply_reports_a_controller_that_is_not_there(tmp_path):
    notes = cgroups.apply({}, Resources(pids_max=10), "legacy")
    assert notes == ["the pids controller is not mounted on this host: pids.max not applied"]
    with pytest.raises(cgroups.LimitError, match="cannot write 10 to .*pids.max"):
        cgroups.apply({"pids": tmp_path}, Resources(pids_max=10), "legacy")  # cgroupfs has every file; a missing one is an error
