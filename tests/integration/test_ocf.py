"""ocf:tupper:container, the OCF resource agent (tupper/cli/ocf.py, ocf/container.in), as Pacemaker runs it:
a real agent script, resource-agents' own ocf-tester, the test store's real tupperd and containers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from helpers import REPO, write_component, write_spec

HELLO = REPO / "examples/hello.toml"


@pytest.fixture(scope="module")
def agent_path():
    """The agent as `make setup` installs it, for this tree, where `nobody` can run it (ocf-tester asks
    for its meta-data as nobody)."""
    d = Path(tempfile.mkdtemp(prefix="tupper-ocf-", dir="/run"))
    d.chmod(0o755)
    path = d / "container"
    path.write_text((REPO / "ocf/container.in").read_text().replace("@PYTHON@", sys.executable))
    path.chmod(0o755)
    yield path
    shutil.rmtree(d)


def run_agent(agent_path: Path, tupper, action: str, **params: str) -> subprocess.CompletedProcess:
    env = {**tupper.env, **{f"OCF_RESKEY_{k}": v for k, v in params.items()}, "OCF_ROOT": "/usr/lib/ocf"}
    return subprocess.run([str(agent_path), action], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(shutil.which("ocf-tester") is None, reason="resource-agents is not installed (make setup installs it)")
def test_the_agent_passes_ocf_tester_through_tupperd(agent_path, tupper, names):
    name = names()
    p = subprocess.run(["ocf-tester", "-v", "-n", name, "-o", f"spec={HELLO}", str(agent_path)], capture_output=True, text=True,
                       env={**tupper.env, "PATH": os.environ["PATH"]}, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert f"{agent_path} passed all tests" in p.stdout
    # It started, restarted and stopped a real container (start twice, stop twice), and left none.
    assert "Testing: starting a started resource" in p.stdout and "Testing: stopping a stopped resource" in p.stdout
    assert tupper("status", name).returncode == 2


def test_a_running_container_is_running_and_a_stopped_one_is_gone(agent_path, tupper, names):
    name = names()
    assert run_agent(agent_path, tupper, "monitor", spec=str(HELLO), name=name).returncode == 7
    start = run_agent(agent_path, tupper, "start", spec=str(HELLO), name=name)
    assert start.returncode == 0, start.stderr
    assert tupper.json("status", name)["state"] == "running"
    assert run_agent(agent_path, tupper, "monitor", spec=str(HELLO), name=name).returncode == 0
    stop = run_agent(agent_path, tupper, "stop", spec=str(HELLO), name=name, stop_timeout="20")
    assert stop.returncode == 0, stop.stderr
    assert tupper("status", name).returncode == 2  # removed: the next start on any node is a fresh one
    assert run_agent(agent_path, tupper, "monitor", spec=str(HELLO), name=name).returncode == 7


def test_a_failing_component_fails_the_start_and_the_monitor_says_why(agent_path, tupper, names, tmp_path):
    name = names()
    comp = write_component(tmp_path / "broken", "broken", {"broken.service": "[Service]\nType=oneshot\nExecStart=/bin/false\n"})
    spec = write_spec(tmp_path / "broken.toml", [comp])
    start = run_agent(agent_path, tupper, "start", spec=str(spec), name=name)
    assert start.returncode == 1, start.stderr
    assert "ocf-exit-reason:" in start.stderr  # Pacemaker shows it with the failure
    monitor = run_agent(agent_path, tupper, "monitor", spec=str(spec), name=name, CRM_meta_interval="10000")
    if tupper("status", name).returncode == 0:  # tupper kept the failed container: the monitor says it failed
        assert monitor.returncode == 1, monitor.stderr
        assert "ocf-exit-reason:container is" in monitor.stderr
    else:
        assert monitor.returncode == 7
    assert run_agent(agent_path, tupper, "stop", spec=str(spec), name=name).returncode == 0
    assert tupper("status", name).returncode == 2


def test_validate_all_uses_tuppers_validator(agent_path, tupper, tmp_path):
    assert run_agent(agent_path, tupper, "validate-all", spec=str(HELLO), name="v1").returncode == 0
    missing = run_agent(agent_path, tupper, "validate-all", spec=str(tmp_path / "nope.toml"), name="v1")
    assert missing.returncode == 5 and "is not on this node" in missing.stderr  # not here; maybe on another node
    bad = tmp_path / "bad.toml"
    bad.write_text('image = "debian-bookworm"\n[resources]\nmemory_max = "lots"\n')
    invalid = run_agent(agent_path, tupper, "validate-all", spec=str(bad), name="v1")
    assert invalid.returncode == 6, invalid.stderr  # wrong everywhere: Pacemaker stops trying on every node
    assert "bad.toml" in invalid.stderr and "memory_max" in invalid.stderr
    assert run_agent(agent_path, tupper, "meta-data").stdout.startswith("<?xml")
    assert run_agent(agent_path, tupper, "reload").returncode == 3


def test_a_set_of_installed_components_runs_without_a_spec_file(agent_path, tupper, names, tmp_path):
    """components=NAME=VERSION instead of spec: the agent writes the spec it means and runs it; a component
    this store lacks is not installed here (5), on this node only."""
    name, comp = names(), f"set{uuid.uuid4().hex[:6]}"
    d = write_component(tmp_path / comp, comp, {f"{comp}.service": "[Service]\nExecStart=/bin/sleep infinity\n"})
    pkg = tupper("sdk", "build", d, "-o", tmp_path, check=True).stdout.split()[0]
    missing = run_agent(agent_path, tupper, "validate-all", components=f"{comp}=1.0.0", name=name)
    assert missing.returncode == 5 and "is not installed here" in missing.stderr, missing.stderr
    tupper("component", "install", pkg, check=True)
    try:
        start = run_agent(agent_path, tupper, "start", components=f"{comp}=1.0.0", name=name)
        assert start.returncode == 0, start.stderr
        status = tupper.json("status", name)
        assert status["state"] == "running" and [(u["name"], u["active_state"]) for u in status["units"]] == [(f"{comp}.service", "active")]
        written = Path(f"/run/tupper-ocf/{name}.toml")
        assert f'name = "{comp}"' in written.read_text()
        assert run_agent(agent_path, tupper, "stop", components=f"{comp}=1.0.0", name=name).returncode == 0
        assert tupper("status", name).returncode == 2 and not written.exists()  # the spec went with its container
    finally:
        tupper("rm", "--force", name)
        tupper("component", "rm", comp, "1.0.0")
