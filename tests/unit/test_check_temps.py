"""store check finds the temporary files of atomic writes (durable.write_json) whose writer is gone:
a SIGKILL between the write and the rename leaves one beside the file it was replacing."""

from __future__ import annotations

import os
import subprocess
import time

from tupper import durable
from tupper.runtime.check import stale_temps


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_temps_of_gone_writers_are_found_and_live_ones_and_root_file_systems_are_not(tmp_path):
    dead = _dead_pid()
    (tmp_path / "containers/web/rootfs/etc").mkdir(parents=True)
    (tmp_path / "images").mkdir()
    left = [tmp_path / f".networks.json.{dead}.tmp", tmp_path / f"containers/web/.record.json.{dead}.tmp",
            tmp_path / f"images/.debian.json.{dead}.tmp"]
    for path in left:
        path.write_text("{")
    live = tmp_path / f".networks.json.{os.getpid()}.tmp"  # a write under way
    live.write_text("{")
    inside = tmp_path / f"containers/web/rootfs/etc/.passwd.{dead}.tmp"  # a container's own file: not ours
    inside.write_text("x")
    (tmp_path / "notes.tmp").write_text("x")  # not named as write_json names them
    assert set(stale_temps(tmp_path)) == set(left)
    durable.write_json(tmp_path / "networks.json", {"a": 1})  # a complete write leaves nothing behind
    assert set(stale_temps(tmp_path)) == set(left)



def test_a_zombie_writer_is_gone(tmp_path):
    """A SIGKILLed tupperd is a zombie until dbus-daemon reaps it; its successor recovers meanwhile."""
    p = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{p.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    (tmp_path / "containers/web").mkdir(parents=True)
    left = tmp_path / f"containers/web/.record.json.{p.pid}.tmp"
    left.write_text("{")
    try:
        assert stale_temps(tmp_path) == [left]
    finally:
        p.wait()
