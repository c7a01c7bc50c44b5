"""Resource limits on real cgroups: the container's and each component's (on cgroup v1 here: cgroups below
tupper's own in each controller hierarchy, component processes placed by the monitor), live updates,
OOM kills counted per component. Figures are read from the kernel's cgroup files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import SERVICES, Events, wait_for, write_component, write_spec

from tupper.container.cgroups import Layout

LAYOUT = Layout.detect()
pytestmark = pytest.mark.skipif(LAYOUT.kind == "v2", reason="these tests read the cgroup v1 controllers (the v2 mapping has unit tests)")

SLEEPER = "[Service]\nType=exec\nExecStart=/bin/sleep infinity\n"
# 4 MB more every 50 ms, until killed.
HOG = "#!/bin/sh\nx=\nwhile :; do\n  x=\"$x$(yes | head -c 4000000)\"\n  sleep 0.05\ndone\n"
# A fork loop that outlives failed forks (dash gives up at the first EAGAIN, and the unit would fail
# before the limit is seen from outside): children sleep, the parent retries after a failure.
FORK_LOOP = """#!/usr/bin/python3
import os, time
while True:
    try:
        if os.fork() == 0:
            time.sleep(1000)
            os._exit(0)
    except OSError:
        time.sleep(0.01)
"""


def cgroup(controller: str, name: str, component: str | None = None) -> Path:
    """The container's (or a component's) cgroup in a controller hierarchy, below our own cgroup there."""
    h = LAYOUT.controller(controller)
    assert h is not None, f"no {controller} hierarchy"
    found = list(h.own.glob(f"tupper-*/{name}"))
    assert len(found) == 1, f"{controller}: {found}"
    return found[0] / component if component else found[0]


def cpu_percent(name: str, component: str, seconds: float = 3.0) -> float:
    usage = cgroup("cpuacct", name, component) / "cpuacct.usage"
    a, t0 = int(usage.read_text()), time.monotonic()
    time.sleep(seconds)
    b, t1 = int(usage.read_text()), time.monotonic()
    return (b - a) / (t1 - t0) / 1e7  # ns per s -> % of one CPU


def procs(path: Path) -> set[int]:
    return {int(x) for x in (path / "cgroup.procs").read_text().split()}


def ns_pids(path: Path) -> set[int]:
    """The processes of a cgroup as the container sees them (systemd inside reports those)."""
    out = set()
    for pid in procs(path):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        out.add(int(next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[-1]))
    return out


def limited_spec(path: Path, name: str, components: list[tuple[Path, str]], resources: str = "") -> Path:
    """A spec: `resources` as the [resources] body, each component with its [components.resources] body."""
    text = f'name = "{name}"\n' + (f"[resources]\n{resources}" if resources else "")
    for directory, limits in components:
        text += f'[[components]]\npath = "{directory}"\n' + (f"[components.resources]\n{limits}" if limits else "")
    path.write_text(text)
    return path


def units(tupper, name: str) -> dict[str, dict]:
    return {u["name"]: u for u in tupper.json("status", name)["units"]}


def test_cpu_max_on_a_component_holds_and_changes_live(tupper, names, tmp_path):
    burn = write_component(tmp_path / "burn", "burn", {"burn.service": "[Service]\nType=exec\nExecStart=/bin/sh -c 'while :; do :; done'\n"})
    idle = write_component(tmp_path / "idle", "idle", {"idle.service": SLEEPER})
    name = names()
    spec = limited_spec(tmp_path / "spec.toml", name, [(burn, 'cpu_max = "50%"\n'), (idle, "")])
    tupper("run", spec, check=True)
    before = units(tupper, name)
    main = before["burn.service"]["main_pid"]
    # The monitor placed the unit's process in the component's cgroups (every v1 controller).
    for controller in ("cpu", "memory", "pids"):
        assert main in ns_pids(cgroup(controller, name, "burn")), controller
    assert (cgroup("cpu", name, "burn") / "cpu.cfs_quota_us").read_text().strip() == "50000"
    used = cpu_percent(name, "burn")
    assert 40 <= used <= 60, f"{used:.1f}% of a CPU with cpu_max 50%"

    p = tupper("update", name, "--component", "burn", "--cpu-max", "100%")
    assert p.returncode == 0, p.stderr
    assert "cpu_max=100% (applied)" in p.stdout
    used = cpu_percent(name, "burn")
    assert used >= 80, f"{used:.1f}% of a CPU after raising cpu_max to 100%"
    after = units(tupper, name)
    assert after["burn.service"]["main_pid"] == main and after["idle.service"]["main_pid"] == before["idle.service"]["main_pid"]
    st = tupper.json("status", name)
    assert {c["name"]: c["resources"] for c in st["components"]}["burn"] == {"cpu_max": "100%"}


def test_container_limits_are_written_before_boot_kept_and_applied_again_at_start(tupper, names, tmp_path):
    name = names()
    spec = write_spec(tmp_path / "spec.toml", [SERVICES / "hello"], name=name,
                      extra='[resources]\nmemory_max = "512M"\nmemory_low = "64M"\ncpu_weight = 50\npids_max = 500\nio_weight = 200\n')
    tupper("run", spec, check=True)
    leader = tupper.json("status", name)["leader_pid"]
    assert leader in procs(cgroup("memory", name)) and leader in procs(cgroup("pids", name))
    assert (cgroup("memory", name) / "memory.limit_in_bytes").read_text().strip() == str(512 << 20)
    assert (cgroup("memory", name) / "memory.soft_limit_in_bytes").read_text().strip() == str(64 << 20)
    assert (cgroup("cpu", name) / "cpu.shares").read_text().strip() == "512"
    assert (cgroup("pids", name) / "pids.max").read_text().strip() == "500"
    assert (cgroup("blkio", name) / "blkio.bfq.weight").read_text().split()[-1] == "1000"

    p = tupper("update", name, "--memory-max", "1G", "--pids-max", "infinity")
    assert p.returncode == 0, p.stderr
    assert (cgroup("memory", name) / "memory.limit_in_bytes").read_text().strip() == str(1 << 30)
    assert (cgroup("pids", name) / "pids.max").read_text().strip() == "max"
    tupper("stop", name, check=True)
    tupper("start", name, check=True)
    assert (cgroup("memory", name) / "memory.limit_in_bytes").read_text().strip() == str(1 << 30)
    assert tupper.json("status", name)["resources"]["memory_max"] == 1 << 30


def test_update_refuses_bad_values_with_exit_2_and_a_limit_below_use_with_exit_1(tupper, names, tmp_path):
    name = names()
    spec = write_spec(tmp_path / "spec.toml", [SERVICES / "hello"], name=name, extra='[resources]\nmemory_max = "512M"\n')
    tupper("run", spec, check=True)
    p = tupper("update", name, "--memory-max", "lots")
    assert p.returncode == 2 and "--memory-max: not a size: 'lots'" in p.stderr, p.stderr
    p = tupper("update", name, "--memory-high", "1G")
    assert p.returncode == 2 and "memory_high: 1G is above memory_max (512M)" in p.stderr, p.stderr
    p = tupper("update", name, "--component", "nope", "--cpu-max", "5%")
    assert p.returncode == 2 and "has no component 'nope'" in p.stderr, p.stderr
    p = tupper("update", name, "--memory-max", "4K")  # far below what systemd and its services use
    assert p.returncode == 1 and "more is in use than that; nothing changed" in p.stderr, p.stderr
    assert (cgroup("memory", name) / "memory.limit_in_bytes").read_text().strip() == str(512 << 20)
    assert tupper.json("status", name)["resources"] == {"memory_max": 512 << 20}


def test_pids_max_on_a_component_stops_its_fork_loop_and_nothing_else(tupper, names, tmp_path):
    forker = write_component(tmp_path / "forker", "forker", {"forker.service": "[Service]\nType=exec\nExecStart=/opt/forker/bin/fork\n"},
                             files={"bin/fork": FORK_LOOP})
    idle = write_component(tmp_path / "idle", "idle", {"idle.service": SLEEPER})
    name = names()
    spec = limited_spec(tmp_path / "spec.toml", name, [(forker, 'pids_max = 32\ncpu_max = "20%"\n'), (idle, "")])
    tupper("run", spec, check=True)
    before = tupper.json("status", name)
    pids = cgroup("pids", name, "forker")
    wait_for(lambda: int((pids / "pids.events").read_text().split()[-1]) > 0, 10, "the fork loop to hit pids.max")
    assert int((pids / "pids.current").read_text()) <= 32
    after = tupper.json("status", name)
    assert after["leader_pid"] == before["leader_pid"]
    idle_unit = {u["name"]: u for u in after["units"]}["idle.service"]
    assert idle_unit["active_state"] == "active" and idle_unit["main_pid"] == {u["name"]: u for u in before["units"]}["idle.service"]["main_pid"]
    assert {u["name"]: u for u in after["units"]}["forker.service"]["active_state"] == "active"  # held at the limit, not dead
    p = tupper("exec", name, "--", "true")  # the container's systemd can still start processes
    assert p.returncode == 0, p.stderr


def test_a_component_over_its_memory_max_is_oom_killed_alone(tupper, names, tmp_path):
    hog = write_component(tmp_path / "hog", "hog", {"hog.service": "[Service]\nType=exec\nExecStart=/opt/hog/bin/hog\n"},
                          files={"bin/hog": HOG})
    idle = write_component(tmp_path / "idle", "idle", {"idle.service": SLEEPER})
    name = names()
    spec = limited_spec(tmp_path / "spec.toml", name, [(hog, 'memory_max = "64M"\n'), (idle, "")])
    events = Events(tupper.env)
    time.sleep(1.0)  # let it subscribe
    try:
        tupper("run", spec, check=True)
        # tupperd announces the kill (it reads the counters when a unit dies, and every 2 s).
        event = events.wait(lambda e: e["type"] == "oom" and e["name"] == name and e["component"] == "hog", 30)
        assert event["oom_kills"] >= 1
        assert event["process"] == "hog" and event["pid"] > 0  # from the kernel's log: which process died
        events.seen_or_wait(lambda e: e["type"] == "container" and e["name"] == name and e.get("state") == "degraded", 30)
    finally:
        events.close()
    before = tupper.json("status", name)

    def killed() -> dict | None:
        st = tupper.json("status", name)
        hog_unit = {u["name"]: u for u in st["units"]}["hog.service"]
        return st if hog_unit["active_state"] == "failed" else None

    st = wait_for(killed, 30, "the hog to be OOM-killed")
    assert st["state"] == "degraded"
    hog_unit = {u["name"]: u for u in st["units"]}["hog.service"]
    assert hog_unit["oom"] is True and hog_unit["result"] == "oom-kill"
    kills = {c["name"]: c["oom_kills"] for c in st["components"]}
    assert kills["hog"] >= 1 and kills["idle"] == 0
    assert st["oom_kills"] == kills["hog"]
    assert st["leader_pid"] == before["leader_pid"]
    idle_before = {u["name"]: u for u in before["units"]}["idle.service"]
    idle_after = {u["name"]: u for u in st["units"]}["idle.service"]
    assert idle_after["active_state"] == "active" and idle_after["main_pid"] == idle_before["main_pid"]
    assert int((cgroup("memory", name, "hog") / "memory.max_usage_in_bytes").read_text()) <= 64 << 20
    p = tupper("status", name)
    assert "oom:" in p.stdout and "hog 1" in p.stdout


def test_a_container_over_its_own_memory_max_loses_the_hog_and_says_which(tupper, names, tmp_path):
    """No limit on the component, 160M on the container: the kernel kills the largest process in the
    container's cgroup; tupper names it, its component and unit, and marks that unit oom-kill."""
    hog = write_component(tmp_path / "hog", "hog", {"hog.service": "[Service]\nType=exec\nExecStart=/opt/hog/bin/hog\n"},
                          files={"bin/hog": HOG})
    idle = write_component(tmp_path / "idle", "idle", {"idle.service": SLEEPER})
    name = names()
    spec = limited_spec(tmp_path / "spec.toml", name, [(hog, ""), (idle, "")], resources='memory_max = "160M"\n')
    events = Events(tupper.env)
    time.sleep(1.0)  # let it subscribe
    try:
        tupper("run", spec, check=True)
        event = events.wait(lambda e: e["type"] == "oom" and e["name"] == name, 60)
        assert event["component"] == "hog" and event["process"] == "hog", event
    finally:
        events.close()
    st = wait_for(lambda: (s := tupper.json("status", name)) and {u["name"]: u for u in s["units"]}["hog.service"]["active_state"] == "failed" and s,
                  30, "hog.service to fail")
    units = {u["name"]: u for u in st["units"]}
    assert units["hog.service"]["oom"] is True and units["hog.service"]["result"] == "oom-kill"
    assert units["idle.service"]["active_state"] == "active" and units["idle.service"]["oom"] is False
    assert st["oom_kills"] >= 1 and st["state"] == "degraded"
    assert int((cgroup("memory", name) / "memory.max_usage_in_bytes").read_text()) <= 160 << 20


