"""Reliability: file descriptors tupperd receives, callers it refuses or loses, one truth per store,
faults of the pieces under a container, `store check`, and SIGKILL of tupperd at random moments."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import REPO, SERVICES, alive, make_tree, system_snapshot, wait_for, write_component

HELLO = REPO / "examples/hello.toml"


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fd_count(pid: int, timeout: float = 5.0) -> int:
    """tupperd's fd count once work a previous call left running (a stop's network clean-up in a
    worker thread) is over: the same count twice, 0.2 s apart."""
    deadline = time.monotonic() + timeout
    last = fd_count(pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = fd_count(pid)
        if now == last:
            return now
        last = now
    return last


def fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def record(store_root: Path, name: str) -> dict:
    return json.loads((store_root / "containers" / name / "record.json").read_text())


def as_nobody(argv: list[str]) -> list[str]:
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]


# ---- file descriptors --------------------------------------------------------------------------------


def test_every_failing_exec_closes_the_callers_descriptors_in_tupperd(tupper, bus, names):
    """`out=$(tupper exec ...)` returns whatever goes wrong, and tupperd's fd count does not grow."""
    running, stopped = names("run"), names("stopped")
    tupper("run", HELLO, "--name", running, check=True)
    tupper("run", HELLO, "--name", stopped, check=True)
    tupper("stop", stopped, check=True)
    pid = bus.tupperd_pid()
    before = settled_fd_count(pid)
    cases = [
        ([sys.executable, "-m", "tupper", "exec", "no-such-container", "--", "true"], 2),
        ([sys.executable, "-m", "tupper", "exec", stopped, "--", "true"], 1),
        ([sys.executable, "-m", "tupper", "exec", running, "--", "no-such-command"], 2),
        ([sys.executable, "-m", "tupper", "exec", "bad/name", "--", "true"], 2),
        (as_nobody([sys.executable, "-m", "tupper", "exec", running, "--", "true"]), 1),
    ]
    for argv, code in cases:
        # The CLI hands its own stdout and stderr (pipes) to tupperd: if tupperd kept them, this would hang.
        p = subprocess.run(argv, capture_output=True, text=True, env=tupper.env, cwd="/", timeout=30)
        assert p.returncode == code, (argv, p.stderr)
    assert bus.tupperd_pid() == pid
    assert fd_count(pid) == before, "no descriptor of a failed call stays open in tupperd"


def test_descriptors_sent_to_an_unknown_method_or_with_a_bad_signature_are_closed(tupper, bus, monkeypatch):
    from tupper.cli.client import Client
    from tupper.errors import TupperError

    tupper("ps", check=True)
    pid = bus.tupperd_pid()
    before = fd_count(pid)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    client = Client()
    try:
        for member, sig, body in (("NoSuchMethod", "h", [0]), ("Exec", "sh", ["x", 0]), ("Exec", "sashhh", ["no-such", ["true"], 0, 0, 0])):
            r, w = os.pipe()
            try:
                with pytest.raises(TupperError):
                    client.call(member, sig, body, unix_fds=[w])
                os.close(w)
                w = -1
                # tupperd's copy of the write end is closed: the reader sees end-of-file at once.
                os.set_blocking(r, False)
                wait_for(lambda r=r: _eof(r), 5, f"end-of-file after {member}({sig})")
            finally:
                os.close(r)
                if w >= 0:
                    os.close(w)
    finally:
        client.close()
    assert fd_count(pid) == before


def _eof(fd: int) -> bool:
    try:
        return os.read(fd, 1) == b""
    except BlockingIOError:
        return False


# ---- callers: refused, or gone mid-call -----------------------------------------------------------------------


READ_ONLY = {
    ("org.tupper1.Manager", m) for m in ("List", "ListJSON", "GetContainer", "GetJSON", "InspectJSON", "SecretHolders", "Stats", "ListNetworks",
                                         "ListContainers", "GetStatus", "Inspect", "GetStats", "ListImages", "ListComponents", "GetStore", "ListVolumes", "InspectVolume",
                                         "GetContainerByPID", "ListPools")
} | {("org.tupper1.Container", "ListUnits")}

