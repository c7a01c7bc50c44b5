"""Warm start (issue 14's headline): `tupper run` that claims a warm pool's container, against a cold
start and the raw nspawn baseline, in one run.

    .venv/bin/python bench/warmstart.py [--runs 50] [--cold-runs 10] [--raw-runs 10] [--size 4]

Through the benchmark's own tupperd (a private dbus-daemon, the store $TUPPER_BENCH_ROOT, default
/var/lib/tupper-bench, as bench/run.py does), with the CLI as a subprocess, wall time until it returns
(then every unit of the spec is active):

- `tupper pool set debian-bookworm --size N`, then wait until `tupper pool ls --json` shows it full;
- **warm**: `tupper run examples/hello.toml --name warm-NNN --json`. Before each run the pool's
  containers' leader PIDs are read from their records (<store>/containers/tpool-*/record.json); the
  run counts only if the leader PID it reports is one of them (a claim, not a boot). After each run
  the container is removed and the benchmark waits until the pool is full again and then `--settle`
  seconds: **the refill (a boot in the background) is not what is measured**;
- **cold**: `tupper run --cold` of the same spec (a boot, with the pool full and idle beside it);
- **raw**: bench/baseline.py's RawContainer (btrfs snapshot, unit installed by hand, nspawn --boot,
  polling the unit's ActiveState over the container's bus), in this process.

Cold and raw runs are spread among the warm ones, alternating which goes first. One warm and one cold
run before the measured ones are not counted (tupperd's lazy imports). Each kind gets p50, p90, p99
(nearest rank: with 50 runs, p99 is the slowest), min and max. Targets: warm p50 < 100 ms, p99 < 150 ms.

Where a warm run's time goes: the floor of a CLI call (`python -c pass`, `tupper --version`, `tupper ps`
with no containers, `tupper stop` of a name that does not exist, which tupperd answers at once); the
time tupperd's runtime reports for the run (`seconds` in the JSON); and the bus traffic of each warm
run (`dbus-monitor` on the private bus timestamps each message as it arrives): the CLI's Hello and
AddMatch, its Run call and the reply (the job), tupperd's Progress signals (the claim step: hostname,
cgroups, bind mounts, unit files, ports and /etc/hosts; then the container's bus and StartUnit; then
the wait for the units), the reply to the CLI's Wait call (the result), and the CLI's exit. tupperd
sends Progress signals from its event loop, which a busy worker thread delays (the GIL): they mark
where a step began a few milliseconds late. tupperd runs with --debug, but its log carries no
timestamps: it gives only the refill boots' times ("ready in 0.84s").

--trace (not for the headline figures) starts tupperd through this script (`--as-tupperd`), which wraps
the steps of a run (TRACED: the runtime's claim and its parts, the record's writes, the network rebuild,
the container's bus calls, tupperd's job and its tracking) in timers that write to tupperd's log; it
prints the median time per run of each, nested as they call each other. tupper's code is not changed.

Everything made is removed at the end, also on failure or Ctrl-C: the containers, the pool
(`tupper pool rm`), the raw containers, the networks the run made (bridges, nftables table). What
is left is checked and reported. Results: bench/results/warmstart-DATE-TIME.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from baseline import CGROUP_PARENT, NSPAWN_RUN, RawContainer
from helpers import BENCH_ROOT, PrivateBus, UserStateGuard, ensure_image, mounted, own_root, timed_cli

from tupper.container import cgroups, firewall
from tupper.progress import Progress
from tupper.runtime import limits
from tupper.store.networks import tag_of
from tupper.store.store import Store

REPO = Path(__file__).resolve().parent.parent
TUPPER = REPO / ".venv/bin/tupper"
PYTHON = REPO / ".venv/bin/python"
SPEC = REPO / "examples/hello.toml"
COMPONENT = REPO / "services/hello"
UNIT = "hello.service"
STORE = own_root("TUPPER_BENCH_ROOT", BENCH_ROOT)
IMAGE_NAME = "debian-bookworm"
IMAGE = STORE / "images" / IMAGE_NAME
SCRATCH = STORE / "tmp"
RESULTS_DIR = REPO / "bench/results"
POOL_PREFIX = "tpool-"
NO_SUCH = "warm-no-such-container"

TARGETS = {"p50": 0.100, "p99": 0.150}  # warm start, seconds
POOL_TIMEOUT = 300.0  # seconds to wait for the pool to be full


# ---- small helpers, shared with bench/scale.py ----------------------------------------------------


def nearest_rank(ordered: list[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    return {"n": len(ordered), "p50": nearest_rank(ordered, 0.5), "p90": nearest_rank(ordered, 0.9), "p99": nearest_rank(ordered, 0.99),
            "min": ordered[0], "max": ordered[-1], "mean": statistics.fmean(ordered), "values": values}


def tupper(*args: str, expect: int = 0, timeout: float | None = None) -> tuple[float, str, str]:
    """The tupper CLI as a subprocess: (wall seconds, stdout, stderr); raises unless it exits with `expect`."""
    return timed_cli(TUPPER, *args, expect=expect, timeout=timeout)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def other_work() -> dict:
    """What else runs on the machine (other stores' containers, test runs): said beside the figures."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    nspawn = [a for a in out if a.startswith("systemd-nspawn") and str(STORE) not in a and "/tmp/" not in a]
    return {"load": loadavg(), "nspawn_elsewhere": len(nspawn), "pytest": sum("pytest" in a for a in out),
            "benchmarks": sorted({m.group(0) for a in out if (m := re.search(r"bench/\w+\.py", a)) and "warmstart" not in a and "scale" not in a})}


def machine() -> dict:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    systemd = subprocess.run(["systemd-nspawn", "--version"], capture_output=True, text=True).stdout.split("\n")[0].strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "systemd": systemd, "python": platform.python_version(),
            "cgroups": cgroups.Layout.detect().kind}


