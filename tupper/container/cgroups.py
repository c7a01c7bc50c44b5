"""Cgroups: the one module that knows the host's cgroup layout and writes cgroup files.

Every container gets `<own>/<parent>/<name>` in each hierarchy it needs, where `<own>` is the cgroup
this process runs in there (a runtime lives in the slice it was given, never above it) and `<parent>`
is the store's (`tupper` for the default store, `tupper-<id>` for another), so two stores never share,
or clean up, each other's cgroups. The hierarchies:

- systemd's, where systemd inside the container makes its own tree: the unified one on a pure cgroup2
  host; `name=systemd` (and the controller-less unified one) on a hybrid or legacy host. nspawn with
  --keep-unit makes `payload/` and `supervisor/` below the container's cgroup.
- on hybrid and legacy hosts, each cgroup v1 controller tupper uses (memory, cpu, cpuacct, blkio,
  pids): the container's resource limits and its usage live there, and each component gets
  `<container>/<component>` below it, where the monitor places the processes of the component's units
  (systemd inside sees these hierarchies read-only and cannot). On a pure cgroup2 host the limits go
  into the container's unified cgroup, and a component's into its units, by systemd inside.

Which limit goes into which file: `v1_files`, `v2_files` and `systemd_properties` (pure; docs/resources.md).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import signal
import time
from pathlib import Path

import attrs

from tupper.model.resources import CPU_PERIOD_US, UNLIMITED, Resources

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "tupper"
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "blkio", "pids")  # what tupper limits or reads on cgroup v1
V2_CONTROLLERS = ("memory", "cpu", "io", "pids")


@attrs.frozen
class Hierarchy:
    controllers: frozenset[str]  # v1: its controllers ("memory", "name=systemd", …); unified: "" (see Layout.unified)
    mount: Path
    own: Path  # this process's cgroup in it, as a directory

    @property
    def unified(self) -> bool:
        return not self.controllers

    def has(self, controller: str) -> bool:
        return controller in self.controllers


@attrs.frozen
class Layout:
    kind: str  # v2 (pure cgroup2), hybrid (v1 controllers + a unified hierarchy), legacy (v1 only)
    hierarchies: tuple[Hierarchy, ...]

    @classmethod
    def read(cls, self_cgroup: str, mountinfo: str) -> Layout:
        """From /proc/self/cgroup and /proc/self/mountinfo: each hierarchy's mount and our place in it.
        A hierarchy mounted from below the root (inside a container) counts from its mount's root."""
        mounts: dict[frozenset[str], tuple[Path, str]] = {}
        for line in mountinfo.splitlines():
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(fields) < 5 or len(rest) < 3 or rest[0] not in ("cgroup", "cgroup2"):
                continue
            mount_root, mount_at = fields[3], _unescape(fields[4])
            key = frozenset() if rest[0] == "cgroup2" else frozenset(
                o for o in rest[2].split(",") if o not in ("rw", "ro", "xattr", "nsdelegate", "clone_children", "noprefix")
                and not o.startswith("release_agent="))
            mounts.setdefault(key, (Path(mount_at), mount_root))
        found: list[Hierarchy] = []
        for line in self_cgroup.splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            key = frozenset(c for c in parts[1].split(",") if c)
            if key not in mounts:
                continue
            mountpoint, root = mounts[key]
            own = parts[2]
            rel = os.path.relpath(own, root)
            if rel.startswith(".."):
                continue  # our cgroup is not in what is mounted here
            found.append(Hierarchy(key, mountpoint, mountpoint if rel == "." else mountpoint / rel))
        unified = next((h for h in found if h.unified), None)
        if unified is not None and len(found) == 1:
            kind = "v2"  # a pure cgroup2 host lists only "0::/…" in /proc/self/cgroup
        elif unified is not None:
            kind = "hybrid"
        else:
            kind = "legacy"
        return cls(kind, tuple(found))

    @classmethod
    def detect(cls) -> Layout:
        return _detect()

    def systemd_hierarchies(self) -> list[Hierarchy]:
        """Where systemd inside the container makes its tree (nspawn mounts these read-write)."""
        if self.kind == "v2":
            return [h for h in self.hierarchies if h.unified]
        return [h for h in self.hierarchies if h.has("name=systemd") or h.unified]

    def controller(self, name: str) -> Hierarchy | None:
        """The hierarchy that holds controller `name` (the unified one on a pure cgroup2 host)."""
        if self.kind == "v2":
            return next((h for h in self.hierarchies if h.unified), None)
        return next((h for h in self.hierarchies if h.has(name)), None)

    def v1_hierarchies(self) -> list[Hierarchy]:
        """The v1 controller hierarchies tupper uses, once each (cpu and cpuacct may share one)."""
        if self.kind == "v2":
            return []
        out: list[Hierarchy] = []
        for c in V1_CONTROLLERS:
            h = self.controller(c)
            if h is not None and h not in out:
                out.append(h)
        return out

    def container_dirs(self, parent: str, name: str) -> list[Path]:
        return [h.own / parent / name for h in [*self.systemd_hierarchies(), *self.v1_hierarchies()]]

    def container_dir(self, controller: str, parent: str, name: str) -> Path | None:
        h = self.controller(controller)
        return None if h is None else h.own / parent / name

    def systemd_dir(self, parent: str, name: str) -> Path | None:
        """The container's cgroup in the hierarchy whose tree systemd inside keeps (units, payload/)."""
        hs = [h for h in self.systemd_hierarchies() if not h.unified] or self.systemd_hierarchies()
        return hs[0].own / parent / name if hs else None

    def unified_dir(self, parent: str, name: str) -> Path | None:
        """The container's cgroup in the unified hierarchy (pressure figures; everything on v2)."""
        return next((h.own / parent / name for h in self.hierarchies if h.unified), None)


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