NOBODY_CALLS = """
import json, os, sys
from tupper.cli.client import Client
from tupper.errors import TupperError
out = []
c = Client()
for path, iface, member, sig, body, fds in json.loads(sys.argv[1]):
    try:
        c.call(member, sig, body, path=path, interface=iface, unix_fds=fds or None)
        out.append("ok")
    except TupperError as exc:
        out.append(exc.message)
print(json.dumps(out))
"""


def _dummy(sig: str, name: str, pid: int = 0) -> list:
    values = {"s": name, "b": False, "d": -1.0, "i": 0, "u": pid, "q": 0, "h": 0, "as": [], "o": "/", "a{ss}": {}, "a{sv}": {}}
    out, i = [], 0
    while i < len(sig):
        t = sig[i:i + 5] if sig.startswith(("a{ss}", "a{sv}"), i) else sig[i:i + 2] if sig[i] == "a" else sig[i]
        out.append(values[t])
        i += len(t)
    return out


def _methods(bus, path: str) -> list[tuple[str, str, str]]:
    xml = subprocess.run(["busctl", f"--address={bus.address}", "introspect", "--xml-interface", "org.tupper1", path],
                         capture_output=True, text=True, check=True).stdout
    found = []
    for iface in ET.fromstring(xml).iter("interface"):
        if not iface.get("name", "").startswith("org.tupper1."):
            continue
        for m in iface.iter("method"):
            sig = "".join(a.get("type") for a in m.iter("arg") if a.get("direction", "in") == "in")
            found.append((iface.get("name"), m.get("name"), sig))
    return found


def test_nobody_is_refused_every_mutating_method_and_answered_every_read_only_one(tupper, bus, names, request):
    """Walks the introspection data: a new method that forgets @privileged fails here."""
    name = names()
    tupper("run", HELLO, "--name", name, check=True)
    container_path = "/org/tupper1/container/" + "".join(c if c.isalnum() else f"_{ord(c):02x}" for c in name)
    leader = tupper.json("status", name)["leader_pid"]  # GetContainerByPID's pid: one of the container's
    tupper("volume", "create", name, check=True)  # InspectVolume's: the string argument is the container's name
    request.addfinalizer(lambda: tupper("volume", "rm", name))
    calls, kinds = [], []
    for path in ("/org/tupper1", container_path):
        for iface, member, sig in _methods(bus, path):
            calls.append([path, iface, member, sig, _dummy(sig, name, leader), [1] * sig.count("h")])
            kinds.append((iface, member) in READ_ONLY)
    assert len(calls) >= 20 and any(kinds) and not all(kinds)
    p = subprocess.run(as_nobody([sys.executable, "-c", NOBODY_CALLS, json.dumps(calls)]), capture_output=True, text=True,
                       env=tupper.env, cwd="/", timeout=120)
    assert p.returncode == 0, p.stderr
    for call, read_only, result in zip(calls, kinds, json.loads(p.stdout), strict=True):
        if read_only:
            assert result == "ok", (call, result)
        else:
            assert "only root or members of group" in result, (call, result)
    assert tupper.json("status", name)["state"] == "running", "the refused calls changed nothing"


