"""The kernel limits that many containers at once run into: inotify instances and watches (each
container's systemd takes some, all charged to root), pids, open files, loop devices. `prepare()`
raises the ones tupper may raise before a start and says which it could not; `explain()` and
`explain_log()` name the limit that most likely stopped a start that failed.

Reading the host (`read`), deciding (`plan`, pure) and writing (`prepare`, `write_sysctl`) are apart,
so the decisions are tested on values and the I/O on a fake /proc and /sys.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import resource
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import attrs

from tupper.progress import Progress

__all__ = ["HOST", "LIMITS", "Host", "Limit", "Plan", "Raise", "Reading", "explain", "explain_log", "limit_in_log", "plan",
           "prepare", "read", "write_sysctl"]

# What one booted container of examples/hello.toml costs, measured here (Debian 12, systemd 252, 2 CPUs;
# tests/integration/test_scale.py prints it): just after boot, 10-12 inotify instances (its systemd 8,
# dbus-daemon and logind 1 each, the keeper's 1-2 for it) and 38-42 watches; 16 tasks; about 400 file
# handles kernel-wide. The budgets leave room for components that watch or fork more.
INSTANCES_PER_CONTAINER = 12
WATCHES_PER_CONTAINER = 100
TASKS_PER_CONTAINER = 32
FILES_PER_CONTAINER = 512  # kernel-wide file handles (fs.file-nr)
FDS_PER_CONTAINER = 16  # tupperd's (or the CLI's) own descriptors for one container (tupperd: ~2 each at 50)
HOST_INSTANCES = 64  # what the host's own programs (as root) keep
HOST_WATCHES = 8192
HOST_FDS = 256

# What tupper raises a low value to (never lowering a higher one).
INSTANCES_WANTED = 8192
WATCHES_WANTED = 524288
NOFILE_CAP = 1 << 20  # the soft limit is raised to the hard one, but never past this (fs.nr_open's default)
_NOFILE_LOCK = threading.Lock()  # tupperd prepares starts in several threads: one says it raised the limit

INSTANCES = "fs.inotify.max_user_instances"
WATCHES = "fs.inotify.max_user_watches"
PID_MAX = "kernel.pid_max"
THREADS_MAX = "kernel.threads-max"
FILE_MAX = "fs.file-max"


@attrs.frozen
class Limit:
    """One kernel limit: its name as an admin knows it, what it counts, and how to raise it."""

    key: str
    name: str
    counts: str
    raise_how: str


LIMITS = {limit.key: limit for limit in (
    Limit("instances", INSTANCES, "inotify instances per user (each container takes about 12, all as root)",
          f"`sysctl -w {INSTANCES}={INSTANCES_WANTED}` (to keep it: a file in /etc/sysctl.d/)"),
    Limit("watches", WATCHES, "inotify watches per user (each container's services add some)",
          f"`sysctl -w {WATCHES}={WATCHES_WANTED}` (to keep it: a file in /etc/sysctl.d/)"),
    Limit("nofile", "RLIMIT_NOFILE", "open files of one process (tupperd or the CLI)",
          "raise the hard limit of open files of tupperd or the shell that runs tupper (`ulimit -Hn`, "
          "/etc/security/limits.conf, or LimitNOFILE= of its service); fs.nr_open caps it"),
    Limit("file-max", FILE_MAX, "open files in the whole system", f"`sysctl -w {FILE_MAX}=N` with N above `cat /proc/sys/fs/file-nr`'s first figure"),
    Limit("pid-max", PID_MAX, "process and thread ids", f"`sysctl -w {PID_MAX}=4194304`"),
    Limit("threads-max", THREADS_MAX, "tasks in the whole system", f"`sysctl -w {THREADS_MAX}=N` with N above the tasks running"),
    Limit("pids-cgroup", "pids.max", "tasks in tupper's own cgroup and the ones above it",
          "write a higher figure or `max` into that pids.max (or raise TasksMax= of the service tupper runs in)"),
    Limit("loop", "loop devices", "loop devices (the loopback btrfs pool needs one)",
          "`modprobe loop` (it makes /dev/loop-control), or free one with `losetup -d`; "
          "inside another container loop devices may not be allowed at all: use the overlay backend"),
    Limit("namespaces", "user.max_*_namespaces", "namespaces per user (each container makes several)",
          "`sysctl -w user.max_mnt_namespaces=N` (likewise pid, net, ipc, uts, cgroup)"),
)}


# ---- the host, as read ---------------------------------------------------------------------------


@attrs.frozen
class Host:
    """Where the host's figures are read and written; the unit tests pass a fake directory tree and
    fake rlimit functions."""

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    dev: Path = Path("/dev")
    is_root: Callable[[], bool] = lambda: os.geteuid() == 0
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit

    def sysctl(self, name: str) -> Path:
        return self.proc / "sys" / name.replace(".", "/")


HOST = Host()


@attrs.frozen
class PidsCgroup:
    path: str  # as the host sees it, for messages
    max: int | None  # None: "max"
    current: int


@attrs.frozen
class Reading:
    """The figures the decisions are made on; None where the host does not have that file."""

    root: bool
    instances: int | None = None
    watches: int | None = None
    pid_max: int | None = None
    threads_max: int | None = None
    tasks: int | None = None  # all tasks on the host (/proc/loadavg's 4th field, after the slash)
    file_max: int | None = None
    files_open: int | None = None  # fs.file-nr's first field
    nofile: tuple[int, int] = (1024, 1024)  # this process's RLIMIT_NOFILE (soft, hard)
    pids_cgroups: tuple[PidsCgroup, ...] = ()
    loop_control: bool = False
    free_loops: int = 0


def read(host: Host = HOST) -> Reading:
    def number(name: str) -> int | None:
        try:
            return int(host.sysctl(name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    tasks = None
    try:
        tasks = int((host.proc / "loadavg").read_text().split()[3].split("/")[1])
    except (OSError, ValueError, IndexError):
        pass
    files_open = None
    try:
        files_open = int(host.sysctl("fs.file-nr").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    try:
        loop_control = stat.S_ISCHR(os.stat(host.dev / "loop-control").st_mode)
    except OSError:
        loop_control = False
    return Reading(
        root=host.is_root(), instances=number(INSTANCES), watches=number(WATCHES), pid_max=number(PID_MAX),
        threads_max=number(THREADS_MAX), tasks=tasks, file_max=number(FILE_MAX), files_open=files_open,
        nofile=host.getrlimit(resource.RLIMIT_NOFILE), pids_cgroups=tuple(_pids_cgroups(host)),
        loop_control=loop_control, free_loops=_free_loops(host))


def _pids_cgroups(host: Host) -> list[PidsCgroup]:
    """Our own cgroup in the pids hierarchy (v1) or the unified one (v2), and each one above it that
    has a pids.max: the containers' cgroups are made below ours, so all of them count against these."""
    try:
        lines = (host.proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    places = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            places.append(host.sys / "fs" / "cgroup" / "pids" / path.lstrip("/"))
        elif controllers == "":
            places.append(host.sys / "fs" / "cgroup" / path.lstrip("/"))
    found = []
    for place in places:
        for d in (place, *place.parents):
            if not d.is_relative_to(host.sys / "fs" / "cgroup"):
                break
            try:
                most = (d / "pids.max").read_text().strip()
                current = int((d / "pids.current").read_text())
            except (OSError, ValueError):
                continue
            found.append(PidsCgroup(str(d), None if most == "max" else int(most), current))
    return found


def _free_loops(host: Host) -> int:
    # A loop device is bound to a file where /sys/block/loopN/loop/ exists.
    try:
        return sum(1 for d in (host.sys / "block").iterdir() if d.name.startswith("loop") and not (d / "loop").exists())
    except OSError:
        return 0


# ---- deciding: pure --------------------------------------------------------------------------------


@attrs.frozen
class Raise:
    """A limit tupper raises: a sysctl (`name` is its dotted name) or this process's RLIMIT_NOFILE."""

    limit: str  # a key of LIMITS
    current: int
    target: int
    needed: int  # below this the start may fail: said when the raise fails
    why: str


@attrs.frozen
class Plan:
    raises: tuple[Raise, ...]
    short: tuple[str, ...]  # limits that stop or may stop this start, which tupper does not raise: what to do


def plan(r: Reading, containers: int, *, loop: bool = False) -> Plan:
    """What to raise, and what to tell, before a start that makes `containers` of the store run."""
    raises: list[Raise] = []
    short: list[str] = []
    n = max(containers, 1)

    def sysctl(key: str, current: int | None, wanted: int, needed: int, why: str) -> None:
        if current is None or current >= wanted:
            return
        if r.root:
            raises.append(Raise(key, current, wanted, needed, why))
        elif current < needed:
            short.append(_shortfall(key, f"is {current}, about {needed} needed for {n} container(s)"))

    instances_needed = n * INSTANCES_PER_CONTAINER + HOST_INSTANCES
    watches_needed = n * WATCHES_PER_CONTAINER + HOST_WATCHES
    sysctl("instances", r.instances, max(INSTANCES_WANTED, instances_needed), instances_needed,
           "each container's systemd takes some")
    sysctl("watches", r.watches, max(WATCHES_WANTED, watches_needed), watches_needed, "each container's services watch files")

    soft, hard = r.nofile
    fds_needed = n * FDS_PER_CONTAINER + HOST_FDS
    # The hard limit cannot pass fs.nr_open (setrlimit refuses it), so it is a number, never RLIM_INFINITY.
    target = min(hard, NOFILE_CAP)
    if soft < target:
        raises.append(Raise("nofile", soft, target, fds_needed, "tupper holds descriptors for each container"))
    if hard < fds_needed:
        short.append(_shortfall("nofile", f"allows {hard} open files (hard limit), about {fds_needed} needed for {n} container(s)"))

    if r.tasks is not None:
        for key, most in (("pid-max", r.pid_max), ("threads-max", r.threads_max)):
            if most is not None and most - r.tasks < TASKS_PER_CONTAINER:
                short.append(_shortfall(key, f"is {most} and {r.tasks} tasks run: no room for a container's {TASKS_PER_CONTAINER}"))
    for cg in r.pids_cgroups:
        if cg.max is not None and cg.max - cg.current < TASKS_PER_CONTAINER:
            short.append(_shortfall("pids-cgroup", f"{cg.path}/pids.max is {cg.max} and {cg.current} tasks run in it: "
                                                   f"no room for a container's {TASKS_PER_CONTAINER}"))
    if r.file_max is not None and r.files_open is not None and r.file_max - r.files_open < FILES_PER_CONTAINER:
        short.append(_shortfall("file-max", f"is {r.file_max} and {r.files_open} files are open: no room for a container's {FILES_PER_CONTAINER}"))
    if loop and not r.loop_control and r.free_loops == 0:
        short.append(_shortfall("loop", "none is free and there is no /dev/loop-control to make one"))
    return Plan(tuple(raises), tuple(short))


def _shortfall(key: str, detail: str) -> str:
    limit = LIMITS[key]
    return f"{limit.name} ({limit.counts}) {detail}: {limit.raise_how}"


# ---- doing ---------------------------------------------------------------------------------------


def prepare(progress: Progress, containers: int, *, loop: bool = False, host: Host = HOST) -> list[str]:
    """Before a start that makes `containers` of this store run (the new one included): raise the
    limits tupper may raise and that are low, each said once through `progress.note`; return what
    stops or may stop the start and could not be raised (not root, a read-only /proc/sys, a check
    that failed), one sentence each with what to do. `loop`: the store needs a loop device now."""
    decided = plan(read(host), containers, loop=loop)
    left = list(decided.short)
    for step in decided.raises:
        limit = LIMITS[step.limit]
        try:
            if step.limit == "nofile":
                before, after = _raise_nofile(step.target, host)
            else:
                before, after = write_sysctl(limit.name, step.target, host=host)
        except (OSError, ValueError) as exc:
            if step.current < step.needed:  # else it is only not as high as tupper likes it: nothing to say
                left.append(f"could not raise {limit.name} from {step.current} to {step.target} ({_reason(exc)}), "
                            f"about {step.needed} needed: {limit.raise_how}")
            continue
        if after > before:
            progress.note(f"raised {limit.name} from {before} to {after} ({step.why})")
    return left


def _raise_nofile(target: int, host: Host) -> tuple[int, int]:
    with _NOFILE_LOCK:
        soft, hard = host.getrlimit(resource.RLIMIT_NOFILE)
        if soft >= target:
            return soft, soft
        host.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return soft, target


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def write_sysctl(name: str, value: int, *, host: Host = HOST) -> tuple[int, int]:
    """Raise the sysctl `name` (dotted, as `sysctl` names it) to `value`; never lower it. Returns
    (before, after) as read from the kernel. Two tuppers raising at once take turns (a lock on the
    file itself), so neither lowers what the other raised; the value goes in one write(), as procfs
    parses it. OSError where the file is missing or not writable; ValueError on a value it cannot read."""
    fd = os.open(host.sysctl(name), os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        before = int(os.pread(fd, 64, 0).split()[0])
        if before >= value:
            return before, before
        data = f"{value}\n".encode()
        if os.pwrite(fd, data, 0) != len(data):
            raise OSError(errno.EIO, f"short write to {host.sysctl(name)}")
        after = int(os.pread(fd, 64, 0).split()[0])
        return before, after
    finally:
        os.close(fd)  # also releases the lock


# ---- naming the limit that stopped a start -------------------------------------------------------

# Text that names a limit, tried in order (the first that matches wins): nspawn's and systemd's console
# messages, losetup's and mount's, and Python's OSError texts.
_RULES: list[tuple[str, re.Pattern[str]]] = [
    ("file-max", re.compile(r"too many open files in system|\bENFILE\b", re.I)),
    ("instances", re.compile(r"inotify.*(too many open files|EMFILE)|(too many open files|EMFILE).*inotify", re.I)),
    ("watches", re.compile(r"inotify.*(no space left on device|ENOSPC)|(no space left on device|ENOSPC).*inotify"
                           r"|inotify watch limit|max_user_watches", re.I)),
    ("namespaces", re.compile(r"(namespace|unshare|clone).*(no space left on device|ENOSPC)", re.I)),
    ("loop", re.compile(r"(?<![\w-])loop.*(failed to allocate|no such device|cannot find an unused|no free|could not find any free)"
                        r"|(failed to allocate|failed to set ?up|cannot find an unused).*(?<![\w-])loop|loop-control", re.I)),
    ("pids", re.compile(r"(fork|clone|thread|spawn|posix_spawn).*(resource temporarily unavailable|EAGAIN)"
                        r"|(resource temporarily unavailable|EAGAIN).*(fork|clone|thread)", re.I)),
    ("files", re.compile(r"too many open files|\bEMFILE\b", re.I)),
]


def explain(exc: BaseException | str, *, host: Host = HOST) -> str | None:
    """The kernel limit that most likely made `exc` (an OSError, any error whose text carries one,
    or a line from nspawn's console) happen, and how to raise it; None where no limit explains it.
    Causes chained with `raise ... from` are looked at too. A string is read as explain_log reads one."""
    if isinstance(exc, str):
        return explain_log(exc, host=host)
    texts: list[str] = []
    errnos: list[int] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            if current.errno is not None:
                errnos.append(current.errno)
                # OSError(errno.EMFILE, "inotify_init1") says what failed but not why: add the why
                texts.append(os.strerror(current.errno))
            texts.append(" ".join(str(p) for p in (current.strerror, current.filename, current.filename2) if p))
        texts.append(str(current))
        current = current.__cause__ or current.__context__
    text = " ".join(t for t in texts if t)
    key = _key_of(text, errnos, host)
    return _describe(key, host) if key else None


def explain_log(tail: str, *, host: Host = HOST) -> str | None:
    """The kernel limit a console log's tail (nspawn's and the container's systemd's messages) says
    stopped a boot, and how to raise it; None where it names none."""
    limit = limit_in_log(tail, host=host)
    return _describe(limit.key, host) if limit else None


def limit_in_log(tail: str, *, host: Host = HOST) -> Limit | None:
    """The kernel limit a console log's tail names (the last line that names one wins), or None. A bare
    "Too many open files" there is the container's systemd out of inotify instances: it raises its own
    descriptor limit, and nspawn's is tupper's, raised by prepare()."""
    for line in reversed(tail.splitlines()):
        key = _key_of(line, [], host, console=True)
        if key:
            return LIMITS[key]
    return None


def _key_of(text: str, errnos: list[int], host: Host, *, console: bool = False) -> str | None:
    """A key of LIMITS, or None."""
    key = next((k for k, pattern in _RULES if pattern.search(text)), None)
    if key is None:
        key = {errno.ENFILE: "file-max", errno.EMFILE: "files"}.get(next(iter(errnos), -1))
    if key is None and errno.EAGAIN in errnos and _pids_short(read(host)):
        key = "pids"  # a bare EAGAIN is a fork that failed only where the task limits are nearly reached
    if key == "files":
        # EMFILE in a container's console (systemd raises its own descriptor limit, so there it is its
        # inotify instances), or while that limit is still low; else this process's descriptors.
        r = read(host)
        low_instances = r.instances is not None and r.instances < INSTANCES_WANTED
        return "instances" if console or low_instances else "nofile"
    if key == "pids":
        return _pids_short(read(host)) or "pid-max"
    return key


def _pids_short(r: Reading) -> str | None:
    """The task limit with the least room left, where one has less than a tenth of it left."""
    room: list[tuple[float, str]] = []
    if r.tasks is not None:
        room += [((most - r.tasks) / most, key) for key, most in (("pid-max", r.pid_max), ("threads-max", r.threads_max)) if most]
    room += [((cg.max - cg.current) / cg.max, "pids-cgroup") for cg in r.pids_cgroups if cg.max]
    tightest = min(room, default=None)
    return tightest[1] if tightest and tightest[0] < 0.1 else None


def _describe(key: str, host: Host) -> str:
    limit = LIMITS[key]
    r = read(host)
    now = {
        "instances": r.instances, "watches": r.watches, "pid-max": r.pid_max, "threads-max": r.threads_max, "file-max": r.file_max,
        "nofile": "{}/{} (soft/hard)".format(*r.nofile),
    }.get(key)
    detail = f", now {now}" if now is not None else ""
    if key in ("pid-max", "threads-max") and r.tasks is not None:
        detail += f", {r.tasks} tasks run"
    if key == "file-max" and r.files_open is not None:
        detail += f", {r.files_open} files open"
    if key == "pids-cgroup":
        detail += "".join(f", {cg.path}/pids.max {cg.max if cg.max is not None else 'max'} with {cg.current} tasks" for cg in r.pids_cgroups)
    return f"most likely the kernel limit {limit.name} stopped it ({limit.counts}{detail}): raise it with {limit.raise_how}"