def network_tag() -> str:
    store = Store(STORE, "btrfs")  # for the names it gives what it shares with the host: they come from its path alone
    return tag_of(store.is_default, store.ident)


def links() -> set[str]:
    """The bench store's bridges and veths (another store's, such as a test suite's, are not ours)."""
    tag = network_tag()
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}
    return {n for n in names if n.startswith((f"tp{tag}-", f"tv{tag}-"))}


def nft_tables() -> set[str]:
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    want = f"{firewall.TABLE}{network_tag()}"
    return {line.split()[-1] for line in out.splitlines() if line.split() and line.split()[-1] == want}


def networks() -> set[str]:
    out = subprocess.run([str(TUPPER), "network", "ls", "--json"], capture_output=True, text=True).stdout
    return {n["name"] for n in json.loads(out or "[]")}


def interrupted(signum, frame):
    raise KeyboardInterrupt


# ---- the benchmark's own world -------------------------------------------------------------------


class Bench:
    """A private dbus-daemon with a tupperd of this checkout on the bench store, and everything made in it,
    removed on exit (also on failure or Ctrl-C) and checked for leftovers."""

    def __init__(self, prog: str, prefixes: tuple[str, ...], *, debug: bool = True, raise_limits: bool = True,
                 trace: bool = False) -> None:
        self.prog = prog
        self.trace = trace
        self.prefixes = prefixes  # names of this run's containers (tupper's and raw)
        self.debug = debug
        self.raise_limits = raise_limits
        self.names: list[str] = []  # tupper containers made
        self.raw: list[RawContainer] = []
        self.pool_set = False
        self.pool_members: set[str] = set()  # every pool container seen (the test suite's pools have tpool- names too)
        self.bus: PrivateBus | None = None
        self.log_text = ""
        self.tupperd = 0
        self.notes: list[str] = []
        self.left: list[str] = []
        self.links_before: set[str] = set()
        self.tables_before: set[str] = set()
        self.networks_before: set[str] | None = None  # None: never read, so none of the networks is this run's to remove

    def say(self, text: str) -> None:
        print(f"{self.prog}: {text}", flush=True)

    def __enter__(self) -> Bench:
        if os.geteuid() != 0:
            sys.exit(f"{self.prog}: needs root (systemd-nspawn, btrfs)")
        other = Store(STORE, "btrfs").daemon_pid()
        if other:
            sys.exit(f"{self.prog}: a tupperd (pid {other}) already serves {STORE}: another benchmark runs; wait for it to end")
        # The CLI's bytecode, as an installed tupper has it: no CLI call compiles modules.
        subprocess.run([str(PYTHON), "-m", "compileall", "-q", str(REPO / "tupper")], check=True)
        if self.raise_limits:  # the baseline boots without tupper: the limits tupper raises for its starts, raised for it too
            self.notes = limits.prepare(_Notes(self.notes), 64)
        self.guard = UserStateGuard(canary=False)
        self.guard.begin()
        self.was_mounted = mounted(STORE)
        try:
            ensure_image(STORE, log=self.say)
            clash = [p.name for pre in self.prefixes for p in (*(STORE / "containers").glob(f"{pre}-*"), *SCRATCH.glob(f"{pre}-*"))]
            if clash:
                raise RuntimeError(f"{STORE} already has {', '.join(clash)} (a run cut short?): remove them first")
            SCRATCH.mkdir(mode=0o700, exist_ok=True)
            self.links_before, self.tables_before = links(), nft_tables()
            self.bus = PrivateBus(STORE, python=str(PYTHON), debug=self.debug)
            if self.trace:  # tupperd through this script, with timers (TRACED); the bus rereads its service file
                (self.bus.dir / "services" / "org.tupper1.service").write_text(
                    f"[D-BUS Service]\nName=org.tupper1\nExec={PYTHON} {Path(__file__).resolve()} --as-tupperd --root {STORE}"
                    f"{' --debug' if self.debug else ''}\nUser=root\n")
                subprocess.run(["busctl", f"--address={self.bus.address}", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                "org.freedesktop.DBus", "ReloadConfig"], check=True, capture_output=True)
            os.environ.update(self.bus.env(STORE))
            signal.signal(signal.SIGTERM, interrupted)  # ends the run the way Ctrl-C does, through __exit__
            tupper("ps")  # the warm-up call: bus-activates tupperd
            self.tupperd = self.bus.tupperd_pid() or 0
            if not self.tupperd:
                raise RuntimeError("no tupperd on the benchmark's private bus after the warm-up call")
            self.networks_before = networks()
        except BaseException:
            self.__exit__(*sys.exc_info())
            print(f"{self.prog}: the private bus's log (tupperd's stderr) ends with:\n" + "\n".join(self.log_text.splitlines()[-15:]),
                  file=sys.stderr)
            raise
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        try:
            self.say("removing what the run made ...")
            for step in (self.remove_pool, self.remove_tupper, self.remove_raw, self.remove_networks):
                try:
                    step()
                except Exception as e:  # noqa: BLE001 - keep cleaning the rest
                    print(f"{self.prog}: cleanup: {e}", file=sys.stderr)
            if self.bus is not None:
                self.log_text = self.bus.log.read_text(errors="replace") if self.bus.log.exists() else ""
                self.bus.close()
            self.left = self.leftovers()  # while the store is mounted: what is in it
            if not self.was_mounted and mounted(STORE):
                subprocess.run([str(TUPPER), "--root", str(STORE), "store", "unmount"], capture_output=True)
            problems = self.guard.end()
            if problems:
                print(f"{self.prog}: the user's state changed: {'; '.join(problems)}", file=sys.stderr)
            if self.left:
                print(f"{self.prog}: left behind: {'; '.join(self.left)}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    # ---- the pool ------------------------------------------------------------------------------

    def pool_view(self) -> dict | None:
        """The image's pool as `tupper pool ls --json` shows it, None where it has none."""
        out = tupper("pool", "ls", "--json")[1]
        view = next((v for v in json.loads(out or "[]") if v["image"] == IMAGE_NAME), None)
        self.pool_members.update(c["name"] for c in (view or {}).get("containers", ()))
        return view

    def pool_leaders(self) -> dict[str, int]:
        """{pool container: its leader PID}, read from the records under <store>/containers/tpool-*."""
        out = {}
        for d in (STORE / "containers").glob(f"{POOL_PREFIX}*"):
            try:
                rec = json.loads((d / "record.json").read_text())
            except (OSError, ValueError):
                continue
            self.pool_members.add(d.name)
            if rec.get("leader_pid"):
                out[d.name] = rec["leader_pid"]
        return out

    def wait_pool(self, size: int, timeout: float = POOL_TIMEOUT) -> float:
        """Wait until the pool holds `size` ready containers and boots none; returns the seconds waited."""
        t0 = time.perf_counter()
        while True:
            v = self.pool_view()
            if v is not None and v["ready"] == size and not v.get("booting") and len(v.get("containers", ())) == size:
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"the pool did not fill to {size} within {timeout:.0f}s: {v}")
            time.sleep(0.1)

    # ---- what is made, and its removal --------------------------------------------------------

    def run_tupper(self, name: str, *extra: str, timeout: float | None = None) -> tuple[float, dict, str]:
        """`tupper run examples/hello.toml --name NAME --json [extra]`: (wall seconds, its JSON, its stderr)."""
        self.names.append(name)
        took, out, err = tupper("run", str(SPEC), "--name", name, "--json", *extra, timeout=timeout)
        return took, json.loads(out), err

    def remove_tupper(self, names: list[str] | None = None) -> None:
        names = list(self.names) if names is None else names
        for i in range(0, len(names), 25):  # one call for several: `rm --force A B ...`
            chunk = names[i:i + 25]
            p = subprocess.run([str(TUPPER), "rm", "--force", *chunk], capture_output=True, text=True, start_new_session=True)
            gone = [n for n in chunk if not (STORE / "containers" / n).exists()]
            for n in gone:
                self.names.remove(n)
            if len(gone) < len(chunk):
                raise RuntimeError(f"tupper rm --force {' '.join(chunk)}: {p.stderr.strip()}")

    def new_raw(self, name: str) -> RawContainer:
        c = RawContainer(name, IMAGE, SCRATCH, COMPONENT, UNIT)
        self.raw.append(c)
        return c

    def remove_raw(self, only: list[RawContainer] | None = None) -> None:
        for c in list(self.raw if only is None else only):
            c.destroy()
            self.raw.remove(c)

    def remove_pool(self) -> None:
        if not self.pool_set:
            return
        tupper("pool", "rm", IMAGE_NAME)
        self.pool_set = False
        # A boot under way when the pool was removed ends in a container that the keeper then drains (size 0).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.pool_view() is not None:
            time.sleep(0.5)
        if self.pool_view() is not None:
            raise RuntimeError(f"the pool still holds containers after `tupper pool rm`: {self.pool_view()}")

    def remove_networks(self) -> None:
        if self.networks_before is None:
            return
        for name in sorted(networks() - self.networks_before):
            subprocess.run([str(TUPPER), "network", "rm", name], capture_output=True)

    def leftovers(self) -> list[str]:
        """Anything of this run still on the machine (should be empty). Pool containers' names are tpool-* in
        every store (a test suite's beside): only the ones this run saw are looked for outside the store."""
        found = []
        parent = Store(STORE, "btrfs").cgroup_parent
        ours = tuple(f"{pre}-" for pre in self.prefixes) + tuple(sorted(self.pool_members))
        if (STORE / "containers").is_dir():
            found += [str(p) for p in (STORE / "containers").iterdir() if p.name.startswith((*ours, POOL_PREFIX))]
        found += [str(p) for p in SCRATCH.iterdir() if p.name.startswith(ours)] if SCRATCH.exists() else []
        found += [f"cgroup {parent}/{c}" for c in cgroups.names(parent=parent) if c.startswith(ours)]
        found += [f"cgroup {CGROUP_PARENT}/{c}" for c in cgroups.names(parent=CGROUP_PARENT) if c.startswith(ours)]
        found += [str(p) for d in ("propagate", "unix-export") if (NSPAWN_RUN / d).is_dir()
                  for p in (NSPAWN_RUN / d).iterdir() if p.name.startswith(ours)]
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
        found += [f"process {line.strip()}" for line in ps
                  if f"{STORE}/" in line or line.endswith(f" {STORE}") or any(f" {o}" in line or f"/{o}" in line for o in ours)]
        with open("/proc/self/mountinfo") as f:
            found += [f"mount {line.split()[4]}" for line in f if line.split()[4].startswith((f"{STORE}/containers/", f"{SCRATCH}/"))]
        found += [f"link {n}" for n in sorted(links() - self.links_before)]
        found += [f"nft table {t}" for t in sorted(nft_tables() - self.tables_before)]
        return found