def test_a_client_that_disconnects_mid_run_does_not_wedge_tupperd(tupper, bus, names):
    name = names()
    tupper("ps", check=True)
    pid = bus.tupperd_pid()
    cli = subprocess.Popen([sys.executable, "-m", "tupper", "run", str(HELLO), "--name", name], env=tupper.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (tupper.root / "containers" / name).exists(), 30, "the run to begin")
    cli.kill()
    cli.wait()
    t0 = time.monotonic()
    tupper("ps", check=True)
    assert time.monotonic() - t0 < 5, "tupperd answers others while the orphaned run goes on"
    # The run goes on without its caller, and completes.
    wait_for(lambda: any(c["name"] == name and c["state"] == "running" for c in tupper.json("ps")), 60, "the run to finish")
    assert tupper.json("status", name)["units"][0]["active_state"] == "active"
    tupper("rm", "--force", name, check=True)
    assert bus.tupperd_pid() == pid
    # Known and not yet resolved: after a whole suite, one socket more may stay open here (seen once
    # after test_daemon.py, never alone); the per-path fd checks above are exact.


# ---- one truth per store -----------------------------------------------------------------------------------


def test_direct_refuses_to_change_a_store_that_tupperd_serves_but_reads_it(tupper, bus, names):
    name = names()
    tupper("run", HELLO, "--name", name, check=True)
    pid = bus.tupperd_pid()
    for verb in (("run", str(HELLO), "--name", names()), ("stop", name), ("rm", "--force", name), ("kill", name), ("start", name)):
        p = tupper("--direct", *verb)
        assert p.returncode == 1 and f"tupperd (pid {pid}) serves the store" in p.stderr, (verb, p.stderr)
    direct = {c["name"]: (c["state"], c["leader_pid"]) for c in tupper.json("--direct", "ps")}
    served = {c["name"]: (c["state"], c["leader_pid"]) for c in tupper.json("ps")}
    assert direct == served
    assert direct[name][0] == "running"


def test_tupperd_adopts_what_direct_ran_while_no_tupperd_served_the_store(tupper, bus, names):
    name = names()
    bus.stop_tupperd()
    p = tupper("--direct", "run", HELLO, "--name", name)
    assert p.returncode == 0, p.stderr
    served = {c["name"]: c for c in tupper.json("ps")}  # activates a tupperd, which adopts it
    assert served[name]["state"] == "running"
    assert served[name]["leader_pid"] == record(tupper.root, name)["leader_pid"]
    tupper("stop", name, check=True)
    assert tupper.json("status", name)["state"] == "stopped"


def test_a_second_tupperd_on_the_same_store_refuses_to_start(tupper, bus):
    tupper("ps", check=True)
    p = subprocess.run([sys.executable, "-m", "tupper.daemon", "--root", str(tupper.root)], capture_output=True, text=True,
                       env=tupper.env, timeout=30)
    assert p.returncode == 1
    assert f"another tupperd (pid {bus.tupperd_pid()}) already serves the store" in p.stderr


# ---- faults of the pieces ---------------------------------------------------------------------------------------


def test_sigkill_of_the_keeper_leaves_the_containers_running_controllable_and_their_exits_recorded(tupper, names):
    """The store's keeper parents every container's nspawn: killed, its containers run on (reparented),
    the next start starts a new keeper, which adopts them: when one ends by itself, its exit is recorded
    (status unknown) and what it leaves is cleaned up, with no tupper command run."""
    name, later = names(), names()
    tupper("run", HELLO, "--name", name, check=True)
    rec = record(tupper.root, name)
    keeper = rec["monitor_pid"]
    assert Path(f"/proc/{keeper}/cmdline").read_text().rstrip("\0") == f"tupper-keeper {tupper.root}", "ps says what the keeper is"
    assert int(Path(f"/proc/{rec['nspawn_pid']}/stat").read_text().rsplit(")", 1)[1].split()[1]) == keeper
    os.kill(keeper, signal.SIGKILL)
    wait_for(lambda: not alive(keeper), 5, "the keeper to die")
    assert tupper.json("status", name)["state"] == "running"
    assert tupper("exec", name, "--", "true").returncode == 0
    tupper("run", HELLO, "--name", later, check=True)
    assert record(tupper.root, later)["monitor_pid"] not in (0, keeper), "a new keeper for the next start"
    cdir = tupper.root / "containers" / name
    assert "tupper-keeper: adopted" in (cdir / "console.log").read_text(), "the new keeper adopted the orphan"
    # It ends by itself; nobody runs a tupper command on it: the adopting keeper records it and cleans up.
    tupper("exec", name, "--", "systemctl", "poweroff")
    wait_for(lambda: (cdir / "exit.json").is_file(), 20, "the adopting keeper to record the exit")
    assert json.loads((cdir / "exit.json").read_text())["returncode"] is None  # only a parent sees the status
    assert not alive(rec["leader_pid"])
    wait_for(lambda: system_snapshot(tupper.root, only=name)["cgroups"] == [], 10, "its cgroups to be removed")
    assert tupper.json("status", name)["state"] == "exited"
    tupper("stop", later, check=True)
    assert tupper.json("status", later)["state"] == "stopped"
    tupper("rm", "--force", name, later, check=True)
    for gone in (name, later):
        left = system_snapshot(tupper.root, only=gone)
        assert (left["subvolumes"], left["nspawn"], left["cgroups"], left["nspawn_dirs"]) == ([], [], [], [])