@functools.cache
def _detect() -> Layout:
    with open("/proc/self/cgroup") as f, open("/proc/self/mountinfo") as g:
        return Layout.read(f.read(), g.read())


# ---- a container's cgroups ----------------------------------------------------------------------


def names(parent: str = PARENT, layout: Layout | None = None) -> set[str]:
    """The container cgroups that exist below `parent`, in any hierarchy."""
    lay = layout or Layout.detect()
    found: set[str] = set()
    for h in [*lay.systemd_hierarchies(), *lay.v1_hierarchies()]:
        d = h.own / parent
        if d.is_dir():
            found.update(p.name for p in d.iterdir() if p.is_dir())
    return found


def create(name: str, parent: str = PARENT, layout: Layout | None = None) -> list[Path]:
    lay = layout or Layout.detect()
    made = lay.container_dirs(parent, name)
    for p in made:
        for attempt in range(5):
            try:
                p.mkdir(parents=True, exist_ok=True)
                break
            except FileNotFoundError:
                # remove() of another container took the shared parent away between our two mkdirs.
                if attempt == 4:
                    raise
    mem = lay.container_dir("memory", parent, name)
    if lay.kind != "v2" and mem is not None:
        # Limits and OOM kills count the container and its components together; charges follow a
        # process moved into a component's cgroup (set on each, see create_component).
        _write_quiet(mem / "memory.use_hierarchy", "1")
    return made


def join(name: str, parent: str = PARENT, layout: Layout | None = None) -> None:
    """Move the calling process into the container's cgroups (used between fork and exec)."""
    for p in (layout or Layout.detect()).container_dirs(parent, name):
        with open(p / "cgroup.procs", "w") as f:
            f.write("0")


def procs(name: str, parent: str = PARENT, layout: Layout | None = None) -> set[int]:
    found: set[int] = set()
    for p in (layout or Layout.detect()).container_dirs(parent, name):
        found |= tree_pids(p)
    return found


def tree_pids(top: Path) -> set[int]:
    found: set[int] = set()
    if not top.is_dir():
        return found
    for dirpath, _, files in os.walk(top):
        if "cgroup.procs" in files:
            try:
                with open(os.path.join(dirpath, "cgroup.procs")) as f:
                    found.update(int(x) for x in f.read().split())
            except OSError:
                pass
    return found


def remove(name: str, parent: str = PARENT, *, kill: bool = True, timeout: float = 2.0, layout: Layout | None = None) -> bool:
    """Remove the container's cgroups bottom-up; with `kill`, SIGKILL what is still inside first.

    Returns True when every directory is gone.
    """
    lay = layout or Layout.detect()
    deadline = time.monotonic() + timeout
    while kill and (left := procs(name, parent, lay)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    ok = True
    for p in lay.container_dirs(parent, name):
        if not p.exists():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(p, topdown=False), key=lambda w: -len(w[0])):
            try:
                os.rmdir(dirpath)
            except FileNotFoundError:
                pass
            except OSError:
                ok = False
        # The shared parent goes too once the last container's cgroup is gone (another may hold it).
        with contextlib.suppress(OSError):
            os.rmdir(p.parent)
    return ok