class _Notes(Progress):
    """limits.prepare's notes (what it raised), kept."""

    def __init__(self, into: list[str]) -> None:
        self.into = into

    def note(self, text: str) -> None:
        self.into.append(text)


# ---- the bus traffic of a run, timestamped as it arrives --------------------------------------------


class BusLog:
    """`dbus-monitor` on the private bus: the method calls to tupperd, its replies, and its Progress signals
    (NAME, KIND, TEXT), each with the wall-clock time the monitor received it (its `time=`)."""

    RULES = ("type='method_call',destination='org.tupper1'", "type='method_return',sender='org.tupper1'",
             "type='signal',interface='org.tupper1.Manager',member='Progress'",
             "type='method_call',interface='org.freedesktop.DBus',member='Hello'",
             "type='method_call',interface='org.freedesktop.DBus',member='AddMatch'")
    HEADER = re.compile(r"^(method call|method return|signal|error) time=([\d.]+) sender=(\S+) -> destination=(\(null destination\)|\S+) serial=(\d+)"
                        r"(?: reply_serial=(\d+))?(?:.*member=(\w+))?")
    STRING = re.compile(r'^\s+string "(.*)"$')

    def __init__(self, address: str) -> None:
        self.proc = subprocess.Popen(["dbus-monitor", "--address", address, *self.RULES], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self.seen: list[dict] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        msg: dict | None = None
        for line in self.proc.stdout:
            m = self.HEADER.match(line)
            if m:
                msg = {"type": m.group(1), "time": float(m.group(2)), "sender": m.group(3), "destination": m.group(4),
                       "serial": int(m.group(5)), "reply_serial": int(m.group(6) or 0), "member": m.group(7) or "", "args": []}
                with self.lock:
                    self.seen.append(msg)
                continue
            s = self.STRING.match(line)
            if msg is not None and s:
                with self.lock:
                    msg["args"].append(s.group(1))

    def timeline(self, name: str, t0: float, t_end: float, timeout: float = 1.0) -> dict | None:
        """A warm run's events, in seconds after the CLI was started (t0): its Hello and AddMatch on the bus;
        the Run call arrives; its reply (the job); the Claiming step and its end; the Starting step (units) and its end; the Wait call's
        reply (the result); the CLI's exit. None where any is missing."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                seen = [dict(m) for m in self.seen if m["time"] >= t0 - 0.001]
            out = self._events(seen, name, t0, t_end)
            if out is not None or time.monotonic() > deadline:
                return out
            time.sleep(0.01)

    @staticmethod
    def _events(seen: list[dict], name: str, t0: float, t_end: float) -> dict | None:
        def reply_to(call: dict | None) -> dict | None:
            if call is None:
                return None
            return next((m for m in seen if m["type"] == "method return" and m["destination"] == call["sender"]
                         and m["reply_serial"] == call["serial"]), None)

        run = next((m for m in seen if m["type"] == "method call" and m["member"] in ("Run", "RunWith") and name in m["args"][:2]), None)
        wait = next((m for m in seen if run and m["type"] == "method call" and m["member"] == "Wait" and m["sender"] == run["sender"]), None)
        progress = [(m["time"], m["args"][1], m["args"][2]) for m in seen
                    if m["type"] == "signal" and len(m["args"]) == 3 and m["args"][0] == name]
        claim = [t for t, _, text in progress if text.startswith("Claiming")]
        units = [t for t, _, text in progress if text.startswith("Starting")]
        first = {m["member"]: m["time"] for m in reversed(seen) if run and m["type"] == "method call" and m["sender"] == run["sender"]}
        points = {"Hello: the CLI is connected to the bus": first.get("Hello"), "AddMatch: it subscribes to Progress": first.get("AddMatch"),
                  "Run call": run and run["time"], "Run reply (the job)": (r := reply_to(run)) and r["time"],
                  "Wait call": wait and wait["time"], "Claiming step begins": claim[0] if claim else None,
                  "Claiming step ends": claim[1] if len(claim) > 1 else None, "Starting units begins": units[0] if units else None,
                  "units active": units[1] if len(units) > 1 else None, "Wait reply (the result)": (w := reply_to(wait)) and w["time"],
                  "CLI exited": t_end}
        if any(v is None for v in points.values()):
            return None
        return {k: float(v) - t0 for k, v in points.items()}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


# ---- --trace: tupperd with timers around the steps of a run (tupper's code unchanged) ---------------

# Wrapped in the tupperd that --trace starts (`warmstart.py --as-tupperd`): each call writes one line to
# its stderr, the private bus's log: TRACE, thread, depth (-1: a coroutine on the event loop), name,
# CLOCK_MONOTONIC start (the same clock as this script's time.monotonic), seconds.
TRACED = {
    "tupper.daemon.tupperd:Daemon": ("run_file", "_run", "_track", "_attach", "_set_state", "_job_done", "_follow_units"),
    "tupper.daemon.api:ContainerInterface": ("publish",),
    "tupper.model.spec": ("load",),
    "tupper.runtime.runtime:Runtime": ("run", "claim", "records", "_check_name_free", "_check_units_do_not_shadow_the_image",
                                       "_check_secrets", "_check_network", "_take_from_pool", "_sync_claim", "_configure_claimed", "_make_cgroups",
                                       "_make_mount_points", "_settle_units", "_wait_units"),
    "tupper.runtime.pools": ("cold_reasons",),
    "tupper.runtime.records:Record": ("save", "end"),
    "tupper.store.networks:Networks": ("rename",),
    "tupper.container.mountns": ("set_hostname", "replace_mount"),
    "tupper.container.unitfiles": ("plan", "write"),
    "tupper.runtime.network:Plumbing": ("publish",),
    # Runtime.connect_bus is a field (ContainerBus.connect, taken when the class was made): its two steps instead
    "tupper.container.systemd:ContainerBus": ("__init__", "system_state", "loaded", "reload", "start_unit", "close"),
}
TRACE_MARK = "TRACE"


def install_traces() -> None:
    import functools
    import importlib
    import inspect

    local = threading.local()

    def emit(name: str, depth: int, t0: float) -> None:
        line = f"{TRACE_MARK}\t{threading.current_thread().name}\t{depth}\t{name}\t{t0:.6f}\t{time.monotonic() - t0:.6f}\n"
        os.write(2, line.encode())

    def wrap(name: str, fn):
        if inspect.iscoroutinefunction(fn):
            async def on_loop(*a, **k):
                t0 = time.monotonic()
                try:
                    return await fn(*a, **k)
                finally:
                    emit(name, -1, t0)
            return functools.wraps(fn)(on_loop)

        def in_thread(*a, **k):
            depth = getattr(local, "depth", 0)
            local.depth = depth + 1
            t0 = time.monotonic()
            try:
                return fn(*a, **k)
            finally:
                local.depth = depth
                emit(name, depth, t0)
        return functools.wraps(fn)(in_thread)

    for where, names in TRACED.items():
        module, _, cls = where.partition(":")
        owner = importlib.import_module(module)
        if cls:
            owner = getattr(owner, cls)
        for n in names:
            raw = inspect.getattr_static(owner, n)
            label = f"{cls or module.rsplit('.', 1)[-1]}.{n}"
            if isinstance(raw, staticmethod):
                setattr(owner, n, staticmethod(wrap(label, raw.__func__)))
            else:
                setattr(owner, n, wrap(label, raw))


def as_tupperd(argv: list[str]) -> int:
    """`warmstart.py --as-tupperd ARGS`: tupperd (ARGS as its own), with the timers of TRACED."""
    install_traces()
    sys.argv = [sys.argv[0], *argv]
    from tupper.daemon.tupperd import main as tupperd_main

    return tupperd_main()


def traces(log: str, windows: list[tuple[float, float]]) -> dict:
    """For each window (a warm run, monotonic start and end), the traced calls that began in it, outside the
    pool keeper's thread: {label: {"ms": median over the runs of the time per run, "calls": median count,
    "depth", "at": median start in ms after the run began}}, in the order of their start."""
    calls = []
    for line in log.splitlines():
        f = line.split("\t")
        if len(f) == 6 and f[0] == TRACE_MARK and f[1] != "pool-keeper":
            calls.append((f[3], int(f[2]), float(f[4]), float(f[5])))
    per_run: list[dict[str, tuple[int, float, int, float]]] = []
    for a, b in windows:
        got: dict[str, tuple[int, float, int, float]] = {}
        for name, depth, start, took in calls:
            if a <= start <= b:
                d, total, n, first = got.get(name, (depth, 0.0, 0, start - a))
                got[name] = (d, total + took, n + 1, first)
        per_run.append(got)
    names = {n for run in per_run for n in run}
    out = {}
    for n in names:
        seen = [run[n] for run in per_run if n in run]
        out[n] = {"depth": seen[0][0], "ms": statistics.median(s[1] for s in seen) * 1000, "calls": statistics.median(s[2] for s in seen),
                  "at": statistics.median(s[3] for s in seen) * 1000, "runs": len(seen)}
    return dict(sorted(out.items(), key=lambda kv: (kv[1]["at"], kv[1]["depth"])))


# ---- the measurements ----------------------------------------------------------------------------


def floor(runs: int) -> dict:
    """What every tupper call pays before tupperd does any work."""
    out: dict[str, list[float]] = {"python -c pass": [], "tupper --version": [], "tupper ps (no containers)": [],
                                   "tupper stop NO-SUCH (answered at once)": []}
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([str(PYTHON), "-c", "pass"], check=True)
        out["python -c pass"].append(time.perf_counter() - t0)
        out["tupper --version"].append(tupper("--version")[0])
        out["tupper ps (no containers)"].append(tupper("ps")[0])
        out["tupper stop NO-SUCH (answered at once)"].append(tupper("stop", NO_SUCH, expect=2)[0])
    return {k: summary(v) for k, v in out.items()}


def schedule(runs: int, cold: int, raw: int) -> list[tuple[str, int]]:
    """The warm runs in order, with the cold and raw ones spread evenly among them (their order alternating)."""
    extra = max(cold, raw)
    after: dict[int, list[tuple[str, int]]] = {}
    for j in range(extra):
        at = max(0, round((j + 1) * runs / extra) - 1)
        pair = [(k, j) for k, n in (("cold", cold), ("raw", raw)) if j < n]
        after.setdefault(at, []).extend(pair if j % 2 == 0 else pair[::-1])
    out: list[tuple[str, int]] = []
    for i in range(runs):
        out.append(("warm", i))
        out += after.get(i, [])
    return out


def warm_run(bench: Bench, buslog: BusLog, i: int, size: int, settle: float) -> dict:
    name = f"warm-{i:03d}"
    before = bench.pool_leaders()
    if len(before) < size:
        raise RuntimeError(f"the pool holds {len(before)} booted containers, not {size}")
    t0, m0 = time.time(), time.monotonic()
    took, res, err = bench.run_tupper(name)
    m1 = time.monotonic()
    timeline = buslog.timeline(name, t0, t0 + took)
    leader = res.get("leader_pid")
    claimed = leader in before.values()
    inactive = [u["name"] for u in res.get("units", []) if u.get("active_state") != "active"]
    if not claimed:
        raise RuntimeError(f"{name}: leader pid {leader} was none of the pool's ({before}): a boot, not a claim. stderr: {err.strip()}")
    if inactive:
        raise RuntimeError(f"{name}: units not active when run returned: {inactive}")
    from_pool = next(n for n, pid in before.items() if pid == leader)
    bench.remove_tupper([name])
    refill = bench.wait_pool(size)
    time.sleep(settle)
    return {"name": name, "wall": took, "runtime": res.get("seconds"), "leader_pid": leader, "from": from_pool,
            "timeline": timeline, "window": (m0, m1), "refill_wait": refill, "stderr": err.strip()}


def cold_run(bench: Bench, i: int, size: int, settle: float) -> dict:
    name = f"cold-{i:03d}"
    before = bench.pool_leaders()
    took, res, err = bench.run_tupper(name, "--cold")
    if res.get("leader_pid") in before.values():
        raise RuntimeError(f"{name}: --cold took a pool container ({res.get('leader_pid')})")
    bench.remove_tupper([name])
    bench.wait_pool(size)
    time.sleep(settle)
    return {"name": name, "wall": took, "runtime": res.get("seconds")}


def raw_run(bench: Bench, i: int, size: int, settle: float) -> dict:
    c = bench.new_raw(f"warmraw-{i:03d}")
    t0 = time.perf_counter()
    c.start()
    took = time.perf_counter() - t0
    bench.remove_raw([c])
    bench.wait_pool(size)
    time.sleep(settle)
    return {"name": c.name, "wall": took}


def refill_boots(log: str) -> list[float]:
    """The pool keeper's boots, from tupperd's log: "pool IMAGE: tpool-… ready in 0.84s"."""
    return [float(m.group(1)) for m in re.finditer(r"pool \S+: tpool-\w+ ready in ([\d.]+)s", log)]


def measure(bench: Bench, args, say: Callable[[str], None]) -> dict:
    buslog = BusLog(bench.bus.address if bench.bus else "")
    try:
        say(f"floor of a CLI call ({args.floor_runs} runs of each) ...")
        fl = floor(args.floor_runs)
        say(f"tupper pool set {IMAGE_NAME} --size {args.size}; waiting until it is full ...")
        tupper("pool", "set", IMAGE_NAME, "--size", str(args.size))
        bench.pool_set = True
        filled = bench.wait_pool(args.size)
        say(f"pool full after {filled:.1f}s; one warm and one cold run not counted (tupperd's lazy imports) ...")
        warmup = {"warm": warm_run(bench, buslog, 999, args.size, args.settle)["wall"],
                  "cold": cold_run(bench, 999, args.size, args.settle)["wall"]}
        runs: dict[str, list[dict]] = {"warm": [], "cold": [], "raw": []}
        plan = schedule(args.runs, args.cold_runs, args.raw_runs)
        for n, (kind, i) in enumerate(plan, 1):
            if kind == "warm":
                r = warm_run(bench, buslog, i, args.size, args.settle)
                detail = f"runtime {r['runtime']:.3f} s, from {r['from']}, refill waited {r['refill_wait']:.1f}s"
            elif kind == "cold":
                r = cold_run(bench, i, args.size, args.settle)
                detail = f"runtime {r['runtime']:.3f} s"
            else:
                r = raw_run(bench, i, args.size, args.settle)
                detail = ""
            runs[kind].append(r)
            say(f"  {n:3d}/{len(plan)} {kind:4} {r['wall']:.3f} s  {detail}")
        pool_after = bench.pool_view()
    finally:
        buslog.close()
    return {"floor": fl, "warmup": warmup, "runs": runs, "pool_filled_in": filled, "pool_after": pool_after}


def report(results: dict) -> str:
    runs = results["runs"]
    s = {k: summary([r["wall"] for r in v]) for k, v in runs.items()}
    lines = ["", "| start, wall time until `run` returns (s) | n | p50 | p90 | p99 | min | max |", "|---|---:|---:|---:|---:|---:|---:|"]
    labels = {"warm": "warm: `tupper run` claims a pool container", "cold": "cold: `tupper run --cold` (a boot)",
              "raw": "raw nspawn (bench/baseline.py)"}
    for k, label in labels.items():
        v = s[k]
        if v["n"]:
            lines.append(f"| {label} | {v['n']} | {v['p50']:.3f} | {v['p90']:.3f} | {v['p99']:.3f} | {v['min']:.3f} | {v['max']:.3f} |")
    w = s["warm"]
    ok50, ok99 = w["p50"] < TARGETS["p50"], w["p99"] < TARGETS["p99"]
    lines.append(f"\ntargets: warm p50 < {TARGETS['p50'] * 1000:.0f} ms: {'met' if ok50 else 'MISSED'} ({w['p50'] * 1000:.0f} ms); "
                 f"p99 < {TARGETS['p99'] * 1000:.0f} ms: {'met' if ok99 else 'MISSED'} ({w['p99'] * 1000:.0f} ms)")
    if s["cold"]["n"] and s["raw"]["n"]:
        lines.append(f"warm p50 / cold p50 = {w['p50'] / s['cold']['p50']:.2f}; warm p50 / raw p50 = {w['p50'] / s['raw']['p50']:.2f}; "
                     f"cold p50 / raw p50 = {s['cold']['p50'] / s['raw']['p50']:.2f}")
    lines.append("\nwhere a warm run's time goes (medians, ms):")
    for k, v in results["floor"].items():
        lines.append(f"  floor: {k}: {v['p50'] * 1000:.1f}")
    runtime = [r["runtime"] for r in runs["warm"] if r.get("runtime") is not None]
    if runtime:
        lines.append(f"  tupperd's runtime (Runtime.run, `seconds` in the JSON): {statistics.median(runtime) * 1000:.1f}; "
                     f"wall - runtime: {statistics.median(r['wall'] - r['runtime'] for r in runs['warm'] if r.get('runtime')) * 1000:.1f}")
    tl = [r["timeline"] for r in runs["warm"] if r.get("timeline")]
    if tl:
        lines.append(f"  a warm run's timeline, ms after the CLI was started (medians of the {len(tl)} of {len(runs['warm'])} runs whose "
                     "bus traffic was all seen; the step between two lines is the difference of their medians):")
        prev = 0.0
        for key in tl[0]:
            at = statistics.median(t[key] for t in tl)
            lines.append(f"    {at * 1000:6.1f}  (+{(at - prev) * 1000:5.1f})  {key}")
            prev = at
    if results.get("traces"):
        lines.append("  inside tupperd (--trace: timers around its steps; medians over the warm runs of the time per run, ms; "
                     "indented: called by the line above; xN: calls per run):")
        for name, t in results["traces"].items():
            calls = f" x{t['calls']:g}" if t["calls"] != 1 else ""
            lines.append(f"    {'  ' * (t['depth'] + 1)}{name}: {t['ms']:.1f}{calls}  (at +{t['at']:.0f})")
    boots = results.get("refill_boots") or []
    if boots:
        lines.append(f"pool refills (tupperd's log, the keeper's boots): {len(boots)}, median {statistics.median(boots):.2f} s, "
                     f"max {max(boots):.2f} s; the benchmark waited for each before the next run")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50, help="warm runs (default 50)")
    ap.add_argument("--cold-runs", type=int, default=10, help="cold runs, spread among the warm ones (default 10)")
    ap.add_argument("--raw-runs", type=int, default=10, help="raw nspawn runs, spread among the warm ones (default 10)")
    ap.add_argument("--size", type=int, default=4, help="the pool's size (default 4)")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds between the pool being full again and the next run (default 1)")
    ap.add_argument("--floor-runs", type=int, default=20, help="runs of each CLI floor measurement (default 20)")
    ap.add_argument("--trace", action="store_true", help="tupperd with timers around the steps of a run (tupper's code unchanged): "
                                                         "where a warm run's time goes inside tupperd; not for the headline figures")
    args = ap.parse_args()
    if args.runs < 1 or args.size < 1 or args.cold_runs < 0 or args.raw_runs < 0 or args.settle < 0 or args.floor_runs < 1:
        ap.error("--runs, --size and --floor-runs must be at least 1; the others not negative")

    def say(text: str) -> None:
        print(f"warmstart: {text}", flush=True)

    info = machine()
    before = other_work()
    say(f"machine: {info['cpu']}, {info['cores']} cores, kernel {info['kernel']}, {info['systemd']}, cgroups {info['cgroups']}")
    say(f"load {before['load']}; elsewhere on the machine: {before['nspawn_elsewhere']} nspawn processes, {before['pytest']} pytest "
        f"processes, benchmarks {before['benchmarks'] or 'none'}")
    started = datetime.datetime.now()
    with Bench("warmstart", ("warm", "cold", "warmraw"), trace=args.trace) as bench:
        say(f"tupperd pid {bench.tupperd} (store {STORE}, --debug), CLI {TUPPER}")
        for note in bench.notes:
            say(f"limits: {note}")
        results = measure(bench, args, say)
    results["refill_boots"] = refill_boots(bench.log_text)
    if args.trace:
        results["traces"] = traces(bench.log_text, [r["window"] for r in results["runs"]["warm"]])
    after = other_work()
    results.update({"date": started.date().isoformat(), "started": started.isoformat(timespec="seconds"), "machine": info,
                    "args": vars(args), "other_work_before": before, "other_work_after": after, "tupperd": bench.tupperd,
                    "leftovers": bench.left, "summary": {k: summary([r["wall"] for r in v]) for k, v in results["runs"].items()},
                    "tupperd_log_lines": len(bench.log_text.splitlines()), "tupperd_tracebacks": bench.log_text.count("Traceback")})
    print(report(results))
    print(f"\nload (1, 5, 15 min) before {before['load']}, after {after['load']}; warm-up (not counted): "
          f"warm {results['warmup']['warm']:.3f} s, cold {results['warmup']['cold']:.3f} s")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"warmstart-{started:%Y-%m-%d-%H%M%S}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    path.with_suffix(".tupperd.log").write_text(bench.log_text)
    print(f"wrote {path.relative_to(REPO)} and tupperd's log beside it ({results['tupperd_log_lines']} lines, "
          f"{results['tupperd_tracebacks']} tracebacks)")
    return 1 if bench.left else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--as-tupperd"]:
        sys.exit(as_tupperd(sys.argv[2:]))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("warmstart: interrupted; what it had made is removed", file=sys.stderr)
        sys.exit(130)