def test_sigkill_of_nspawn_records_the_exit_and_rm_leaves_nothing(tupper, names):
    name = names()
    tupper("run", HELLO, "--name", name, check=True)
    rec = record(tupper.root, name)
    os.kill(rec["nspawn_pid"], signal.SIGKILL)
    state = wait_for(lambda: tupper.json("status", name)["state"] in ("failed", "exited") and tupper.json("status", name)["state"],
                     15, "the container to be seen dead")
    assert state in ("failed", "exited")
    status = tupper.json("status", name)
    assert status["exit"]["exited_at"] > rec["started_at"]
    wait_for(lambda: not alive(rec["leader_pid"]), 10, "PID 1 to go with nspawn")
    tupper("rm", name, check=True)
    left = system_snapshot(tupper.root, only=name)
    assert (left["subvolumes"], left["nspawn"], left["cgroups"], left["nspawn_dirs"]) == ([], [], [], [])


# ---- store check ---------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_store_check_finds_what_a_crash_leaves_and_repair_fixes_it(tupper, bus, names, store_root):
    from tupper.store.store import Store

    store = Store.open(store_root, create=False)
    tag = uuid.uuid4().hex[:6]
    dead = _dead_pid()
    made = {}

    def subvolume(path: Path) -> None:
        make_tree(store_root, path)

    # A run interrupted by a crash: a record saying "creating", owned by a process that is gone.
    interrupted = names("interrupted")
    tupper("run", HELLO, "--name", interrupted, check=True)
    tupper("stop", interrupted, check=True)
    rec = record(store_root, interrupted)
    rec.update(phase="creating", owner_pid=dead, owner_starttime=1)
    (store_root / "containers" / interrupted / "record.json").write_text(json.dumps(rec))
    made["interrupted"] = store_root / "containers" / interrupted
    orphan = store_root / "containers" / names("orphan")
    subvolume(orphan / "rootfs")
    made["orphan-root"] = orphan
    rootless = store_root / "containers" / names("rootless")
    rootless.mkdir()
    (rootless / "record.json").write_text(json.dumps({**rec, "name": rootless.name, "phase": "stopped", "owner_pid": 0}))
    made["record-without-root"] = rootless
    corrupt = store_root / "containers" / names("corrupt")
    corrupt.mkdir()
    (corrupt / "record.json").write_text("{not json")
    made["corrupt-record"] = corrupt / "record.json"
    scratch = store_root / "tmp" / f"new.{dead}.1.t-{tag}"
    subvolume(scratch)
    cgroup = Path("/sys/fs/cgroup/systemd") / store.cgroup_parent / f"t-stale-{tag}"
    cgroup.mkdir(parents=True)
    made["cgroup"] = Path(f"{store.cgroup_parent}/t-stale-{tag}")
    nspawn_dir = Path("/run/systemd/nspawn/propagate") / rootless.name
    nspawn_dir.mkdir(parents=True)
    made["nspawn-dir"] = nspawn_dir
    agent = store.run_dir / "agents" / f"t-noone-{tag}"
    agent.mkdir(parents=True)
    half_image = store_root / "images" / f"t-half-{tag}"
    subvolume(half_image)
    made["image"] = half_image
    half_component = store_root / "components" / f"thalf{tag}" / "1.0.0"
    subvolume(half_component)
    made["component"] = half_component
    half_written = store_root / f".networks.json.{dead}.tmp"  # write_json cut between its write and its rename
    half_written.write_text("{")
    made["temp-file"] = half_written

    # tupperd logs what it finds when it starts (without repairing it).
    bus.stop_tupperd()
    tupper("ps", check=True)
    wait_for(lambda: str(orphan) in bus.log.read_text(), 10, "tupperd to log the check at start")
    assert orphan.exists(), "tupperd's start-up check does not repair"
    assert not made["interrupted"].exists(), "but it does finish what a crash interrupted (an interrupted run is undone)"
    assert not scratch.exists(), "and removes the scratch space of processes that are gone"
    del made["interrupted"]
    assert not agent.exists(), "and the agent directories of containers that are gone"
    assert not half_written.exists(), "and the files half-written by processes that are gone"
    half_written.write_text("{")  # again, for the check to find
    subvolume(scratch)  # again, for the check to find
    made["scratch"] = scratch
    agent.mkdir(parents=True)
    made["agent-dir"] = agent

    p = tupper("store", "check", "--json")
    assert p.returncode == 1, p.stderr
    found = {(f["kind"], f["path"]) for f in json.loads(p.stdout)}
    for kind, path in made.items():
        assert (kind, str(path)) in found, (kind, path, found)

    p = tupper("store", "check", "--repair", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    results = {f["path"]: f["result"] for f in json.loads(p.stdout)}
    assert all(results[str(path)] == "removed" for path in made.values()), results
    for kind, path in made.items():
        if kind != "cgroup":
            assert not path.exists(), path
    assert not cgroup.exists()
    p = tupper("store", "check")
    assert p.returncode == 0 and "consistent" in p.stdout, p.stdout


def test_rm_removes_a_container_directory_that_has_no_record(tupper, names, store_root):
    orphan = store_root / "containers" / names("orphan")
    orphan.mkdir()
    make_tree(store_root, orphan / "rootfs")
    p = tupper("rm", orphan.name)
    assert p.returncode == 0, p.stderr
    assert not orphan.exists()


def test_a_new_tupperd_removes_what_a_killed_writer_half_wrote(tupper, bus, names, store_root):
    """A SIGKILL between an atomic write's write and its rename leaves `.NAME.PID.tmp` beside the file
    (whole) it was to replace: the next tupperd removes it; one of a live process stays."""
    name = names()
    tupper("run", HELLO, "--name", name, check=True)
    cdir = store_root / "containers" / name
    dead, live = cdir / f".record.json.{_dead_pid()}.tmp", cdir / f".record.json.{os.getpid()}.tmp"
    for path in (dead, live):
        path.write_text('{"half": ')
    try:
        bus.stop_tupperd(signal.SIGKILL)
        assert tupper.json("status", name)["state"] == "running"  # bus activation: a new tupperd recovers first
        assert not dead.exists() and live.exists()
    finally:
        live.unlink(missing_ok=True)


# ---- SIGKILL of tupperd at random moments -------------------------------------------------------------------


def _make_component(root: Path, name: str, version: str) -> Path:
    d = write_component(root / f"{name}-{version}", name, {f"{name}.service": f"[Service]\nType=exec\nExecStart=/opt/{name}/bin/run\n"},
                        files={"bin/run": f"#!/bin/sh\necho {name} {version}\nexec sleep infinity\n", "VERSION": version})
    manifest = d / "component.toml"
    manifest.write_text(manifest.read_text().replace('version = "1.0.0"', f'version = "{version}"'))
    return d


PREFIX = "t-test-sigkill-of-tupperd"  # the names fixture's names for the test below
KILLS = int(os.environ.get("TUPPER_CRASH_KILLS", "100"))


@pytest.mark.timeout(600)  # 100 cuts, each followed by a recovery and a consistency check: ~260 s here
def test_sigkill_of_tupperd_at_random_moments_leaves_every_container_whole(tupper, bus, names, tmp_path, store_root):
    """run, stop, rm, upgrade and secret rotation, each cut by SIGKILL of tupperd at a random moment
    (seeded): afterwards every container is running and adopted, or stopped/failed with its exit
    recorded, or gone; `store check` finds nothing; `rm` removes every leftover."""
    rng = random.Random(int(os.environ.get("TUPPER_CRASH_SEED", "8")))
    comp = f"crash{uuid.uuid4().hex[:6]}"
    (tmp_path / "dist").mkdir()
    for version in ("1.0.0", "2.0.0"):
        d = _make_component(tmp_path, comp, version)
        p = tupper("sdk", "build", d, "-o", tmp_path / "dist")
        assert p.returncode == 0, p.stderr
        tupper("component", "install", tmp_path / "dist" / f"{comp}-{version}.tupper", check=True)
    secret = f"crash-{uuid.uuid4().hex[:6]}"
    tupper("secret", "set", secret, input="v1", check=True)
    cred = write_component(tmp_path / "cred", "cred", {"cred.service": "[Service]\nType=exec\nExecStart=/opt/cred/bin/run\nLoadCredential=key\n"},
                           files={"bin/run": "#!/bin/sh\nexec sleep infinity\n"}, extra='secrets = ["key"]\non_rotate = "restart"\n')
    spec = tmp_path / "spec.toml"
    spec.write_text(f'[[components]]\nname = "{comp}"\nversion = "1.0.0"\n[[components]]\npath = "{SERVICES / "hello"}"\n'
                    f'[[components]]\npath = "{cred}"\n[secrets]\nkey = "{secret}"\n')
    ops = ["run"] * 40 + ["stop"] * 15 + ["rm"] * 20 + ["upgrade"] * 15 + ["rotate"] * 10
    if only := os.environ.get("TUPPER_CRASH_OPS"):  # e.g. "run,rotate": cut only these (to chase one failure)
        ops = [op for op in ops if op in only.split(",")]
    ops = ops[:KILLS] if KILLS < len(ops) else ops + ["run"] * (KILLS - len(ops))
    rng.shuffle(ops)
    alive_names: list[str] = []
    versions: dict[str, str] = {}
    outcomes: dict[str, int] = {}
    try:
        for i, op in enumerate(ops):
            if op != "run" and not alive_names:
                op = "run"
            if op == "run":
                target = names(f"c{i}")
                argv = ["run", spec, "--name", target]
                span = 0.8
            else:
                target = rng.choice(alive_names)
                if op == "upgrade":
                    to = "2.0.0" if versions.get(target, "1.0.0") == "1.0.0" else "1.0.0"
                    argv, span = ["component", "upgrade", target, comp, to], 0.4
                elif op == "rotate":
                    argv, span = ["secret", "rotate", secret], 0.3
                else:
                    argv, span = ([op, target] if op == "stop" else ["rm", "--force", target]), 0.3
            tupper("ps", check=True)  # a tupperd is up (activation) before the cut
            pid = bus.tupperd_pid()
            cli = subprocess.Popen([sys.executable, "-m", "tupper", *map(str, argv)], env=tupper.env, cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(rng.uniform(0, span))
            os.kill(pid, signal.SIGKILL)
            try:
                cli.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                pytest.fail(f"kill {i} during {op} {target}: tupper {' '.join(map(str, argv))} still waits 120 s after the kill\n"
                            + _stuck(bus, cli, store_root))
            wait_for(lambda pid=pid: not alive(pid), 10, "tupperd to die")
            outcome = _check_consistent(tupper, store_root, f"kill {i} during {op} {target}")
            outcomes[op] = outcomes.get(op, 0) + 1
            alive_names = [n for n, st in outcome.items() if st == "running"]
            for n in list(outcome):
                if outcome[n] in ("stopped", "failed", "exited"):
                    tupper("rm", "--force", n, check=True)
            for n in alive_names:
                versions[n] = next(c["version"] for c in tupper.json("status", n)["components"] if c["name"] == comp)
            if len(alive_names) > 4:  # keep the machine light: a few running containers are enough to cut into
                tupper("rm", "--force", alive_names.pop(0), check=True)
    finally:
        for n in [c["name"] for c in tupper.json("ps") if c["name"].startswith(PREFIX)]:
            tupper("rm", "--force", n)
        for version in ("1.0.0", "2.0.0"):
            tupper("component", "rm", comp, version)
        tupper("secret", "rm", secret)
    assert sum(outcomes.values()) == len(ops) >= KILLS
    left = system_snapshot(store_root, only=PREFIX)
    assert (left["subvolumes"], left["nspawn"], left["cgroups"], left["nspawn_dirs"]) == ([], [], [], []), left


def _stuck(bus, cli: subprocess.Popen, store_root: Path) -> str:
    """What a CLI call that never returned was waiting for: the stacks of the CLI and of every tupperd
    on the test store, and the end of tupperd's log (the test bus's stderr). Kills the CLI."""
    lines = []
    daemons = subprocess.run(["pgrep", "-f", f"tupper.daemon --root {store_root}"], capture_output=True, text=True).stdout.split()
    for what, pid in [("the CLI", str(cli.pid))] + [("tupperd", p) for p in daemons]:
        dump = subprocess.run([str(Path(sys.executable).parent / "py-spy"), "dump", "--pid", pid], capture_output=True, text=True)
        lines.append(f"---- {what} ({pid}):\n{dump.stdout or dump.stderr}")
    lines.append("---- the test bus's log (tupperd's stderr), last 80 lines:\n" + "\n".join(bus.log.read_text().splitlines()[-80:]))
    cli.kill()
    cli.communicate()
    return "\n".join(lines)


def _check_consistent(tupper, store_root: Path, when: str) -> dict[str, str]:
    """The invariants after a cut. Returns {container: state} for the test's containers."""
    listed = {c["name"]: c for c in tupper.json("ps") if c["name"].startswith(PREFIX)}  # a new tupperd recovers
    on_disk = {d.name for d in (store_root / "containers").iterdir() if d.name.startswith(PREFIX)}
    assert set(listed) == on_disk, f"{when}: ps and the store disagree: {sorted(listed)} vs {sorted(on_disk)}"
    for name, c in listed.items():
        assert c["state"] in ("running", "stopped", "failed", "exited"), f"{when}: {name} is {c['state']}"
        assert "interrupted" not in c, f"{when}: {name} still interrupted after recovery"
        assert (store_root / "containers" / name / "rootfs").is_dir(), f"{when}: {name} has a record and no root"
        if c["state"] == "running":
            assert alive(c["leader_pid"]), f"{when}: {name} running without its PID 1"
            status = tupper.json("status", name)
            assert all(u["active_state"] in ("active", "activating", "reloading") for u in status["units"]), f"{when}: {status['units']}"
        else:
            assert "exit" in c or c["state"] == "stopped", f"{when}: {name} is {c['state']} with no exit recorded"
    check = tupper("store", "check", "--json")
    findings = [f for f in json.loads(check.stdout or "[]") if PREFIX in f["path"] or "/tmp/" in f["path"]]
    assert not findings, f"{when}: store check found {findings}"
    return {n: c["state"] for n, c in listed.items()}
