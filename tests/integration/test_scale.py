"""Start at scale: fifty different specs run at once through a tupperd that was not running, all reach
`running`, all are removed, and nothing is left behind. Where a start fails, the failure names the
kernel limit its console log names (tupper.runtime.limits)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import SERVICES, system_snapshot, write_spec

from tupper.runtime import limits

COUNT = 50


def inotify_in_use() -> tuple[int, int]:
    """(instances, watches) of inotify held by root's processes: the figures the two limits count."""
    instances = watches = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    watches += sum(1 for line in f if line.startswith("inotify wd:"))
                instances += 1
            except OSError:
                continue
    return instances, watches


def mine(snapshot: dict, prefix: str, store_root: Path) -> dict:
    """A leak snapshot with the host's mounts and loop devices narrowed to ours (the containers' and
    the store's pool): other stores' pools and containers come and go on this machine while fifty of
    ours boot (a benchmark's pool was mounted, then unmounted, during a run)."""
    return {**snapshot, "mounts": [m for m in snapshot["mounts"] if prefix in m],
            "loops": [line for line in snapshot["loops"] if line.split(None, 1)[-1].startswith(str(store_root))]}


@pytest.mark.timeout(900)
def test_fifty_different_specs_run_at_once_through_a_cold_tupperd_all_reach_running(tupper, bus, store_root, tmp_path):
    prefix = f"scale-{uuid.uuid4().hex[:6]}-"
    names = [f"{prefix}{i:02d}" for i in range(COUNT)]
    specs = [write_spec(tmp_path / f"{n}.toml", [SERVICES / "hello"], name=n) for n in names]
    for spec, n in zip(specs, names, strict=True):  # each its own spec: its own greeting for the component
        spec.write_text(spec.read_text() + f'[components.env]\nGREETING = "hi from {n}"\n')
    before = mine(system_snapshot(store_root, only=prefix), prefix, store_root)
    inotify_before = inotify_in_use()
    bus.stop_tupperd()  # cold: the first of the fifty calls bus-activates tupperd, the others race it
    assert bus.tupperd_pid() is None

    gate = threading.Barrier(COUNT)

    def run(spec: Path):
        gate.wait()
        return tupper("run", spec, timeout=600)

    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(COUNT) as pool:
            results = list(pool.map(run, specs))
        took = time.monotonic() - t0
        failed = {n: r for n, r in zip(names, results, strict=True) if r.returncode != 0}
        assert not failed, "\n".join(f"{n}: exit {r.returncode}: {r.stderr.strip()[-600:]} / limit: {_limit_of(store_root, n)}"
                                     for n, r in failed.items())
        listed = {c["name"]: c for c in tupper.json("ps") if c["name"].startswith(prefix)}
        assert sorted(listed) == names
        assert {n: c["state"] for n, c in listed.items()} == dict.fromkeys(names, "running")
        for n in names:
            assert limits.explain_log((store_root / "containers" / n / "console.log").read_text(errors="replace")) is None, n
        instances, watches = inotify_in_use()
        tupperd = bus.tupperd_pid()
        fds = len(os.listdir(f"/proc/{tupperd}/fd")) if tupperd else -1
        print(f"\n{COUNT} cold runs at once: {took:.1f}s; inotify in use {inotify_before} -> {(instances, watches)} "
              f"(+{(instances - inotify_before[0]) / COUNT:.1f} instances, +{(watches - inotify_before[1]) / COUNT:.1f} watches "
              f"per container); tupperd holds {fds} descriptors")
        assert (instances, watches) > inotify_before, "the containers' systemd watch files"
    finally:
        t1 = time.monotonic()
        rm = tupper("rm", "--force", *names, timeout=600)
        print(f"rm --force of {COUNT}: {time.monotonic() - t1:.1f}s")
    assert rm.returncode == 0, rm.stderr
    assert not [c["name"] for c in tupper.json("ps") if c["name"].startswith(prefix)]
    assert not [n for n in names if (store_root / "containers" / n).exists()]
    assert mine(system_snapshot(store_root, only=prefix), prefix, store_root) == before


def _limit_of(store_root: Path, name: str) -> str | None:
    try:
        return limits.explain_log((store_root / "containers" / name / "console.log").read_text(errors="replace"))
    except OSError:
        return None
