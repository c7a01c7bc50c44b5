"""Density (issue 14): memory per idle container and tupperd's footprint with N running, against raw nspawn.

    .venv/bin/python bench/density.py [--count 100] [--batch 10] [--settle 10] [--backend btrfs|overlay]

N idle containers of examples/hello.toml (density-000, density-001, …) are started through the
benchmark's own tupperd (a private dbus-daemon, the store $TUPPER_BENCH_ROOT, default
/var/lib/tupper-bench, as bench/run.py does), `--batch` at a time. Then, with all N up and settled:

- PSS per container (/proc/PID/smaps_rollup) of everything tupper and nspawn run for it:
  systemd-nspawn and every process in the container's cgroups (its systemd,
  journald, dbus, logind, the component's service), summed over the N containers and divided by N;
  also its split into anonymous and file-backed pages, and which programs inside weigh most;
- tupperd's RSS and PSS with 0 containers (fresh, then after one container was started and removed:
  its lazy imports done), N/2, N, and after they are all removed: the growth per container;
- the store's keeper (tupper.runtime.keeper, the parent of every container's nspawn), counted once and
  shared out like tupperd (a tupper-monitor per container, where an older tupper runs them, is counted
  per container);
- `tupper ps` wall time with N running (median of 5), and with none running, each with how busy the
  CPUs were meanwhile (other work on the machine shows there).

The tupper containers are then removed, and N raw containers are started the way bench/baseline.py's
RawContainer does (a btrfs snapshot, systemd-nspawn --boot, the same component's unit), `--batch` at a
time, and measured alike (nspawn + the container's processes). The two sets never run together, so
neither shares pages with the other. Prints both side by side with the ratio, and writes
bench/results/density-DATE-TIME-BACKEND-N.json. `--backend overlay` runs the tupper side on the overlay
store beside the bench store (overlayfs roots on one image tree); the raw side stays on btrfs snapshots.

Everything started is removed at the end, also on failure or Ctrl-C: the containers, the networks
their start made in the bench store (their bridges and nftables table), the raw containers, their
snapshots and cgroups. What is left is checked and reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from baseline import CGROUP_PARENT, NSPAWN_RUN, RawContainer
from helpers import BENCH_ROOT, PrivateBus, UserStateGuard, backend_root, ensure_image, mounted, own_root, timed_cli

from tupper.container import cgroups, firewall
from tupper.progress import Progress
from tupper.runtime import limits
from tupper.store.networks import tag_of
from tupper.store.store import Store

REPO = Path(__file__).resolve().parent.parent
TUPPER = REPO / ".venv/bin/tupper"
SPEC = REPO / "examples/hello.toml"
COMPONENT = REPO / "services/hello"  # what the raw containers run: the same component, its unit installed by hand
UNIT = "hello.service"
STORE = own_root("TUPPER_BENCH_ROOT", BENCH_ROOT)  # the bench's btrfs store: the raw containers' image and snapshots
IMAGE = STORE / "images/debian-bookworm"
SCRATCH = STORE / "tmp"
PREFIX = "density"  # tupper containers: density-000, …; raw ones: density-raw-000, …
RAW_PREFIX = f"{PREFIX}-raw"
RESULTS_DIR = REPO / "bench/results"
ROOTS = {"btrfs": STORE, "overlay": backend_root(STORE, "overlay")}  # tupper's store, by --backend
TARGETS = {"per_container_mb": 20.0, "tupperd_rss_mb": 60.0, "ps_s": 0.1}
PS_RUNS = 5
# smaps_rollup lines read, in kB (Pss_Anon/File/Shmem: kernel ≥ 5.14).
SMAPS = {"Rss:": "rss", "Pss:": "pss", "Pss_Anon:": "anon", "Pss_File:": "file", "Pss_Shmem:": "shmem"}
KINDS = ("monitor", "nspawn", "container")


# ---- the CLI, the machine ------------------------------------------------------------------------


def tupper(*args: str) -> tuple[float, str]:
    """Run the tupper CLI; return (wall seconds, stdout). Raises when it fails."""
    elapsed, stdout, _ = timed_cli(TUPPER, *args)
    return elapsed, stdout


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    systemd = subprocess.run(["systemd-nspawn", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": os.uname().release, "systemd": systemd.strip(),
            "os": release.get("PRETTY_NAME", "unknown").strip('"'), "python": sys.version.split()[0],
            "cgroups": cgroups.Layout.detect().kind, "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30)}


def preflight(containers: int, log: Callable[[str], None]) -> None:
    if os.geteuid() != 0:
        sys.exit("density: needs root (systemd-nspawn, btrfs)")
    # The raw containers need the kernel limits a tupper start raises for itself (inotify instances above all).
    for problem in limits.prepare(Note(log), containers):
        log(problem)
    # The CLI's bytecode, as an installed tupper has it (else every call would compile it).
    subprocess.run([str(REPO / ".venv/bin/python"), "-m", "compileall", "-q", str(REPO / "tupper")], check=True)


class Note(Progress):
    """tupper's progress notes, as this script's log lines."""

    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__()
        self.log = log

    def note(self, text: str) -> None:
        self.log(text)


# ---- reading memory ------------------------------------------------------------------------------


def smaps(pid: int) -> dict[str, int]:
    """A process's memory in kB from /proc/PID/smaps_rollup; zeros for a process that is gone (or a kernel thread)."""
    out = dict.fromkeys(SMAPS.values(), 0)
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(" ")
        if key in SMAPS:
            out[SMAPS[key]] = int(rest.split()[0])
    return out


