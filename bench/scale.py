"""Cold start at scale (issue 14): 50 containers started at once through tupperd, against 50 raw nspawn
boots started at once.

    .venv/bin/python bench/scale.py [--count 50] [--rounds 2] [--pause 30]

- **tupper**: `tupper run examples/hello.toml --cold --name scale-NNN --json`, `--count` CLI processes
  released together (a thread each, behind a barrier), all through the benchmark's own tupperd (a private
  dbus-daemon, the store $TUPPER_BENCH_ROOT, default /var/lib/tupper-bench, as bench/run.py does). Wall
  time from the release until the last one has returned; each returns once its units are active, and
  the JSON each prints is checked (every unit active), then `tupper ps` must list all of them running.
- **raw**: `--count` RawContainer.start() (bench/baseline.py: btrfs snapshot, unit installed by hand,
  systemd-nspawn --boot, polling the unit's ActiveState over the container's bus every 10 ms) released
  together in threads of this process; wall time until the last has returned (its unit active).

The ratio tupper / raw is printed for each round (target ≤ 1.2); rounds alternate which kind goes first.
The two kinds never run together: each kind's containers are removed before the other starts, then the
machine is left `--pause` seconds, and then until btrfs has deleted the removed snapshots (`btrfs subvolume
sync`: its cleaner would otherwise run through the next kind's boots) and the CPUs are quiet (both shown). No warm pool
may be set in the bench store (the runs are --cold anyway; a pool's refills would boot beside them).

Kernel limits: tupper.runtime.limits raises, before a start, fs.inotify.max_user_instances and
fs.inotify.max_user_watches (sysctls) and its own RLIMIT_NOFILE where they are low. They are read before
anything runs and after; the notes the CLI prints when tupper raised one ("raised … from … to …") are
collected; tupperd's open-files limit and descriptors, and the inotify instances and watches in use with
all the containers up, are shown. Also shown: when each run returned (after the release), the most
threads tupperd had, and how busy the machine's CPUs were while each kind started (/proc/stat: whoever
used them, other work on the machine included). Where a raw round would come before tupper raised a limit, the
benchmark raises it for the raw boots (and says so): the baseline needs them as much.

Everything made is removed at the end, also on failure or Ctrl-C (the starts under way finish first).
Results: bench/results/scale-DATE-TIME.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from warmstart import REPO, RESULTS_DIR, STORE, TUPPER, Bench, _Notes, loadavg, machine, other_work, summary, tupper

from tupper.runtime import limits

TARGET = 1.2  # tupper / raw, wall time of the whole batch
START_TIMEOUT = 900.0


def limits_now() -> dict:
    r = limits.read()
    return {limits.INSTANCES: r.instances, limits.WATCHES: r.watches, "RLIMIT_NOFILE (this process)": list(r.nofile),
            limits.PID_MAX: r.pid_max, limits.THREADS_MAX: r.threads_max, limits.FILE_MAX: r.file_max}


def inotify_in_use() -> tuple[int, int]:
    """(instances, watches) of inotify held on the machine: what the two sysctls count (per user: nearly all root here)."""
    instances = watches = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    watches += sum(1 for line in f if line.startswith("inotify wd:"))
                instances += 1
            except OSError:
                continue
    return instances, watches


def process_files(pid: int) -> dict:
    """A process's open-files limit (soft, hard) and how many descriptors it holds."""
    soft = hard = None
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
        held = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        held = -1
    return {"soft": soft, "hard": hard, "held": held}


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (idle and iowait count as not busy)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(f) - f[3] - f[4], sum(f)


def busy_since(before: tuple[int, int]) -> float:
    """How busy the machine's CPUs were since `before` (0..1), whoever used them."""
    busy, total = cpu_times()
    return (busy - before[0]) / max(1, total - before[1])


