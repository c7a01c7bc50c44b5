"""tupper soak: many run/stop/rm cycles, `exec` calls and live upgrades through tupperd, and proof that
they leave nothing behind.

    .venv/bin/python bench/soak.py [--cycles 200] [--execs 200] [--upgrades 50]      (make soak)

What is counted, before and after (the "before" is taken after a warm-up of one of each, so that
one-time allocations such as tupperd's lazy imports do not count as growth):

- subvolumes   every subvolume in the store (`btrfs subvolume list -o`);
- mounts       every mount the host's mount namespace shows (/proc/self/mountinfo);
- loops        every loop device (`losetup -l`);
- nspawn       systemd-nspawn processes booting a root in this store;
- cgroups      container cgroups under this store's own cgroup parent (tupper-<id>);
- nspawn_dirs  nspawn's runtime dirs (/run/systemd/nspawn/{propagate,unix-export}) of the soak's containers;
- tupperd_fds  tupperd's open file descriptors (/proc/PID/fd);
- tupperd_rss  tupperd's resident memory (VmRSS in /proc/PID/status), also after each phase.

Each live upgrade alternates between two installed versions of a tiny component in a container that
runs through the whole soak (the one the exec calls go to) and is checked by reading its VERSION file
inside the container (one more exec).

Pass: zero growth in each, tupperd's RSS grows less than 5 MB, and tupperd is the same process at the
end. Mounts and loop devices are counted machine-wide (anything else mounting at the same time shows
up too, and the table names what appeared); the rest is scoped to this store and these containers.

`make soak` works like `make bench`: a store of its own ($TUPPER_SOAK_ROOT, default
/var/lib/tupper-soak, its base image copied from the default store or built once), a private
dbus-daemon whose tupperd is bus-activated from this checkout, the user's running containers checked
before and after. Everything the soak creates is named soak-<pid>-* and removed at the end, also on
failure or Ctrl-C. The suite runs a 30-cycle version (tests/integration/test_soak.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from helpers import PrivateBus, UserStateGuard, ensure_image, mounted, own_root, system_snapshot  # noqa: E402

SOAK_ROOT = Path("/var/lib/tupper-soak")
SPEC = REPO / "examples/hello.toml"
RSS_LIMIT_KB = 5 * 1024  # tupperd's RSS may grow by less than 5 MB
SETTLE_SECONDS = 10.0  # after the last call, how long leftovers of asynchronous clean-up may take to go
MEASURES = ("subvolumes", "mounts", "loops", "nspawn", "cgroups", "nspawn_dirs", "tupperd_fds", "tupperd_rss")
LISTED = ("subvolumes", "mounts", "loops", "nspawn", "cgroups", "nspawn_dirs")  # measures that are lists of things


class SoakFailed(RuntimeError):
    pass


# ---- measuring ------------------------------------------------------------------------------------


def _cgroup_parent(store_root: Path) -> str:
    from tupper.store.store import Store

    return Store(Path(os.path.abspath(store_root)), "btrfs").cgroup_parent


def _machine(name: str) -> str:
    from tupper.container.nspawn import machine_name

    return machine_name(name)


def tupperd_usage(pid: int) -> dict:
    """tupperd's open fds (what they point at) and its resident memory in kB."""
    fd_dir = Path(f"/proc/{pid}/fd")
    fds = []
    try:
        listed = os.listdir(fd_dir)
    except FileNotFoundError:
        raise SoakFailed(f"tupperd (pid {pid}) is gone") from None
    for fd in sorted(listed, key=int):
        try:
            fds.append(f"{fd} -> {os.readlink(fd_dir / fd)}")
        except OSError:
            continue  # closed while we looked
    rss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
    except FileNotFoundError:
        raise SoakFailed(f"tupperd (pid {pid}) is gone") from None
    return {"tupperd_fds": fds, "tupperd_rss": rss}


