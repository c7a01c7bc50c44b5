"""tupper.container.systemd against a real container's systemd: a thread that waits there for a job or
for a command to end leaves Python's other threads running (tupperd's event loop, and the secrets
agent a restarting unit needs, are one of them).

pystemd keeps the GIL while sd-bus blocks; when the waits went through it, the thread that waited
for a unit's restart left the event loop a few milliseconds each second and a credential delivery
took 15-30 s (the rotation after a killed tupperd that outlasted its CLI's two minutes)."""

from __future__ import annotations

import os
import threading
import time

import pytest
from helpers import write_component

from tupper.container import systemd

SLOW = 2.0  # seconds the unit takes to start, and the command to run


@pytest.fixture
def slow_container(tupper, names, tmp_path):
    """A running container with slow.service, whose start takes SLOW seconds; its PID 1."""
    comp = write_component(tmp_path / "slow", "slow", {"slow.service": f"[Service]\nType=exec\nExecStartPre=/bin/sleep {SLOW}\n"
                                                                         "ExecStart=/bin/sleep infinity\n"})
    spec = tmp_path / "slow.toml"
    spec.write_text(f'[[components]]\npath = "{comp}"\n')
    name = names()
    tupper("run", spec, "--name", name, check=True)
    return tupper.json("status", name)["leader_pid"]


def _beats_while(work) -> tuple[object, int, float]:
    """Run `work()` in a thread; meanwhile count this thread's 10 ms sleeps (a loop that needs the GIL
    between them). (work's result, beats, seconds it took)."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=work()))
    start = time.monotonic()
    thread.start()
    beats = 0
    while thread.is_alive():
        time.sleep(0.01)
        beats += 1
    return out.get("result"), beats, time.monotonic() - start


def _expected_beats(seconds: float) -> int:
    """Half of the 10 ms beats `seconds` hold: a blocked GIL allows one or two a second."""
    return int(seconds * 100 / 2)


def test_a_thread_waiting_for_a_job_leaves_the_others_running(slow_container):
    result, beats, took = _beats_while(lambda: systemd.run_job(slow_container, "slow.service", "RestartUnit", 30))
    assert result == "done"
    assert took >= SLOW
    assert beats >= _expected_beats(took), f"{beats} beats of 10 ms in {took:.1f}s: the wait held the GIL"


def test_a_thread_waiting_for_a_command_leaves_the_others_running(slow_container):
    devnull = os.open("/dev/null", os.O_RDWR)
    try:
        result, beats, took = _beats_while(lambda: systemd.run_command(slow_container, ["/bin/sleep", str(SLOW)], stdin=devnull,
                                                                      stdout=devnull, stderr=devnull))
    finally:
        os.close(devnull)
    assert result == 0
    assert took >= SLOW
    assert beats >= _expected_beats(took), f"{beats} beats of 10 ms in {took:.1f}s: the wait held the GIL"


def test_wait_change_wakes_when_a_watched_unit_changes(slow_container):
    """Not at its timeout: a start that waits for its units learns of each change as systemd announces it."""
    with systemd.ContainerBus.connect(slow_container) as bus:
        bus.watch(["slow.service"])
        assert bus.active_state("slow.service") == "active"
        bus.wait_change(0)  # what came in so far (NameAcquired, …)
        bus.restart_unit("slow.service")
        states, start = [], time.monotonic()
        while (state := bus.active_state("slow.service")) != "active" or not states:
            states.append(state)
            bus.wait_change(30)
            assert time.monotonic() - start < 15, f"no change announced: {states}"
        took = time.monotonic() - start
    assert "activating" in states
    assert SLOW <= took < SLOW + 5, f"active after {took:.1f}s: the last wait ran to its timeout"
