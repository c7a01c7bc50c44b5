"""The soak (bench/soak.py, `make soak`) in its short form: run/stop/rm cycles, exec calls and live
upgrades through tupperd leave nothing behind (subvolumes, mounts, loop devices, nspawn processes,
cgroups, nspawn runtime dirs, tupperd's fds) and tupperd's memory does not grow."""

from __future__ import annotations

import importlib.util
import sys

from helpers import REPO


def _soak_module():
    spec = importlib.util.spec_from_file_location("tupper_bench_soak", REPO / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_thirty_cycles_through_tupperd_leave_nothing_behind(tupper, bus, store_root):
    soak = _soak_module()
    report = soak.soak(tupper, bus, store_root, cycles=30, execs=30, upgrades=5, log=lambda text: print(text, file=sys.stderr))
    assert report["passed"], "the soak left something behind, or a call failed:\n" + soak.format_report(report)
