"""Warm pools through tupperd: pool containers booted ahead, claimed by `tupper run`, refilled in the
background, destroyed when a claim fails, re-adopted by a successor of a SIGKILLed tupperd."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import pytest
from helpers import IMAGE, REPO, alive, container_roots, wait_for, write_component, write_spec

HELLO = REPO / "examples/hello.toml"


def _pool(tupper) -> dict:
    return next((p for p in tupper.json("pool", "ls") if p["image"] == IMAGE), {"ready": 0, "containers": []})


def _ready(tupper, n: int, timeout: float = 60) -> dict:
    wait_for(lambda: _pool(tupper)["ready"] >= n, timeout, f"{n} ready pool container(s)", interval=0.2)
    return _pool(tupper)


def _leader(store_root: Path, name: str) -> int:
    return json.loads((store_root / "containers" / name / "record.json").read_text())["leader_pid"]


@pytest.fixture
def pool(tupper):
    """A pool of the test image, emptied and forgotten afterwards (other tests must boot cold)."""

    def make(size: int) -> dict:
        tupper("pool", "set", IMAGE, "--size", str(size), check=True)
        return _ready(tupper, size)

    yield make
    tupper("pool", "rm", IMAGE)
    # A boot under way when the pool went finishes, and is then removed by the keeper.
    wait_for(lambda: not [p for p in tupper.json("pool", "ls") if p["image"] == IMAGE], 60, "the pool to be drained", interval=0.2)


def test_a_run_takes_a_booted_pool_container_and_it_behaves_as_a_cold_one(tupper, names, pool, store_root):
    before = pool(2)
    members = [c["name"] for c in before["containers"]]
    leaders = {_leader(store_root, m) for m in members}
    listed = tupper.json("ps")
    assert not [c for c in listed if c["name"] in members], "ps leaves the pool's containers out"
    every = {c["name"]: c for c in tupper.json("ps", "--all")}
    assert {every[m]["state"] for m in members} == {"ready"}

    warm, cold = names("warm"), names("cold")
    result = tupper.json("run", HELLO, "--name", warm)
    assert result["leader_pid"] in leaders, "the run took a container that was booted before it"
    assert [u["active_state"] for u in result["units"]] == ["active"]
    assert tupper.json("run", HELLO, "--name", cold, "--cold")["leader_pid"] not in leaders

    # The pool refills to its size, with new containers; the claimed one is no member any more.
    after = _ready(tupper, 2)
    assert warm not in [c["name"] for c in after["containers"]]
    assert len(set(members) - {c["name"] for c in after["containers"]}) == 1

    # The claimed container is as a cold one: name and hostname, record, status, exec, logs, stop, start.
    for name in (warm, cold):
        assert tupper("exec", name, "--", "/bin/hostname", check=True).stdout.strip() == name
        hosts = tupper("exec", name, "--", "/bin/cat", "/etc/hosts", check=True).stdout
        assert name in hosts and not [m for m in members if m in hosts]
    w, c = tupper.json("status", warm), tupper.json("status", cold)
    assert w["state"] == c["state"] == "running"
    assert [(u["name"], u["active_state"], u["sub_state"]) for u in w["units"]] == \
           [(u["name"], u["active_state"], u["sub_state"]) for u in c["units"]]
    assert sorted(w) == sorted(c)
    wi, ci = tupper.json("inspect", warm), tupper.json("inspect", cold)
    assert sorted(wi) == sorted(ci)
    assert wi["name"] == warm and wi["machine"] == ci["machine"].replace(cold, warm)
    assert (store_root / "containers" / warm / "rootfs" / "etc/systemd/system/tupper.target").exists()
    assert "hello from tupper" in tupper("logs", warm, check=True).stdout
    assert [c["name"] for c in tupper.json("ps", "--filter", f"name={warm}")] == [warm]
    assert tupper.json("stop", warm)[0]["state"] == "stopped"
    assert tupper.json("start", warm)[0]["state"] == "running"
    assert tupper("exec", warm, "--", "/bin/hostname", check=True).stdout.strip() == warm
    assert tupper("rm", "--force", warm, cold).returncode == 0
    assert not [r for r in container_roots(store_root) if warm in r or cold in r]


def test_a_claim_whose_unit_fails_fails_the_run_and_destroys_the_pool_container(tupper, names, pool, store_root, tmp_path):
    member = pool(1)["containers"][0]["name"]
    leader = _leader(store_root, member)
    comp = write_component(tmp_path / "bad", "bad", {"bad.service": "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/false\n"})
    spec = write_spec(tmp_path / "bad.toml", [comp], name=names("bad"))
    run = tupper("run", spec)
    assert run.returncode == 1, run.stderr
    assert "bad.service" in run.stderr
    wait_for(lambda: not alive(leader), 10, "the claimed pool container to end")
    assert not (store_root / "containers" / member).exists()
    assert not [c for c in tupper.json("ps", "--all") if c["name"] == member], "it did not go back into the pool"
    refilled = _ready(tupper, 1)
    assert member not in [c["name"] for c in refilled["containers"]]


def test_a_successor_of_a_sigkilled_tupperd_readopts_pool_and_claimed_containers(tupper, bus, names, pool, store_root, tmp_path):
    members = [c["name"] for c in pool(2)["containers"]]
    claimed = names("claimed")
    result = tupper.json("run", HELLO, "--name", claimed)
    _ready(tupper, 2)
    # A claim under way when tupperd dies: its unit takes long to start.
    slow = write_component(tmp_path / "slow", "slow", {"slow.service": "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/sleep 60\n"})
    cut = names("cut")
    job = tupper("run", write_spec(tmp_path / "slow.toml", [slow], name=cut), "--no-wait")
    assert job.returncode == 0, job.stderr
    wait_for(lambda: (store_root / "containers" / cut).exists(), 30, "the claim to take a pool container")
    cut_leader = _leader(store_root, cut)
    ready = [c["name"] for c in _pool(tupper)["containers"] if c["state"] == "ready"]
    old = bus.tupperd_pid()
    bus.stop_tupperd(signal.SIGKILL)
    assert alive(result["leader_pid"]) and alive(cut_leader)

    listed = {c["name"]: c for c in tupper.json("ps", "--all")}  # a new tupperd, bus-activated
    assert bus.tupperd_pid() not in (None, old)
    assert listed[claimed]["state"] == "running" and listed[claimed]["leader_pid"] == result["leader_pid"]
    assert cut not in listed, "the claim cut short was undone"
    wait_for(lambda: not alive(cut_leader), 10, "the half-claimed container to end")
    assert not (store_root / "containers" / cut).exists()
    kept = [n for n in ready if n in listed]
    assert kept and all(listed[n]["state"] == "ready" for n in kept), "ready pool containers are adopted, not booted again"
    assert tupper.json("status", claimed)["units"][0]["active_state"] == "active"
    _ready(tupper, 2)
    assert tupper.json("stop", claimed)[0]["state"] == "stopped"
    assert set(members) & {c["name"] for c in _pool(tupper)["containers"]} <= set(members)


def test_pool_verbs_refuse_bad_input_with_exit_2(tupper, store_root):
    for args in (("pool", "set", IMAGE, "--size", "-1"), ("pool", "set", IMAGE), ("pool", "set", IMAGE, "--size", "65")):
        p = tupper(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr
    p = tupper("pool", "set", "no-such-image", "--size", "1")
    assert p.returncode != 0 and "no image 'no-such-image'" in p.stderr
    assert not (store_root / "tupperd.toml").exists() or "no-such-image" not in (store_root / "tupperd.toml").read_text()
    p = tupper("pool", "rm", "no-such-image")
    assert p.returncode != 0 and "no pool of image 'no-such-image'" in p.stderr


def test_a_spec_that_needs_a_boot_starts_cold_even_with_a_pool(tupper, names, pool, tmp_path, store_root):
    member = pool(1)["containers"][0]["name"]
    spec = write_spec(tmp_path / "vol.toml", [REPO / "services/hello"], name=names("vol"),
                      extra=f'[[volumes]]\nsource = "{tmp_path}"\ntarget = "/mnt/host"\nread_only = true\n')
    run = tupper("run", spec)
    assert run.returncode == 0, run.stderr
    assert "booting cold" in run.stderr and "volumes" in run.stderr, run.stderr
    assert member in [c["name"] for c in _pool(tupper)["containers"]], "the pool container was not taken"


def test_a_claimed_container_gets_its_secrets_env_ports_and_limits(tupper, names, pool, tmp_path, store_root):
    member = pool(1)["containers"][0]["name"]
    leader = _leader(store_root, member)
    secret = f"s-{uuid.uuid4().hex[:8]}"
    value = f"VALUE-{uuid.uuid4().hex}"
    assert tupper("secret", "set", secret, input=value).returncode == 0
    try:
        comp = write_component(
            tmp_path / "svc", "svc",
            {"svc.service": "[Service]\nType=exec\nExecStart=/bin/sh -c 'echo started $$GREETING; exec sleep infinity'\nLoadCredential=token\n"},
            extra='secrets = ["token"]\n')
        name = names("sec")
        spec = tmp_path / "sec.toml"
        spec.write_text(f'name = "{name}"\nimage = "{IMAGE}"\n[resources]\nmemory_max = "300M"\npids_max = 200\n'
                        f'[[components]]\npath = "{comp}"\nenv = {{ GREETING = "hi there" }}\n[secrets]\ntoken = "{secret}"\n'
                        '[[network.ports]]\ncontainer = 8080\n')
        result = tupper.json("run", spec)
        assert result["leader_pid"] == leader, "it was a claim"
        assert tupper("exec", name, "--", "/bin/cat", "/run/credentials/svc.service/token", check=True).stdout == value
        assert "started hi there" in tupper("logs", name, check=True).stdout
        assert result["ports"] and "8080" in result["ports"][0]
        limits = tupper.json("inspect", name)["resources"]
        assert limits["memory_max"] == 300 << 20 and limits["pids_max"] == 200
        cgroups = tupper.json("inspect", name)["cgroups"]
        pids = Path(cgroups["pids"]) / "pids.max" if "pids" in cgroups else Path(cgroups["unified"]) / "pids.max"
        assert pids.read_text().strip() == "200", "the limit is in the container's cgroup"
    finally:
        tupper("secret", "rm", secret)