def add(total: dict, more: dict) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0) + v


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def processes(cmdline_part: str) -> list[int]:
    """Pids whose command line contains `cmdline_part` (not this process)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if cmdline_part in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(d.name))
        except OSError:
            continue
    return found


def ppid(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Members:
    """One container's processes: (kind, pid) for monitor, nspawn and the container's cgroups."""

    def __init__(self, name: str, monitor: int | None, nspawn: int, cgroup_parent: str) -> None:
        self.name, self.monitor, self.nspawn, self.cgroup_parent = name, monitor, nspawn, cgroup_parent

    def pids(self) -> list[tuple[str, int]]:
        inside = cgroups.procs(self.name, parent=self.cgroup_parent) - {self.nspawn, self.monitor or 0}
        out = [("monitor", self.monitor)] if self.monitor else []
        return [*out, ("nspawn", self.nspawn), *(("container", p) for p in sorted(inside))]


def measure_units(units: list[Members]) -> dict:
    """PSS of N containers' processes at one moment: per kind summed and divided by N, per container totals,
    and the container's processes by program name."""
    kinds: dict[str, dict[str, int]] = {k: {} for k in KINDS}
    per_container: list[int] = []
    programs: dict[str, dict[str, int]] = {}
    counts: dict[str, int] = dict.fromkeys(KINDS, 0)
    for u in units:
        total = 0
        for kind, pid in u.pids():
            m = smaps(pid)
            add(kinds[kind], m)
            counts[kind] += 1
            total += m["pss"]
            if kind == "container":
                prog = programs.setdefault(comm(pid), {})
                add(prog, {"pss": m["pss"], "processes": 1})
        per_container.append(total)
    n = len(units)
    return {
        "containers": n,
        "per_container_kb": {k: {f: v / n for f, v in kinds[k].items()} for k in KINDS if counts[k]},
        "processes_per_container": {k: counts[k] / n for k in KINDS if counts[k]},
        "total_kb": {"median": statistics.median(per_container), "min": min(per_container), "max": max(per_container)},
        "programs_kb": {p: {"pss": v["pss"] / n, "processes": v["processes"] / n}
                        for p, v in sorted(programs.items(), key=lambda kv: -kv[1]["pss"])},
    }


def per_container_total(m: dict) -> float:
    return sum(v["pss"] for v in m["per_container_kb"].values())


