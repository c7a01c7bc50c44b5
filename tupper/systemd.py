"""Talking to the systemd inside a container, over its own system bus, through pystemd.

The one place pystemd is imported. D-Bus names stay as systemd spells them; bytes become str here.
pystemd is blocking: asyncio callers use asyncio.to_thread.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import attrs
import pystemd.run  # noqa: F401  (pystemd.run is then the function, not the module)
from pystemd.dbuslib import DBusAddress, apply_signature, path_encode

from tupper.errors import Failed

SD = b"org.freedesktop.systemd1"
SD_PATH = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
UNIT = b"org.freedesktop.systemd1.Unit"
SERVICE = b"org.freedesktop.systemd1.Service"


@attrs.frozen
class UnitState:
    name: str
    active_state: str
    sub_state: str
    result: str = ""  # Service.Result ("success", "exit-code", "timeout", …); "" for non-services
    main_pid: int = 0
    active_enter_usec: int = 0  # CLOCK_MONOTONIC µs of the last entry to "active"
    inactive_exit_usec: int = 0  # CLOCK_MONOTONIC µs of the last start (leaving "inactive")

    def to_json(self) -> dict:
        return attrs.asdict(self)


def bus_socket(leader: int) -> Path:
    return Path(f"/proc/{leader}/root/run/dbus/system_bus_socket")


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ContainerBus:
    """One connection to one container's system bus, shared by every call for that container."""

    def __init__(self, leader: int) -> None:
        self.leader = leader
        self.address = f"unix:path={bus_socket(leader)}".encode()
        self._bus = DBusAddress(self.address)
        self._bus.open()

    @classmethod
    def connect(cls, leader: int, timeout: float = 30.0, alive=None) -> ContainerBus:
        """Wait for the container's bus socket to answer; `alive()` False aborts early."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise Failed("the container exited before its system bus came up")
            if bus_socket(leader).exists():
                bus = None
                try:
                    bus = cls(leader)
                    bus.system_state()
                    return bus
                except Exception as exc:  # noqa: BLE001 - pystemd raises several kinds while dbus starts
                    last = exc
                    if bus is not None:
                        bus.close()  # pystemd does not close a bus when it is collected
            time.sleep(0.01)
        raise Failed(f"the container's system bus did not answer within {timeout:.0f}s ({last})")

    def close(self) -> None:
        self._bus.close()

    def __enter__(self) -> ContainerBus:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- properties ----------------------------------------------------------------------------

    def _get(self, path: bytes, iface: bytes, prop: bytes, sig: bytes):
        return self._bus.get_property(SD, path, iface, prop, sig)

    def _call(self, method: bytes, sig: bytes = b"", *args):
        return self._bus.call_method(SD, SD_PATH, MANAGER, method, apply_signature(sig, list(args)) if sig else [])

    def system_state(self) -> str:
        return _s(self._get(SD_PATH, MANAGER, b"SystemState", b"s"))

    def unit_state(self, name: str) -> UnitState:
        path = path_encode(b"/org/freedesktop/systemd1/unit", name.encode())
        active = _s(self._get(path, UNIT, b"ActiveState", b"s"))
        sub = _s(self._get(path, UNIT, b"SubState", b"s"))
        enter = int(self._get(path, UNIT, b"ActiveEnterTimestampMonotonic", b"t"))
        leave = int(self._get(path, UNIT, b"InactiveExitTimestampMonotonic", b"t"))
        result, main_pid = "", 0
        if name.endswith(".service"):
            result = _s(self._get(path, SERVICE, b"Result", b"s"))
            main_pid = int(self._get(path, SERVICE, b"MainPID", b"u"))
        return UnitState(name, active, sub, result, main_pid, enter, leave)

    def unit_active_state(self, name: str) -> str:
        path = path_encode(b"/org/freedesktop/systemd1/unit", name.encode())
        return _s(self._get(path, UNIT, b"ActiveState", b"s"))

    def has_job(self, name: str) -> bool:
        path = path_encode(b"/org/freedesktop/systemd1/unit", name.encode())
        job = self._get(path, UNIT, b"Job", b"(uo)")
        return bool(job and job[0])

    # ---- methods -------------------------------------------------------------------------------

    def power_off(self) -> None:
        self._call(b"PowerOff")

    def start_unit(self, name: str) -> None:
        self._call(b"StartUnit", b"ss", name.encode(), b"replace")

    def stop_unit(self, name: str) -> None:
        self._call(b"StopUnit", b"ss", name.encode(), b"replace")

    def restart_unit(self, name: str) -> None:
        self._call(b"RestartUnit", b"ss", name.encode(), b"replace")

    def reload(self) -> None:
        self._call(b"Reload")


def run_command(leader: int, argv: list[str], *, stdin: int | None, stdout: int, stderr: int, env: dict[str, str] | None = None) -> int:
    """Run argv as a transient service in the container with our fds; return its exit code."""
    address = f"unix:path={bus_socket(leader)}".encode()
    # systemd expands $VAR in ExecStart; "$$" is its escape for a literal "$".
    unit = pystemd.run(
        [a.replace("$", "$$").encode() for a in argv],
        address=address,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=env,
        wait=True,
        remain_after_exit=True,
        cwd=b"/",
        extra={b"Description": b"tupper exec"},
    )
    try:
        code = int(unit.Service.ExecMainCode)
        status = int(unit.Service.ExecMainStatus)
    finally:
        try:
            unit.Unit.Stop(b"replace")
        except Exception:  # noqa: BLE001 - the unit may already be gone; nothing to clean then
            pass
    # ExecMainCode is a CLD_* value: 1 exited (status = exit code), 2 killed / 3 dumped (status = signal).
    return status if code == 1 else 128 + status


def resolve_in_root(root: Path, command: str, path: str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin") -> str | None:
    """Find `command` on PATH inside the container's root, as systemd needs an absolute path."""
    if command.startswith("/"):
        return command
    for d in path.split(":"):
        candidate = f"{d}/{command}"
        if os.path.exists(f"{root}{candidate}"):
            return candidate
    return None