def measure(store_root: Path, prefix: str, pid: int) -> dict:
    """Everything a leak would show up in (lists; tupperd_rss in kB)."""
    snap = system_snapshot(store_root)
    parent = _cgroup_parent(store_root)
    machine_prefix = _machine(prefix)
    out = {
        "subvolumes": snap["subvolumes"],
        "mounts": snap["mounts"],
        "loops": snap["loops"],
        "nspawn": [p for p in snap["nspawn"] if f" {store_root}/" in p],
        "cgroups": [c for c in snap["cgroups"] if Path(c).parent.name == parent],
        "nspawn_dirs": [d for d in snap["nspawn_dirs"] if Path(d).name.startswith(machine_prefix)],
    }
    out.update(tupperd_usage(pid))
    return out


def _count(value) -> int:
    return value if isinstance(value, int) else len(value)


def growth(before: dict, after: dict) -> dict[str, int]:
    return {m: _count(after[m]) - _count(before[m]) for m in MEASURES}


def _ok(measure_name: str, grew: int) -> bool:
    return grew < RSS_LIMIT_KB if measure_name == "tupperd_rss" else grew <= 0


def _leaks(before: dict, after: dict) -> list[str]:
    g = growth(before, after)
    return [m for m in MEASURES if not _ok(m, g[m])]


# ---- the work -------------------------------------------------------------------------------------


def _component(work: Path, name: str, version: str) -> Path:
    """A tiny component: one service that says which version it is and sleeps."""
    d = work / f"{name}-{version}"
    (d / "units").mkdir(parents=True)
    (d / "bin").mkdir()
    (d / "component.toml").write_text(f'name = "{name}"\nversion = "{version}"\nunits = ["{name}.service"]\n')
    (d / "VERSION").write_text(version + "\n")
    (d / "units" / f"{name}.service").write_text(f"[Service]\nType=exec\nExecStart=/opt/{name}/bin/run\n")
    (d / "bin" / "run").write_text(f"#!/bin/sh\necho {name} {version} up\nexec sleep infinity\n")
    (d / "bin" / "run").chmod(0o755)
    return d


