"""A spec's [[volumes]]: named volumes and host paths parsed into values; every bad entry names the file and
the key (`spec.toml: volumes[0].source: …`); records keep the binds across a save and a load."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_component

from tupper.errors import InvalidInput
from tupper.model import spec as specmod
from tupper.model.volumes import VolumeUse
from tupper.runtime.records import PRUNABLE, Record, VolumeEntry, prunable

UNIT = "[Service]\nExecStart=/opt/hello/bin/hello\n"


def spec_with(tmp_path: Path, volumes: str) -> Path:
    if not (tmp_path / "hello").exists():
        write_component(tmp_path / "hello", "hello", {"hello.service": UNIT})
    path = tmp_path / "spec.toml"
    path.write_text(f'name = "w"\n[[components]]\npath = "hello"\n{volumes}')
    return path


def error(path: Path) -> str:
    with pytest.raises(InvalidInput) as info:
        specmod.load(path)
    assert "\n" not in info.value.message
    return info.value.message


def test_named_volumes_and_host_paths_are_told_apart_and_host_paths_resolved(tmp_path):
    host = tmp_path / "data"
    host.mkdir()
    (tmp_path / "link").symlink_to(host)
    (tmp_path / "app.conf").write_text("x")
    s = specmod.load(spec_with(tmp_path, f'[[volumes]]\nsource = "pgdata"\ntarget = "/var/lib/postgresql/"\n'
                                         f'[[volumes]]\nsource = "{tmp_path}/link"\ntarget = "/srv/data"\nread_only = true\n'
                                         f'[[volumes]]\nsource = "{tmp_path}/app.conf"\ntarget = "/opt/app.conf"\n'))
    assert s.volumes == (VolumeUse("pgdata", "/var/lib/postgresql", False, named=True),
                         VolumeUse(str(host), "/srv/data", True, named=False),
                         VolumeUse(str(tmp_path / "app.conf"), "/opt/app.conf", False, named=False))


def test_a_spec_without_volumes_has_none(tmp_path):
    assert specmod.load(spec_with(tmp_path, "")).volumes == ()


@pytest.mark.parametrize("entry,key,says", [
    ('source = "rel/dir"\ntarget = "/data"', "volumes[0].source", "neither an absolute host path nor a volume name"),
    ('source = "./data"\ntarget = "/data"', "volumes[0].source", "neither an absolute host path nor a volume name"),
    ('source = "/no/such/dir/anywhere"\ntarget = "/data"', "volumes[0].source", "no such file or directory on the host"),
    ('source = "/tmp/../etc"\ntarget = "/data"', "volumes[0].source", "must not contain '..'"),
    ('source = "/dev/null"\ntarget = "/data"', "volumes[0].source", "not a directory or a regular file"),
    ('source = "bad name"\ntarget = "/data"', "volumes[0].source", "invalid volume name"),
    ('source = "-x"\ntarget = "/data"', "volumes[0].source", "invalid volume name"),
    ('target = "/data"', "volumes[0].source", "missing (required)"),
    ('source = "v"', "volumes[0].target", "missing (required)"),
    ('source = "v"\ntarget = "data"', "volumes[0].target", "must be an absolute path"),
    ('source = "v"\ntarget = "/data/../etc"', "volumes[0].target", "must not contain '..'"),
    ('source = "v"\ntarget = "/etc"', "volumes[0].target", "system directory"),
    ('source = "v"\ntarget = "/run/x"', "volumes[0].target", "system directory"),
    ('source = "v"\ntarget = "/proc/sys"', "volumes[0].target", "system directory"),
    ('source = "v"\ntarget = "/data"\nread_only = "yes"', "volumes[0].read_only", "expected a boolean"),
    ('source = "v"\ntarget = "/data"\nreadonly = true', "volumes[0].readonly", "did you mean 'read_only'"),
    ('source = "v"\ntarget = "/opt/hello"', "volumes[0].target", "overlaps the mount /opt/hello of component 'hello'"),
    ('source = "v"\ntarget = "/opt/hello/state"', "volumes[0].target", "overlaps the mount /opt/hello"),
    ('source = "v"\ntarget = "/opt"', "volumes[0].target", "overlaps the mount /opt/hello"),
])
def test_a_bad_entry_names_the_file_and_the_key(tmp_path, entry, key, says):
    message = error(spec_with(tmp_path, f"[[volumes]]\n{entry}\n"))
    assert message.startswith(f"{tmp_path}/spec.toml: {key}: ") or message.startswith(f"spec.toml: {key}: "), message
    assert says in message, message


def test_targets_may_not_repeat_or_nest(tmp_path):
    first = '[[volumes]]\nsource = "a"\ntarget = "/data"\n'
    assert "volumes[1].target: /data is also the target of volumes[0]" in error(spec_with(tmp_path, first + '[[volumes]]\nsource = "b"\ntarget = "/data/"\n'))
    assert "volumes[1].target: /data/x overlaps /data" in error(spec_with(tmp_path, first + '[[volumes]]\nsource = "b"\ntarget = "/data/x"\n'))


def test_volumes_must_be_an_array_of_tables(tmp_path):
    spec_with(tmp_path, "")
    path = tmp_path / "spec.toml"
    path.write_text('name = "w"\nvolumes = ["a"]\n[[components]]\npath = "hello"\n')
    assert "spec.toml: volumes[0]: expected a table" in error(path)


def test_a_record_keeps_its_volumes_across_save_and_load(tmp_path):
    rec = Record(name="w", dir=tmp_path, image="img", spec_file="spec.toml", created_at=1.0, stop_timeout=10.0,
                 volumes=[VolumeEntry("/store/volumes/pg", "/var/lib/pg", False, volume="pg"), VolumeEntry("/srv", "/srv", True)])
    rec.save()
    loaded = Record.load(tmp_path)
    assert loaded.volumes == rec.volumes
    assert loaded.to_json()["volumes"] == [{"source": "/store/volumes/pg", "target": "/var/lib/pg", "read_only": False, "volume": "pg"},
                                           {"source": "/srv", "target": "/srv", "read_only": True, "volume": None}]


def test_a_record_from_before_volumes_has_none(tmp_path):
    Record(name="w", dir=tmp_path, image="img", spec_file="s", created_at=1.0, stop_timeout=10.0).save()
    import json

    data = json.loads((tmp_path / "record.json").read_text())
    del data["volumes"]
    (tmp_path / "record.json").write_text(json.dumps(data))
    assert Record.load(tmp_path).volumes == []


def test_prune_takes_containers_that_do_not_run_and_never_a_running_one():
    assert {"stopped", "failed", "exited"} <= PRUNABLE
    assert prunable({"state": "stopped", "leader_pid": None})
    assert prunable({"state": "exited", "leader_pid": None})
    assert not prunable({"state": "failed", "leader_pid": 1234})  # kept running by --keep-failed
    for state in ("running", "starting", "stopping", "removing", "created"):
        assert not prunable({"state": state, "leader_pid": None})
