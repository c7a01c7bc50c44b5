"""The baseline tupper is measured against: the same image and component booted by hand with systemd-nspawn.

What tupper automates, done here with nothing but btrfsutil, systemd-nspawn and pystemd:
snapshot the image, put a fresh machine id in, install the component's unit with a
multi-user.target.wants link, bind its payload read-only, boot, and poll the container's own
system bus until the unit is active. Stop is PowerOff over that bus until nspawn exits.

The only thing borrowed from tupper is its cgroup helper: on this host (no systemd as PID 1)
every container needs a cgroup of its own.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import btrfsutil
from pystemd.dbuslib import DBusAddress, path_encode

from tupper.container import cgroups

CGROUP_PARENT = "tupper-bench-raw"  # not the default store's cgroup parent

SD = b"org.freedesktop.systemd1"
SD_PATH = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
UNIT = b"org.freedesktop.systemd1.Unit"

NSPAWN_RUN = Path("/run/systemd/nspawn")
POLL = 0.01  # the same polling interval tupper uses while it waits for the bus and the units
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


class RawContainer:
    """One hand-made container. start() and stop() are what is timed; destroy() always cleans up."""

    def __init__(self, name: str, image: Path, scratch_dir: Path, component: Path, unit: str) -> None:
        self.name = name
        self.image = image
        self.snap = scratch_dir / name
        self.component = component  # a service directory: bin/, units/
        self.unit = unit
        self.nspawn: subprocess.Popen | None = None
        self.leader = 0
        self.cgroup_made = False

    # ---- start ------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Snapshot, prepare, boot; return once the unit is active."""
        btrfsutil.create_snapshot(str(self.image), str(self.snap))
        self._prepare()
        cgroups.create(self.name, parent=CGROUP_PARENT)
        self.cgroup_made = True
        argv = [
            "systemd-nspawn", "-D", str(self.snap), "--boot", f"--machine={self.name}",
            "--keep-unit", "--register=no", "--console=pipe", "-q", "--link-journal=no",
            f"--bind-ro={self.component}:/opt/{self.component.name}",
        ]
        self.nspawn = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=ENV, preexec_fn=lambda: cgroups.join(self.name, parent=CGROUP_PARENT),
            start_new_session=True,  # Ctrl-C goes to the benchmark, which then cleans up
        )
        deadline = time.monotonic() + timeout
        self.leader = self._find_leader(deadline)
        self._wait_active(deadline)

    def _prepare(self) -> None:
        etc = self.snap / "etc"
        (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
        (etc / "hostname").unlink(missing_ok=True)
        units = etc / "systemd/system"
        shutil.copyfile(self.component / "units" / self.unit, units / self.unit)
        wants = units / "multi-user.target.wants"
        wants.mkdir(exist_ok=True)
        (wants / self.unit).symlink_to(f"/etc/systemd/system/{self.unit}")
        (self.snap / "opt" / self.component.name).mkdir(parents=True, exist_ok=True)

    def _find_leader(self, deadline: float) -> int:
        """nspawn's child that is PID 1 in its own PID namespace."""
        pid = self.nspawn.pid
        while time.monotonic() < deadline:
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                children = []
            for child in children:
                try:
                    status = Path(f"/proc/{child}/status").read_text()
                except OSError:
                    continue
                nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
                if len(nspid) >= 2 and nspid[-1] == "1":
                    return int(child)
            self._check_alive()
            time.sleep(0.005)
        raise TimeoutError(f"{self.name}: no container PID 1 appeared")

    def bus_address(self) -> bytes:
        return f"unix:path=/proc/{self.leader}/root/run/dbus/system_bus_socket".encode()

    def _wait_active(self, deadline: float) -> None:
        socket = Path(f"/proc/{self.leader}/root/run/dbus/system_bus_socket")
        unit_path = path_encode(b"/org/freedesktop/systemd1/unit", self.unit.encode())
        bus = None
        try:
            while time.monotonic() < deadline:
                self._check_alive()
                state = b""
                try:
                    if bus is None and socket.exists():
                        bus = DBusAddress(self.bus_address())
                        bus.open()
                    if bus is not None:
                        state = bus.get_property(SD, unit_path, UNIT, b"ActiveState", b"s")
                except Exception:  # noqa: BLE001 - pystemd raises several kinds while dbus starts
                    if bus is not None:
                        bus.close()
                    bus = None
                if state == b"active":
                    return
                if state == b"failed":
                    raise RuntimeError(f"{self.name}: {self.unit} failed")
                time.sleep(POLL)
            raise TimeoutError(f"{self.name}: {self.unit} not active within the timeout")
        finally:
            if bus is not None:
                bus.close()

    def _check_alive(self) -> None:
        if self.nspawn.poll() is not None:
            raise RuntimeError(f"{self.name}: systemd-nspawn exited with {self.nspawn.returncode}")

    # ---- stop -------------------------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> None:
        """PowerOff over the container's bus; return when nspawn has exited."""
        with DBusAddress(self.bus_address()) as bus:
            try:
                bus.call_method(SD, SD_PATH, MANAGER, b"PowerOff", [])
            except Exception:  # noqa: BLE001 - the bus may go away mid-call as the container shuts down
                pass
        # Woken by nspawn's exit itself. Popen.wait(timeout) would poll, sleeping up to 50 ms at a time
        # (0.5 ms doubling): that rounded every stop up to 0.065 s or 0.115 s.
        fd = os.pidfd_open(self.nspawn.pid)
        try:
            if not select.select([fd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.nspawn.args, timeout)
        finally:
            os.close(fd)
        self.nspawn.wait()

    # ---- cleanup ----------------------------------------------------------------------------

    def destroy(self) -> None:
        """Kill whatever runs and remove the snapshot and the cgroups. Safe to call at any point, twice."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            if self.leader:
                try:
                    os.kill(self.leader, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.nspawn.wait(5)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
        if self.cgroup_made:
            cgroups.remove(self.name, parent=CGROUP_PARENT)
            self.cgroup_made = False
        if self.snap.exists():
            btrfsutil.delete_subvolume(str(self.snap), recursive=True)
        for d in runtime_dirs(self.name):
            # nspawn leaves these behind when its container is killed where /run is not a tmpfs.
            shutil.rmtree(d, ignore_errors=True)


def runtime_dirs(name: str) -> list[Path]:
    """What systemd-nspawn keeps under /run for a running machine."""
    return [NSPAWN_RUN / "propagate" / name, NSPAWN_RUN / "unix-export" / name]