def soak(tupper_call, bus, store_root: Path, cycles: int = 200, execs: int = 200, upgrades: int = 50, log=print,
         *, prefix: str | None = None) -> dict:
    """Warm up, measure, do `cycles` run/stop/rm cycles, `execs` exec calls and `upgrades` live upgrades
    through tupperd, measure again. `tupper_call(*args)` runs the CLI against tupperd on `bus` (serving
    `store_root`) and returns a CompletedProcess. Returns the report (see `format_report`); everything
    created is removed before it returns, also when it raises."""
    store_root = Path(os.path.abspath(store_root))
    prefix = prefix or f"soak-{os.getpid()}"
    component = prefix.lower()[:40] + "-up"  # a component name: [a-z0-9][a-z0-9_.-]*
    live = f"{prefix}-live"  # runs through the whole soak: the container of the execs and upgrades
    containers: list[str] = []
    installed: list[str] = []
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    report: dict = {"passed": False, "cycles": cycles, "execs": execs, "upgrades": upgrades, "prefix": prefix,
                    "store": str(store_root), "errors": [], "seconds": {}}
    t_start = time.monotonic()

    def call(*args: str) -> str:
        p = tupper_call(*map(str, args))
        if p.returncode != 0:
            raise SoakFailed(f"tupper {' '.join(map(str, args))} exited {p.returncode}: {p.stderr.strip()}")
        return p.stdout

    def cycle(name: str) -> None:
        containers.append(name)
        call("run", SPEC, "--name", name)
        call("stop", name)
        call("rm", name)
        containers.remove(name)

    versions = ("1.0.0", "2.0.0")
    upgraded = [0]

    def upgrade() -> None:
        version = versions[(upgraded[0] + 1) % 2]
        call("component", "upgrade", live, component, version)
        upgraded[0] += 1
        got = call("exec", live, "--", "cat", f"/opt/{component}/VERSION").strip()
        if got != version:
            raise SoakFailed(f"after the upgrade to {version}, /opt/{component}/VERSION in {live} says {got!r}")

    def exec_once(i: int) -> None:
        out = call("exec", live, "--", "echo", f"soak {i}")
        if out != f"soak {i}\n":
            raise SoakFailed(f"tupper exec {live} -- echo 'soak {i}' printed {out!r}")

    try:
        # ---- set-up (not measured): two installed versions, one long-lived container -----------
        if upgrades:
            for version in versions:
                d = _component(work, component, version)
                call("sdk", "build", d, "-o", work)
                installed.append(version)  # before the call: an interrupted install is removed too
                call("component", "install", work / f"{component}-{version}.tupper")
            spec = work / "live.toml"
            spec.write_text(f'name = "{live}"\nimage = "debian-bookworm"\n[[components]]\nname = "{component}"\nversion = "1.0.0"\n')
        else:
            spec = SPEC
        containers.append(live)
        call("run", spec, "--name", live)

        # ---- warm-up: one of each, so one-time allocations are in "before" ---------------------
        log(f"soak: warm-up (one cycle, one exec{', two upgrades' if upgrades else ''}) ...")
        cycle(f"{prefix}-warm")
        exec_once(-1)
        if upgrades:
            upgrade()
            upgrade()
        pid = bus.tupperd_pid()
        if pid is None:
            raise SoakFailed("no tupperd on the bus after the warm-up")
        report["tupperd_pid"] = pid
        before = measure(store_root, prefix, pid)
        rss = report["rss_kb"] = {"before": before["tupperd_rss"]}  # tupperd's RSS after each phase

        # ---- the soak ------------------------------------------------------------------------
        step = max(1, cycles // 10)
        t0 = time.monotonic()
        for i in range(cycles):
            cycle(f"{prefix}-{i}")
            if (i + 1) % step == 0 or i + 1 == cycles:
                log(f"soak: {i + 1}/{cycles} run/stop/rm cycles ({time.monotonic() - t0:.0f}s)")
        report["seconds"]["cycles"] = round(time.monotonic() - t0, 1)
        rss["cycles"] = tupperd_usage(pid)["tupperd_rss"]
        t0 = time.monotonic()
        for i in range(execs):
            exec_once(i)
        if execs:
            log(f"soak: {execs} exec calls ({time.monotonic() - t0:.0f}s)")
        report["seconds"]["execs"] = round(time.monotonic() - t0, 1)
        rss["execs"] = tupperd_usage(pid)["tupperd_rss"]
        t0 = time.monotonic()
        for _ in range(upgrades):
            upgrade()
        if upgrades:
            log(f"soak: {upgrades} live upgrades ({time.monotonic() - t0:.0f}s)")
        report["seconds"]["upgrades"] = round(time.monotonic() - t0, 1)
        rss["upgrades"] = tupperd_usage(pid)["tupperd_rss"]

        # ---- after: what asynchronous clean-up is still doing gets a moment -------------------
        t0 = time.monotonic()
        while True:
            if bus.tupperd_pid() != pid:
                raise SoakFailed(f"tupperd (pid {pid}) is gone or was replaced (now: {bus.tupperd_pid()}) during the soak")
            after = measure(store_root, prefix, pid)
            if not [m for m in _leaks(before, after) if m != "tupperd_rss"] or time.monotonic() - t0 > SETTLE_SECONDS:
                break
            time.sleep(0.5)
        report["seconds"]["settle"] = round(time.monotonic() - t0, 1)
        g = growth(before, after)
        report["measures"] = {m: {"before": _count(before[m]), "after": _count(after[m]), "growth": g[m],
                                  "limit": f"< {RSS_LIMIT_KB} kB" if m == "tupperd_rss" else "0", "ok": _ok(m, g[m])}
                              for m in MEASURES}
        report["appeared"] = {m: sorted(set(after[m]) - set(before[m])) for m in (*LISTED, "tupperd_fds")
                              if set(after[m]) - set(before[m])}
        report["passed"] = all(r["ok"] for r in report["measures"].values())
    except SoakFailed as exc:
        report["errors"].append(str(exc))
    finally:
        # Clean-up whatever happened; a second Ctrl-C must not cut it short.
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
        for name in list(containers):
            p = tupper_call("rm", "--force", name)
            if p.returncode != 0 and "no container" not in p.stderr:
                report["errors"].append(f"clean-up: tupper rm --force {name}: {p.stderr.strip()}")
        for version in installed:
            p = tupper_call("component", "rm", component, version)
            if p.returncode != 0 and "no installed component" not in p.stderr:
                report["errors"].append(f"clean-up: tupper component rm {component} {version}: {p.stderr.strip()}")
        shutil.rmtree(work, ignore_errors=True)
        report["seconds"]["total"] = round(time.monotonic() - t_start, 1)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if report["errors"]:
        report["passed"] = False
    return report


# ---- output -----------------------------------------------------------------------------------------


LABELS = {
    "subvolumes": "subvolumes in the store",
    "mounts": "mounts (host)",
    "loops": "loop devices",
    "nspawn": "nspawn processes",
    "cgroups": "container cgroups",
    "nspawn_dirs": "nspawn runtime dirs",
    "tupperd_fds": "tupperd open fds",
    "tupperd_rss": "tupperd RSS (kB)",
}


def format_report(report: dict) -> str:
    lines = [f"soak: {report['cycles']} run/stop/rm cycles, {report['execs']} exec calls, {report['upgrades']} live upgrades "
             f"through tupperd (pid {report.get('tupperd_pid', '?')}), store {report['store']}"]
    if "measures" in report:
        header = ["", "before", "after", "growth", "allowed", "ok"]
        rows = [[LABELS[m], str(r["before"]), str(r["after"]), f"{r['growth']:+d}", r["limit"], "yes" if r["ok"] else "NO"]
                for m, r in report["measures"].items()]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if "rss_kb" in report and len(report["rss_kb"]) > 1:
            steps = list(report["rss_kb"].items())
            lines.append("  tupperd RSS growth by phase: " + ", ".join(
                f"{name} {value - previous:+d} kB" for (_, previous), (name, value) in zip(steps, steps[1:], strict=False)))
        for m, entries in report.get("appeared", {}).items():
            lines.append(f"  new in {LABELS[m]}: " + "; ".join(entries[:20]) + (" ..." if len(entries) > 20 else ""))
    s = report["seconds"]
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s.items()))
    for e in report["errors"]:
        lines.append(f"  error: {e}")
    lines.append("PASS" if report["passed"] else "FAIL")
    return "\n".join(lines)