# ---- what is started, so that all of it goes -----------------------------------------------------


class Fleet:
    """The containers, raw containers and networks this run made, and the pool that starts them."""

    def __init__(self, batch: int, networks_before: set[str]) -> None:
        self.batch = batch
        self.pool = ThreadPoolExecutor(batch)
        self.tupper: list[str] = []
        self.raw: list[RawContainer] = []
        self.networks_before = networks_before

    def each(self, fn: Callable, items: Iterable) -> list:
        """fn(item) for every item, `batch` at a time; the first failure is raised (cleanup waits for the rest)."""
        futures = [self.pool.submit(fn, item) for item in items]
        return [f.result() for f in futures]

    def run_tupper(self, name: str) -> None:
        self.tupper.append(name)
        tupper("run", str(SPEC), "--name", name)

    def run_raw(self, name: str) -> RawContainer:
        c = RawContainer(name, IMAGE, SCRATCH, COMPONENT, UNIT)
        self.raw.append(c)
        c.start(timeout=120.0)
        return c

    def remove_tupper(self) -> None:
        names, self.tupper = list(self.tupper), []
        with ThreadPoolExecutor(self.batch) as pool:
            failed = [n for n, rc in zip(names, pool.map(_rm, names), strict=True) if rc not in (0, 2)]  # 2: never made
        if failed:
            self.tupper += failed
            raise RuntimeError(f"tupper rm -f failed for {', '.join(failed)}")

    def remove_raw(self) -> None:
        raw, self.raw = list(self.raw), []
        with ThreadPoolExecutor(self.batch) as pool:
            list(pool.map(RawContainer.destroy, raw))

    def remove_networks(self) -> None:
        for name in sorted(networks() - self.networks_before):
            subprocess.run([str(TUPPER), "network", "rm", name], capture_output=True)

    def close(self) -> None:
        """Everything goes: the starts under way finish first (their processes are in sessions of their own,
        Ctrl-C reaches only this script), then the removals. Safe to call twice."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        for step in (self.remove_tupper, self.remove_raw, self.remove_networks):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - keep cleaning the rest
                print(f"density: cleanup: {exc}", file=sys.stderr)


def _rm(name: str) -> int:
    return subprocess.run([str(TUPPER), "rm", "-f", name], capture_output=True, start_new_session=True).returncode


def networks() -> set[str]:
    out = subprocess.run([str(TUPPER), "network", "ls", "--json"], capture_output=True, text=True).stdout
    return {n["name"] for n in json.loads(out or "[]")}


# ---- the measurements ----------------------------------------------------------------------------


def names(prefix: str, start: int, stop: int) -> list[str]:
    return [f"{prefix}-{i:03d}" for i in range(start, stop)]


def tupper_units(names_: list[str], cgroup_parent: str) -> list[Members]:
    units = []
    for name in names_:
        info = json.loads(tupper("inspect", "--json", name)[1])
        if not info.get("nspawn_pid"):
            raise RuntimeError(f"{name} does not run (state {info.get('state')})")
        monitor = info.get("monitor_pid")
        if monitor and not cmdline(monitor).startswith("tupper-monitor "):
            monitor = None  # the store's keeper, shared by every container: counted with tupperd
        units.append(Members(name, monitor, info["nspawn_pid"], cgroup_parent))
    return units


def daemon_memory(bus: PrivateBus) -> dict:
    """tupperd's and the store's keeper's memory (kB), the keeper found by its process title."""
    pid = bus.tupperd_pid()
    if pid is None:
        raise RuntimeError("no tupperd on the benchmark's bus")
    titles = {f"tupper-keeper {root}" for root in ROOTS.values()}
    keepers = [p for p in processes("tupper-keeper ") if cmdline(p) in titles]
    keeper = smaps(keepers[0]) if keepers else None
    return {"pid": pid, "tupperd": smaps(pid), "threads": threads(pid), "keeper": keeper, "keeper_pid": keepers[0] if keepers else None}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def threads(pid: int) -> int:
    """A process's threads: each thread that allocates may get a malloc arena of its own, which RSS shows."""
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_ps() -> tuple[list[float], float]:
    """`tupper ps` wall times (after one untimed call), and how busy the machine's CPUs were meanwhile (0-1):
    the load average lags by a minute, this says whether anything else competed for the CPUs."""
    tupper("ps")
    before = cpu_times()
    times = [tupper("ps")[0] for _ in range(PS_RUNS)]
    after = cpu_times()
    total = sum(after) - sum(before)
    idle = (after[3] + after[4]) - (before[3] + before[4])  # idle, iowait
    return times, (1 - idle / total) if total else 0.0


