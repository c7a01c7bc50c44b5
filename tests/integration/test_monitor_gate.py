"""monitor.Gate: work done while the monitor and nspawn's process are made, with the process executed
only once the work is done, and never where it fails (the container's network is wired this way)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tupper.errors import Failed
from tupper.runtime import monitor


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
