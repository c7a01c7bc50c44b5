"""Symlinks a container plants in its own root, and races against start-up and removal, through tupperd.

1. A container's root is its own to change: while it runs, its processes can turn `/opt` or
   `/etc/systemd/system` into a symlink out of the root (to `/`, a host path, a `../..` chain), and
   leave it so for the next start. tupper writes unit files into that root from the host during a live
   upgrade, and makes the component mount points before nspawn starts: neither may follow such a link
   onto the host, neither when the link sits there (a restart) nor when the container swaps it back
   and forth while the upgrade writes (the race). No container process exists while nspawn sets a
   container up (the previous boot's PID namespace died with its PID 1), so the swaps during an
   upgrade are the race a container can actually run.
2. `tupper rm --force` racing `tupper run`, and racing `tupper stop`, of the same name: whatever wins,
   the end state is consistent (listed with a real state and removable, or gone with its directory)
   and nothing of the container is left (subvolume, cgroup, nspawn process, nspawn runtime dir, a
   `store check` finding).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
import uuid
from pathlib import Path

from helpers import REPO, system_snapshot

HELLO = REPO / "examples/hello.toml"


def _listing(path: str) -> set[str]:
    try:
        return set(os.listdir(path))
    except FileNotFoundError:
        return set()


def _component(tmp_path: Path, name: str, version: str) -> Path:
    d = tmp_path / f"{name}-{version}"
    (d / "units").mkdir(parents=True)
    (d / "bin").mkdir()
    (d / "component.toml").write_text(f'name = "{name}"\nversion = "{version}"\nunits = ["{name}.service"]\n')
    (d / "VERSION").write_text(version + "\n")
    (d / "units" / f"{name}.service").write_text(f"[Service]\nType=exec\nExecStart=/opt/{name}/bin/run\n")
    (d / "bin" / "run").write_text("#!/bin/sh\nexec sleep infinity\n")
    (d / "bin" / "run").chmod(0o755)
    return d


def _install(tupper, tmp_path: Path, name: str, versions: tuple[str, ...]) -> None:
    for version in versions:
        p = tupper("sdk", "build", _component(tmp_path, name, version), "-o", tmp_path)
        assert p.returncode == 0, p.stderr
        tupper("component", "install", tmp_path / f"{name}-{version}.tupper", check=True)


def _uninstall(tupper, name: str) -> None:
    for c in tupper.json("component", "ls"):
        if c["name"] == name:
            for container in c["used_by"]:
                tupper("rm", "--force", container)
            tupper("component", "rm", name, c["version"])


# ---- 1. symlinks out of the root, planted and swapped by the container ------------------------------


def test_a_restart_with_opt_turned_into_a_symlink_out_of_the_root_creates_nothing_on_the_host(tupper, names, tmp_path):
    tag = uuid.uuid4().hex[:8]
    comp = f"race{tag}"
    host_dir = Path(f"/tmp/tupper-race-{tag}")  # exists on the host only: a link to it dangles inside
    host_dir.mkdir()
    _install(tupper, tmp_path, comp, ("1.0.0",))
    watched = {d: _listing(d) for d in ("/", "/opt", "/tmp")}
    try:
        for target, starts in (("/", True), (str(host_dir), False), ("../../../../../../.." + str(host_dir), False)):
            name = names()
            spec = tmp_path / f"{name}.toml"
            spec.write_text(f'name = "{name}"\n[[components]]\nname = "{comp}"\n')
            tupper("run", spec, check=True)
            # The container plants the link (the mount point inside /opt moves along with /opt).
            plant = tupper("exec", name, "--", "sh", "-c", f"mv /opt /opt.old && ln -s {target} /opt")
            assert plant.returncode == 0, plant.stderr
            tupper("stop", name, check=True)
            p = tupper("start", name)
            if starts:
                assert p.returncode == 0, f"/opt -> {target}: {p.stderr}"
                # Inside, /opt/<comp> is /<comp> now: the component is there and its service runs.
                assert tupper("exec", name, "--", "cat", f"/{comp}/VERSION").stdout == "1.0.0\n"
                units = {u["name"]: u for u in tupper.json("status", name)["units"]}
                assert units[f"{comp}.service"]["active_state"] == "active"
            else:
                assert p.returncode == 1, f"/opt -> {target}: {p.returncode} {p.stderr}"
                assert "cannot make the mount point" in p.stderr and "Traceback" not in p.stderr, p.stderr
            assert tupper("rm", "--force", name).returncode == 0
            for d, before in watched.items():
                assert _listing(d) - before == set(), f"/opt -> {target}: new on the host in {d}: {_listing(d) - before}"
            assert _listing(str(host_dir)) == set(), f"/opt -> {target}: the host directory got {_listing(str(host_dir))}"
    finally:
        _uninstall(tupper, comp)
        os.rmdir(host_dir)


UPGRADES = 3  # per target; an upgrade takes ~10 s while the container's swap loop keeps both cores busy
SWAP_LOOP = """
mkdir -p /etc/systemd/spare.d
while [ ! -e /run/race-stop ]; do
  mv -T /etc/systemd/system /etc/systemd/real && ln -sfn {target} /etc/systemd/system
  rm -f /etc/systemd/system
  mv -T /etc/systemd/real /etc/systemd/system
  n=$((n + 1))