def cpu_times() -> list[int]:
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def other_containers() -> int:
    """systemd-nspawn processes on the machine before this run starts any (another test suite's, the user's)."""
    return sum(1 for p in processes("systemd-nspawn") if comm(p) == "systemd-nspawn")


def measure(args, root: Path, bus: PrivateBus, fleet: Fleet, log: Callable[[str], None]) -> dict:
    n, half = args.count, args.count // 2
    parent = named(root).cgroup_parent
    out: dict = {"tupperd": {}}
    tupper("ps")  # the warm-up call: activates tupperd
    out["tupperd"]["0, fresh"] = daemon_memory(bus)
    log(f"tupperd pid {out['tupperd']['0, fresh']['pid']}; one container started and removed (tupperd's lazy imports) ...")
    fleet.each(fleet.run_tupper, [f"{PREFIX}-warmup"])
    fleet.remove_tupper()
    out["tupperd"]["0, warmed"] = daemon_memory(bus)
    out["ps0_s"], out["ps0_cpu_busy"] = timed_ps()  # the same call with none of ours running: what N adds

    first, rest = names(PREFIX, 0, half), names(PREFIX, half, n)
    log(f"starting {len(first)} containers, {args.batch} at a time ...")
    t_first = timed(lambda: fleet.each(fleet.run_tupper, first))
    time.sleep(args.settle)
    out["tupperd"][str(half)] = daemon_memory(bus)
    log(f"starting {len(rest)} more ...")
    t_rest = timed(lambda: fleet.each(fleet.run_tupper, rest))
    out["tupper_start_s"] = t_first + t_rest
    log(f"{n} running ({out['tupper_start_s']:.1f} s to start them); settling {args.settle:.0f} s, load {loadavg()}")
    time.sleep(args.settle)
    listed = json.loads(tupper("ps", "--json")[1])
    running = sum(1 for c in listed if c["name"].startswith(f"{PREFIX}-") and c["state"] == "running")
    if running != n:
        raise RuntimeError(f"`tupper ps` shows {running} of the {n} containers running")
    out["tupperd"][str(n)] = daemon_memory(bus)
    out["tupper"] = measure_units(tupper_units(first + rest, parent))
    out["load_tupper"] = loadavg()
    out["ps_s"], out["ps_cpu_busy"] = timed_ps()
    out["ps_listed"] = len(listed)
    log(f"`tupper ps` with {n}: median {statistics.median(out['ps_s']):.3f} s; removing them ...")
    out["tupper_rm_s"] = timed(fleet.remove_tupper)
    time.sleep(args.settle)
    out["tupperd"]["0, all removed"] = daemon_memory(bus)

    raw_names = names(RAW_PREFIX, 0, n)
    log(f"starting {n} raw nspawn containers, {args.batch} at a time ...")
    SCRATCH.mkdir(mode=0o700, exist_ok=True)
    out["raw_start_s"] = timed(lambda: fleet.each(fleet.run_raw, raw_names))
    log(f"{n} raw running ({out['raw_start_s']:.1f} s to start them); settling {args.settle:.0f} s, load {loadavg()}")
    time.sleep(args.settle)
    out["raw"] = measure_units([Members(c.name, None, c.nspawn.pid, CGROUP_PARENT) for c in fleet.raw if c.nspawn])
    out["load_raw"] = loadavg()
    log("removing them ...")
    out["raw_rm_s"] = timed(fleet.remove_raw)
    return out


