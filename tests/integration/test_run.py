"""`tupper run` and the lifecycle verbs against real btrfs, real systemd-nspawn and real systemd inside."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from helpers import REPO, SERVICES, system_snapshot, write_component, write_spec


def test_run_hello_reaches_active_and_is_listed(tupper, names):
    name = names()
    p = tupper("run", REPO / "examples/hello.toml", "--name", name)
    assert p.returncode == 0, p.stderr
    assert "hello.service" in p.stdout and "active" in p.stdout

    status = tupper.json("status", name)
    assert status["name"] == name
    assert status["state"] == "running"
    assert status["leader_pid"] > 1
    assert Path(f"/proc/{status['leader_pid']}").exists()
    assert [(u["name"], u["active_state"], u["sub_state"]) for u in status["units"]] == [("hello.service", "active", "running")]

    listed = {c["name"]: c for c in tupper.json("ps")}
    assert listed[name]["state"] == "running"
    assert listed[name]["image"] == "debian-bookworm"
    assert listed[name]["leader_pid"] == status["leader_pid"]


def test_container_gets_its_name_as_hostname_and_components_read_only(tupper, names):
    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    p = tupper("exec", name, "--", "cat", "/proc/sys/kernel/hostname")
    assert p.stdout.strip() == name
    p = tupper("exec", name, "--", "touch", "/opt/hello/x")
    assert p.returncode != 0, "the component payload must be bound read-only"


def test_an_nspawn_settings_file_for_the_machine_has_no_effect(tupper, names, tmp_path):
    """tupper's record is the one source of a container's settings (nspawn runs with --settings=no):
    a NAME.nspawn file in /run/systemd/nspawn that would rename the host and bind a directory in is ignored."""
    name = names()
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "marker").write_text("from the .nspawn file")
    settings = Path("/run/systemd/nspawn") / f"{name}.nspawn"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(f"[Exec]\nHostname=from-nspawn-file\n[Files]\nBindReadOnly={planted}:/mnt/planted\n")
    try:
        tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
        assert tupper("exec", name, "--", "cat", "/proc/sys/kernel/hostname").stdout.strip() == name
        assert tupper("exec", name, "--", "test", "-e", "/mnt/planted/marker").returncode == 1
    finally:
        settings.unlink()


def test_requires_starts_units_after_the_required_ones_are_active(tupper, names, tmp_path):
    # "base" takes a while to become active; "app" requires it, so it may only start afterwards.
    base = write_component(tmp_path / "base", "base", {"base.service": (
        "[Service]\nType=exec\nExecStart=/bin/sleep infinity\nExecStartPost=/bin/sleep 0.5\n")})
    app = write_component(tmp_path / "app", "app", {"app.service": "[Service]\nType=exec\nExecStart=/bin/sleep infinity\n"},
                          requires=["base"])
    # app is listed first: ordering must come from `requires`, not from the list.
    spec = write_spec(tmp_path / "order.toml", [app, base], name=names())
    p = tupper("run", spec)
    assert p.returncode == 0, p.stderr
    units = {u["name"]: u for u in tupper.json("status", spec_name(spec))["units"]}
    assert units["base.service"]["active_state"] == units["app.service"]["active_state"] == "active"
    assert units["app.service"]["inactive_exit_usec"] >= units["base.service"]["active_enter_usec"] > 0


def gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for the host's init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def spec_name(spec: Path) -> str:
    return next(line.split('"')[1] for line in spec.read_text().splitlines() if line.startswith("name ="))


def test_failing_component_exits_1_names_the_unit_and_leaves_nothing(tupper, names, store_root, tmp_path):
    bad = write_component(tmp_path / "bad", "bad", {"bad.service": (
        "[Service]\nType=exec\nExecStart=/bin/sh -c 'echo about to fail; exit 4'\n")})
    name = names()
    spec = write_spec(tmp_path / "bad.toml", [SERVICES / "hello", bad], name=name)
    before = system_snapshot(store_root, only=name)
    p = tupper("run", spec)
    assert p.returncode == 1
    assert "bad.service" in p.stderr and "exit-code" in p.stderr
    assert "about to fail" in p.stderr, "the unit's last journal lines are shown"
    assert "Traceback" not in p.stderr
    assert not (store_root / "containers" / name).exists()
    assert system_snapshot(store_root, only=name) == before


def test_dependency_of_a_failed_component_is_reported_not_awaited(tupper, names, tmp_path):
    bad = write_component(tmp_path / "bad", "bad", {"bad.service": "[Service]\nType=exec\nExecStart=/bin/false\n"})
    dep = write_component(tmp_path / "dep", "dep", {"dep.service": "[Service]\nType=exec\nExecStart=/bin/sleep infinity\n"},
                          requires=["bad"])
    spec = write_spec(tmp_path / "dep.toml", [bad, dep], name=names(), extra="[start]\ntimeout = 30\n")
    t0 = time.monotonic()
    p = tupper("run", spec)
    assert p.returncode == 1
    assert time.monotonic() - t0 < 20, "a unit whose dependency failed must not be waited for until the timeout"
    assert "bad.service" in p.stderr


def test_keep_failed_leaves_the_container_in_failed_state(tupper, names, tmp_path):
    bad = write_component(tmp_path / "bad", "bad", {"bad.service": "[Service]\nType=exec\nExecStart=/bin/false\n"})
    name = names()
    spec = write_spec(tmp_path / "bad.toml", [bad], name=name)
    p = tupper("run", spec, "--keep-failed")
    assert p.returncode == 1
    status = tupper.json("status", name)
    assert status["state"] == "failed"
    assert status["units"][0]["active_state"] == "failed"
    assert tupper("rm", name).returncode == 1, "rm of a live container needs --force"
    assert tupper("rm", "--force", name).returncode == 0
    assert tupper("status", name).returncode == 2


def test_stop_powers_off_cleanly(tupper, names):
    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    leader = tupper.json("status", name)["leader_pid"]
    t0 = time.monotonic()
    tupper("stop", name, check=True)
    assert time.monotonic() - t0 < 5
    assert gone(leader)
    status = tupper.json("status", name)
    assert status["state"] == "stopped"
    assert status["exit"]["returncode"] == 0
    assert status["leader_pid"] is None


def stubborn_component(tmp_path: Path) -> Path:
    """A service that ignores SIGTERM (and whose own stop timeout is long): only SIGKILL ends it."""
    return write_component(
        tmp_path / "stubborn", "stubborn",
        {"stubborn.service": "[Service]\nType=exec\nExecStart=/opt/stubborn/bin/stubborn\nTimeoutStopSec=300\n"},
        files={"bin/stubborn": "#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 0.2; done\n"},
    )


def test_stop_kills_a_service_that_ignores_sigterm_at_the_timeout(tupper, names, tmp_path):
    stubborn = stubborn_component(tmp_path)
    name = names()
    spec = write_spec(tmp_path / "stubborn.toml", [stubborn], name=name, extra="[stop]\ntimeout = 2\n")
    tupper("run", spec, check=True)
    leader = tupper.json("status", name)["leader_pid"]
    t0 = time.monotonic()
    tupper("stop", name, check=True)
    elapsed = time.monotonic() - t0
    assert 2.0 <= elapsed < 8.0, f"stop took {elapsed:.1f}s; expected SIGKILL at the 2s timeout"
    assert gone(leader)
    assert tupper.json("status", name)["state"] == "stopped"


def test_stop_timeout_flag_overrides_the_spec(tupper, names, tmp_path):
    stubborn = stubborn_component(tmp_path)
    name = names()
    spec = write_spec(tmp_path / "stubborn.toml", [stubborn], name=name, extra="[stop]\ntimeout = 60\n")
    tupper("run", spec, check=True)
    t0 = time.monotonic()
    tupper("stop", name, "--timeout", "1", check=True)
    assert time.monotonic() - t0 < 6


def test_exec_streams_output_and_passes_the_exit_code(tupper, names):
    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    p = tupper("exec", name, "--", "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3")
    assert p.returncode == 3
    assert p.stdout == "to-stdout\n"
    assert "to-stderr" in p.stderr
    assert tupper("exec", name, "--", "true").returncode == 0
    literal = tupper("exec", name, "--", "echo", "$HOME", "${PATH}", "100%", "%n")
    assert literal.stdout == "$HOME ${PATH} 100% %n\n", "arguments reach the command unexpanded"
    killed = tupper("exec", name, "--", "sh", "-c", "kill -9 $$")
    assert killed.returncode == 128 + 9
    missing = tupper("exec", name, "--", "no-such-command")
    assert missing.returncode == 2 and "not found" in missing.stderr
    # Every exec above (exited, failed, killed) left no transient unit behind in the container: only
    # the one listing them is loaded.
    units = tupper("exec", name, "--", "systemctl", "list-units", "--all", "--plain", "--no-legend", "tupper-exec-*")
    assert units.returncode == 0 and len(units.stdout.splitlines()) == 1, units.stdout


def test_exec_on_a_stopped_container_fails(tupper, names):
    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    tupper("stop", name, check=True)
    p = tupper("exec", name, "--", "true")
    assert p.returncode == 1 and "not running" in p.stderr


def test_logs_show_the_unit_journal_while_running_and_after_stop(tupper, names):
    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    p = tupper("logs", name, "-u", "hello.service", "-n", "20")
    assert p.returncode == 0 and "hello from" in p.stdout
    tupper("stop", name, check=True)
    p = tupper("logs", name, "-n", "200")
    assert p.returncode == 0 and "hello from" in p.stdout


def web_spec(tmp_path: Path) -> Path:
    """examples/web.toml, its component paths absolute; its port is published on a host port tupper picks."""
    text = (REPO / "examples/web.toml").read_text().replace('"../services/', f'"{SERVICES}/')
    path = tmp_path / "web.toml"
    path.write_text(text)
    return path


def test_web_component_is_active_only_when_its_port_answers(tupper, names, tmp_path):
    name = names()
    p = tupper("run", web_spec(tmp_path), "--name", name)
    assert p.returncode == 0, p.stderr
    # Its own network, port 8080 published on the host: the forward answers as soon as run returns.
    (port,) = tupper.json("port", name)
    with socket.create_connection(("127.0.0.1", port["host"]), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.0 200") and b"Hello from a tupper container" in reply
    status = {u["name"]: u["active_state"] for u in tupper.json("status", name)["units"]}
    assert status == {"hello.service": "active", "web.service": "active"}


def test_env_from_the_spec_reaches_the_service(tupper, names, tmp_path):
    name = names()
    tupper("run", web_spec(tmp_path), "--name", name, check=True)
    p = tupper("logs", name, "-u", "hello.service")
    assert "hi from the demo" in p.stdout


def test_image_rm_is_refused_while_a_container_uses_it(tupper, names):
    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    p = tupper("image", "rm", "debian-bookworm")
    assert p.returncode == 1 and name in p.stderr
    assert any(i["name"] == "debian-bookworm" for i in tupper.json("image", "ls"))


def test_twenty_run_stop_rm_cycles_leave_nothing_behind(tupper, names, store_root):
    before = system_snapshot(store_root, only="t-test_twenty")
    for i in range(20):
        name = names(str(i))
        tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
        tupper("stop", name, check=True)
        tupper("rm", name, check=True)
        assert not (store_root / "containers" / name).exists()
    assert system_snapshot(store_root, only="t-test_twenty") == before


def test_rm_force_of_a_running_container_leaves_nothing(tupper, names, store_root):
    name = names()
    before = system_snapshot(store_root, only=name)
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    leader = tupper.json("status", name)["leader_pid"]
    assert system_snapshot(store_root, only=name) != before, "the check sees a running container"
    tupper("rm", "--force", name, check=True)
    assert gone(leader)
    assert not (store_root / "containers" / name).exists()
    assert system_snapshot(store_root, only=name) == before


def test_logs_follow_streams_new_entries(tupper, names):
    import select
    import subprocess
    import sys

    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    follow = subprocess.Popen([sys.executable, "-m", "tupper", "logs", name, "-f", "-n", "0"], stdout=subprocess.PIPE,
                              env=tupper.env, cwd=REPO)
    try:
        time.sleep(0.5)
        tupper("exec", name, "--", "systemd-cat", "-t", "marker", "echo", "followed-line", check=True)
        seen = b""
        deadline = time.monotonic() + 10
        while b"followed-line" not in seen and time.monotonic() < deadline:
            if select.select([follow.stdout], [], [], 0.2)[0]:
                seen += os.read(follow.stdout.fileno(), 65536)
        assert b"followed-line" in seen
    finally:
        follow.terminate()
        follow.wait(5)
