"""The runtime's verbs with a fake container bus (tupper.container.systemd.SystemdBus) and a store on a
plain directory: how `run` judges the units it waits for, what `status` shows when systemd answers or
not, and how `stop` powers a container off and records it. The container's "nspawn" is a real child
process (a `sleep`), so liveness is the runtime's own /proc check."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator

import attrs
import pytest
from helpers import PlainStore

from tupper import proc
from tupper.container import nspawn
from tupper.container.systemd import UnitState
from tupper.errors import Failed
from tupper.progress import SILENT, Progress
from tupper.runtime.records import ComponentEntry, Record
from tupper.runtime.runtime import Runtime


@attrs.define
class FakeBus:
    """A container's systemd as a script: `states[unit]` is the list of states it passes through,
    one per question (the last one stays)."""

    states: dict[str, list[UnitState]] = attrs.Factory(dict)
    system: list[str] = attrs.Factory(lambda: ["running"])
    jobs: set[str] = attrs.Factory(set)
    calls: list[str] = attrs.Factory(list)
    looks: list[str] = attrs.Factory(list)  # watch, read (ActiveState) and wait, in order
    on_power_off: object = None
    closed: bool = False

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> FakeBus:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def system_state(self) -> str:
        return self.system.pop(0) if len(self.system) > 1 else self.system[0]

    def unit_state(self, name: str) -> UnitState:
        seq = self.states.get(name) or [UnitState(name, "inactive", "dead")]
        return seq.pop(0) if len(seq) > 1 else seq[0]

    def active_state(self, name: str) -> str:
        self.looks.append(f"read {name}")
        return self.unit_state(name).active_state

    def has_job(self, name: str) -> bool:
        return name in self.jobs

    def watch(self, units: list[str], *, jobs: bool = True) -> None:
        self.looks.append(f"watch {' '.join(units)}")

    def wait_change(self, timeout: float) -> None:
        self.looks.append(f"wait {timeout}")
        time.sleep(min(timeout, 0.001))  # a systemd whose every next answer is news

    def power_off(self) -> None:
        self.calls.append("PowerOff")
        if callable(self.on_power_off):
            self.on_power_off()

    def stop_unit(self, name: str) -> None:
        self.calls.append(f"StopUnit {name}")

    def restart_unit(self, name: str) -> None:
        self.calls.append(f"RestartUnit {name}")

    def reload(self) -> None:
        self.calls.append("Reload")


def _unit(name: str, active: str, sub: str = "", result: str = "") -> UnitState:
    return UnitState(name, active, sub or {"active": "running", "failed": "failed"}.get(active, "dead"), result)


@pytest.fixture
def nspawn_proc() -> Iterator[subprocess.Popen]:
    """Stands in for a container's nspawn (and its PID 1): a real process the runtime sees alive."""
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


@pytest.fixture
def world(tmp_path, nspawn_proc):
    bus = FakeBus()
    rt = Runtime(PlainStore(tmp_path / "store"), host=nspawn.Host(systemd=True), connect_bus=lambda leader, **kw: bus)
    cdir = rt.store.containers_dir / "c"
    cdir.mkdir()
    rec = Record(name="c", dir=cdir, image="img", spec_file="/s.toml", created_at=1.0, stop_timeout=5.0, phase="running",
                 nspawn_pid=nspawn_proc.pid, nspawn_starttime=proc.pid_starttime(nspawn_proc.pid) or 0, leader_pid=nspawn_proc.pid,
                 components=[ComponentEntry(name="web", version="1", mount="/opt/web", source="/s/web", units=("web.service", "web.socket")),
                             ComponentEntry(name="db", version="1", mount="/opt/db", source="/s/db", units=("db.service",))])
    rec.save()
    return rt, bus, rec


def test_units_that_all_become_active_are_a_successful_start(world):
    rt, bus, rec = world
    bus.states = {"web.service": [_unit("web.service", "activating", "start"), _unit("web.service", "active")],
                  "web.socket": [_unit("web.socket", "active", "listening")], "db.service": [_unit("db.service", "active")]}
    states, failures = rt._wait_units(rec, bus, rec.units, 5.0, SILENT)
    assert failures == [] and [s.active_state for s in states] == ["active"] * 3


def test_units_are_watched_before_their_states_are_first_read_and_waited_for_between_looks(world):
    """A change between the first read and the subscription would be missed until the next look."""
    rt, bus, rec = world
    bus.states = {"web.service": [_unit("web.service", "activating", "start"), _unit("web.service", "active")],
                  "web.socket": [_unit("web.socket", "active", "listening")], "db.service": [_unit("db.service", "active")]}
    rt._wait_units(rec, bus, rec.units, 5.0, SILENT, longest=0.25)
    reads = [f"read {u}" for u in rec.units]
    assert bus.looks == [f"watch {' '.join(rec.units)}", *reads, "wait 0.25", *reads]


def test_a_failed_unit_fails_the_start_with_its_result(world, monkeypatch):
    rt, bus, rec = world
    monkeypatch.setattr(Runtime, "journal_tail", lambda self, rec, unit, lines: [f"{unit}: boom"])
    bus.states = {"web.service": [_unit("web.service", "activating", "start"), _unit("web.service", "failed", result="exit-code")],
                  "web.socket": [_unit("web.socket", "active", "listening")], "db.service": [_unit("db.service", "active")]}
    _, failures = rt._wait_units(rec, bus, rec.units, 5.0, SILENT)
    assert [(f.unit, f.active_state, f.result, f.journal) for f in failures] == [("web.service", "failed", "exit-code", ["web.service: boom"])]