# ---- what is left ---------------------------------------------------------------------------------


def leftovers(root: Path, parent: str, links_before: set[str], tables_before: set[str]) -> list[str]:
    """Anything of this run still on the machine (should be empty)."""
    found = [str(p) for p in (root / "containers").glob(f"{PREFIX}-*")]
    found += [str(p) for p in SCRATCH.glob(f"{PREFIX}-*")] if SCRATCH.exists() else []
    found += [f"cgroup {parent}/{c}" for c in cgroups.names(parent=parent) if c.startswith(f"{PREFIX}-")]
    found += [f"cgroup {CGROUP_PARENT}/{c}" for c in cgroups.names(parent=CGROUP_PARENT) if c.startswith(f"{PREFIX}-")]
    found += [str(p) for d in ("propagate", "unix-export") for p in (NSPAWN_RUN / d).glob(f"{PREFIX}-*")]
    found += [f"process {p} ({comm(p)})" for p in processes(f"{PREFIX}-")]
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f if f"/{PREFIX}-" in line.split()[4]]
    found += [f"link {name}" for name in sorted(links(root) - links_before)]
    found += [f"nft table {t}" for t in sorted(nft_tables(root) - tables_before)]
    return found


def named(root: Path) -> Store:
    """The store at `root`, for the names it gives what it shares with the host (cgroup parent, network tag):
    they come from its path alone, whichever its backend."""
    return Store(root, "btrfs")


def network_tag(root: Path) -> str:
    """A bench store's network tag: its bridges are tpXX-NAME, its veths tvXX-…, its nftables table tupperXX."""
    store = named(root)
    return tag_of(store.is_default, store.ident)


def links(root: Path) -> set[str]:
    """The bench store's bridges and veths (another store's, such as a test suite's running beside, are not ours)."""
    tag = network_tag(root)
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}
    return {n for n in names if n.startswith((f"tp{tag}-", f"tv{tag}-"))}


def nft_tables(root: Path) -> set[str]:
    """The bench store's nftables table, where it exists."""
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.split() and line.split()[-1] == f"{firewall.TABLE}{network_tag(root)}"}


# ---- output ---------------------------------------------------------------------------------------


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def split(m: dict | None) -> str:
    return "-" if m is None else f"{mb(m['anon'])} / {mb(m['file'])}"


def merged(kinds: dict[str, dict]) -> dict:
    out: dict[str, float] = {}
    for m in kinds.values():
        add(out, m)
    return out