class Threads:
    """How many threads tupperd has, sampled every 0.1 s (one small file read: it does not load the machine)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.most = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                n = next(int(line.split()[1]) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines()
                         if line.startswith("Threads:"))
            except (OSError, StopIteration, ValueError):
                continue
            self.most = max(self.most, n)

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.most


def settle(say: Callable[[str], None], quiet: float = 0.15, longest: float = 120.0) -> dict:
    """Before each kind starts: btrfs has deleted what the other kind removed (`btrfs subvolume sync`: its
    cleaner otherwise works in the background through the next kind's boots), and the CPUs are quiet
    (busy below `quiet` over a second), at most `longest` seconds; how long that took is reported."""
    import subprocess

    began = time.monotonic()
    subprocess.run(["btrfs", "subvolume", "sync", str(STORE)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=longest, check=False)
    synced = time.monotonic() - began
    while True:
        before = cpu_times()
        time.sleep(1.0)
        busy = busy_since(before)
        if busy < quiet or time.monotonic() - began > longest:
            break
    out = {"btrfs_sync_s": round(synced, 1), "settled_s": round(time.monotonic() - began, 1), "busy_then": round(busy, 2)}
    say(f"settled: btrfs cleaned up in {synced:.1f} s, CPUs {busy:.0%} busy after {out['settled_s']:.1f} s")
    return out


def at_once(jobs: list[Callable[[], object]]) -> tuple[float, list[float], list[BaseException]]:
    """Run every job in a thread of its own, all released by one barrier; (wall seconds from the release
    until the last ended, each one's end in seconds after the release, the errors). Ctrl-C waits for
    the jobs under way (their processes run in sessions of their own), then goes on."""
    barrier = threading.Barrier(len(jobs) + 1)
    ends: list[float] = [0.0] * len(jobs)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        barrier.wait()
        try:
            jobs[i]()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
        ends[i] = time.perf_counter()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for t in threads:
            t.join()
        raise
    rel = [e - t0 for e in ends]
    return max(rel), sorted(rel), errors


def tupper_round(bench: Bench, count: int, r: int, say: Callable[[str], None]) -> dict:
    names = [f"scale-{r}-{i:03d}" for i in range(count)]
    printed: dict[str, str] = {}
    inactive: list[str] = []

    def run(name: str) -> None:
        _, res, err = bench.run_tupper(name, "--cold", timeout=START_TIMEOUT)
        printed[name] = err
        inactive.extend(f"{name}: {u['name']} {u['active_state']}" for u in res.get("units", []) if u.get("active_state") != "active")

    say(f"round {r}: tupper: {count} `tupper run --cold` at once (load {loadavg()}) ...")
    threads = Threads(bench.tupperd)
    cpu = cpu_times()
    try:
        wall, ends, errors = at_once([lambda n=n: run(n) for n in names])
    finally:
        most_threads = threads.close()
    busy = busy_since(cpu)
    if errors:
        raise RuntimeError(f"{len(errors)} of {count} runs failed; the first: {errors[0]}")
    if inactive:
        raise RuntimeError(f"units not active when run returned: {inactive[:5]}")
    listed = json.loads(tupper("ps", "--json")[1])
    running = sorted(c["name"] for c in listed if c["name"] in names and c["state"] == "running")
    if running != names:
        raise RuntimeError(f"`tupper ps` shows {len(running)} of the {count} running")
    up = {"inotify_in_use": inotify_in_use(), "tupperd_files": process_files(bench.tupperd), "tupperd_threads_most": most_threads,
          "cpu_busy": busy}
    notes = sorted({line.removeprefix("note: ") for err in printed.values() for line in err.splitlines() if line.startswith("note: raised")})
    t0 = time.perf_counter()
    bench.remove_tupper(names)
    removed = time.perf_counter() - t0
    say(f"round {r}: tupper: all {count} running after {wall:.2f} s (first {ends[0]:.2f} s, median {statistics.median(ends):.2f} s; "
        f"CPUs {busy:.0%} busy); removed in {removed:.1f} s")
    return {"wall": wall, "ends": ends, "removed_in": removed, "raised": notes, **up}


def raw_round(bench: Bench, count: int, r: int, say: Callable[[str], None]) -> dict:
    raised: list[str] = []
    limits.prepare(_Notes(raised), count + 4)  # what tupper raises for its starts, for the raw boots too (said when it does)
    containers = [bench.new_raw(f"scaleraw-{r}-{i:03d}") for i in range(count)]
    say(f"round {r}: raw: {count} nspawn boots at once (load {loadavg()}) ...")
    cpu = cpu_times()
    wall, ends, errors = at_once([lambda c=c: c.start(timeout=START_TIMEOUT) for c in containers])
    busy = busy_since(cpu)
    if errors:
        raise RuntimeError(f"{len(errors)} of {count} raw boots failed; the first: {errors[0]}")
    up = {"inotify_in_use": inotify_in_use(), "cpu_busy": busy}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda c: bench.remove_raw([c]), containers))
    removed = time.perf_counter() - t0
    say(f"round {r}: raw: all {count} units active after {wall:.2f} s (first {ends[0]:.2f} s, median {statistics.median(ends):.2f} s; "
        f"CPUs {busy:.0%} busy); removed in {removed:.1f} s")
    return {"wall": wall, "ends": ends, "removed_in": removed, "raised_by_bench": raised, **up}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=50, help="containers started at once (default 50)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of tupper and raw, alternating which goes first (default 2)")
    ap.add_argument("--pause", type=float, default=30.0, help="seconds between one kind's removal and the other's start (default 30)")
    args = ap.parse_args()
    if args.count < 1 or args.rounds < 1 or args.pause < 0:
        ap.error("--count and --rounds must be at least 1, --pause not negative")

    def say(text: str) -> None:
        print(f"scale: {text}", flush=True)

    info = machine()
    before = other_work()
    limits_before = limits_now()
    say(f"machine: {info['cpu']}, {info['cores']} cores, kernel {info['kernel']}, {info['systemd']}, cgroups {info['cgroups']}")
    say(f"load {before['load']}; elsewhere on the machine: {before['nspawn_elsewhere']} nspawn processes, {before['pytest']} pytest "
        f"processes, benchmarks {before['benchmarks'] or 'none'}")
    say(f"kernel limits before: {limits_before}")
    started = datetime.datetime.now()
    rounds: list[dict] = []
    with Bench("scale", ("scale", "scaleraw"), debug=False, raise_limits=False) as bench:
        say(f"tupperd pid {bench.tupperd} (store {STORE}), CLI {TUPPER}; its open files: {process_files(bench.tupperd)}")
        if bench.pool_view() is not None:
            raise SystemExit(f"scale: {STORE} has a warm pool ({bench.pool_view()}): its refills would boot beside the runs; "
                             "remove it (`tupper pool rm IMAGE` against the bench's tupperd) first")
        for r in range(args.rounds):
            order = ("tupper", "raw") if r % 2 == 0 else ("raw", "tupper")
            got: dict = {"order": list(order)}
            for n, kind in enumerate(order):
                if n:
                    time.sleep(args.pause)
                calm = settle(say)
                got[kind] = (tupper_round if kind == "tupper" else raw_round)(bench, args.count, r, say)
                got[kind]["settle"] = calm
            got["ratio"] = got["tupper"]["wall"] / got["raw"]["wall"]
            say(f"round {r}: tupper {got['tupper']['wall']:.2f} s / raw {got['raw']['wall']:.2f} s = {got['ratio']:.2f}")
            rounds.append(got)
            if r + 1 < args.rounds:
                time.sleep(args.pause)
    after = other_work()
    limits_after = limits_now()
    tw = [g["tupper"]["wall"] for g in rounds]
    rw = [g["raw"]["wall"] for g in rounds]
    ratio = statistics.median(tw) / statistics.median(rw)
    results = {"date": started.date().isoformat(), "started": started.isoformat(timespec="seconds"), "machine": info, "args": vars(args),
               "other_work_before": before, "other_work_after": after, "limits_before": limits_before, "limits_after": limits_after,
               "rounds": rounds, "tupper": summary(tw), "raw": summary(rw), "ratio": ratio, "leftovers": bench.left,
               "tupperd_warnings": [line for line in bench.log_text.splitlines() if line.startswith("tupperd:") and "limit" in line.lower()]}
    print(f"\n| {args.count} started at once: wall time until all units active (s) | " +
          " | ".join(f"round {r} ({'tupper first' if g['order'][0] == 'tupper' else 'raw first'})" for r, g in enumerate(rounds)) +
          " | median |")
    print("|---|" + "---:|" * (len(rounds) + 1))
    print("| tupper: `tupper run --cold`, one CLI process each, through tupperd | " + " | ".join(f"{w:.2f}" for w in tw) +
          f" | {statistics.median(tw):.2f} |")
    print("| raw nspawn (bench/baseline.py), a thread each | " + " | ".join(f"{w:.2f}" for w in rw) + f" | {statistics.median(rw):.2f} |")
    print("| ratio tupper / raw | " + " | ".join(f"{g['ratio']:.2f}" for g in rounds) + f" | {ratio:.2f} |")
    print(f"\nratio {ratio:.2f}: target ≤ {TARGET}: {'met' if ratio <= TARGET else 'MISSED'}")
    raised = sorted({n for g in rounds for n in g["tupper"]["raised"]})
    by_bench = sorted({n for g in rounds for n in g["raw"]["raised_by_bench"]})
    print(f"kernel limits before: {limits_before}\nkernel limits after:  {limits_after}")
    print(f"raised by tupper in this run: {raised or 'none (each was already at or above what tupper wants)'}; "
          f"raised by the benchmark for the raw boots: {by_bench or 'none'}")
    for kind in ("tupper", "raw"):
        print(f"{kind}: runs returned (s after the release; every 5th): " +
              "; ".join(" ".join(f"{e:.1f}" for e in g[kind]["ends"][4::5]) for g in rounds))
    for r, g in enumerate(rounds):
        t = g["tupper"]
        print(f"round {r}: with {args.count} tupper containers up: inotify in use {t['inotify_in_use']}, tupperd {t['tupperd_files']}, "
              f"tupperd threads at most {t['tupperd_threads_most']}; with {args.count} raw: inotify in use {g['raw']['inotify_in_use']}; "
              f"CPUs busy while starting: tupper {t['cpu_busy']:.0%}, raw {g['raw']['cpu_busy']:.0%}")
    if results["tupperd_warnings"]:
        print(f"tupperd's log on limits: {results['tupperd_warnings']}")
    print(f"load (1, 5, 15 min) before {before['load']}, after {after['load']}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"scale-{started:%Y-%m-%d-%H%M%S}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}")
    return 1 if bench.left else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("scale: interrupted; what it had made is removed", file=sys.stderr)
        sys.exit(130)
