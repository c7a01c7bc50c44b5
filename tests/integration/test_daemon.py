"""tupperd: the D-Bus API with a real dbus-daemon, supervision, re-adoption, races, events."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from helpers import REPO, SERVICES, Events, alive, busctl, container_roots, label, wait_for, write_component, write_spec

HELLO = REPO / "examples/hello.toml"


def test_busctl_alone_runs_inspects_stops_and_removes_a_container(tupper, bus, names):
    name = names()
    path = f"/org/tupper1/container/{label(name)}"
    intro = busctl(bus, "introspect", "org.tupper1", "/org/tupper1")
    assert intro.returncode == 0, intro.stderr
    assert "org.tupper1.Manager" in intro.stdout and ".Run " in intro.stdout and ".ContainerStateChanged" in intro.stdout

    # Run answers at once with the container's path and a job; Job.Wait answers when the boot is done
    run = busctl(bus, "call", "org.tupper1", "/org/tupper1", "org.tupper1.Manager", "Run", "ssb", str(HELLO), name, "false")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f'oo "{path}" "/org/tupper1/job/')
    job = run.stdout.split()[2].strip('"')
    waited = busctl(bus, "call", "org.tupper1", job, "org.tupper1.Job", "Wait")
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.startswith("a{sv} ") and f'"name" s "{name}"' in waited.stdout and '"state" s "running"' in waited.stdout
    assert busctl(bus, "get-property", "org.tupper1", job, "org.tupper1.Job", "State").stdout.strip() == 's "done"'

    state = busctl(bus, "get-property", "org.tupper1", path, "org.tupper1.Container", "State")
    assert state.stdout.strip() == 's "running"'
    leader = int(busctl(bus, "get-property", "org.tupper1", path, "org.tupper1.Container", "LeaderPID").stdout.split()[1])
    assert alive(leader)
    units = busctl(bus, "call", "org.tupper1", path, "org.tupper1.Container", "ListUnits")
    assert units.stdout.strip() == 'a(ssss) 1 "hello.service" "active" "running" "success"'
    listed = busctl(bus, "call", "org.tupper1", "/org/tupper1", "org.tupper1.Manager", "List")
    assert f'"{name}" "running" {leader} "debian-bookworm" "{path}"' in listed.stdout

    # the container a process belongs to: its PID 1 and a service inside it; not the test's own process
    service = next(pid for pid in map(int, subprocess.run(["pgrep", "-f", "/opt/hello/bin/hello"], capture_output=True, text=True).stdout.split())
                   if leader in _ancestors(pid))
    for pid in (leader, service):
        owner = busctl(bus, "call", "org.tupper1", "/org/tupper1", "org.tupper1.Manager", "GetContainerByPID", "u", str(pid))
        assert owner.stdout.strip() == f'o "{path}"', (pid, owner.stderr)
    outside = busctl(bus, "call", "org.tupper1", "/org/tupper1", "org.tupper1.Manager", "GetContainerByPID", "u", str(os.getpid()))
    assert outside.returncode != 0 and "is not part of any container" in outside.stderr
    missing = busctl(bus, "call", "org.tupper1", "/org/tupper1", "org.tupper1.Manager", "GetContainer", "s", "no-such-container")
    assert missing.returncode != 0 and "no container 'no-such-container'" in missing.stderr

    stop = busctl(bus, "call", "org.tupper1", path, "org.tupper1.Container", "Stop", "d", "-1")
    assert stop.stdout.startswith('o "/org/tupper1/job/'), stop.stderr
    waited = busctl(bus, "call", "org.tupper1", stop.stdout.split()[1].strip('"'), "org.tupper1.Job", "Wait")
    assert '"state" s "stopped"' in waited.stdout, waited.stderr
    assert not alive(leader)
    rm = busctl(bus, "call", "org.tupper1", "/org/tupper1", "org.tupper1.Manager", "Remove", "sb", name, "false")
    assert rm.returncode == 0, rm.stderr
    assert busctl(bus, "get-property", "org.tupper1", path, "org.tupper1.Container", "State").returncode != 0


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        with open(f"/proc/{pid}/status") as f:
            pid = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
        out.append(pid)
    return out


def test_errors_are_named_org_tupper1_error(tupper, bus, names, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("imagee = 'x'\n")
    p = busctl(bus, "call", "org.tupper1", "/org/tupper1", "org.tupper1.Manager", "Run", "ssb", str(bad), "", "false")
    assert p.returncode != 0 and "imagee" in p.stderr
    name = names()
    tupper("run", HELLO, "--name", name, check=True)
    # busctl prints the error's text; the name is checked with a second, typed client: the CLI's own error mapping.
    again = tupper("run", HELLO, "--name", name)
    assert again.returncode == 2 and "already exists" in again.stderr
    monitor = subprocess.run(
        [sys.executable, "-c", (
            "import asyncio, sys\n"
            "from dbus_next.aio import MessageBus\nfrom dbus_next import Message, BusType\n"
            "async def main():\n"
            "    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()\n"
            "    r = await bus.call(Message(destination='org.tupper1', path='/org/tupper1', interface='org.tupper1.Manager',\n"
            f"        member='Run', signature='ssb', body=['{HELLO}', '{name}', False]))\n"
            "    print(r.error_name)\n"
            "asyncio.run(main())\n")],
        capture_output=True, text=True, env=tupper.env, timeout=60)
    assert monitor.stdout.strip() == "org.tupper1.Error.Exists"


def test_nobody_is_denied_mutating_methods_but_answered_read_only_ones(tupper, bus, names):
    name = names()
    tupper("run", HELLO, "--name", name, check=True)
    listed = busctl(bus, "call", "org.tupper1", "/org/tupper1", "org.tupper1.Manager", "ListJSON", user="nobody")
    assert listed.returncode == 0, listed.stderr
    assert name in listed.stdout
    state = busctl(bus, "get-property", "org.tupper1", f"/org/tupper1/container/{label(name)}", "org.tupper1.Container", "State",
                   user="nobody")
    assert state.stdout.strip() == 's "running"'
    for args in (("/org/tupper1", "org.tupper1.Manager", "Stop", "sd", name, "-1"),
                 ("/org/tupper1", "org.tupper1.Manager", "Remove", "sb", name, "true"),
                 (f"/org/tupper1/container/{label(name)}", "org.tupper1.Container", "StopUnit", "s", "hello.service")):
        denied = busctl(bus, "call", "org.tupper1", *args, user="nobody")
        assert denied.returncode != 0
        assert "Access denied" in denied.stderr or "AccessDenied" in denied.stderr, denied.stderr
    assert tupper.json("status", name)["state"] == "running", "the denied calls changed nothing"
    assert tupper.json("status", name)["units"][0]["active_state"] == "active"


def test_sigkilled_tupperd_leaves_containers_running_and_its_successor_readopts_them(tupper, bus, names, store_root):
    made = [names(str(i)) for i in range(5)]
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda n: tupper("run", HELLO, "--name", n), made))
    assert [r.returncode for r in results] == [0] * 5, [r.stderr for r in results]
    leaders = {c["name"]: c["leader_pid"] for c in tupper.json("ps") if c["name"] in made}
    old = bus.tupperd_pid()
    bus.stop_tupperd(signal.SIGKILL)
    assert not alive(old)
    assert all(alive(pid) for pid in leaders.values()), "containers outlive a SIGKILLed tupperd"

    # One container dies while no tupperd watches: it must come back as stopped or failed, not running.
    victim = made[4]
    os.kill(leaders[victim], signal.SIGKILL)
    wait_for(lambda: not alive(leaders[victim]), 10, "the victim to die")

    listed = tupper.json("ps")  # bus activation starts a new tupperd
    assert bus.tupperd_pid() not in (None, old)
    mine = [c for c in listed if c["name"] in made]
    assert sorted(c["name"] for c in mine) == sorted(made), "each container exactly once"
    states = {c["name"]: c["state"] for c in mine}
    assert states.pop(victim) in ("stopped", "failed")
    assert set(states.values()) == {"running"}
    assert {n: c["leader_pid"] for n, c in ((c["name"], c) for c in mine) if n != victim} == {n: p for n, p in leaders.items() if n != victim}
    roots = container_roots(store_root)
    for n in made:
        assert roots.count(f"containers/{n}/rootfs") == 1, "one root each, no orphan"
    # ... and the adopted containers are controllable.
    tupper("stop", made[0], check=True)
    assert not alive(leaders[made[0]])
    assert tupper.json("status", made[1])["units"][0]["active_state"] == "active"


def test_sigterm_to_tupperd_leaves_containers_running(tupper, bus, names):
    name = names()
    tupper("run", HELLO, "--name", name, check=True)
    leader = tupper.json("status", name)["leader_pid"]
    bus.stop_tupperd(signal.SIGTERM)
    assert bus.tupperd_pid() is None
    assert alive(leader)
    assert tupper.json("status", name)["state"] == "running"


def test_twenty_parallel_runs_of_one_name_give_one_container(tupper, names, store_root):
    name = names()
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: tupper("run", HELLO, "--name", name), range(20)))
    codes = sorted(r.returncode for r in results)
    assert codes == [0] + [2] * 19, [r.stderr for r in results if r.returncode not in (0, 2)]
    assert all("already exists" in r.stderr for r in results if r.returncode == 2)
    assert container_roots(store_root).count(f"containers/{name}/rootfs") == 1
    assert [c["name"] for c in tupper.json("ps")].count(name) == 1


def test_parallel_runs_of_different_names_all_succeed(tupper, names):
    made = [names(str(i)) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda n: tupper("run", HELLO, "--name", n), made))
    assert [r.returncode for r in results] == [0] * 6, [r.stderr for r in results]
    states = {c["name"]: c["state"] for c in tupper.json("ps")}
    assert all(states[n] == "running" for n in made)


def test_unit_state_changes_inside_a_container_arrive_as_signals(tupper, bus, names):
    name = names()
    tupper("run", HELLO, "--name", name, check=True)
    events = Events(tupper.env)
    try:
        time.sleep(1.0)  # let it subscribe
        path = f"/org/tupper1/container/{label(name)}"
        stop = busctl(bus, "call", "org.tupper1", path, "org.tupper1.Container", "StopUnit", "s", "hello.service")
        assert stop.stdout.strip() == 's "done"', stop.stderr
        events.wait(lambda e: e["type"] == "unit" and e["name"] == name and e["unit"] == "hello.service"
                    and e["active_state"] == "inactive", 10)
        start = busctl(bus, "call", "org.tupper1", path, "org.tupper1.Container", "StartUnit", "s", "hello.service")
        assert start.stdout.strip() == 's "done"'
        events.wait(lambda e: e["type"] == "unit" and e["unit"] == "hello.service" and e["active_state"] == "active", 10)
        tupper("stop", name, check=True)
        events.wait(lambda e: e["type"] == "container" and e["name"] == name and e.get("state") == "stopped", 10)
    finally:
        events.close()
    refused = busctl(bus, "call", "org.tupper1", f"/org/tupper1/container/{label(name)}", "org.tupper1.Container", "StartUnit", "s", "dbus.service")
    assert refused.returncode != 0 and "not a unit of container" in refused.stderr


def test_on_failure_restarts_a_container_whose_pid1_was_killed(tupper, names, tmp_path):
    name = names()
    spec = write_spec(tmp_path / "r.toml", [SERVICES / "hello"], name=name, extra='[restart]\npolicy = "on-failure"\ndelay = 0.2\n')
    tupper("run", spec, check=True)
    first = tupper.json("status", name)["leader_pid"]
    os.kill(first, signal.SIGKILL)

    def restarted():
        st = tupper.json("status", name)
        return st if st["state"] == "running" and st["leader_pid"] not in (None, first) else None

    st = wait_for(restarted, 30, "the container to be restarted")
    assert st["units"][0]["active_state"] == "active"
    # A deliberate stop is not a failure: no restart after it.
    tupper("stop", name, check=True)
    time.sleep(1.5)
    assert tupper.json("status", name)["state"] == "stopped"


def test_a_container_that_fails_every_time_ends_in_crash_loop(tupper, names, tmp_path):
    # The unit is active at once, then fails after a second; FailureAction makes systemd (PID 1) exit 3.
    flaky = write_component(tmp_path / "flaky", "flaky", {"flaky.service": (
        "[Unit]\nFailureAction=exit-force\nFailureActionExitStatus=3\n"
        "[Service]\nType=exec\nExecStart=/bin/sh -c 'sleep 1; exit 1'\n")})
    name = names()
    spec = write_spec(tmp_path / "flaky.toml", [flaky], name=name, extra='[restart]\npolicy = "on-failure"\ndelay = 0.2\nlimit = 3\n')
    tupper("run", spec, check=True)
    states = set()

    def crash_loop():
        st = tupper.json("status", name)["state"]
        states.add(st)
        return st == "crash-loop"

    wait_for(crash_loop, 60, "the crash-loop state", interval=0.05)
    assert "running" in states, "it was restarted before giving up"
    time.sleep(2)
    assert tupper.json("status", name)["state"] == "crash-loop", "no more restarts once in crash-loop"
    assert "crash-loop" in tupper("ps").stdout


def test_shutdown_all_stops_every_container_last_started_first(tupper, names):
    made = [names(str(i)) for i in range(3)]
    for n in made:
        tupper("run", HELLO, "--name", n, check=True)
        time.sleep(0.05)
    p = tupper("shutdown", "--all", check=True)
    order = [line.split(":")[0] for line in p.stdout.splitlines()]
    mine = [n for n in order if n in made]
    assert mine == list(reversed(made))
    assert all(tupper.json("status", n)["state"] == "stopped" for n in made)


def test_run_text_takes_a_spec_as_text_with_a_base_directory(tupper, bus, names):
    name = names()
    toml = 'image = "debian-bookworm"\n[[components]]\npath = "services/hello"\n'
    p = busctl(bus, "call", "org.tupper1", "/org/tupper1", "org.tupper1.Manager", "RunText", "sssb", toml, str(REPO), name, "false")
    assert p.returncode == 0, p.stderr
    assert busctl(bus, "call", "org.tupper1", p.stdout.split()[2].strip('"'), "org.tupper1.Job", "Wait").returncode == 0
    assert tupper.json("status", name)["units"][0]["active_state"] == "active"
    relative = busctl(bus, "call", "org.tupper1", "/org/tupper1", "org.tupper1.Manager", "RunText", "sssb", toml, "services", name + "x", "false")
    assert relative.returncode != 0 and "must be absolute" in relative.stderr


def test_kill_with_a_signal_reaches_pid1(tupper, names):
    name = names()
    tupper("run", HELLO, "--name", name, check=True)
    leader = tupper.json("status", name)["leader_pid"]
    # SIGRTMIN+3 asks systemd to halt: the container goes down cleanly.
    tupper("kill", name, "--signal", "RTMIN+3", check=True)
    wait_for(lambda: not alive(leader), 15, "systemd to halt on SIGRTMIN+3")
    wait_for(lambda: tupper.json("status", name)["state"] in ("stopped", "failed"), 10, "the state to follow")
    bad = tupper("kill", name, "--signal", "NOPE")
    assert bad.returncode == 2 and "unknown signal" in bad.stderr