# ---- components (cgroup v1: below the container's, filled by the monitor) ------------------------


def component_dirs(name: str, component: str, parent: str = PARENT, layout: Layout | None = None) -> list[Path]:
    """A component's cgroups in each v1 controller hierarchy (none on a pure cgroup2 host, where
    systemd inside limits the component's units itself)."""
    return [h.own / parent / name / component for h in (layout or Layout.detect()).v1_hierarchies()]


def create_component(name: str, component: str, parent: str = PARENT, layout: Layout | None = None) -> list[Path]:
    lay = layout or Layout.detect()
    made = component_dirs(name, component, parent, lay)
    for p in made:
        p.mkdir(exist_ok=True)
        if (p / "memory.move_charge_at_immigrate").exists():
            # What a process allocated before the monitor moved it is charged to the component too.
            _write_quiet(p / "memory.move_charge_at_immigrate", "3")
    return made


def place(pids: set[int], name: str, component: str, parent: str = PARENT, layout: Layout | None = None) -> set[int]:
    """Move `pids` into the component's cgroups; returns the ones that are there now (gone ones are not)."""
    placed = set(pids)
    for d in component_dirs(name, component, parent, layout):
        for pid in pids:
            try:
                _attach(d, pid)
            except OSError as exc:
                if exc.errno == errno.ENOMEM and (d / "memory.move_charge_at_immigrate").exists():
                    # It holds more than the component may: move it without its charge; what it
                    # allocates from now on counts, and the component's limit then applies.
                    _write(d / "memory.move_charge_at_immigrate", "0")
                    try:
                        _attach(d, pid)
                    finally:
                        _write_quiet(d / "memory.move_charge_at_immigrate", "3")
                elif exc.errno in (errno.ESRCH, errno.ENOENT):
                    placed.discard(pid)
                else:
                    raise
    return placed


def _attach(d: Path, pid: int) -> None:
    fd = os.open(d / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(pid).encode())
    finally:
        os.close(fd)


def unit_dir(name: str, unit: str, parent: str = PARENT, layout: Layout | None = None, *, unified: bool = False) -> Path | None:
    """The cgroup systemd inside made for `unit` (below payload/, in system.slice unless the unit says
    otherwise), in the hierarchy systemd keeps (`unified`: in the unified one, for pressure figures);
    None while it has none."""
    lay = layout or Layout.detect()
    top = lay.unified_dir(parent, name) if unified else lay.systemd_dir(parent, name)
    if top is None:
        return None
    first = top / "payload" / "system.slice" / unit
    if first.is_dir():
        return first
    for dirpath, dirs, _ in os.walk(top / "payload"):
        if unit in dirs:
            return Path(dirpath) / unit
    return None


# ---- limits ----------------------------------------------------------------------------------


def _bytes_v2(value: int) -> str:
    return "max" if value >= UNLIMITED else str(value)


def _bytes_v1(value: int) -> str:
    return "-1" if value >= UNLIMITED else str(value)


