"""monitor.Gate: work done while the monitor and nspawn's process are made, with the process executed
only once the work is done, and never where it fails (the container's network is wired this way); and
tupperd's spawner (tupper.runtime.spawner), which forks the monitors from a small process."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tupper.errors import Failed
from tupper.runtime import monitor
from tupper.runtime.spawner import Spawner


def wait_for_exit(cdir: Path, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return json.loads((cdir / "exit.json").read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.02)
    raise AssertionError("the monitor recorded no exit")


def test_the_process_runs_only_after_the_work(tmp_path):
    marker = tmp_path / "wired"

    def work() -> None:
        time.sleep(0.3)  # longer than making the monitor and the process takes
        marker.write_text("yes")

    with monitor.Gate(work) as gate:
        monitor.spawn("gate-test", tmp_path, ["test", "-e", str(marker)], tmp_path / "console.log", None, gate=gate.fd)
    assert wait_for_exit(tmp_path)["returncode"] == 0  # `test -e` found the marker: executed after the work


def test_failed_work_means_the_process_never_runs_and_its_error_is_the_one_raised(tmp_path):
    ran = tmp_path / "ran"

    def work() -> None:
        raise Failed("the network could not be wired")

    with pytest.raises(Failed, match="could not be wired"):
        with monitor.Gate(work) as gate:
            monitor.spawn("gate-test", tmp_path, ["touch", str(ran)], tmp_path / "console.log", None, gate=gate.fd)
    time.sleep(0.2)
    assert not ran.exists()


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_the_spawner_forks_monitors_through_a_gate_and_ends_with_its_socket(tmp_path):
    marker = tmp_path / "wired"
    spawner = Spawner()
    try:
        with monitor.Gate(lambda: (time.sleep(0.2), marker.write_text("yes"))) as gate:
            mon, child = spawner.spawn("spawn-test", tmp_path, ["sh", "-c", f"test -e {marker} && sleep 1"], tmp_path / "console.log",
                                       None, "/nonexistent-store", gate.fd)
        assert parent_of(mon) == spawner.process.pid  # not ours: the spawner's (reaped by the kernel there)
        assert parent_of(child) == mon  # nspawn's process (here: sh) is the monitor's child, as with monitor.spawn
        assert wait_for_exit(tmp_path)["returncode"] == 0  # executed after the gate's work
    finally:
        spawner.close()
    assert spawner.process.poll() is not None  # the end of file on its socket ended it


def test_a_refused_start_through_the_spawner_says_why(tmp_path):
    spawner = Spawner()
    try:
        with pytest.raises(Failed, match="could not start systemd-nspawn"):
            spawner.spawn("spawn-test", tmp_path, ["/nonexistent/program"], tmp_path / "console.log", None, "/nonexistent-store")
        mon, _ = spawner.spawn("spawn-test", tmp_path, ["true"], tmp_path / "console.log", None, "/nonexistent-store")
        assert mon > 0  # the spawner serves on after a refused request
    finally:
        spawner.close()
