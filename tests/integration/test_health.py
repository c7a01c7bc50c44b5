"""Health checks on real containers through tupperd: readiness in `tupper run`, liveness restarts of a
component whose check fails, `unhealthy` past the restart limit, `degraded` containers, and the events
and D-Bus properties that say so. The components' health is switched from the host through a file in
the container's /run (reached as /proc/LEADER/root/run)."""

from __future__ import annotations

import socket
from pathlib import Path

from helpers import Events, busctl, label, wait_for, write_component, write_spec

# An HTTP server whose /health answers 500 while /run/sick exists in the container, else 200.
FLAKY_SERVER = """#!/usr/bin/python3
import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
while True:
    c, _ = s.accept()
    with c:
        c.recv(4096)
        code = b"500 Sick" if os.path.exists("/run/sick") else b"200 OK"
        c.sendall(b"HTTP/1.0 " + code + b"\\r\\nContent-Length: 0\\r\\n\\r\\n")
"""
SLEEPER = "[Service]\nType=exec\nExecStart=/bin/sleep infinity\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flaky(tmp_path: Path, port: int) -> Path:
    return write_component(
        tmp_path / "flaky", "flaky",
        {"flaky.service": f"[Service]\nType=exec\nExecStart=/opt/flaky/bin/server {port}\n"},
        files={"bin/server": FLAKY_SERVER},
        extra=f'[health]\nhttp = "http://127.0.0.1:{port}/health"\ninterval = "300ms"\ntimeout = "250ms"\nretries = 2\nrestarts = 1\n')


def unit(status: dict, name: str) -> dict:
    return {u["name"]: u for u in status["units"]}[name]


def test_a_failing_check_restarts_the_component_then_marks_it_unhealthy_and_the_container_degraded(tupper, bus, names, tmp_path):
    port = free_port()
    checker = write_component(tmp_path / "checker", "checker", {"checker.service": SLEEPER},
                              extra='[health]\nexec = ["/bin/sh", "-c", "echo all good"]\ninterval = "1s"\n')
    name = names()
    spec = write_spec(tmp_path / "spec.toml", [flaky(tmp_path, port), checker], name=name)
    run = tupper("run", spec, check=True)
    assert "health check" in run.stderr  # the readiness step is shown
    st = tupper.json("status", name)
    health = {c["name"]: c.get("health") for c in st["components"]}
    assert health["flaky"]["state"] == "healthy" and health["flaky"]["check"] == f"http://127.0.0.1:{port}/health"
    assert health["checker"]["state"] == "healthy"
    ps = {c["name"]: c for c in tupper.json("ps")}[name]
    assert ps["state"] == "running"
    table = tupper("ps", check=True).stdout
    assert "HEALTH" in table.splitlines()[0] and any(line.startswith(name) and " healthy " in line for line in table.splitlines())
    leader, first_pid = st["leader_pid"], unit(st, "flaky.service")["main_pid"]
    path = f"/org/tupper1/container/{label(name)}"

    # The exec check ran as transient units inside and left none behind.
    listed = tupper("exec", name, "--", "systemctl", "list-units", "--all", "--no-legend", "tupper-health-*", check=True)
    assert "tupper-health" not in listed.stdout

    events = Events(tupper.env)
    try:
        wait_for(lambda: events.proc.poll() is None and bool(busctl(bus, "get-property", "org.tupper1", path, "org.tupper1.Container", "Health").stdout), 10, "events to start")
        Path(f"/proc/{leader}/root/run/sick").write_text("")
        # retries (2) failures at 300 ms: tupperd restarts flaky.service once (restarts = 1) ...
        events.wait(lambda e: e["type"] == "health" and e["name"] == name and e["component"] == "flaky" and e["health"] == "starting", 15)
        restarted = wait_for(lambda: (s := tupper.json("status", name)) and unit(s, "flaky.service")["main_pid"] not in (0, first_pid) and s, 15,
                             "flaky.service to be restarted")
        assert unit(restarted, "checker.service")["active_state"] == "active" and restarted["leader_pid"] == leader
        # ... and still failing after the restart it is unhealthy, its container degraded.
        event = events.wait(lambda e: e["type"] == "health" and e["component"] == "flaky" and e["health"] == "unhealthy", 15)
        assert event["detail"] == "HTTP 500"
        events.wait(lambda e: e["type"] == "container" and e["name"] == name and e.get("state") == "degraded", 10)
        st = tupper.json("status", name)
        assert st["state"] == "degraded"
        flaky_health = {c["name"]: c["health"] for c in st["components"]}["flaky"]
        assert flaky_health["state"] == "unhealthy" and flaky_health["restarts"] == 1 and flaky_health["detail"] == "HTTP 500"
        assert {c["name"]: c for c in tupper.json("ps")}[name]["state"] == "degraded"
        assert "unhealthy (flaky)" in tupper("ps", check=True).stdout
        prop = busctl(bus, "get-property", "org.tupper1", path, "org.tupper1.Container", "Health").stdout
        assert '"flaky" "unhealthy"' in prop and '"checker" "healthy"' in prop, prop
        state = busctl(bus, "get-property", "org.tupper1", path, "org.tupper1.Container", "State").stdout
        assert state.strip() == 's "degraded"'
        # No more restarts past the limit: the main PID stays.
        stuck = unit(st, "flaky.service")["main_pid"]
        # Healthy again on the next pass; the container runs normally again.
        Path(f"/proc/{leader}/root/run/sick").unlink()
        events.wait(lambda e: e["type"] == "health" and e["component"] == "flaky" and e["health"] == "healthy", 10)
        events.wait(lambda e: e["type"] == "container" and e["name"] == name and e.get("state") == "running", 10)
        assert unit(tupper.json("status", name), "flaky.service")["main_pid"] == stuck
    finally:
        events.close()


def test_a_failed_component_unit_makes_the_container_degraded(tupper, names, tmp_path):
    name = names()
    spec = write_spec(tmp_path / "spec.toml", [write_component(tmp_path / "idle", "idle", {"idle.service": SLEEPER})], name=name)
    tupper("run", spec, check=True)
    assert tupper.json("status", name)["state"] == "running"
    assert tupper("exec", name, "--", "systemctl", "kill", "--signal=KILL", "idle.service").returncode == 0
    wait_for(lambda: {c["name"]: c for c in tupper.json("ps")}[name]["state"] == "degraded", 10, "ps to say degraded")
    st = tupper.json("status", name)
    assert st["state"] == "degraded" and unit(st, "idle.service")["active_state"] == "failed"
    assert tupper("exec", name, "--", "systemctl", "start", "idle.service").returncode == 0
    wait_for(lambda: {c["name"]: c for c in tupper.json("ps")}[name]["state"] == "running", 10, "ps to say running again")


def test_a_run_whose_component_never_becomes_healthy_exits_1_naming_it(tupper, names, tmp_path, store_root):
    port = free_port()  # nobody listens there
    never = write_component(tmp_path / "never", "never", {"never.service": SLEEPER},
                            extra=f'[health]\ntcp = {port}\ninterval = "200ms"\nretries = 2\n')
    name = names()
    p = tupper("run", write_spec(tmp_path / "spec.toml", [never], name=name))
    assert p.returncode == 1, p.stderr
    assert "component(s) never became healthy: never" in p.stderr
    assert "component never never became healthy in" in p.stderr and f"tcp 127.0.0.1:{port}: connection refused" in p.stderr
    assert "the container was stopped and removed" in p.stderr
    assert not (store_root / "containers" / name).exists()