def cpu_shares(weight: int) -> int:
    """cgroup v1 cpu.shares for a cgroup v2 weight, as systemd maps them (100 ↔ 1024)."""
    return min(max(weight * 1024 // 100, 2), 262144)


def blkio_weight(weight: int) -> int:
    """cgroup v1 blkio weight (10–1000, default 500) for an io weight (1–10000, default 100), as systemd maps them."""
    return min(max(weight * 500 // 100, 10), 1000)


def v2_files(res: Resources) -> list[tuple[str, str]]:
    """(file, value) to write into a cgroup of the unified hierarchy, in order."""
    out: list[tuple[str, str]] = []
    for key, file in (("memory_min", "memory.min"), ("memory_low", "memory.low"), ("memory_high", "memory.high"),
                      ("memory_max", "memory.max"), ("memory_swap_max", "memory.swap.max")):
        value = getattr(res, key)
        if value is not None:
            out.append((file, _bytes_v2(value)))
    if res.cpu_weight is not None:
        out.append(("cpu.weight", str(res.cpu_weight)))
    if res.cpu_max is not None:
        quota = "max" if math.isinf(res.cpu_max) else str(round(res.cpu_max * CPU_PERIOD_US / 100))
        out.append(("cpu.max", f"{quota} {CPU_PERIOD_US}"))
    if res.io_weight is not None:
        out.append(("io.weight", f"default {res.io_weight}"))
    if res.pids_max is not None:
        out.append(("pids.max", _bytes_v2(res.pids_max)))
    return out


def v1_files(res: Resources, *, swap_accounting: bool = True) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """({controller: [(file, value), …]}, notes): the same limits on cgroup v1, and what v1 cannot do."""
    out: dict[str, list[tuple[str, str]]] = {}
    notes: list[str] = []
    mem: list[tuple[str, str]] = []
    if res.memory_min is not None:
        notes.append("memory_min: cgroup v1 has no memory protection; not applied")
    if res.memory_high is not None:
        notes.append("memory_high: cgroup v1 has no throttling limit; not applied (memory_max is a hard limit on v1 too)")
    if res.memory_low is not None:
        mem.append(("memory.soft_limit_in_bytes", _bytes_v1(res.memory_low)))
    if res.memory_max is not None:
        mem.append(("memory.limit_in_bytes", _bytes_v1(res.memory_max)))
    if res.memory_swap_max is not None:
        if not swap_accounting:
            notes.append("memory_swap_max: this kernel does not account swap per cgroup (no memory.memsw.*); not applied")
        elif res.memory_max is None or res.memory_max >= UNLIMITED:
            notes.append("memory_swap_max: cgroup v1 limits memory and swap together; set memory_max too; not applied")
        else:
            total = UNLIMITED if res.memory_swap_max >= UNLIMITED else res.memory_max + res.memory_swap_max
            mem.append(("memory.memsw.limit_in_bytes", _bytes_v1(total)))
    if mem:
        out["memory"] = mem
    cpu: list[tuple[str, str]] = []
    if res.cpu_weight is not None:
        cpu.append(("cpu.shares", str(cpu_shares(res.cpu_weight))))
    if res.cpu_max is not None:
        cpu.append(("cpu.cfs_period_us", str(CPU_PERIOD_US)))
        cpu.append(("cpu.cfs_quota_us", "-1" if math.isinf(res.cpu_max) else str(round(res.cpu_max * CPU_PERIOD_US / 100))))
    if cpu:
        out["cpu"] = cpu
    if res.io_weight is not None:
        out["blkio"] = [("blkio.bfq.weight", str(blkio_weight(res.io_weight)))]
    if res.pids_max is not None:
        out["pids"] = [("pids.max", _bytes_v2(res.pids_max))]
    return out, notes


def systemd_properties(res: Resources) -> list[tuple[str, str]]:
    """The same limits as systemd unit properties (a scope made by machined, a unit inside a
    container whose controllers are delegated): (name, value as in a unit file)."""
    out: list[tuple[str, str]] = []
    for key, prop in (("memory_min", "MemoryMin"), ("memory_low", "MemoryLow"), ("memory_high", "MemoryHigh"),
                      ("memory_max", "MemoryMax"), ("memory_swap_max", "MemorySwapMax")):
        value = getattr(res, key)
        if value is not None:
            out.append((prop, "infinity" if value >= UNLIMITED else str(value)))
    if res.cpu_weight is not None:
        out.append(("CPUWeight", str(res.cpu_weight)))
    if res.cpu_max is not None:
        out.append(("CPUQuota", "" if math.isinf(res.cpu_max) else f"{res.cpu_max:g}%"))
    if res.io_weight is not None:
        out.append(("IOWeight", str(res.io_weight)))
    if res.pids_max is not None:
        out.append(("TasksMax", "infinity" if res.pids_max >= UNLIMITED else str(res.pids_max)))
    return out


class LimitError(OSError):
    """A limit the kernel refused (a memory limit below what is in use, …): says which file and value."""


def apply(dirs: dict[str, Path], res: Resources, kind: str) -> list[str]:
    """Write `res` into cgroups: `dirs` maps a v1 controller (or "unified" on v2) to the cgroup's
    directory. Returns notes on what this layout cannot apply; raises LimitError naming the file."""
    if kind == "v2":
        d = dirs.get("unified")
        if d is None:
            return ["no cgroup of its own in the unified hierarchy: limits not applied"]
        for file, value in v2_files(res):
            _write(d / file, value)
        return []
    mem = dirs.get("memory")
    files, notes = v1_files(res, swap_accounting=mem is not None and (mem / "memory.memsw.limit_in_bytes").exists())
    for controller, writes in files.items():
        d = dirs.get(controller)
        if d is None:
            notes.append(f"the {controller} controller is not mounted on this host: {', '.join(f for f, _ in writes)} not applied")
            continue
        if controller == "memory":
            _write_memory_v1(d, writes)
            continue
        for file, value in writes:
            if controller == "blkio" and not (d / file).exists():
                if (d / "blkio.weight").exists():
                    file = "blkio.weight"
                else:
                    notes.append("io_weight: no proportional IO controller (blkio.bfq.weight or blkio.weight) on this kernel; not applied")
                    continue
            _write(d / file, value)
    return notes


def _write_memory_v1(d: Path, writes: list[tuple[str, str]]) -> None:
    """memory.memsw.limit_in_bytes must stay ≥ memory.limit_in_bytes at every moment: lowering both
    goes limit first, raising both memsw first. Try one order; on EINVAL, the other."""
    order = sorted(writes, key=lambda w: w[0] == "memory.memsw.limit_in_bytes")
    try:
        for file, value in order:
            _write(d / file, value)
    except LimitError as exc:
        if exc.errno != errno.EINVAL:
            raise
        for file, value in reversed(order):
            _write(d / file, value)


def _write(path: Path, value: str) -> None:
    """One write(2) to an existing cgroup file (never created: a missing file is a missing controller)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        why = {errno.EBUSY: "more is in use than that", errno.EINVAL: "the kernel refused the value"}.get(exc.errno or 0, exc.strerror or "")
        raise LimitError(exc.errno, f"cannot write {value} to {path}: {why}") from None


def _write_quiet(path: Path, value: str) -> None:
    with contextlib.suppress(OSError):
        _write(path, value)


def controller_dirs(name: str, parent: str = PARENT, component: str | None = None, layout: Layout | None = None) -> dict[str, Path]:
    """{controller or "unified": directory} of a container's (or one component's) cgroups, for apply()."""
    lay = layout or Layout.detect()
    if lay.kind == "v2":
        d = lay.unified_dir(parent, name)
        return {} if d is None or component is not None else {"unified": d}
    out: dict[str, Path] = {}
    for c in V1_CONTROLLERS:
        d = lay.container_dir(c, parent, name)
        if d is not None:
            out[c] = d / component if component else d
    return out


def oom_kills(directory: Path | None) -> int:
    """Processes the kernel's OOM killer killed in this cgroup: v2 memory.events counts the cgroups below
    too, v1 memory.oom_control this one alone; 0 where the file is not there."""
    if directory is None:
        return 0
    for file in ("memory.events", "memory.oom_control"):
        try:
            text = (directory / file).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return 0


# ---- usage (tupper stats, status) ---------------------------------------------------------------

NO_LIMIT = 1 << 62  # v1 shows "no limit" as a huge number (9223372036854771712)


def _text(path: Path) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _int(path: Path) -> int | None:
    text = _text(path)
    if text is None:
        return None
    text = text.strip()
    return None if text == "max" else int(text)


def _keyed(path: Path) -> dict[str, int]:
    """`key value` lines (memory.stat, cpu.stat)."""
    out: dict[str, int] = {}
    for line in (_text(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def pressure(directory: Path | None) -> dict[str, tuple[float | None, float | None]]:
    """{cpu|memory|io: (some avg10, full avg10)} from a unified-hierarchy cgroup; absent kinds are left out."""
    out: dict[str, tuple[float | None, float | None]] = {}
    if directory is None:
        return out
    for kind in ("cpu", "memory", "io"):
        text = _text(directory / f"{kind}.pressure")
        if text is None:
            continue
        figures: dict[str, float] = {}
        for line in text.splitlines():
            words = line.split()
            if words and words[0] in ("some", "full"):
                avg = next((w.split("=", 1)[1] for w in words[1:] if w.startswith("avg10=")), None)
                if avg is not None:
                    figures[words[0]] = float(avg)
        out[kind] = (figures.get("some"), figures.get("full"))
    return out


def usage(dirs: dict[str, Path], kind: str) -> dict[str, int | None]:
    """CPU time, memory, IO and pids of a cgroup: `dirs` as controller_dirs() gives them."""
    if kind == "v2":
        d = dirs.get("unified")
        if d is None:
            return {}
        cpu = _keyed(d / "cpu.stat").get("usage_usec")
        current = _int(d / "memory.current")
        inactive = _keyed(d / "memory.stat").get("inactive_file", 0)
        rbytes = wbytes = 0
        for line in (_text(d / "io.stat") or "").splitlines():
            for word in line.split()[1:]:
                key, _, value = word.partition("=")
                if key == "rbytes":
                    rbytes += int(value)
                elif key == "wbytes":
                    wbytes += int(value)
        return {"cpu_ns": None if cpu is None else cpu * 1000,
                "memory": None if current is None else max(0, current - inactive),
                "memory_peak": _int(d / "memory.peak"), "memory_limit": _int(d / "memory.max"),
                "io_read": rbytes, "io_write": wbytes, "pids": _int(d / "pids.current"), "pids_limit": _int(d / "pids.max")}
    out: dict[str, int | None] = {}
    if (d := dirs.get("cpuacct")) is not None:
        out["cpu_ns"] = _int(d / "cpuacct.usage")
    if (d := dirs.get("memory")) is not None:
        current = _int(d / "memory.usage_in_bytes")
        inactive = _keyed(d / "memory.stat").get("total_inactive_file", 0)
        limit = _int(d / "memory.limit_in_bytes")
        out.update(memory=None if current is None else max(0, current - inactive), memory_peak=_int(d / "memory.max_usage_in_bytes"),
                   memory_limit=None if limit is None or limit >= NO_LIMIT else limit)
    if (d := dirs.get("blkio")) is not None:
        read = write = 0
        for line in (_text(d / "blkio.throttle.io_service_bytes_recursive") or "").splitlines():
            words = line.split()
            if len(words) == 3 and words[1] == "Read":
                read += int(words[2])
            elif len(words) == 3 and words[1] == "Write":
                write += int(words[2])
        out.update(io_read=read, io_write=write)
    if (d := dirs.get("pids")) is not None:
        out.update(pids=_int(d / "pids.current"), pids_limit=_int(d / "pids.max"))
    return out


# ---- noticing units start (inotify on the unified hierarchy) ---------------------------------------

_IN_MODIFY, _IN_CREATE, _IN_ISDIR = 0x2, 0x100, 0x40000000


class UnitWatch:
    """Wakes the monitor when one of `units` starts in the container: inotify on the container's tree in
    the unified hierarchy (systemd inside keeps one there on hybrid and v2 hosts) for new cgroups
    (payload/, slices, the units') and for each unit cgroup's `cgroup.events` (it changes when its
    first process arrives). `fileno()` for poll; `drain()` after it is readable."""

    def __init__(self, top: Path, units: set[str]) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.units = units
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.dirs: dict[int, Path] = {}
        try:
            self._watch_tree(top)
        except BaseException:
            os.close(self.fd)
            raise

    def fileno(self) -> int:
        return self.fd

    def _add(self, path: Path, mask: int) -> int:
        return self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)

    def _watch_tree(self, d: Path) -> None:
        wd = self._add(d, _IN_CREATE)
        if wd < 0:
            return  # gone again
        self.dirs[wd] = d
        with contextlib.suppress(OSError):
            for sub in os.scandir(d):
                if sub.is_dir(follow_symlinks=False):
                    self._new_dir(Path(sub.path))

    def _new_dir(self, d: Path) -> None:
        if d.name in self.units:
            self._add(d / "cgroup.events", _IN_MODIFY)
        elif d.name == "payload" or d.name.endswith(".slice"):
            self._watch_tree(d)

    def drain(self) -> None:
        import struct

        try:
            buf = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        i = 0
        while i + 16 <= len(buf):
            wd, mask, _cookie, length = struct.unpack_from("iIII", buf, i)
            name = buf[i + 16:i + 16 + length].rstrip(b"\0")
            i += 16 + length
            if mask & _IN_CREATE and mask & _IN_ISDIR and wd in self.dirs:
                self._new_dir(self.dirs[wd] / os.fsdecode(name))

    def close(self) -> None:
        os.close(self.fd)