# ---- make soak ----------------------------------------------------------------------------------------


def cli(bus: PrivateBus, root: Path):
    """The tupper CLI as a subprocess, a client of the soak's own tupperd. Each call in its own session:
    Ctrl-C reaches only this script, which lets the call finish and then cleans up."""
    env = bus.env(root)

    def call(*args: str) -> subprocess.CompletedProcess:
        p = subprocess.Popen([sys.executable, "-m", "tupper", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, cwd=REPO, start_new_session=True)
        try:
            out, err = p.communicate(timeout=600)
        except KeyboardInterrupt:
            p.communicate()
            raise
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            return subprocess.CompletedProcess(p.args, 124, out, f"timed out after 600s\n{err}")
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    return call


def interrupted(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=200, help="run/stop/rm cycles (default 200)")
    ap.add_argument("--execs", type=int, default=200, help="exec calls (default 200)")
    ap.add_argument("--upgrades", type=int, default=50, help="live upgrades (default 50)")
    args = ap.parse_args()
    if min(args.cycles, args.execs, args.upgrades) < 0:
        ap.error("counts must not be negative")
    if os.geteuid() != 0:
        sys.exit("soak: needs root (systemd-nspawn, btrfs)")
    store = own_root("TUPPER_SOAK_ROOT", SOAK_ROOT)

    guard = UserStateGuard(canary=False)
    guard.begin()
    was_mounted = mounted(store)
    ensure_image(store, log=lambda text: print(f"soak: {text}", flush=True))
    bus = PrivateBus(store, python=sys.executable, debug=False)
    signal.signal(signal.SIGTERM, interrupted)  # SIGTERM ends the run the way Ctrl-C does
    report = None
    t0 = time.monotonic()
    try:
        report = soak(cli(bus, store), bus, store, args.cycles, args.execs, args.upgrades,
                      log=lambda text: print(text, flush=True))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        bus.close()
        if not was_mounted and mounted(store):
            subprocess.run([sys.executable, "-m", "tupper", "--root", str(store), "store", "unmount"], capture_output=True, cwd=REPO)
        problems = guard.end()
        if problems:
            print(f"soak: the user's state changed: {'; '.join(problems)}", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    print()
    print(format_report(report))
    print(f"wall time: {time.monotonic() - t0:.0f}s")
    return 0 if report["passed"] and not problems else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("soak: interrupted; what it had created is removed", file=sys.stderr)
        sys.exit(130)
