"""The record: the state shown to users derived from the phase, the exit file and /proc; interrupted
operations; the typed components and their JSON on disk; the agent's reading of systemd's peer address."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tupper import proc
from tupper.daemon.agent import parse_peer
from tupper.model.resources import Resources
from tupper.runtime import records
from tupper.runtime.records import ComponentEntry, PendingUpgrade, Record


def _dead_pid() -> tuple[int, int]:
    p = subprocess.Popen(["true"])
    start = proc.pid_starttime(p.pid) or 1
    p.wait()
    return p.pid, start


def _record(tmp_path: Path, **fields) -> Record:
    d = tmp_path / "c"
    d.mkdir(exist_ok=True)
    return Record(name="c", dir=d, image="img", spec_file="/s.toml", created_at=1.0, stop_timeout=5.0, **fields)


ME = (os.getpid(), proc.pid_starttime(os.getpid()) or 0)  # "nspawn" that runs: this very process


@pytest.mark.parametrize(("phase", "state"), [
    ("creating", "starting"), ("starting", "starting"), ("stopping", "stopping"), ("removing", "removing"),
    ("failed", "failed"), ("running", "running"), ("crash-loop", "running"),
])
def test_a_running_nspawn_gives_the_phase_its_live_name(tmp_path, phase, state):
    rec = _record(tmp_path, phase=phase, nspawn_pid=ME[0], nspawn_starttime=ME[1])
    assert rec.alive()
    assert rec.state() == state


@pytest.mark.parametrize(("phase", "exit_code", "state"), [
    ("running", 0, "stopped"),  # nspawn ended cleanly: the container powered off
    ("running", 1, "failed"),
    ("running", None, "exited"),  # the monitor could not see the status
    ("stopping", 1, "stopped"),  # stopped on purpose: whatever nspawn said
    ("stopped", 137, "stopped"),
    ("failed", 0, "failed"),
    ("crash-loop", 1, "crash-loop"),
    ("removing", 0, "removing"),
])
def test_an_ended_nspawn_gives_a_state_from_the_phase_and_the_exit(tmp_path, phase, exit_code, state):
    pid, start = _dead_pid()
    rec = _record(tmp_path, phase=phase, nspawn_pid=pid, nspawn_starttime=start)
    records.mark_exit(rec.dir, exit_code)
    assert not rec.alive()
    assert rec.state() == state


def test_no_exit_file_after_nspawn_ended_is_exited_and_never_started_is_created_or_stopped(tmp_path):
    pid, start = _dead_pid()
    assert _record(tmp_path, phase="running", nspawn_pid=pid, nspawn_starttime=start).state() == "exited"
    assert _record(tmp_path, phase="creating").state() == "created"
    assert _record(tmp_path, phase="stopped").state() == "stopped"


def test_a_reused_pid_is_not_the_container(tmp_path):
    rec = _record(tmp_path, phase="running", nspawn_pid=ME[0], nspawn_starttime=ME[1] + 1)
    assert not rec.alive()


def test_interrupted_means_a_transitional_phase_or_an_upgrade_whose_owner_is_gone(tmp_path):
    pid, start = _dead_pid()
    assert _record(tmp_path, phase="stopping", owner_pid=pid, owner_starttime=start).interrupted()
    assert not _record(tmp_path, phase="stopping", owner_pid=ME[0], owner_starttime=ME[1]).interrupted()
    assert not _record(tmp_path, phase="running", owner_pid=pid, owner_starttime=start).interrupted()
    upgrade = PendingUpgrade(component="a", version="1", source="/x/1", to_source="/x/2")
    assert _record(tmp_path, phase="running", owner_pid=pid, owner_starttime=start, upgrade=upgrade).interrupted()
    assert not _record(tmp_path, phase="running").interrupted(), "no owner recorded: nothing under way"
    assert _record(tmp_path, phase="creating").interrupted(), "a creation without an owner is half-made"


def test_components_are_typed_in_memory_and_the_same_json_on_disk(tmp_path):
    comps = [ComponentEntry(name="web", version="1.0", mount="/opt/web", source="/store/web/1.0", units=["web.service"],
                            env=[["PORT", "80"]], requires=[], secrets=["tls"], on_rotate="reload",
                            resources=Resources(memory_max=256 << 20, cpu_max=50.0)),
             ComponentEntry(name="db", version="2", mount="/opt/db", source="/src/db", units=("db.service", "db.socket"))]
    rec = _record(tmp_path, components=comps, grants={"tls": "site-cert"},
                  upgrade=PendingUpgrade(component="web", version="0.9", source="/s/0.9", to_source="/s/1.0"))
    rec.save()
    on_disk = json.loads((rec.dir / records.RECORD).read_text())
    assert on_disk["components"][0] == {"name": "web", "version": "1.0", "mount": "/opt/web", "source": "/store/web/1.0",
                                        "units": ["web.service"], "env": [["PORT", "80"]], "requires": [], "secrets": ["tls"],
                                        "on_rotate": "reload", "resources": {"memory_max": 256 << 20, "cpu_max": "50%"}}
    assert on_disk["components"][1]["resources"] == {}
    assert on_disk["upgrade"] == {"component": "web", "version": "0.9", "source": "/s/0.9", "to_source": "/s/1.0"}
    back = Record.load(rec.dir)
    assert back.components == rec.components and back.upgrade == rec.upgrade
    assert back.components[0].env == (("PORT", "80"),) and back.components[1].units == ("db.service", "db.socket")
    assert back.units == ["web.service", "db.service", "db.socket"]
    assert back.credential_grants() == {"web.service": {"tls": "site-cert"}}
    assert back.component("db") is back.components[1] and back.component("nope") is None


def test_a_record_written_before_the_types_loads(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    (d / records.RECORD).write_text(json.dumps({
        "name": "old", "image": "img", "spec_file": "/s.toml", "created_at": 1.0, "stop_timeout": 5.0, "phase": "stopped",
        "components": [{"name": "hello", "version": "0.1", "mount": "/opt/hello", "units": ["hello.service"], "source": "/h"}],
        "upgrade": None}))
    rec = Record.load(d)
    assert rec.components[0] == ComponentEntry(name="hello", version="0.1", mount="/opt/hello", source="/h", units=("hello.service",))
    assert rec.components[0].on_rotate == "restart" and rec.upgrade is None


@pytest.mark.parametrize(("address", "parsed"), [
    (b"\0f0a1b2c3d4e5f607/unit/web.service/tls", ("web.service", "tls")),
    ("\0abc/unit/db.service/password", ("db.service", "password")),
    (b"\0abc/unit/web.service/", None),  # no credential
    (b"\0abc/unit//tls", None),  # no unit
    (b"\0abc/other/web.service/tls", None),
    (b"\0abc/unit/web.service/tls/extra", None),
    (b"/run/some.sock", None),  # a path, not systemd's abstract address
    (b"", None),
    (b"\0\xff\xfe/unit/w\xff/x", ("w\ufffd", "x")),  # undecodable bytes are replaced, never raise
])
def test_the_agent_reads_unit_and_credential_from_systemds_peer_address(address, parsed):
    assert parse_peer(address) == parsed


def test_status_lists_every_component_unit_with_its_component_inactive_where_systemd_did_not_answer(tmp_path):
    from tupper.container.systemd import UnitState
    from tupper.runtime.status import ContainerStatus

    rec = _record(tmp_path, components=[
        ComponentEntry(name="web", version="1", mount="/opt/web", source="/s/web", units=["web.service", "web.socket"]),
        ComponentEntry(name="db", version="2", mount="/opt/db", source="/s/db", units=["db.service"]),
    ])
    answered = UnitState(name="web.service", active_state="active", sub_state="running", result="success", main_pid=42)
    st = ContainerStatus.of(rec, {"web.service": answered}, "running")
    assert [(u.component, u.name, u.state.active_state) for u in st.units] == [
        ("web", "web.service", "active"), ("web", "web.socket", "inactive"), ("db", "db.service", "inactive")]
    out = st.to_json()
    assert out["system_state"] == "running" and out["name"] == "c"
    assert out["units"][0] == {**answered.to_json(), "component": "web", "oom": False}
    assert "system_state" not in ContainerStatus.of(rec, {}, None).to_json()  # not running: systemd was not asked


def test_a_unit_killed_by_a_signal_in_a_component_with_oom_kills_was_oom_killed(tmp_path):
    from tupper.container.systemd import UnitState
    from tupper.runtime.status import ContainerStatus

    rec = _record(tmp_path, components=[
        ComponentEntry(name="hog", version="1", mount="/opt/hog", source="/s/hog", units=["hog.service"]),
        ComponentEntry(name="app", version="1", mount="/opt/app", source="/s/app", units=["app.service"]),
    ])
    states = {"hog.service": UnitState("hog.service", "failed", "failed", "signal"),
              "app.service": UnitState("app.service", "failed", "failed", "signal")}  # killed, but its component had no OOM kill
    st = ContainerStatus.of(rec, states, "degraded", oom_kills=1, component_oom_kills={"hog": 1, "app": 0})
    assert [(u.name, u.oom, u.result) for u in st.units] == [("hog.service", True, "oom-kill"), ("app.service", False, "signal")]
    out = st.to_json()
    assert out["oom_kills"] == 1 and [c["oom_kills"] for c in out["components"]] == [1, 0]