def test_after_boot_a_unit_left_inactive_with_no_job_failed_through_a_dependency(world, monkeypatch):
    """Its job was cancelled (a dependency failed): waiting longer would only run into the timeout."""
    rt, bus, rec = world
    monkeypatch.setattr(Runtime, "journal_tail", lambda self, rec, unit, lines: [])
    bus.system = ["starting", "starting", "degraded"]
    bus.states = {"web.service": [_unit("web.service", "active")], "web.socket": [_unit("web.socket", "active", "listening")],
                  "db.service": [_unit("db.service", "inactive")]}
    _, failures = rt._wait_units(rec, bus, rec.units, 5.0, SILENT)
    assert [(f.unit, f.result) for f in failures] == [("db.service", "dependency")]
    assert not bus.system[1:], "judged before the boot was over"


def test_a_unit_still_queued_when_the_start_times_out_fails_the_start(world, monkeypatch):
    rt, bus, rec = world
    monkeypatch.setattr(Runtime, "journal_tail", lambda self, rec, unit, lines: [])
    bus.system = ["degraded"]
    bus.states = {"web.service": [_unit("web.service", "active")], "web.socket": [_unit("web.socket", "active", "listening")],
                  "db.service": [_unit("db.service", "activating", "start")]}
    _, failures = rt._wait_units(rec, bus, rec.units, 0.1, SILENT)
    assert [(f.unit, f.active_state, f.result) for f in failures] == [("db.service", "activating", "activating")]


def test_a_container_that_dies_while_its_units_start_fails_the_start(world, nspawn_proc):
    rt, bus, rec = world
    bus.system = ["starting"]
    bus.states = {"web.service": [_unit("web.service", "activating", "start")]}
    bus.jobs = {"web.service", "web.socket", "db.service"}
    nspawn_proc.kill()
    nspawn_proc.wait()
    with pytest.raises(Failed, match="the container exited while its units were starting"):
        rt._wait_units(rec, bus, rec.units, 5.0, SILENT)


def test_status_shows_what_systemd_answers_and_each_units_component(world):
    rt, bus, _ = world
    bus.system = ["degraded"]
    bus.states = {"web.service": [_unit("web.service", "failed", result="exit-code")], "db.service": [_unit("db.service", "active")]}
    st = rt.status("c")
    assert st.system_state == "degraded"
    assert [(u.component, u.name, u.state.active_state, u.state.result) for u in st.units] == [
        ("web", "web.service", "failed", "exit-code"), ("web", "web.socket", "inactive", ""), ("db", "db.service", "active", "")]
    assert bus.closed


def test_status_of_a_container_whose_bus_does_not_answer_shows_its_units_inactive(world):
    rt, _, _ = world

    def no_answer(leader, **kw):
        raise Failed("the container's system bus did not answer within 2s")

    rt.connect_bus = no_answer
    st = rt.status("c")
    assert st.system_state is None and {u.state.active_state for u in st.units} == {"inactive"}
    assert st.to_json()["state"] == "running"


def test_stop_powers_the_container_off_over_its_bus_and_records_it_stopped(world, nspawn_proc):
    rt, bus, rec = world
    bus.on_power_off = nspawn_proc.terminate  # the container goes down when asked
    stopped = rt.stop("c")
    assert bus.calls == ["PowerOff"] and bus.closed
    assert nspawn_proc.wait(timeout=5) is not None
    assert stopped.phase == "stopped" and stopped.owner_pid == 0
    assert Record.load(rec.dir).state() == "stopped"


def test_stop_kills_a_container_that_ignores_power_off_after_its_timeout(world, nspawn_proc):
    rt, bus, rec = world
    stopped = rt.stop("c", timeout=0.2)  # the fake ignores PowerOff: the runtime SIGKILLs "PID 1"
    assert bus.calls == ["PowerOff"]
    assert nspawn_proc.wait(timeout=5) == -9
    assert Record.load(rec.dir).phase == "stopped" and stopped.state() == "stopped"


class Notes(Progress):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)


def test_a_boot_waits_for_a_free_boot_slot_and_says_so(world):
    rt, _bus, rec = world
    rt.boots = threading.BoundedSemaphore(1)
    rt.boots.acquire()  # another container is booting
    progress, entered = Notes(), threading.Event()

    def boot() -> None:
        with rt._boot_slot(progress):
            entered.set()

    t = threading.Thread(target=boot)
    t.start()
    assert not entered.wait(0.3), "it booted while no slot was free"
    assert progress.notes == ["other containers are booting; this one waits for one of them"]
    rt.boots.release()  # that boot ended
    assert entered.wait(5)
    t.join(5)
    assert rt.boots.acquire(blocking=False), "the slot was not given back"


def test_starting_a_running_container_takes_no_boot_slot(world):
    rt, _bus, rec = world
    rt.boots = threading.BoundedSemaphore(1)
    rt.boots.acquire()  # none free: a start that wanted one would wait for ever
    assert rt.start(rec) == []  # it runs already (its "nspawn" is alive): nothing to boot