def table(results: dict) -> str:
    n, t, r = results["count"], results["tupper"], results["raw"]
    tk, rk = t["per_container_kb"], r["per_container_kb"]
    total_t, total_r = per_container_total(t), per_container_total(r)
    ok = total_t / 1024 <= TARGETS["per_container_mb"]
    d = results["tupperd"]
    share = (d[str(n)]["tupperd"]["pss"] + (d[str(n)]["keeper"] or {}).get("pss", 0)) / n
    lines = [
        f"| per container, {n} idle (PSS, MB) | tupper | raw nspawn | tupper / raw | target |",
        "|---|---:|---:|---:|---|",
        *([f"| tupper-monitor | {mb(tk['monitor']['pss'])} | - | - | |"] if "monitor" in tk else []),
        f"| systemd-nspawn | {mb(tk['nspawn']['pss'])} | {mb(rk['nspawn']['pss'])} | {tk['nspawn']['pss'] / rk['nspawn']['pss']:.2f} | |",
        f"| the container's processes ({t['processes_per_container']['container']:.0f}) | {mb(tk['container']['pss'])} | "
        f"{mb(rk['container']['pss'])} | {tk['container']['pss'] / rk['container']['pss']:.2f} | |",
        f"| **total** | **{mb(total_t)}** | **{mb(total_r)}** | **{total_t / total_r:.2f}** | ≤ {TARGETS['per_container_mb']:.0f} MB: "
        f"{'met' if ok else 'MISSED'} |",
        f"| total, fewest / most of the {n} | {mb(t['total_kb']['min'])} / {mb(t['total_kb']['max'])} | "
        f"{mb(r['total_kb']['min'])} / {mb(r['total_kb']['max'])} | | |",
        f"| with tupperd + keeper's PSS shared out (/ {n}) | {mb(total_t + share)} | {mb(total_r)} | {(total_t + share) / total_r:.2f} | |",
        f"| start {n}, {results['batch']} at a time (s) | {results['tupper_start_s']:.1f} | {results['raw_start_s']:.1f} | "
        f"{results['tupper_start_s'] / results['raw_start_s']:.2f} | |",
        f"| remove {n}, {results['batch']} at a time (s) | {results['tupper_rm_s']:.1f} | {results['raw_rm_s']:.1f} | "
        f"{results['tupper_rm_s'] / results['raw_rm_s']:.2f} | |",
        "",
        "| per container, PSS anonymous / file-backed (MB) | tupper | raw nspawn |",
        "|---|---:|---:|",
        *(f"| {label} | {split(tk.get(kind))} | {split(rk.get(kind))} |"
          for kind, label in (("monitor", "tupper-monitor"), ("nspawn", "systemd-nspawn"), ("container", "the container's processes"))),
        f"| total | {split(merged(tk))} | {split(merged(rk))} |",
        "",
        "| containers running | tupperd RSS (MB) | tupperd PSS | tupperd threads | keeper RSS | keeper PSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, m in d.items():
        s = m["keeper"] or {"rss": 0, "pss": 0}
        lines.append(f"| {label} | {mb(m['tupperd']['rss'])} | {mb(m['tupperd']['pss'])} | {m['threads']} | {mb(s['rss'])} | {mb(s['pss'])} |")
    g = results["tupperd_growth_kb"]
    rss_n = d[str(n)]["tupperd"]["rss"] / 1024
    lines += [
        "",
        f"tupperd's growth per container: {g['rss_warm']:.0f} kB RSS, {g['pss_warm']:.0f} kB PSS from 0 (warmed) to {n}; "
        f"{g['rss_half']:.0f} kB RSS from {n // 2} to {n}. RSS with {n}: {rss_n:.1f} MB "
        f"(target ≤ {TARGETS['tupperd_rss_mb']:.0f} MB: {'met' if rss_n <= TARGETS['tupperd_rss_mb'] else 'MISSED'}).",
        "",
    ]
    ps, ps0 = results["ps_s"], results["ps0_s"]
    med = statistics.median(ps)
    lines.append(f"`tupper ps` with {n} running: median {med:.3f} s of {len(ps)} (min {min(ps):.3f}, max {max(ps):.3f}; "
                 f"target < {TARGETS['ps_s']} s: {'met' if med < TARGETS['ps_s'] else 'MISSED'}); CPUs {results['ps_cpu_busy']:.0%} busy "
                 f"meanwhile. With none running: median {statistics.median(ps0):.3f} s (min {min(ps0):.3f}), "
                 f"CPUs {results['ps0_cpu_busy']:.0%} busy.")
    lines += ["", "| the container's processes, by program (PSS MB per container) | tupper | raw nspawn |", "|---|---:|---:|"]
    for prog in list(dict.fromkeys([*t["programs_kb"], *r["programs_kb"]])):
        a, b = t["programs_kb"].get(prog), r["programs_kb"].get(prog)
        lines.append(f"| {prog} | {mb(a['pss']) if a else '-'} | {mb(b['pss']) if b else '-'} |")
    return "\n".join(lines) + "\n"


def growth(d: dict, n: int) -> dict:
    half = n // 2
    return {
        "rss_warm": (d[str(n)]["tupperd"]["rss"] - d["0, warmed"]["tupperd"]["rss"]) / n,
        "pss_warm": (d[str(n)]["tupperd"]["pss"] - d["0, warmed"]["tupperd"]["pss"]) / n,
        "rss_half": (d[str(n)]["tupperd"]["rss"] - d[str(half)]["tupperd"]["rss"]) / max(n - half, 1),
    }


# ---- main -----------------------------------------------------------------------------------------


def interrupted(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100, help="containers of each kind (default 100)")
    ap.add_argument("--batch", type=int, default=10, help="containers started at a time (default 10)")
    ap.add_argument("--backend", choices=tuple(ROOTS), default="btrfs",
                    help="tupper's store: btrfs snapshots (default) or overlayfs roots; the raw containers are btrfs snapshots either way")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds to wait after starting before measuring (default 10)")
    args = ap.parse_args()
    if args.count < 2 or args.batch < 1 or args.settle < 0:
        ap.error("--count must be at least 2, --batch at least 1, --settle not negative")

    def log(text: str) -> None:
        print(f"density: {text}", flush=True)

    preflight(args.count + 10, log)
    info = machine()
    log(f"machine: {info['cpu']}, {info['cores']} cores, kernel {info['kernel']}, {info['systemd']}, cgroups {info['cgroups']}")
    others = other_containers()
    log(f"load {loadavg()}; {others} other nspawn containers running on the machine")
    root = ROOTS[args.backend]
    links_before, tables_before = links(root), nft_tables(root)
    parent = named(root).cgroup_parent
    guard = UserStateGuard(canary=False)
    guard.begin()
    was_mounted = mounted(STORE)
    signal.signal(signal.SIGTERM, interrupted)  # ends the run the way Ctrl-C does, through the finally below
    bus: PrivateBus | None = None
    fleet: Fleet | None = None
    try:
        ensure_image(root, log=log, backend=args.backend)
        if root != STORE:
            ensure_image(STORE, log=log)  # the raw containers' snapshots are made from the btrfs store's image
        bus = PrivateBus(root, python=str(REPO / ".venv/bin/python"), debug=False)
        os.environ.update(bus.env(root))
        clash = [p.name for p in (root / "containers").glob(f"{PREFIX}-*")]
        if clash:
            sys.exit(f"density: {root} already has {', '.join(clash)} (a run cut short?): remove them with "
                     f"TUPPER_ROOT={root} tupper --direct rm -f NAME")
        fleet = Fleet(args.batch, networks())
        results = measure(args, root, bus, fleet, log)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        if fleet is not None:
            log("removing what is left ...")
            fleet.close()
        if bus is not None:
            bus.close()
        if args.backend == "overlay":
            subprocess.run([str(TUPPER), "--root", str(root), "store", "unmount"], capture_output=True)
        if not was_mounted and mounted(STORE):
            subprocess.run([str(TUPPER), "--root", str(STORE), "store", "unmount"], capture_output=True)
        problems = guard.end()
        if problems:
            print(f"density: the user's state changed: {'; '.join(problems)}", file=sys.stderr)
        left = leftovers(root, parent, links_before, tables_before)
        if left:
            print(f"density: left behind: {'; '.join(left)}", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    now = datetime.datetime.now()
    results.update({"date": now.date().isoformat(), "count": args.count, "batch": args.batch, "settle": args.settle, "backend": args.backend,
                    "machine": info, "other_containers": others, "leftovers": left})
    results["tupperd_growth_kb"] = growth(results["tupperd"], args.count)
    print()
    print(table(results), end="")
    print(f"\nload (1, 5, 15 min) while measuring: tupper {results['load_tupper']}, raw {results['load_raw']}; "
          f"{others} other nspawn containers were running on the machine at the start")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"density-{now:%Y-%m-%d-%H%M%S}-{args.backend}-{args.count}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}")
    return 1 if left else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("density: interrupted; what it had started is removed", file=sys.stderr)
        sys.exit(130)
