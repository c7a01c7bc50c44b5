"""tupper benchmarks against plain systemd-nspawn: start, stop, and `tupper ps` with 10 containers.

    .venv/bin/python bench/run.py [--runs N] [--quick]

tupper is measured as users meet it: the CLI as a subprocess, wall time until it returns. The
baseline (bench/baseline.py) does the same work by hand in this process. tupper and baseline runs
alternate, so drift on the machine affects both alike. Results go to bench/results/latest.json
and, for full runs, to docs/benchmarks.md. Everything created is named bench-* and removed at
the end, also on failure or Ctrl-C.
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

import btrfsutil

from baseline import NSPAWN_RUN, RawContainer
from tupper import cgroups

REPO = Path(__file__).resolve().parent.parent
TUPPER = REPO / ".venv/bin/tupper"
SPEC = REPO / "examples/hello.toml"
COMPONENT = REPO / "services/hello"
UNIT = "hello.service"
STORE = Path(os.environ.get("TUPPER_ROOT") or "/var/lib/tupper")
IMAGE = STORE / "images/debian-bookworm"
SCRATCH = STORE / "tmp"
RESULTS = REPO / "bench/results/latest.json"
DOC = REPO / "docs/benchmarks.md"

PS_CONTAINERS = 10
SETTLE = 1.0  # seconds between "unit active" and stop, the same for tupper and the baseline
TARGETS = {"start": 1.3, "stop": 1.5, "ps": 0.3}  # start and stop: ratio tupper/baseline; ps: seconds

PREFIX = f"bench-{os.getpid()}"  # unique per run, so a concurrent run cannot collide with this one


# ---- helpers ------------------------------------------------------------------------------------


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]  # nearest rank
    return {"median": statistics.median(ordered), "p90": p90, "min": ordered[0], "n": len(ordered), "values": values}


def tupper(*args: str) -> tuple[float, str]:
    """Run the tupper CLI; return (wall seconds, stdout). Raises when it fails."""
    t0 = time.perf_counter()
    # Its own session: Ctrl-C reaches only this script, which lets tupper finish and then cleans up.
    p = subprocess.Popen([str(TUPPER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate()
    except KeyboardInterrupt:
        p.communicate()
        raise
    elapsed = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"tupper {' '.join(args)} exited {p.returncode}: {stderr.strip()}")
    return elapsed, stdout


def reported_seconds(stdout: str, pattern: str) -> float | None:
    """The time tupper prints itself ("running ... in 0.40s", "stopped (0.07s)"): the runtime without the CLI."""
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
        "cgroups": cgroups.layout(),
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
        found += [str(p) for h in cgroups.hierarchies() for p in (h / cgroups.PARENT).glob(f"{PREFIX}-*")]
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
    names = [f"{PREFIX}-ps{i}" for i in range(PS_CONTAINERS)]
    for name in names:
        cleanup.tupper_names.append(name)
        tupper("run", str(SPEC), "--name", name)
    _, out = tupper("ps", "--json")
    listed = json.loads(out)
    ours = [r for r in listed if r["name"] in names and r["state"] == "running"]
    if len(ours) != PS_CONTAINERS:
        raise RuntimeError(f"expected {PS_CONTAINERS} running bench containers, ps shows {len(ours)}")
    times = [tupper("ps")[0] for _ in range(runs)]
    for name in names:
        cleanup.remove_tupper(name)
    return {"ps": times, "listed": len(listed), "running": sum(r["state"] == "running" for r in listed)}


def python_floor(runs: int) -> dict:
    """What any Python CLI pays before it does anything: the interpreter, and tupper's imports."""
    py = str(REPO / ".venv/bin/python")
    out = {}
    for key, code in (("interpreter", "pass"), ("imports", "import tupper.cli, tupper.runtime, tupper.ui, tupper.spec")):
        vals = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run([py, "-c", code], check=True)
            vals.append(time.perf_counter() - t0)
        out[key] = summary(vals)
    return out


# ---- output -------------------------------------------------------------------------------------