done
echo "$n"
"""


def test_live_upgrades_while_the_container_swaps_its_unit_dir_for_a_link_out_write_nothing_on_the_host(tupper, names, tmp_path):
    """The container swaps /etc/systemd/system for a symlink to a host directory, thousands of times, while
    tupper writes the component's unit files into it from the host for upgrade after upgrade: every
    file lands inside the root (or the upgrade is refused and rolled back); none on the host."""
    tag = uuid.uuid4().hex[:8]
    comp = f"race{tag}"
    host_dir = Path(f"/tmp/tupper-race-{tag}")
    host_dir.mkdir()
    _install(tupper, tmp_path, comp, ("1.0.0", "2.0.0"))
    try:
        for target in (str(host_dir), "../../../../.." + str(host_dir)):
            name = names()
            spec = tmp_path / f"{name}.toml"
            spec.write_text(f'name = "{name}"\n[[components]]\nname = "{comp}"\nversion = "1.0.0"\n')
            tupper("run", spec, check=True)
            swapper = subprocess.Popen([*tupper.argv, "exec", name, "--", "sh", "-c", SWAP_LOOP.format(target=target)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tupper.env)
            results: dict[str, int] = {}
            try:
                time.sleep(0.3)
                for i in range(UPGRADES):
                    version = ("2.0.0", "1.0.0")[i % 2]
                    up = tupper("component", "upgrade", name, comp, version)
                    assert up.returncode == 0 or (up.returncode == 1 and ("rolled back" in up.stderr or "the rollback" in up.stderr)), up.stderr
                    assert "Traceback" not in up.stderr and "File \"" not in up.stderr, up.stderr
                    key = "upgraded" if up.returncode == 0 else "rolled back" if "rolled back" in up.stderr else "rollback failed"
                    results[key] = results.get(key, 0) + 1
                    assert _listing(str(host_dir)) == set(), f"/etc/systemd/system -> {target}: a unit file landed on the host: {_listing(str(host_dir))}"
            finally:
                tupper("exec", name, "--", "touch", "/run/race-stop")
                out, err = swapper.communicate(timeout=60)
            swaps = int(out.strip() or 0)
            print(f"\n/etc/systemd/system -> {target}: {swaps} swaps during {UPGRADES} upgrades: {results}")
            assert swaps > 100, f"the container swapped only {swaps} times: the race did not happen ({err})"
            if "rollback failed" not in results:
                units = {u["name"]: u for u in tupper.json("status", name)["units"]}
                assert units[f"{comp}.service"]["active_state"] == "active", f"upgraded or rolled back, the component runs: {results}"
            assert tupper("rm", "--force", name).returncode == 0
        assert _listing(str(host_dir)) == set()
    finally:
        _uninstall(tupper, comp)
        for f in _listing(str(host_dir)):
            os.unlink(host_dir / f)
        os.rmdir(host_dir)


# ---- 2. rm racing run, rm racing stop -----------------------------------------------------------------

ROUNDS = 50
STATES = ("running", "stopped", "failed")


def _in_thread(results: dict, key: str, tupper, *args: str) -> threading.Thread:
    """`tupper *args` in a thread of its own; its CompletedProcess (or what it raised) lands in results[key]."""

    def work() -> None:
        try:
            results[key] = tupper(*args, timeout=120)
        except Exception as exc:  # noqa: BLE001 - a timeout, reported by the test
            results[key] = exc

    t = threading.Thread(target=work)
    t.start()
    return t


def _leftovers(store_root: Path, name: str) -> dict:
    snap = system_snapshot(store_root, only=name)
    return {k: v for k, v in snap.items() if k not in ("mounts", "loops") and v}


def test_rm_racing_run_or_stop_of_the_same_name_ends_consistent_and_leaves_nothing(tupper, names, store_root):
    outcomes: dict[str, int] = {}
    t0 = time.monotonic()
    for i in range(ROUNDS):
        rng = random.Random(i)
        name = names(f"r{i}")
        results: dict[str, object] = {}
        if i % 2 == 0:
            what = "rm racing run"
            runner = _in_thread(results, "run", tupper, "run", HELLO, "--name", name)
            time.sleep(rng.uniform(0, 0.9))  # `tupper run` takes ~0.6 s; rm lands before, during and after it
            results["rm"] = tupper("rm", "--force", name, timeout=120)
            runner.join(180)
            assert not runner.is_alive(), f"round {i}: `tupper run` did not return"
            first = results["run"]
        else:
            what = "rm racing stop"
            tupper("run", HELLO, "--name", name, check=True, timeout=120)
            rm_first = rng.random() < 0.3
            delay = rng.uniform(0, 0.6)
            if rm_first:
                rmer = _in_thread(results, "rm", tupper, "rm", "--force", name)
                time.sleep(delay)
                stopper = _in_thread(results, "stop", tupper, "stop", name)
                rmer.join(180)
            else:
                stopper = _in_thread(results, "stop", tupper, "stop", name)
                time.sleep(delay)
                results["rm"] = tupper("rm", "--force", name, timeout=120)
            stopper.join(180)
            assert not stopper.is_alive(), f"round {i}: `tupper stop` did not return"
            first = results["stop"]
        rm = results["rm"]
        for p in (first, rm):
            assert not isinstance(p, Exception), f"round {i} ({what}): a tupper call failed: {p!r}"
            assert "Traceback" not in p.stderr, f"round {i} ({what}): a tupper call crashed:\n{p.stderr}"
        key = f"{what}: {'run' if i % 2 == 0 else 'stop'} exit {first.returncode}, rm exit {rm.returncode}"
        outcomes[key] = outcomes.get(key, 0) + 1
        context = (f"round {i} ({what}, seed {i}): first call exit {first.returncode} {first.stderr.strip()!r}; "
                   f"rm --force exit {rm.returncode} {rm.stderr.strip()!r}")

        # Consistent: listed with a real state (then removable), or gone together with its directory.
        listed = {c["name"]: c for c in tupper.json("ps")}
        cdir = store_root / "containers" / name
        if name in listed:
            state = listed[name]["state"]
            assert state in STATES, f"{context}: left in state {state!r}: {listed[name]}"
            again = tupper("rm", "--force", name)
            assert again.returncode == 0, f"{context}: left {state}, and then `rm --force` failed: {again.stderr}"
            assert name not in {c["name"] for c in tupper.json("ps")}, f"{context}: still listed after a second rm"
        assert not cdir.exists(), (f"{context}: not listed by `tupper ps`, but its directory is still there: "
                                   f"{sorted(p.name for p in cdir.iterdir()) if cdir.is_dir() else cdir}")

        # Nothing of it left: subvolume, cgroup, nspawn process, nspawn runtime dir (a moment for the kernel).
        deadline = time.monotonic() + 3
        while (left := _leftovers(store_root, name)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"{context}: left behind: {left}"
        check = tupper("store", "check", "--json")
        findings = [f for f in json.loads(check.stdout or "[]") if name in f["path"] or name in f["detail"]]
        assert not findings, f"{context}: `tupper store check` reports: {findings}"
    print(f"\n{ROUNDS} rounds in {time.monotonic() - t0:.0f}s; outcomes: {json.dumps(outcomes, indent=1)}")
