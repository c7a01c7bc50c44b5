"""Shared fixtures: a real store, a CLI runner, unique container names, and a leak check."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVICES = REPO / "services"
IMAGE = "debian-bookworm"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def store_root() -> Path:
    """The store the integration tests use: $TUPPER_TEST_ROOT, else the default store (the image is built once)."""
    if os.geteuid() != 0:
        pytest.skip("integration tests need root")
    root = Path(os.environ.get("TUPPER_TEST_ROOT", "/var/lib/tupper"))
    was_mounted = _mounted(root)
    yield root
    # Leave the machine as we found it: a pool the suite mounted is unmounted again (the file stays,
    # so the next run mounts it in a moment instead of rebuilding the image).
    if not was_mounted and _mounted(root):
        running = [c for c in _ps(root) if c["state"] in ("running", "starting", "stopping", "failed")]
        if not running:
            subprocess.run([sys.executable, "-m", "tupper", "--root", str(root), "store", "unmount"], check=False)


def _mounted(root: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(root) for line in f)


def _ps(root: Path) -> list[dict]:
    p = subprocess.run([sys.executable, "-m", "tupper", "--direct", "--root", str(root), "ps", "--json"], capture_output=True, text=True)
    return json.loads(p.stdout) if p.returncode == 0 else []


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


class Bus:
    """A real dbus-daemon for the test session, with tupper's own policy file and tupperd bus-activated
    from this checkout (so the tests never talk to a tupperd of another checkout)."""

    def __init__(self, store_root: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tupper-test-bus-", dir="/run"))
        self.dir.chmod(0o755)  # a caller running as nobody must reach the socket
        self.socket = self.dir / "bus"
        self.address = f"unix:path={self.socket}"
        services = self.dir / "services"
        services.mkdir()
        (services / "org.tupper1.service").write_text(
            f"[D-BUS Service]\nName=org.tupper1\nExec={sys.executable} -m tupper.daemon --root {store_root} --debug\nUser=root\n")
        config = self.dir / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=self.socket, services=services, policy=REPO / "dbus" / "org.tupper1.conf"))
        self.log = self.dir / "bus.log"
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.address, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile"],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=env, cwd="/")
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"test dbus-daemon did not start: {self.log.read_text()}")
            time.sleep(0.01)

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

    def close(self) -> None:
        self.stop_tupperd()
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def bus(store_root: Path):
    b = Bus(store_root)
    yield b
    b.close()


class Tupper:
    """Runs the real CLI as a subprocess: container verbs through tupperd on the test bus, store and
    image commands on the test store."""

    def __init__(self, root: Path, bus: Bus) -> None:
        self.root = root
        self.bus = bus
        self.env = dict(os.environ, TUPPER_ROOT=str(root), DBUS_SYSTEM_BUS_ADDRESS=bus.address)
        self.env.pop("TUPPER_DIRECT", None)

    def __call__(self, *args: str, check: bool = False, timeout: float = 600, input: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run(
            [sys.executable, "-m", "tupper", *map(str, args)],
            capture_output=True, text=True, timeout=timeout, input=input, cwd=cwd or REPO, env=self.env,
        )
        if check and p.returncode != 0:
            raise AssertionError(f"tupper {' '.join(map(str, args))} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
        return p

    def json(self, *args: str):
        return json.loads(self(*args, "--json", check=True).stdout)


@pytest.fixture(scope="session")
def tupper_session(store_root: Path, bus: Bus) -> Tupper:
    t = Tupper(store_root, bus)
    # Build the base image once for the whole session (debootstrap, about a minute on a fresh machine).
    t("image", "build", str(REPO / "images" / f"{IMAGE}.toml"), check=True, timeout=1200)
    return t


@pytest.fixture
def tupper(tupper_session: Tupper, request) -> Tupper:
    yield tupper_session


@pytest.fixture
def names(tupper_session: Tupper, request):
    """Unique container names for one test; whatever the test leaves is force-removed afterwards."""
    made: list[str] = []
    base = re.sub(r"[^a-zA-Z0-9]", "-", request.node.name)[:30].strip("-")

    def new(label: str = "") -> str:
        name = f"t-{base}-{label + '-' if label else ''}{uuid.uuid4().hex[:6]}"
        made.append(name)
        return name

    yield new
    for name in made:
        tupper_session("rm", "--force", name)


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


def system_snapshot(root: Path, only: str = "") -> dict:
    """What a leak would show up in: mounts, loop devices, store subvolumes, nspawn processes, cgroups.

    `only` keeps the subvolumes, processes and cgroups whose path or command line contains it, so a
    test is not disturbed by other work on the machine; mounts and loop devices are always counted whole.
    """
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(line.split()[4] for line in f)
    loops = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True).stdout.split("\n")
    subvols = subprocess.run(["btrfs", "subvolume", "list", "-o", str(root)], capture_output=True, text=True).stdout.split("\n")
    procs = subprocess.run(["pgrep", "-a", "-x", "systemd-nspawn"], capture_output=True, text=True).stdout.split("\n")
    cgroup_dirs = []
    for h in (Path("/sys/fs/cgroup/systemd/tupper"), Path("/sys/fs/cgroup/unified/tupper"), Path("/sys/fs/cgroup/tupper")):
        if h.is_dir():
            cgroup_dirs += [str(p) for p in h.iterdir() if p.is_dir()]
    propagate = Path("/run/systemd/nspawn/propagate")
    nspawn_dirs = [str(p) for p in propagate.iterdir()] if propagate.is_dir() else []
    return {
        "nspawn_dirs": sorted(d for d in nspawn_dirs if only in d),
        "mounts": sorted(mounts),
        "loops": sorted(l for l in loops if l.strip()),
        "subvolumes": sorted(l.split(" path ", 1)[1] for l in subvols if " path " in l and only in l),
        "nspawn": sorted(l for l in procs if l.strip() and "<defunct>" not in l and only in l),
        "cgroups": sorted(c for c in cgroup_dirs if only in c),
    }