def verdicts(results: dict) -> dict:
    start, stop, ps = results["start"], results["stop"], results["ps"]
    return {
        "start": start["ratio"] <= TARGETS["start"],
        "stop": stop["ratio"] <= TARGETS["stop"],
        "ps": ps["tupper"]["median"] < TARGETS["ps"],
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
    t = results["ps"]["tupper"]
    rows.append([f"`tupper ps`, {PS_CONTAINERS} running", f"{t['median']:.3f}", f"{t['p90']:.3f}", f"{t['min']:.3f}",
                 "-", "-", "-", "-", f"< {TARGETS['ps']} s", "yes" if ok["ps"] else "NO"])
    return rows


HEADER = ["", "tupper median", "p90", "min", "baseline median", "p90", "min", "ratio", "target", "met"]


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    for r in [HEADER, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def markdown(results: dict) -> str:
    m = results["machine"]
    rows = table_rows(results)
    lines = [
        f"## Results, {results['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, {m['systemd']}, {m['os']}, "
        f"cgroups {m['cgroups']}, Python {m['python']}. {results['runs']} runs each; times in seconds.",
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
        f"- start: tupper reports {b['start_reported']:.3f} s for its own work (snapshot → units active), "
        f"{b['start_reported_ratio']:.2f} × the baseline; the other {b['start_cli']:.3f} s of the wall time is the CLI "
        "process around it (Python start-up, imports, reading the spec, opening the store, output, exit).",
        f"- stop: tupper reports {b['stop_reported']:.3f} s, {b['stop_reported_ratio']:.2f} × the baseline; "
        f"the CLI process around it adds {b['stop_cli']:.3f} s.",
        f"- a Python process that does nothing takes {b['interpreter']:.3f} s; importing tupper's modules "
        f"takes it to {b['imports']:.3f} s.",
        "",
    ]
    return "\n".join(lines)


DOC_INTRO = """\
# Benchmarks

`make bench` (`bench/run.py`) measures tupper against the plainest way to do the same thing by hand
(`bench/baseline.py`), on the same machine, in one run:

- **start**: `tupper run examples/hello.toml --name bench-…` as a subprocess, wall time until it
  returns (then every component unit is active), versus the baseline: a btrfs snapshot of the same
  image (btrfsutil), a fresh `/etc/machine-id` and no `/etc/hostname` (as tupper does),
  `hello.service` installed by hand with a `multi-user.target.wants` link, the payload bound with
  `--bind-ro`, `systemd-nspawn --boot --keep-unit --register=no --console=pipe`, and polling
  `ActiveState` over the container's own system bus (pystemd) every 10 ms, the interval tupper uses,
  until the unit is active. Timed from before the snapshot.
- **stop**: `tupper stop NAME` (wall time) versus `PowerOff` over the container's bus until the
  nspawn process has exited. Both containers have been up for 1 s when stopped.
- **ps**: `tupper ps` wall time with 10 containers running.

tupper and baseline runs alternate (and alternate which goes first) so that drift on the machine
affects both alike. Each row gives the median, the 90th percentile (nearest rank) and the minimum.
The baseline runs inside the benchmark's own Python process, so the ratio includes what every
`tupper` command pays to start a Python interpreter and import tupper; the lines under the table
separate that from the time tupper itself reports.
Raw numbers: `bench/results/latest.json` (not committed).

Targets: start ratio ≤ 1.3, stop ratio ≤ 1.5, `tupper ps` < 0.3 s.

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
    if not btrfsutil.is_subvolume(str(IMAGE)):
        sys.exit(f"bench: no image at {IMAGE}: build it with `tupper image build images/debian-bookworm.toml`")
    SCRATCH.mkdir(mode=0o700, exist_ok=True)
    # tupper raises fs.inotify.max_user_instances itself on its first run; raise it for the baseline too.
    subprocess.run([str(TUPPER), "ps"], capture_output=True, check=True)


def interrupted(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="runs of each measurement (default 10)")
    ap.add_argument("--quick", action="store_true", help="3 runs, and leave docs/benchmarks.md alone")
    args = ap.parse_args()
    runs = 3 if args.quick else args.runs
    if runs < 1:
        ap.error("--runs must be at least 1")

    preflight()
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, kernel {info['kernel']}, {info['systemd']}, {info['os']}")
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
        print(f"  starting {PS_CONTAINERS} containers for `tupper ps` ...", flush=True)
        ps = measure_ps(max(runs, 10), cleanup)
        floor = python_floor(max(runs, 10))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        cleanup.all()
        left = Cleanup.leftovers()
        if left:
            print(f"bench: left behind: {', '.join(left)}", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    results = {"date": datetime.date.today().isoformat(), "runs": runs, "machine": info}
    for key in ("start", "stop"):
        t = summary([r[key] for r in t_runs])
        b = summary([r[key] for r in b_runs])
        results[key] = {"tupper": t, "baseline": b, "ratio": t["median"] / b["median"]}
    results["ps"] = {"tupper": summary(ps["ps"]), "containers_listed": ps["listed"], "containers_running": ps["running"]}
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
        "imports": floor["imports"]["median"],
    }
    results["python_floor"] = floor
    results["verdicts"] = verdicts(results)

    print()
    print_table(table_rows(results))
    b = results["breakdown"]
    print(f"\ntupper's own time (as it reports it): start {b['start_reported']:.3f} s ({b['start_reported_ratio']:.2f} × baseline), "
          f"stop {b['stop_reported']:.3f} s ({b['stop_reported_ratio']:.2f} × baseline)")
    print(f"a Python process: {b['interpreter']:.3f} s doing nothing, {b['imports']:.3f} s importing tupper's modules")
    print(f"`tupper ps` listed {ps['listed']} containers ({ps['running']} running)")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}")
    if args.quick or runs < 10:
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
