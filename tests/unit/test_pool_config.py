"""Warm pools, the pure parts: tupperd.toml's [pool], the keys that force a cold start, the listing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tupper.errors import InvalidInput
from tupper.model.network import NetworkSpec
from tupper.model.resources import Resources
from tupper.model.spec import Spec
from tupper.model.volumes import VolumeUse
from tupper.runtime import pools
from tupper.runtime.records import Record


def test_no_file_is_no_pools_and_a_saved_table_reads_back(tmp_path):
    assert pools.load(tmp_path) == {}
    pools.save(tmp_path, {"debian-bookworm": 3, "web-base": 0, "alpine": 1})
    assert pools.load(tmp_path) == {"debian-bookworm": 3, "alpine": 1}, "a size of 0 is no pool"
    assert "[pool]" in (tmp_path / pools.CONFIG).read_text()


@pytest.mark.parametrize(("text", "key"), [
    ('[pool]\n"debian-bookworm" = -1\n', "pool.debian-bookworm"),
    ('[pool]\n"debian-bookworm" = 65\n', "pool.debian-bookworm"),
    ('[pool]\n"debian-bookworm" = "2"\n', "pool.debian-bookworm"),
    ('[pool]\n"debian-bookworm" = true\n', "pool.debian-bookworm"),
    ('[pools]\n"debian-bookworm" = 2\n', "pools"),
    ('pool = 3\n', "pool"),
    ('[pool\n', ""),
])
def test_a_bad_config_names_the_file_and_the_key(tmp_path, text, key):
    (tmp_path / pools.CONFIG).write_text(text)
    with pytest.raises(InvalidInput) as exc:
        pools.load(tmp_path)
    assert str(tmp_path / pools.CONFIG) in exc.value.message
    assert key in exc.value.message
    assert exc.value.exit_code == 2


def test_sizes_outside_0_to_64_are_refused():
    assert pools.check_size(0) == 0 and pools.check_size(64) == 64
    for bad in (-1, 65):
        with pytest.raises(InvalidInput):
            pools.check_size(bad)


def test_new_names_are_neutral_and_avoid_taken_ones():
    taken = {pools.new_name(set()) for _ in range(50)}
    name = pools.new_name(taken)
    assert name.startswith(pools.PREFIX) and name not in taken and pools.is_pool_name(name)


def _spec(**kw) -> Spec:
    return Spec(name="web", image="debian-bookworm", components=(), **kw)


def test_a_plain_spec_can_take_a_pool_container():
    assert pools.cold_reasons(_spec(), systemd_host=False, cgroup_kind="hybrid") == []
    ports = NetworkSpec(ports=())
    assert pools.cold_reasons(_spec(network=ports, resources=Resources(memory_max=1 << 30)), systemd_host=False, cgroup_kind="v2") == []


@pytest.mark.parametrize(("kw", "host", "kind", "words"), [
    ({"volumes": (VolumeUse(source="data", target="/data", read_only=False, named=True),)}, False, "hybrid", "[[volumes]]"),
    ({"network": NetworkSpec(mode="host")}, False, "hybrid", "host"),
    ({"network": NetworkSpec(mode="none")}, False, "hybrid", "none"),
    ({"network": NetworkSpec(network="backend")}, False, "hybrid", "backend"),
    ({}, True, "hybrid", "systemd"),
])
def test_what_only_a_boot_gives_forces_a_cold_start(kw, host, kind, words):
    why = pools.cold_reasons(_spec(**kw), systemd_host=host, cgroup_kind=kind)
    assert len(why) == 1 and words in why[0]


def _rec(tmp_path: Path, name: str, pool: str, phase: str, *, alive: bool, owner: bool = False, started: float = 0.0) -> Record:
    rec = Record(name=name, dir=tmp_path / name, image=pool or "debian-bookworm", spec_file="<pool>", created_at=started or time.time(),
                 stop_timeout=1.0, phase=phase, pool=pool, started_at=started)
    if alive:  # this process stands in for the container's nspawn
        from tupper import proc

        rec.nspawn_pid, rec.nspawn_starttime = os.getpid(), proc.pid_starttime(os.getpid()) or 0
    if owner:
        rec.begin(phase)
    return rec


def test_members_are_ready_booting_or_what_their_record_says(tmp_path):
    now = time.time()
    ready = _rec(tmp_path, "tpool-1", "debian-bookworm", "running", alive=True, started=now - 30)
    booting = _rec(tmp_path, "tpool-2", "debian-bookworm", "creating", alive=True, owner=True)
    dead = _rec(tmp_path, "tpool-3", "debian-bookworm", "running", alive=False, started=now - 5)
    assert [pools.member_state(r) for r in (ready, booting, dead)] == ["ready", "booting", "stopped"]
    views = pools.views({"debian-bookworm": 2, "alpine": 1}, [ready, booting, dead,
                                                               _rec(tmp_path, "tpool-4", "old", "running", alive=True)])
    by_image = {v.image: v.to_json() for v in views}
    assert sorted(by_image) == ["alpine", "debian-bookworm", "old"], "configured pools, and images with members left over"
    deb = by_image["debian-bookworm"]
    assert (deb["size"], deb["ready"], deb["booting"]) == (2, 1, 1)
    assert 29 <= deb["age"] <= 40, "the age of its oldest ready container"
    assert by_image["alpine"] == {"image": "alpine", "size": 1, "ready": 0, "booting": 0, "age": None, "containers": []}
    assert by_image["old"]["size"] == 0
