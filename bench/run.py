"""tupper benchmarks against plain systemd-nspawn: start, stop, and `tupper ps` with 10 and 20 containers.

    .venv/bin/python bench/run.py [--runs N] [--quick] [--cli PATH]

tupper is measured as users meet it: the CLI as a subprocess, wall time until it returns. The CLI
is a client of tupperd (org.tupper1 on the system bus), so every tupper number is one CLI process
plus its call to tupperd, which does the work. The benchmark never touches the user's state: it
works in a store of its own ($TUPPER_BENCH_ROOT, default /var/lib/tupper-bench, the base image copied
from the default store or built once) with a tupperd of its own, bus-activated on a private
dbus-daemon from this checkout's code by the first call; tupper's bytecode is compiled so that no
CLI call compiles it. The user's running containers are checked before and after (same leader PID). The baseline
(bench/baseline.py) does the same work by hand in this process. tupper and baseline runs alternate,
so drift on the machine affects both alike. Results go to bench/results/latest.json and, for full
runs, to docs/benchmarks.md. Everything created is named bench-* and removed at the end, also on
failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from baseline import NSPAWN_RUN, RawContainer
from helpers import BENCH_ROOT, PrivateBus, UserStateGuard, ensure_image, mounted, own_root, timed_cli
from isolation import measure_health_cpu, measure_limits_start
from network import measure_forward_rps, measure_network_start
from sdk import PAYLOAD_MB, measure_sdk_build, measure_upgrade

from tupper.cli.client import Client
from tupper.container import cgroups
from tupper.errors import TupperError
from tupper.progress import Progress
from tupper.runtime import limits

REPO = Path(__file__).resolve().parent.parent
TUPPER = REPO / ".venv/bin/tupper"  # --cli changes it
SPEC = REPO / "examples/hello.toml"
COMPONENT = REPO / "services/hello"
UNIT = "hello.service"
STORE = own_root("TUPPER_BENCH_ROOT", BENCH_ROOT)
IMAGE = STORE / "images/debian-bookworm"
SCRATCH = STORE / "tmp"
RESULTS = REPO / "bench/results/latest.json"
DOC = REPO / "docs/benchmarks.md"

PS_COUNTS = (10, 20)  # `tupper ps` is timed with this many bench containers running
SETTLE = 1.0  # seconds between "unit active" and stop, the same for tupper and the baseline
# start and stop: ratio tupper/baseline (medians); ps20, stats20: seconds with 20 running. ps10, stats10 have no target.
TARGETS = {"start": 1.3, "stop": 1.5, "ps20": 0.2, "stats20": 0.15, "upgrade": 0.5,  # ratios, then seconds
           "limits_start": 1.05, "health_cpu": 2.0,  # ratio; percent of one CPU
           "net_start": 1.3, "forward_rps": 0.9}  # ratio (at most); ratio (at least)
HEALTH_COUNT, HEALTH_WINDOW = 20, 30.0  # containers checked every second, seconds of tupperd CPU measured
NO_SUCH = "bench-no-such-container"  # for a CLI call that tupperd answers at once (with an error)

PREFIX = f"bench-{os.getpid()}"  # unique per run, so a concurrent run cannot collide with this one


# ---- helpers ------------------------------------------------------------------------------------


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]  # nearest rank
    return {"median": statistics.median(ordered), "p90": p90, "min": ordered[0], "n": len(ordered), "values": values}


def tupper(*args: str, expect: int = 0) -> tuple[float, str]:
    """Run the tupper CLI; return (wall seconds, stdout). Raises when it fails."""
    elapsed, stdout, _ = timed_cli(TUPPER, *args, expect=expect)
    return elapsed, stdout


def reported_seconds(stdout: str, pattern: str) -> float | None:
    """The time tupper prints itself: "running ... in 0.40s" is the runtime's work in tupperd (snapshot →
    units active); "stopped (0.07s)" is the Stop call as the CLI times it (tupperd's stop + the D-Bus round trip)."""
    m = re.search(pattern, stdout)
    return float(m.group(1)) if m else None


def machine() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    systemd = subprocess.run(["systemd-nspawn", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "systemd": systemd.strip(),
        "os": _os_release(),
        "python": platform.python_version(),
        "cgroups": cgroups.Layout.detect().kind,
    }


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "unknown"


# ---- what is created, so that it can all be removed --------------------------------------------


class Cleanup:
    def __init__(self) -> None:
        self.tupper_names: list[str] = []
        self.raw: list[RawContainer] = []

    def remove_tupper(self, name: str) -> None:
        subprocess.run([str(TUPPER), "rm", "-f", name], capture_output=True)
        if name in self.tupper_names:
            self.tupper_names.remove(name)

    def remove_raw(self, c: RawContainer) -> None:
        c.destroy()
        if c in self.raw:
            self.raw.remove(c)

    def all(self) -> None:
        for name in list(self.tupper_names):
            self.remove_tupper(name)
        # The bench store's networks (the default one, made by the first private start) and their bridges.
        out = subprocess.run([str(TUPPER), "network", "ls", "--json"], capture_output=True, text=True).stdout
        for net in json.loads(out or "[]"):
            subprocess.run([str(TUPPER), "network", "rm", net["name"]], capture_output=True)
        for c in list(self.raw):
            try:
                self.remove_raw(c)
            except Exception as exc:  # noqa: BLE001 - keep cleaning the rest
                print(f"cleanup: {c.name}: {exc}", file=sys.stderr)

    @staticmethod
    def leftovers() -> list[str]:
        """Anything of this run still on the machine (should be empty)."""
        found = [str(p) for p in SCRATCH.glob(f"{PREFIX}-*")]
        found += [str(p) for p in (STORE / "containers").glob(f"{PREFIX}-*")]
        found += [str(p) for h in cgroups.Layout.detect().hierarchies for p in h.own.glob(f"tupper*/{PREFIX}-*")]
        found += [str(p) for d in ("propagate", "unix-export") for p in (NSPAWN_RUN / d).glob(f"{PREFIX}-*")]
        return found


# ---- the measurements ---------------------------------------------------------------------------


def tupper_start_stop(i: int, cleanup: Cleanup) -> dict:
    name = f"{PREFIX}-t{i}"
    cleanup.tupper_names.append(name)
    start, out = tupper("run", str(SPEC), "--name", name)
    inner_start = reported_seconds(out, r" in ([\d.]+)s")
    time.sleep(SETTLE)
    stop, out = tupper("stop", name)
    inner_stop = reported_seconds(out, r"\(([\d.]+)s\)")
    cleanup.remove_tupper(name)
    return {"start": start, "stop": stop, "start_reported": inner_start, "stop_reported": inner_stop}


def baseline_start_stop(i: int, cleanup: Cleanup) -> dict:
    c = RawContainer(f"{PREFIX}-r{i}", IMAGE, SCRATCH, COMPONENT, UNIT)
    cleanup.raw.append(c)
    t0 = time.perf_counter()
    c.start()
    start = time.perf_counter() - t0
    time.sleep(SETTLE)
    t0 = time.perf_counter()
    c.stop()
    stop = time.perf_counter() - t0
    cleanup.remove_raw(c)
    return {"start": start, "stop": stop}


def measure_ps(runs: int, cleanup: Cleanup) -> dict:
    """`tupper ps` and `tupper stats --no-stream --json` wall time with 10, then 20 bench containers running."""
    names: list[str] = []
    out: dict = {}
    for count in PS_COUNTS:
        print(f"  starting {count - len(names)} more containers: `tupper ps` with {count} running ...", flush=True)
        while len(names) < count:
            name = f"{PREFIX}-ps{len(names)}"
            names.append(name)
            cleanup.tupper_names.append(name)
            tupper("run", str(SPEC), "--name", name)
        _, text = tupper("ps", "--json")
        listed = json.loads(text)
        ours = [r for r in listed if r["name"] in names and r["state"] == "running"]
        if len(ours) != count:
            raise RuntimeError(f"expected {count} running bench containers, ps shows {len(ours)}")
        times = [tupper("ps")[0] for _ in range(runs)]
        _, text = tupper("stats", "--no-stream", "--json")
        if len([s for s in json.loads(text) if s["name"] in names]) != count:
            raise RuntimeError(f"`tupper stats` does not show the {count} running bench containers")
        stats_times = [tupper("stats", "--no-stream", "--json")[0] for _ in range(runs)]
        out[str(count)] = {"times": times, "stats_times": stats_times, "listed": len(listed),
                           "running": sum(r["state"] == "running" for r in listed)}
    for name in names:
        cleanup.remove_tupper(name)
    return out


def measure_floor(runs: int) -> dict:
    """What every tupper command pays before tupperd does any work: a Python process that does nothing,
    and a whole CLI call that tupperd answers at once (`tupper stop` of a container that does not exist)."""
    py = str(REPO / ".venv/bin/python")
    out = {}
    vals = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([py, "-c", "pass"], check=True)
        vals.append(time.perf_counter() - t0)
    out["interpreter"] = summary(vals)
    out["client_call"] = summary([tupper("stop", NO_SUCH, expect=2)[0] for _ in range(runs)])
    return out


# ---- tupperd ------------------------------------------------------------------------------------


def tupperd_pid() -> int | None:
    """The pid of the process that owns org.tupper1 on the system bus, None when nobody does."""
    client = Client()
    try:
        return client.call("GetConnectionUnixProcessID", "s", ["org.tupper1"], destination="org.freedesktop.DBus",
                           path="/org/freedesktop/DBus", interface="org.freedesktop.DBus")[0]
    except TupperError:  # NameHasNoOwner
        return None
    finally:
        client.close()


def fresh_tupperd() -> int:
    """Warm up with one call, which bus-activates the benchmark's own tupperd (on its private bus,
    serving its own store) from the code of this checkout. Returns that tupperd's pid."""
    tupper("ps")  # the warm-up call: activates tupperd
    new = tupperd_pid()
    if new is None:
        sys.exit("bench: no tupperd on the benchmark's private bus after the warm-up call")
    return new


# ---- output -------------------------------------------------------------------------------------


def verdicts(results: dict) -> dict:
    start, stop, ps = results["start"], results["stop"], results["ps"]
    return {
        "start": start["ratio"] <= TARGETS["start"],
        "stop": stop["ratio"] <= TARGETS["stop"],
        "ps20": ps["20"]["tupper"]["median"] < TARGETS["ps20"],
        "stats20": ps["20"]["stats"]["median"] < TARGETS["stats20"],
        "upgrade": results["upgrade"]["tupper"]["median"] < TARGETS["upgrade"],
        "limits_start": results["limits_start"]["ratio"] <= TARGETS["limits_start"],
        "health_cpu": results["health_cpu"]["http"]["percent"] < TARGETS["health_cpu"],
        "net_start": results["net_start"]["ratio"] <= TARGETS["net_start"],
        "forward_rps": results["forward_rps"]["ratio"] >= TARGETS["forward_rps"],
    }


def table_rows(results: dict) -> list[list[str]]:
    ok = verdicts(results)
    rows = []
    for key, label in (("start", "start (run → unit active)"), ("stop", "stop (PowerOff → nspawn gone)")):
        r = results[key]
        t, b = r["tupper"], r["baseline"]
        rows.append([label, f"{t['median']:.3f}", f"{t['p90']:.3f}", f"{t['min']:.3f}",
                     f"{b['median']:.3f}", f"{b['p90']:.3f}", f"{b['min']:.3f}",
                     f"{r['ratio']:.2f}", f"≤ {TARGETS[key]}", "yes" if ok[key] else "NO"])
    for count in PS_COUNTS:
        t = results["ps"][str(count)]["tupper"]
        key = f"ps{count}"
        target, met = (f"< {TARGETS[key]} s", "yes" if ok[key] else "NO") if key in TARGETS else ("-", "-")
        rows.append([f"`tupper ps`, {count} running", f"{t['median']:.3f}", f"{t['p90']:.3f}", f"{t['min']:.3f}",
                     "-", "-", "-", "-", target, met])
    for count in PS_COUNTS:
        t = results["ps"][str(count)]["stats"]
        key = f"stats{count}"
        target, met = (f"< {TARGETS[key]} s", "yes" if ok[key] else "NO") if key in TARGETS else ("-", "-")
        rows.append([f"`tupper stats --no-stream --json`, {count} running", f"{t['median']:.3f}", f"{t['p90']:.3f}", f"{t['min']:.3f}",
                     "-", "-", "-", "-", target, met])
    t = results["upgrade"]["tupper"]
    rows.append(["live upgrade (command → new units active)", f"{t['median']:.3f}", f"{t['p90']:.3f}", f"{t['min']:.3f}",
                 "-", "-", "-", "-", f"< {TARGETS['upgrade']} s", "yes" if ok["upgrade"] else "NO"])
    r = results["limits_start"]
    t, b0 = r["limited"], r["plain"]
    rows.append(["start with [resources] (vs the same spec without)", f"{t['median']:.3f}", f"{t['p90']:.3f}", f"{t['min']:.3f}",
                 f"{b0['median']:.3f}", f"{b0['p90']:.3f}", f"{b0['min']:.3f}", f"{r['ratio']:.2f}",
                 f"≤ {TARGETS['limits_start']}", "yes" if ok["limits_start"] else "NO"])
    h = results["health_cpu"]
    n = h["http"]["containers"]
    rows.append([f"tupperd CPU, {n} containers unchecked (% of one CPU)", f"{h['none']['percent']:.2f}",
                 "-", "-", "-", "-", "-", "-", "-", "-"])
    raw = h["http"].get("raw_percent")
    rows.append([f"tupperd CPU, {n} containers, http check every 1 s (baseline: the same GETs by a plain loop)",
                 f"{h['http']['percent']:.2f}", "-", "-", f"{raw:.2f}" if raw else "-", "-", "-",
                 f"{h['http']['percent'] / raw:.2f}" if raw else "-", f"< {TARGETS['health_cpu']} %", "yes" if ok["health_cpu"] else "NO"])
    rows.append([f"tupperd CPU, {n} containers, exec check every 1 s", f"{h['exec']['percent']:.2f}",
                 "-", "-", "-", "-", "-", "-", "-", "-"])
    rows += network_rows(results, ok)
    b = results["sdk_build"]
    t = b["tupper"]
    rows.append([f"`sdk build`, {b['payload_bytes'] >> 20} MB payload → {b['package_bytes'] / 2**20:.0f} MB package",
                 f"{t['median']:.3f}", f"{t['p90']:.3f}", f"{t['min']:.3f}", "-", "-", "-", "-", "-", "-"])
    return rows


def network_rows(results: dict, ok: dict) -> list[list[str]]:
    r = results["net_start"]
    b = r["baseline"]
    rows = []
    for kind, label in (("private", "start, `mode = \"private\"` + 1 published port (vs raw nspawn)"),
                        ("host", "start, `mode = \"host\"` (vs raw nspawn)")):
        t = r[kind]
        ratio = t["median"] / b["median"]
        rows.append([label, f"{t['median']:.3f}", f"{t['p90']:.3f}", f"{t['min']:.3f}", f"{b['median']:.3f}", f"{b['p90']:.3f}",
                     f"{b['min']:.3f}", f"{ratio:.2f}", f"≤ {TARGETS['net_start']}" if kind == "private" else "-",
                     ("yes" if ok["net_start"] else "NO") if kind == "private" else "-"])
    f = results["forward_rps"]
    t, d = f["forwarded"], f["direct"]
    rows.append([f"requests/s through 127.0.0.1:PORT (vs straight to the container's address; ab -n {f['requests']} -c {f['concurrency']})",
                 f"{t['median']:.0f}", "-", f"{t['min']:.0f}", f"{d['median']:.0f}", "-", f"{d['min']:.0f}", f"{f['ratio']:.2f}",
                 f"≥ {TARGETS['forward_rps']}", "yes" if ok["forward_rps"] else "NO"])
    return rows


def network_results(starts: dict, rps: dict) -> dict:
    out = {"net_start": {k: summary(v) for k, v in starts.items()}}
    out["net_start"]["ratio"] = out["net_start"]["private"]["median"] / out["net_start"]["baseline"]["median"]
    out["forward_rps"] = {"forwarded": summary(rps["rps"]["forwarded"]), "direct": summary(rps["rps"]["direct"]),
                          "requests": rps["requests"], "concurrency": rps["concurrency"]}
    out["forward_rps"]["ratio"] = out["forward_rps"]["forwarded"]["median"] / out["forward_rps"]["direct"]["median"]
    return out


def raw_start(i: int, cleanup: Cleanup) -> float:
    """The baseline's start alone (the container is removed at once)."""
    c = RawContainer(f"{PREFIX}-rn{i}", IMAGE, SCRATCH, COMPONENT, UNIT)
    cleanup.raw.append(c)
    t0 = time.perf_counter()
    c.start()
    took = time.perf_counter() - t0
    cleanup.remove_raw(c)
    return took


HEADER = ["", "tupper median", "p90", "min", "baseline median", "p90", "min", "ratio", "target", "met"]


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    for r in [HEADER, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def markdown(results: dict) -> str:
    m = results["machine"]
    rows = table_rows(results)
    lines = [
        f"## Results, {results['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, {m['systemd']}, {m['os']}, "
        f"cgroups {m['cgroups']}, Python {m['python']}. {results['runs']} runs each; times in seconds.",
        "",
        f"Every tupper command went through tupperd (pid {results['tupperd']['pid']}, bus-activated for this run by the "
        "warm-up call): the times are one `tupper` CLI process, a D-Bus client, plus tupperd's work.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    b = results["breakdown"]
    lines += [
        "",
        "Where tupper's extra time goes (medians):",
        "",
        f"- start: tupperd's runtime reports {b['start_reported']:.3f} s for the work (snapshot → units active), "
        f"{b['start_reported_ratio']:.2f} × the baseline; the other {b['start_cli']:.3f} s of the wall time is the rest of "
        "the call in tupperd (reading the spec, following the new container's units) and the CLI process around it "
        "(Python start-up, imports, connecting to the bus, progress signals, output, exit).",
        f"- stop: the Stop call to tupperd takes {b['stop_reported']:.3f} s as the CLI times it, "
        f"{b['stop_reported_ratio']:.2f} × the baseline; the CLI process around it adds {b['stop_cli']:.3f} s.",
        f"- a Python process that does nothing takes {b['interpreter']:.3f} s; a whole `tupper` call that tupperd "
        f"answers at once (`tupper stop` of a container that does not exist) takes {b['client_call']:.3f} s.",
        "",
    ]
    return "\n".join(lines)


DOC_INTRO = """\
# Benchmarks

`make bench` (`bench/run.py`) measures tupper against the plainest way to do the same thing by hand
(`bench/baseline.py`), on the same machine, in one run. The `tupper` CLI is a client of the daemon
tupperd (bus name `org.tupper1`), which does the work: every tupper number below is one CLI process
plus its call to tupperd. The benchmark leaves the user's state alone: it works in a store of its own
(`/var/lib/tupper-bench`, the base image copied from the default store by btrfs send/receive, or built
once) and starts a dbus-daemon of its own, where one warm-up call bus-activates a tupperd running the
checkout's code; it also compiles tupper's bytecode, so no CLI call compiles modules.

- **start**: `tupper run examples/hello.toml --name bench-…` as a subprocess, wall time until it
  returns (then every component unit is active), versus the baseline: a btrfs snapshot of the same
  image (btrfsutil), a fresh `/etc/machine-id` and no `/etc/hostname` (as tupper does),
  `hello.service` installed by hand with a `multi-user.target.wants` link, the payload bound with
  `--bind-ro`, `systemd-nspawn --boot --keep-unit --register=no --console=pipe`, and polling
  `ActiveState` over the container's own system bus (pystemd) every 10 ms, the interval tupper uses,
  until the unit is active. Timed from before the snapshot.
- **stop**: `tupper stop NAME` (wall time) versus `PowerOff` over the container's bus until the
  nspawn process has exited (woken by a pidfd: `Popen.wait` with a timeout polls with sleeps of up
  to 50 ms, which rounded the baseline up to 0.065 s or 0.115 s). Both containers have been up for
  1 s when stopped. Most of a stop is the container shutting down, which varies from about 0.03 s
  to 0.09 s from one stop to the next, for tupper and the baseline alike: with 10 runs, the stop
  ratio of medians moves by 0.2 or more from one benchmark run to the next. What tupper adds to a
  stop is steadier: see the lines under the table.
- **ps**: `tupper ps` wall time with 10, then 20 bench containers running.

tupper and baseline runs alternate (and alternate which goes first) so that drift on the machine
affects both alike. Each row gives the median, the 90th percentile (nearest rank) and the minimum.
The baseline runs inside the benchmark's own Python process, so the ratio includes what every
`tupper` command pays to start a Python interpreter, import the CLI and call tupperd; the lines
under the table separate that from the time tupper itself reports.
Raw numbers: `bench/results/latest.json` (not committed).

- **live upgrade**: `tupper component upgrade` of a running container's component between two
  installed versions (alternating), wall time until the new units are active.
- **sdk build**: `tupper sdk build` of a component with a 50 MB payload (half random, half text).

- **network start**: `tupper run` of services/hello with `mode = "private"` and one published port
  (its own network namespace, a veth pair on the store's default bridge, an address, the nftables
  table rebuilt, /etc/hosts written), and with `mode = "host"`, against the same raw baseline (nspawn
  on the host's network), the three alternating. The plain **start** row above uses
  examples/hello.toml, which since networks landed runs in a private network (the default) too.
- **requests/s**: `ab` (apache2-utils) against examples/web.toml's server, through the port forwarded
  on the host's 127.0.0.1 (nftables DNAT in `output`, route_localnet, masquerade) and straight to the
  container's address on the bridge, alternating; each `ab` run is bounded in requests and time.

Targets: start ratio ≤ 1.3, stop ratio ≤ 1.5, `tupper ps` with 20 running < 0.2 s, `tupper stats --no-stream --json` with 20 running < 0.15 s, live upgrade < 0.5 s, start with `[resources]` ≤ 1.05 × without, tupperd's CPU for http checks of 20 containers every second < 2 % of one CPU, start with a private network and a port ≤ 1.3 × raw nspawn, requests/s through the forward ≥ 0.9 × straight.

"""

MARK_BEGIN = "<!-- bench results: written by bench/run.py -->"
MARK_END = "<!-- end of bench results -->"


def write_doc(results: dict) -> None:
    section = f"{MARK_BEGIN}\n{markdown(results)}{MARK_END}\n"
    text = DOC.read_text() if DOC.exists() else DOC_INTRO
    if MARK_BEGIN in text and MARK_END in text:
        head, _, rest = text.partition(MARK_BEGIN)
        _, _, tail = rest.partition(MARK_END + "\n")
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)


# ---- main ---------------------------------------------------------------------------------------


def preflight() -> None:
    if os.geteuid() != 0:
        sys.exit("bench: needs root (systemd-nspawn, btrfs)")
    # tupper raises the kernel limits itself when it boots a container (inotify instances above all); for the baseline too.
    for problem in limits.prepare(Progress(), 20):
        print(f"bench: {problem}", file=sys.stderr)
    # The CLI's bytecode, as an installed tupper has it (PYTHONDONTWRITEBYTECODE would leave every call compiling).
    subprocess.run([str(REPO / ".venv/bin/python"), "-m", "compileall", "-q", str(REPO / "tupper")], check=True)


def interrupted(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="runs of each measurement (default 10)")
    ap.add_argument("--quick", action="store_true", help="3 runs, and leave docs/benchmarks.md alone")
    ap.add_argument("--cli", type=Path, help="another tupper executable to measure, e.g. of an older version "
                                             "(default .venv/bin/tupper; leaves docs/benchmarks.md alone)")
    ap.add_argument("--network", action="store_true", help="only the network start and forwarded requests/s "
                                                          "measurements, printed (leaves docs/benchmarks.md alone)")
    ap.add_argument("--isolation", action="store_true", help="only the resource-limit start and health-check CPU "
                                                            "measurements, printed (leaves docs/benchmarks.md alone)")
    args = ap.parse_args()
    global TUPPER
    if args.cli:
        TUPPER = args.cli.resolve()
    runs = 3 if args.quick else args.runs
    if runs < 1:
        ap.error("--runs must be at least 1")

    preflight()
    guard = UserStateGuard(canary=False)
    guard.begin()
    was_mounted = mounted(STORE)
    ensure_image(STORE, log=lambda text: print(f"bench: {text}", flush=True))
    bus = PrivateBus(STORE, python=str(REPO / ".venv/bin/python"), debug=False)
    os.environ.update(bus.env(STORE))
    try:
        if args.network:
            return measure_network(runs)
        return measure_isolation(runs) if args.isolation else measure(args, runs)
    finally:
        bus.close()
        if not was_mounted and mounted(STORE):
            subprocess.run([str(TUPPER), "--root", str(STORE), "store", "unmount"], capture_output=True)
        problems = guard.end()
        if problems:
            print(f"bench: the user's state changed: {'; '.join(problems)}", file=sys.stderr)


def measure_isolation(runs: int) -> int:
    fresh_tupperd()
    cleanup = Cleanup()
    signal.signal(signal.SIGTERM, interrupted)
    try:
        limits = measure_limits_start(tupper, PREFIX, runs, cleanup.tupper_names)
        health = measure_health_cpu(tupper, PREFIX, HEALTH_COUNT, HEALTH_WINDOW, tupperd_pid, cleanup.tupper_names)
    finally:
        cleanup.all()
    lim, plain = summary(limits["limited"]), summary(limits["plain"])
    print(f"start with [resources] {lim['median']:.3f} s, without {plain['median']:.3f} s: ratio {lim['median'] / plain['median']:.2f}")
    for kind, h in health.items():
        raw = f"; the same GETs by a plain loop: {h['raw_percent']:.2f} %" if "raw_percent" in h else ""
        print(f"tupperd CPU, {h['containers']} containers, {kind} checks: {h['percent']:.2f} % of one CPU ({h['samples']}){raw}")
    return 0


def measure_network(runs: int) -> int:
    fresh_tupperd()
    cleanup = Cleanup()
    signal.signal(signal.SIGTERM, interrupted)
    try:
        starts = measure_network_start(tupper, PREFIX, runs, cleanup.tupper_names, lambda i: raw_start(i, cleanup))
        rps = measure_forward_rps(tupper, PREFIX, max(min(runs, 5), 3), cleanup.tupper_names)
    finally:
        cleanup.all()
    results = network_results(starts, rps)
    ok = {"net_start": results["net_start"]["ratio"] <= TARGETS["net_start"],
          "forward_rps": results["forward_rps"]["ratio"] >= TARGETS["forward_rps"]}
    print_table(network_rows(results, ok))
    return 0


def measure(args, runs: int) -> int:
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, kernel {info['kernel']}, {info['systemd']}, {info['os']}")
    SCRATCH.mkdir(mode=0o700, exist_ok=True)
    pid = fresh_tupperd()
    print(f"tupper: {TUPPER}, a client of the benchmark's own tupperd (pid {pid}, store {STORE}); "
          "every tupper time is a CLI process plus its D-Bus call to tupperd")
    print(f"runs: {runs}, names: {PREFIX}-*")

    # SIGTERM ends the run the way Ctrl-C does, through the finally below.
    signal.signal(signal.SIGTERM, interrupted)
    cleanup = Cleanup()
    t_runs: list[dict] = []
    b_runs: list[dict] = []
    try:
        for i in range(runs):
            order = (("tupper", tupper_start_stop), ("baseline", baseline_start_stop))
            for kind, fn in order if i % 2 == 0 else reversed(order):
                r = fn(i, cleanup)
                (t_runs if kind == "tupper" else b_runs).append(r)
                print(f"  run {i + 1}/{runs} {kind:8}  start {r['start']:.3f} s  stop {r['stop']:.3f} s", flush=True)
        ps = measure_ps(max(runs, 10), cleanup)
        floor = measure_floor(max(runs, 10))
        print("  live upgrade (two installed versions, alternating) ...", flush=True)
        upgrade = measure_upgrade(tupper, PREFIX, max(runs, 10), cleanup.tupper_names)
        print("  start with [resources] against the same spec without, alternating ...", flush=True)
        limits = measure_limits_start(tupper, PREFIX, max(runs, 10), cleanup.tupper_names)
        print("  start with a private network and a published port, with host networking, and raw nspawn, alternating ...", flush=True)
        net_starts = measure_network_start(tupper, PREFIX, max(runs, 10), cleanup.tupper_names, lambda i: raw_start(i, cleanup))
        print("  requests/s through a forwarded localhost port and straight to the container (ab) ...", flush=True)
        rps = measure_forward_rps(tupper, PREFIX, max(min(runs, 5), 3), cleanup.tupper_names)
        print(f"  tupperd CPU with {HEALTH_COUNT} containers unchecked, http-checked and exec-checked every second "
              f"({HEALTH_WINDOW:.0f} s each) ...", flush=True)
        health = measure_health_cpu(tupper, PREFIX, HEALTH_COUNT, HEALTH_WINDOW, tupperd_pid, cleanup.tupper_names)
        print(f"  sdk build of a {PAYLOAD_MB} MB payload ...", flush=True)
        build = measure_sdk_build(tupper, PREFIX, min(max(runs, 3), 5))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        cleanup.all()
        left = Cleanup.leftovers()
        if left:
            print(f"bench: left behind: {', '.join(left)}", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    results = {"date": datetime.date.today().isoformat(), "runs": runs, "machine": info, "cli": str(TUPPER),
               "tupperd": {"pid": pid, "restarted": True}}
    for key in ("start", "stop"):
        t = summary([r[key] for r in t_runs])
        b = summary([r[key] for r in b_runs])
        results[key] = {"tupper": t, "baseline": b, "ratio": t["median"] / b["median"]}
    results["ps"] = {n: {"tupper": summary(p["times"]), "stats": summary(p["stats_times"]), "containers_listed": p["listed"],
                         "containers_running": p["running"]} for n, p in ps.items()}
    start_rep = statistics.median(r["start_reported"] for r in t_runs if r["start_reported"] is not None)
    stop_rep = statistics.median(r["stop_reported"] for r in t_runs if r["stop_reported"] is not None)
    results["breakdown"] = {
        "start_reported": start_rep,
        "start_cli": results["start"]["tupper"]["median"] - start_rep,
        "start_reported_ratio": start_rep / results["start"]["baseline"]["median"],
        "stop_reported": stop_rep,
        "stop_reported_ratio": stop_rep / results["stop"]["baseline"]["median"],
        "stop_cli": results["stop"]["tupper"]["median"] - stop_rep,
        "interpreter": floor["interpreter"]["median"],
        "client_call": floor["client_call"]["median"],
    }
    results["floor"] = floor
    results["upgrade"] = {"tupper": summary(upgrade["times"])}
    results["sdk_build"] = {"tupper": summary(build["times"]), "payload_bytes": build["payload_bytes"],
                            "package_bytes": build["package_bytes"]}
    results["limits_start"] = {"limited": summary(limits["limited"]), "plain": summary(limits["plain"])}
    results["limits_start"]["ratio"] = results["limits_start"]["limited"]["median"] / results["limits_start"]["plain"]["median"]
    results["health_cpu"] = health
    results.update(network_results(net_starts, rps))
    results["verdicts"] = verdicts(results)

    print()
    print_table(table_rows(results))
    b = results["breakdown"]
    print(f"\ntupper's own time (as it reports it): start {b['start_reported']:.3f} s in tupperd's runtime "
          f"({b['start_reported_ratio']:.2f} × baseline), stop {b['stop_reported']:.3f} s for the Stop call "
          f"({b['stop_reported_ratio']:.2f} × baseline)")
    print(f"a Python process: {b['interpreter']:.3f} s doing nothing; a tupper call that tupperd answers at once: "
          f"{b['client_call']:.3f} s")
    for n, p in ps.items():
        print(f"`tupper ps` with {n} bench containers running listed {p['listed']} containers ({p['running']} running)")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}")
    if args.cli:
        print(f"not writing {DOC.relative_to(REPO)}: --cli measured another tupper")
    elif args.quick or runs < 10:
        print(f"not writing {DOC.relative_to(REPO)}: fewer than 10 runs")
    else:
        write_doc(results)
        print(f"wrote {DOC.relative_to(REPO)}")
    missed = [k for k, ok in results["verdicts"].items() if not ok]
    print(f"targets missed: {', '.join(missed)}" if missed else "all targets met")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; what it had created is removed", file=sys.stderr)
        sys.exit(130)