def _memory_in_use(d: Path) -> int:
    stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
    return int((d / "memory.usage_in_bytes").read_text()) - int(stat["total_inactive_file"])


def test_stats_match_the_cgroup_files_they_come_from(tupper, names, tmp_path):
    burn = write_component(tmp_path / "burn", "burn", {"burn.service": "[Service]\nType=exec\nExecStart=/bin/sh -c 'while :; do :; done'\n"})
    made = []
    for i in range(2):
        name = names()
        spec = limited_spec(tmp_path / f"spec{i}.toml", name, [(burn, 'cpu_max = "20%"\n')], f'memory_max = "{256 + i}M"\n')
        tupper("run", spec, check=True)
        made.append(name)
    cpu_before = {n: int((cgroup("cpuacct", n) / "cpuacct.usage").read_text()) for n in made}
    stats = {s["name"]: s for s in tupper.json("stats", "--no-stream", *made)}
    assert sorted(stats) == sorted(made)
    for i, n in enumerate(made):
        s = stats[n]
        assert cpu_before[n] <= s["cpu_ns"] <= int((cgroup("cpuacct", n) / "cpuacct.usage").read_text())
        assert abs(s["memory"] - _memory_in_use(cgroup("memory", n))) < 4 << 20
        assert s["memory_limit"] == (256 + i) << 20
        assert s["memory_peak"] >= s["memory"]
        assert abs(s["pids"] - int((cgroup("pids", n) / "pids.current").read_text())) <= 2
        assert s["state"] == "running" and 0 < s["cpu_percent"] < 200
        assert set(s["pressure"]) == {"cpu", "memory", "io"}  # the unified hierarchy has PSI per cgroup here
        assert all(isinstance(p["some_avg10"], float) for p in s["pressure"].values())
        (burn_stats,) = s["components"]
        assert burn_stats["name"] == "burn"
        assert burn_stats["cpu_ns"] <= int((cgroup("cpuacct", n, "burn") / "cpuacct.usage").read_text())
        assert burn_stats["pids"] == int((cgroup("pids", n, "burn") / "pids.current").read_text())
    # The table: a row per container, and per component with --components.
    p = tupper("stats", "--no-stream", "--components", made[0])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "CPU", "%"] and lines[1].startswith(made[0]) and lines[2].strip().startswith("burn")
    p = tupper("stats", "--no-stream", "no-such-container")
    assert p.returncode == 2 and "no container 'no-such-container'" in p.stderr
