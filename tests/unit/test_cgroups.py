"""Cgroup layouts and per-container paths, against fake cgroup trees in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tupper.container import cgroups


def v2(root: Path) -> Path:
    root.mkdir(exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    return root


def hybrid(root: Path) -> Path:
    for h in ("systemd", "unified", "memory", "cpu", "pids"):
        (root / h).mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("")
    return root


def legacy(root: Path) -> Path:
    for h in ("systemd", "memory", "cpu,cpuacct", "pids"):
        (root / h).mkdir(parents=True)
    return root


def test_layout_is_v2_when_the_root_has_cgroup_controllers(tmp_path):
    assert cgroups.layout(v2(tmp_path)) == "v2"


def test_layout_is_hybrid_when_only_unified_has_cgroup_controllers(tmp_path):
    assert cgroups.layout(hybrid(tmp_path)) == "hybrid"


def test_layout_is_legacy_without_any_cgroup2_mount(tmp_path):
    assert cgroups.layout(legacy(tmp_path)) == "legacy"


def test_v2_uses_the_one_unified_hierarchy(tmp_path):
    root = v2(tmp_path)
    assert cgroups.hierarchies(root) == [root]
    assert cgroups.paths("web", root) == [root / "tupper" / "web"]


def test_hybrid_uses_the_named_systemd_hierarchy_and_unified(tmp_path):
    root = hybrid(tmp_path)
    assert cgroups.hierarchies(root) == [root / "systemd", root / "unified"]
    assert cgroups.paths("web", root) == [root / "systemd/tupper/web", root / "unified/tupper/web"]


def test_legacy_uses_the_named_systemd_hierarchy_only(tmp_path):
    root = legacy(tmp_path)
    assert cgroups.hierarchies(root) == [root / "systemd"]
    assert cgroups.paths("web", root) == [root / "systemd/tupper/web"]


def test_legacy_without_a_systemd_hierarchy_has_none(tmp_path):
    (tmp_path / "memory").mkdir()
    assert cgroups.hierarchies(tmp_path) == []
    assert cgroups.paths("web", tmp_path) == []


@pytest.mark.parametrize("make", [v2, hybrid, legacy])
def test_create_then_remove_leaves_no_directory(tmp_path, make):
    root = make(tmp_path / "cg")
    made = cgroups.create("web", root)
    assert made == cgroups.paths("web", root)
    assert made and all(p.is_dir() for p in made)
    (made[0] / "payload").mkdir()  # nspawn makes sub-cgroups; remove() goes bottom-up
    assert cgroups.remove("web", root, kill=False) is True
    assert not any(p.exists() for p in made)
    assert not any(p.parent.exists() for p in made)  # the shared tupper/ parent goes with the last container


def test_remove_keeps_the_shared_parent_while_another_container_uses_it(tmp_path):
    root = v2(tmp_path)
    cgroups.create("a", root)
    cgroups.create("b", root)
    assert cgroups.remove("a", root, kill=False)
    assert not (root / "tupper" / "a").exists()
    assert (root / "tupper" / "b").is_dir()


def test_procs_reads_every_cgroup_procs_below_the_container(tmp_path):
    root = v2(tmp_path)
    (p,) = cgroups.create("web", root)
    (p / "cgroup.procs").write_text("")
    (p / "payload").mkdir()
    (p / "payload" / "cgroup.procs").write_text("101\n102\n")
    (p / "supervisor").mkdir()
    (p / "supervisor" / "cgroup.procs").write_text("100\n")
    assert cgroups.procs("web", root) == {100, 101, 102}
    assert cgroups.procs("other", root) == set()
