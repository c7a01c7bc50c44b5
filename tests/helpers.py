"""What the tests, the benchmarks and the soak share: a store and a bus of their own, the base image
in that store without a second debootstrap, a guard that proves the user's containers were left
alone, component/spec writers, and a snapshot of everything a leak would show up in.

Nothing here may touch the user's state: the default store is only ever read (and, for the canary,
given one container of our own, removed again).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tupper.store.store import Store

REPO = Path(__file__).resolve().parent.parent
SERVICES = REPO / "services"
IMAGE = "debian-bookworm"
DEFAULT_ROOT = Path("/var/lib/tupper")
# Where the suite keeps its own store (a loopback pool beside it, kept between runs so the base
# image is built or copied once per machine, not once per run).
TEST_ROOT = Path("/var/lib/tupper-test")
BENCH_ROOT = Path("/var/lib/tupper-bench")


def own_root(variable: str, default: Path) -> Path:
    """The store for a test run or a benchmark: $variable or `default`, never the user's store."""
    root = Path(os.path.abspath(os.environ.get(variable) or default))
    if root == DEFAULT_ROOT or root == Path(os.path.abspath(os.environ.get("TUPPER_ROOT") or DEFAULT_ROOT)):
        raise SystemExit(f"{variable}={root} is the user's store: tests and benchmarks need a store of their own")
    return root


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def tupper_cmd(root: Path, *args: str, env: dict | None = None, timeout: float = 1200) -> subprocess.CompletedProcess:
    """The CLI in-process mode (`--direct --root`), for store and image set-up before any daemon runs."""
    return subprocess.run([sys.executable, "-m", "tupper", "--root", str(root), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env or _clean_env(), cwd=REPO)


def _clean_env(**extra: str) -> dict:
    # PYTHONDONTWRITEBYTECODE: the CLI and tupperd run as users run them, from their bytecode cache (with it,
    # every one of the thousands of CLI calls of the suite compiles tupper's modules again)
    env = {k: v for k, v in os.environ.items() if k not in ("TUPPER_ROOT", "TUPPER_DIRECT", "DBUS_SYSTEM_BUS_ADDRESS", "PYTHONDONTWRITEBYTECODE")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


# ---- the benchmarks' CLI calls, timed ------------------------------------------------------------


def timed_cli(tupper: Path, *args: str, expect: int = 0, timeout: float | None = None) -> tuple[float, str, str]:
    """The tupper CLI `tupper` as a subprocess: (wall seconds, stdout, stderr); raises unless it exits
    with `expect`. In a session of its own: Ctrl-C reaches only the caller, which lets tupper finish and
    then cleans up."""
    t0 = time.perf_counter()
    p = subprocess.Popen([str(tupper), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except KeyboardInterrupt:
        p.communicate()
        raise
    elapsed = time.perf_counter() - t0
    if p.returncode != expect:
        raise RuntimeError(f"tupper {' '.join(args)} exited {p.returncode}: {stderr.strip()}")
    return elapsed, stdout, stderr


def timed_direct(root: Path, *args) -> float:
    """`python -m tupper --direct --root ROOT ARGS` with this interpreter: wall seconds; exits the
    benchmark with tupper's error when it fails."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "tupper", "--direct", "--root", str(root), *map(str, args)], capture_output=True, text=True,
                       env=_clean_env(), cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"tupper --root {root} {' '.join(map(str, args))}: {p.stderr}")
    return time.monotonic() - t0


# ---- the base image, once per machine ------------------------------------------------------------


BACKENDS = ("btrfs", "overlay")


def backend_root(root: Path, backend: str) -> Path:
    """Where a suite or benchmark keeps its store of `backend`: `root` for btrfs, `root`-overlay for overlay."""
    return root if backend == "btrfs" else root.with_name(f"{root.name}-{backend}")


def ensure_image(root: Path, image: str = IMAGE, log=print, source_root: Path = DEFAULT_ROOT, env: dict | None = None,
                 backend: str = "btrfs", seed: Path | None = None) -> str:
    """Make `image` exist in the store at `root` (made with `backend` if new). Cheapest first: already
    there; on the overlay backend, or with a `seed` store, an export from that store (the btrfs store
    beside it by default: `image export | image import`, the way images travel between hosts); a copy
    (btrfs send | receive, read-only on the source) from the default store when that is mounted and has
    it; a build from images/<image>.toml. Returns how it got there."""
    p = tupper_cmd(root, "store", "init", "--backend", backend, "--json", env=env)  # creates or mounts the store
    if p.returncode != 0:
        raise RuntimeError(f"cannot open the test store {root}: {p.stderr}")
    if (root / "images" / image).is_dir() and (root / "images" / f"{image}.json").is_file():
        return "present"
    source_store = seed or root.with_name(root.name.removesuffix("-overlay"))
    if (backend == "overlay" or seed) and source_store != root:
        if seed is None:
            ensure_image(source_store, image, log, source_root, env)
        _carry_image(source_store, root, image, env)
        log(f"imported image {image} into {root} from {source_store} (image export | image import)")
        return "imported"
    source = source_root / "images" / image
    meta = source_root / "images" / f"{image}.json"
    if mounted(source_root) and source.is_dir() and meta.is_file() and _read_only_subvolume(source):
        try:
            _copy_image(source, meta, root, image)
            log(f"copied image {image} from {source_root} into {root} (btrfs send | receive)")
            return "copied"
        except (RuntimeError, OSError) as exc:
            log(f"could not copy image {image} from {source_root} ({exc}); building it")
    log(f"building image {image} in {root} (debootstrap, about a minute)")
    p = tupper_cmd(root, "image", "build", REPO / "images" / f"{image}.toml", env=env)
    if p.returncode != 0:
        raise RuntimeError(f"image build failed: {p.stderr}")
    return "built"


def is_overlay(store_root: Path) -> bool:
    return (store_root / ".backend").is_file()


def make_tree(store_root: Path, path: Path) -> None:
    """What the store makes an image, a component or a container's root of: a subvolume (btrfs backend)
    or a directory (overlay backend)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_overlay(store_root):
        path.mkdir()
    else:
        subprocess.run(["btrfs", "subvolume", "create", str(path)], check=True, capture_output=True)


def container_roots(store_root: Path) -> list[str]:
    """The container roots in the store, as `containers/NAME/rootfs`."""
    if is_overlay(store_root):
        return sorted(str(p.relative_to(store_root)) for p in (store_root / "containers").glob("*/rootfs"))
    out = subprocess.run(["btrfs", "subvolume", "list", "-o", str(store_root / "containers")], capture_output=True, text=True).stdout
    return sorted(line.split(" path ", 1)[1] for line in out.splitlines() if " path " in line)


def _carry_image(source: Path, dest: Path, image: str, env: dict | None) -> None:
    """`tupper image export | tupper image import` from the store at `source` to the one at `dest`."""
    was_mounted = mounted(source) or (source / ".backend").is_file()
    export = subprocess.Popen([sys.executable, "-m", "tupper", "--root", str(source), "image", "export", image, "-o", "-"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or _clean_env(), cwd=REPO)
    assert export.stdout is not None and export.stderr is not None
    imported = subprocess.run([sys.executable, "-m", "tupper", "--root", str(dest), "image", "import", "-"], stdin=export.stdout,
                              capture_output=True, text=True, env=env or _clean_env(), cwd=REPO, timeout=1200)
    export.stdout.close()
    export_err = export.stderr.read().decode(errors="replace")
    export.wait()
    if not was_mounted:
        tupper_cmd(source, "store", "unmount", env=env)
    if export.returncode != 0 or imported.returncode != 0:
        raise RuntimeError(f"could not carry {image} from {source} to {dest}: {export_err} {imported.stderr}")


def _read_only_subvolume(path: Path) -> bool:
    p = subprocess.run(["btrfs", "property", "get", "-ts", str(path), "ro"], capture_output=True, text=True)
    return p.returncode == 0 and "ro=true" in p.stdout


def _copy_image(source: Path, meta: Path, root: Path, image: str) -> None:
    # Named as tupper names scratch space (kind.pid.starttime.label): a crash leaves what `store check` removes.
    staging = root / "tmp" / f"seed.{os.getpid()}.{_pid_starttime(os.getpid())}.{image}"
    staging.mkdir()
    try:
        send = subprocess.Popen(["btrfs", "send", "-q", str(source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        recv = subprocess.run(["btrfs", "receive", "-q", str(staging)], stdin=send.stdout, capture_output=True, text=True)
        send.stdout.close()
        send_err = send.stderr.read().decode(errors="replace")
        send.wait()
        if send.returncode != 0 or recv.returncode != 0:
            raise RuntimeError(f"btrfs send/receive failed: {send_err.strip()} {recv.stderr.strip()}")
        # A received subvolume is read-only and cannot be renamed: publish a read-only snapshot of it
        # (then its metadata: a crash leaves an image the store does not list).
        subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(staging / image), str(root / "images" / image)],
                       check=True, capture_output=True)
        shutil.copyfile(meta, root / "images" / f".{image}.json.tmp")
        os.replace(root / "images" / f".{image}.json.tmp", root / "images" / f"{image}.json")
    finally:
        for sub in staging.iterdir() if staging.exists() else []:
            subprocess.run(["btrfs", "property", "set", "-ts", str(sub), "ro", "false"], capture_output=True)
            subprocess.run(["btrfs", "subvolume", "delete", str(sub)], capture_output=True)
        shutil.rmtree(staging, ignore_errors=True)


# ---- the user's state: a guard around the whole suite -------------------------------------------


class UserStateGuard:
    """Proves a test run left the user's containers alone. Where the default store is mounted, it
    notes every running container there (name, leader PID) and starts a canary container of its own;
    afterwards each must still run with the same leader PID. Where there is no default store, the run
    must not have created one."""

    def __init__(self, *, canary: bool = True) -> None:
        self.want_canary = canary
        self.had_store = DEFAULT_ROOT.exists() or Path(f"{DEFAULT_ROOT}.img").exists()
        self.mounted = mounted(DEFAULT_ROOT)
        self.before: dict[str, int] = {}
        self.canary: str | None = None
        self.direct = False
        self.problems: list[str] = []

    def _user_tupper(self, *args: str, direct: bool | None = None) -> subprocess.CompletedProcess:
        """tupper as the user runs it: the default store, the system bus (its tupperd) or --direct."""
        use_direct = self.direct if direct is None else direct
        argv = [sys.executable, "-m", "tupper", *(["--direct"] if use_direct else []), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=_clean_env(), cwd=REPO)

    def running(self) -> dict[str, int]:
        """{name: leader PID} of the running containers in the default store, read from their records."""
        out: dict[str, int] = {}
        containers = DEFAULT_ROOT / "containers"
        if not self.mounted or not containers.is_dir():
            return out
        for d in containers.iterdir():
            try:
                rec = json.loads((d / "record.json").read_text())
            except (OSError, ValueError):
                continue
            pid, start = rec.get("nspawn_pid", 0), rec.get("nspawn_starttime", 0)
            if d.name.startswith("tupper-canary-") and d.name != self.canary:
                continue  # another test run's canary (runs at the same time): not the user's
            if pid and _pid_starttime(pid) == start and rec.get("leader_pid"):
                out[d.name] = rec["leader_pid"]
        return out

    def begin(self) -> None:
        if not self.mounted:
            return
        self.before = self.running()
        if not self.want_canary or not (DEFAULT_ROOT / "images" / IMAGE).is_dir():
            return
        name = f"tupper-canary-{uuid.uuid4().hex[:6]}"
        # Through the user's tupperd where one serves; else --direct: a call on the system bus would
        # bus-activate a tupperd for the user's store, which would outlive the suite.
        self.direct = not _system_tupperd_runs()
        p = self._user_tupper("run", str(REPO / "examples" / "hello.toml"), "--name", name)
        if p.returncode != 0 and not self.direct and ("system bus" in p.stderr or "tupperd" in p.stderr):
            self.direct = True
            p = self._user_tupper("run", str(REPO / "examples" / "hello.toml"), "--name", name)
        if p.returncode != 0:
            raise RuntimeError(f"could not start the canary container in {DEFAULT_ROOT}: {p.stderr}")
        self.canary = name
        self.before = self.running()
        if name not in self.before:
            raise RuntimeError(f"the canary {name} does not show as running in {DEFAULT_ROOT}")

    def end(self) -> list[str]:
        """What changed in the user's state (empty: nothing); removes the canary."""
        problems = []
        if not self.had_store and (DEFAULT_ROOT.exists() or Path(f"{DEFAULT_ROOT}.img").exists()):
            problems.append(f"the run created the default store {DEFAULT_ROOT}")
        after = self.running()
        for name, leader in self.before.items():
            if name not in after:
                problems.append(f"{name} in the default store no longer runs")
            elif after[name] != leader:
                problems.append(f"{name} in the default store was restarted (leader {leader} → {after[name]})")
        if self.canary:
            p = self._user_tupper("rm", "--force", self.canary)
            if p.returncode != 0:
                problems.append(f"could not remove the canary {self.canary}: {p.stderr.strip()}")
        return problems


def _system_tupperd_runs() -> bool:
    """Somebody owns org.tupper1 on the system bus (asked without activating it)."""
    p = subprocess.run(["dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                        "org.freedesktop.DBus.NameHasOwner", "string:org.tupper1"], capture_output=True, text=True, timeout=30,
                       env=_clean_env())
    return p.returncode == 0 and "boolean true" in p.stdout


def _pid_starttime(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


# ---- a private system bus with tupperd on it ------------------------------------------------------


BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>tupper-test</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <servicedir>{services}</servicedir>
  <policy context="default">
    <!-- as Debian's system.conf: deny, then punch holes -->
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_destination="org.freedesktop.DBus"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


class PrivateBus:
    """A real dbus-daemon of our own, with tupper's policy file and tupperd bus-activated from this
    checkout on the given store: tests and benchmarks never talk to the user's bus or tupperd."""

    def __init__(self, store_root: Path, *, python: str = sys.executable, debug: bool = True) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tupper-test-bus-", dir="/run"))
        self.dir.chmod(0o755)  # a caller running as nobody must reach the socket
        self.socket = self.dir / "bus"
        self.address = f"unix:path={self.socket}"
        services = self.dir / "services"
        services.mkdir()
        (services / "org.tupper1.service").write_text(
            f"[D-BUS Service]\nName=org.tupper1\nExec={python} -m tupper.daemon --root {store_root}{' --debug' if debug else ''}\n"
            "User=root\n")
        config = self.dir / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=self.socket, services=services, policy=REPO / "dbus" / "org.tupper1.conf"))
        self.log = self.dir / "bus.log"
        env = _clean_env(DBUS_SYSTEM_BUS_ADDRESS=self.address)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile"],
                                         stdout=subprocess.DEVNULL, stderr=log, env=env, cwd="/")
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"test dbus-daemon did not start: {self.log.read_text()}")
            time.sleep(0.01)

    def env(self, root: Path) -> dict:
        """The environment for a CLI that talks to this bus's tupperd about `root`."""
        return _clean_env(TUPPER_ROOT=str(root), DBUS_SYSTEM_BUS_ADDRESS=self.address)

    def tupperd_pid(self) -> int | None:
        p = subprocess.run(["busctl", f"--address={self.address}", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                            "org.freedesktop.DBus", "GetConnectionUnixProcessID", "s", "org.tupper1"], capture_output=True, text=True)
        return int(p.stdout.split()[1]) if p.returncode == 0 else None

    def stop_tupperd(self, sig: int = signal.SIGTERM) -> None:
        pid = self.tupperd_pid()
        if pid:
            os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while self.tupperd_pid() == pid and time.monotonic() < deadline:
                time.sleep(0.02)
            while _pid_starttime(pid) is not None and time.monotonic() < deadline:
                time.sleep(0.02)

    def close(self) -> None:
        self.stop_tupperd()
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- waiting on processes and conditions --------------------------------------------------------

def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """The predicate's first true value, polled until `timeout`; an AssertionError naming `what` after."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def alive(pid: int) -> bool:
    """The process runs (not a zombie)."""
    return _pid_starttime(pid) is not None


# ---- writing components and specs ------------------------------------------------------------------


def write_component(directory: Path, name: str, units: dict[str, str], *, requires: list[str] | None = None,
                    files: dict[str, str] | None = None, extra: str = "") -> Path:
    """Make a component directory for a test: manifest, unit files, payload files."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "units").mkdir(exist_ok=True)
    manifest = [f'name = "{name}"', 'version = "1.0.0"', f"units = {json.dumps(list(units))}"]
    if requires:
        manifest.append(f"requires = {json.dumps(requires)}")
    (directory / "component.toml").write_text("\n".join(manifest) + "\n" + extra)
    for unit, text in units.items():
        (directory / "units" / unit).write_text(text)
    for rel, text in (files or {}).items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if rel.startswith("bin/"):
            path.chmod(0o755)
    return directory


def write_spec(path: Path, components: list[Path | str], *, name: str | None = None, extra: str = "") -> Path:
    lines = []
    if name:
        lines.append(f'name = "{name}"')
    lines.append(f'image = "{IMAGE}"')
    lines.append(extra)
    for c in components:
        lines += ["[[components]]", f'path = "{c}"']
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- what a leak would show up in --------------------------------------------------------------------


def system_snapshot(root: Path, only: str = "") -> dict:
    """Mounts, loop devices, store subvolumes, nspawn processes, cgroups, nspawn runtime dirs.

    `only` keeps the subvolumes, processes and cgroups whose path or command line contains it, so a
    test is not disturbed by other work on the machine; mounts and loop devices are always counted whole.
    """
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(line.split()[4] for line in f)
    loops = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True).stdout.split("\n")
    if (root / ".backend").is_file():  # the overlay backend: the store's trees are directories
        subvols = [f"x path {p.relative_to(root)}" for d in ("containers", "tmp") if (root / d).is_dir()
                   for p in [*(root / d).iterdir(), *(root / d).glob("*/rootfs")]]
    else:
        subvols = subprocess.run(["btrfs", "subvolume", "list", "-o", str(root)], capture_output=True, text=True).stdout.split("\n")
    procs = subprocess.run(["pgrep", "-a", "-x", "systemd-nspawn"], capture_output=True, text=True).stdout.split("\n")
    cgroup_dirs = []
    from tupper.container.cgroups import Layout

    # Every hierarchy, below our own cgroup in each (where tupper makes them) and at the top.
    for h in {*(h.own for h in Layout.detect().hierarchies), *(h.mount for h in Layout.detect().hierarchies)}:
        for parent in h.glob("tupper*"):
            if parent.is_dir():
                cgroup_dirs += [str(p) for p in parent.iterdir() if p.is_dir()]
    nspawn_dirs = []
    for kind in ("propagate", "unix-export"):
        d = Path("/run/systemd/nspawn") / kind
        nspawn_dirs += [str(p) for p in d.iterdir()] if d.is_dir() else []
    return {
        "nspawn_dirs": sorted(d for d in nspawn_dirs if only in d),
        "mounts": sorted(mounts),
        "loops": sorted(line for line in loops if line.strip()),
        "subvolumes": sorted(line.split(" path ", 1)[1] for line in subvols if " path " in line and only in line),
        "nspawn": sorted(line for line in procs if line.strip() and "<defunct>" not in line and only in line),
        "cgroups": sorted(c for c in cgroup_dirs if only in c),
    }


# ---- a store without btrfs, for unit tests -------------------------------------------------------------


class PlainStore(Store):
    """A Store on a plain directory: subvolumes are directories, snapshots copies (the real ones need
    btrfs; what the Installer writes, and where, is the same). Free space is not the subject here."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, "btrfs")
        root.mkdir(parents=True, exist_ok=True)
        self._ensure_layout()

    def create_subvolume(self, path: Path) -> None:
        path.mkdir()

    def snapshot(self, source: Path, dest: Path, *, read_only: bool = False) -> None:
        shutil.copytree(source, dest, symlinks=True)

    def set_read_only(self, path: Path, read_only: bool = True) -> None:
        pass

    def require_free(self, needed: int, what: str) -> None:
        pass



# ---- the D-Bus API from outside: busctl, and `tupper events` in the background -----------------------

def busctl(bus, *args: str, user: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    # "--" after the verb: arguments such as "-1" are values, not options.
    argv = ["busctl", f"--address={bus.address}", f"--timeout={int(timeout)}", args[0], "--", *args[1:]]
    if user:
        argv = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10)


def label(name: str) -> str:
    return "".join(c if c.isalnum() else f"_{ord(c):02x}" for c in name)


class Events:
    """`tupper events --json` in the background, read line by line without Python's buffering (a
    buffered reader can hold lines that select() no longer sees)."""

    def __init__(self, env: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tupper", "events", "--json"], stdout=subprocess.PIPE, env=env)
        self.pending = b""
        self.seen: list[dict] = []

    def wait(self, want, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\n" in self.pending:
                line, self.pending = self.pending.split(b"\n", 1)
                event = json.loads(line)
                self.seen.append(event)
                if want(event):
                    return event
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                self.pending += chunk
        raise AssertionError(f"no matching event within {timeout}s; saw {self.seen}")

    def seen_or_wait(self, want, timeout: float) -> dict:
        """An event already seen that matches, else the next one: for events whose order is not defined."""
        return next((e for e in self.seen if want(e)), None) or self.wait(want, timeout)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


# ---- shell completion ---------------------------------------------------------------------------------

_COMPLETE = r'''
source "$1"
read -ra COMP_WORDS <<< "$2"
[[ $2 == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
COMP_LINE=$2
COMP_POINT=${#2}
_shtab_tupper tupper "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
'''


def bash_complete(script: Path, line: str, root: Path | None = None, env: dict | None = None) -> list[str]:
    """What bash offers for `line` (the cursor at its end) from the completion `script`, asked as
    bash-completion asks it. No config file unless `env` names one; the store is `root` if given."""
    full_env = {"PATH": os.environ["PATH"], "TUPPER_CONFIG": "/nonexistent-tupper.toml", **(env or {})}
    if root is not None:
        full_env["TUPPER_ROOT"] = str(root)
    p = subprocess.run(["bash", "-c", _COMPLETE, "complete", str(script), line], capture_output=True, text=True, env=full_env, timeout=30)
    assert p.returncode == 0, p.stderr
    return [w for w in p.stdout.splitlines() if w]


class DirectStore:
    """The CLI on a store of its own (--direct: no tupperd serves it), made with `backend` (None: open as is)."""

    def __init__(self, root: Path, backend: str | None = None) -> None:
        self.root = root
        if backend is not None:
            self("store", "init", "--backend", backend, check=True)

    def __call__(self, *args, check: bool = False, input: bytes | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "tupper", "--direct", "--root", str(self.root), *map(str, args)], capture_output=True,
                           timeout=600, cwd=REPO, env=_clean_env(), input=input)
        if check and p.returncode != 0:
            raise AssertionError(f"tupper {' '.join(map(str, args))} exited {p.returncode}: {p.stderr.decode(errors='replace')}")
        return p

    def images(self) -> dict[str, dict]:
        return {i["name"]: i for i in json.loads(self("image", "ls", "--json", check=True).stdout)}

    def leftovers(self) -> list[str]:
        """What an import may leave: subvolumes or files in images/ that are not a published image, scratch."""
        names = set(self.images())
        out = [p.name for p in (self.root / "images").iterdir()
               if not p.name.startswith(".") and p.name.removesuffix(".json") not in names]
        out += [p.name for p in (self.root / "tmp").iterdir()]
        return out

    def destroy(self) -> None:
        for c in json.loads(self("ps", "--json").stdout or "[]"):
            self("rm", "-f", c["name"])
        for n in json.loads(self("network", "ls", "--json").stdout or "[]"):
            self("network", "rm", n["name"])
        self("store", "unmount")
        subprocess.run(["rm", "-rf", str(self.root)], check=False)
        Path(f"{self.root}.img").unlink(missing_ok=True)
