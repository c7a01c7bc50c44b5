"""Talking to the systemd inside a container, over its own system bus: the one adapter for it.

Blocking calls (properties, unit methods, jobs waited for, transient exec units) go through pystemd's
sd-bus binding, the one place pystemd is imported; asyncio callers use asyncio.to_thread. pystemd keeps
Python's GIL while sd-bus blocks (sd_bus_call, sd_bus_wait), which stops every other thread, tupperd's
event loop and its secrets agent with them: waits here poll the bus's descriptor instead (_wait_bus),
and only calls systemd answers at once (it replies to a job method when the job is queued) block. The one
asynchronous piece, UnitWatch (tupperd follows unit state changes as they happen), uses dbus-next on
tupperd's event loop, imported only there. D-Bus names stay as systemd spells them; bytes become str here.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import attrs
from pystemd.dbusexc import DBusBaseError
from pystemd.dbuslib import DBusAddress, apply_signature, path_encode
from pystemd.systemd1.unit_signatures import signature_array

from tupper.errors import Failed

SD = b"org.freedesktop.systemd1"
SD_PATH = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
UNIT = b"org.freedesktop.systemd1.Unit"
SERVICE = b"org.freedesktop.systemd1.Service"
JOB_METHODS = ("StartUnit", "StopUnit", "RestartUnit", "ReloadUnit")
PROPERTIES = b"org.freedesktop.DBus.Properties"
_FINISHED = ("exited", "failed", "dead")


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


def unit_object_path(name: str) -> str:
    """systemd's D-Bus object path of unit `name` (/org/freedesktop/systemd1/unit/<escaped name>)."""
    return path_encode(b"/org/freedesktop/systemd1/unit", name.encode()).decode()


def bus_socket(leader: int) -> Path:
    return Path(f"/proc/{leader}/root/run/dbus/system_bus_socket")


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _why(exc: Exception) -> str:
    """pystemd's error without its wrapping ("[err -2]: b'Unit x not found.'" -> "Unit x not found.")."""
    message = getattr(exc, "err_message", None)
    return _s(message) if message else str(exc)


class SystemdBus(Protocol):
    """What the runtime asks of a container's systemd (ContainerBus; fakes in the unit tests)."""

    def close(self) -> None: ...

    def __enter__(self) -> SystemdBus: ...

    def __exit__(self, *exc) -> None: ...

    def system_state(self) -> str: ...

    def unit_state(self, name: str) -> UnitState: ...

    def active_state(self, name: str) -> str: ...

    def has_job(self, name: str) -> bool: ...

    def power_off(self) -> None: ...

    def stop_unit(self, name: str) -> None: ...

    def restart_unit(self, name: str) -> None: ...

    def reload(self) -> None: ...

    def start_unit(self, name: str) -> None: ...

    def loaded(self, names: list[str]) -> list[str]: ...


# Opens a SystemdBus to the container whose PID 1 is `leader`: (leader, timeout=, alive=) -> bus.
Connect = Callable[..., SystemdBus]


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
        try:
            return self._bus.get_property(SD, path, iface, prop, sig)
        except DBusBaseError as exc:
            raise Failed(f"the container's systemd did not answer {_s(prop)}: {_why(exc)}") from None

    def _call(self, method: bytes, sig: bytes = b"", *args):
        try:
            return self._bus.call_method(SD, SD_PATH, MANAGER, method, apply_signature(sig, list(args)) if sig else [])
        except DBusBaseError as exc:
            what = f"{_s(method)}({', '.join(_s(a) for a in args)})"
            raise Failed(f"the container's systemd refused {what}: {_why(exc)}") from None

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

    def active_state(self, name: str) -> str:
        return _s(self._get(path_encode(b"/org/freedesktop/systemd1/unit", name.encode()), UNIT, b"ActiveState", b"s"))

    def has_job(self, name: str) -> bool:
        path = path_encode(b"/org/freedesktop/systemd1/unit", name.encode())
        job = self._get(path, UNIT, b"Job", b"(uo)")
        return bool(job and job[0])

    # ---- methods -------------------------------------------------------------------------------

    def power_off(self) -> None:
        self._call(b"PowerOff")

    def stop_unit(self, name: str) -> None:
        self._call(b"StopUnit", b"ss", name.encode(), b"replace")

    def restart_unit(self, name: str) -> None:
        self._call(b"RestartUnit", b"ss", name.encode(), b"replace")

    def reload(self) -> None:
        self._call(b"Reload")

    def start_unit(self, name: str) -> None:
        self._call(b"StartUnit", b"ss", name.encode(), b"replace")

    def loaded(self, names: list[str]) -> list[str]:
        """Which of `names` systemd holds in memory now (loaded, or a stub for a name something referred
        to). ListUnitsByPatterns only lists; it loads nothing (ListUnitsByNames would). A name with a
        glob character cannot be asked for exactly: it counts as loaded."""
        if not names:
            return []
        if any(c in name for name in names for c in "*?[\\"):
            return list(names)
        reply = self._call(b"ListUnitsByPatterns", b"asas", [], [n.encode() for n in names])
        body = reply.body  # pystemd unwraps a single return value: the array itself
        found = {_s(entry[0]) for entry in (body if isinstance(body, list) else body[0])}
        return [n for n in names if n in found]


def exec_properties(argv: list[str], *, stdin: int | None, stdout: int, stderr: int, env: dict[str, str] | None = None,
                    description: str = "tupper exec", timeout: float | None = None, user: str | None = None,
                    workdir: str = "/") -> dict[bytes, object]:
    """The transient service that runs argv with the caller's fds (what `systemd-run --pipe --wait` sends);
    `timeout`: systemd kills it after that many seconds (RuntimeMaxSec); `user`: run as that user."""
    # systemd expands $VAR in ExecStart; "$$" is its escape for a literal "$".
    words = [a.replace("$", "$$").encode() for a in argv]
    props: dict[bytes, object] = {
        b"Description": description.encode(),
        b"ExecStart": [(words[0], words, False)],
        b"WorkingDirectory": workdir.encode(),
        # Collected once it has ended and our connection is gone (AddRef, in _start_transient, keeps it
        # loaded while we read its exit code): nothing is left behind, not even if the caller dies.
        b"CollectMode": b"inactive-or-failed",
        b"StandardOutputFileDescriptor": stdout,
        b"StandardErrorFileDescriptor": stderr,
    }
    if user is not None:
        props[b"User"] = user.encode()
    if stdin is not None:
        props[b"StandardInputFileDescriptor"] = stdin
    if env:
        props[b"Environment"] = [f"{k}={v}".encode() for k, v in env.items()]
    if timeout is not None:
        props[b"RuntimeMaxUSec"] = max(1, int(timeout * 1_000_000))
    return props


def run_command(leader: int, argv: list[str], *, stdin: int | None, stdout: int, stderr: int, env: dict[str, str] | None = None,
                description: str = "tupper exec", timeout: float | None = None, prefix: str = "tupper-exec",
                user: str | None = None, workdir: str = "/") -> int:
    """Run argv as a transient service in the container with our fds; return its exit code (128 +
    the signal if it was killed: by systemd after `timeout` seconds, for one).

    Plain method calls and property reads on one connection: pystemd's object layer (pystemd.run)
    introspects every object it touches and grew tupperd's heap by ~1.5 MB per exec.
    """
    try:
        return _run_command(leader, argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env, description=description,
                            timeout=timeout, prefix=prefix, user=user, workdir=workdir)
    except DBusBaseError as exc:  # the container's bus went away (it stopped), or systemd refused the unit
        raise Failed(f"cannot run {argv[0]} in the container: {_why(exc)}") from None


def _run_command(leader: int, argv: list[str], *, stdin: int | None, stdout: int, stderr: int, env: dict[str, str] | None,
                 description: str, timeout: float | None, prefix: str, user: str | None = None, workdir: str = "/") -> int:
    unit = f"{prefix}-{os.urandom(6).hex()}.service"
    path = path_encode(b"/org/freedesktop/systemd1/unit", unit.encode())
    bus = DBusAddress(f"unix:path={bus_socket(leader)}".encode())
    bus.open()
    try:
        _start_transient(bus, unit, exec_properties(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env, description=description,
                                                    timeout=timeout, user=user, workdir=workdir))
        try:
            return _wait_exit(bus, path)
        finally:
            _unload(bus, unit, path)
    finally:
        bus.close()


def _start_transient(bus: DBusAddress, unit: str, props: dict[bytes, object]) -> None:
    """StartTransientUnit, subscribed first: systemd then sends the unit's PropertiesChanged, which wakes
    _wait_exit (a quick command can end before the reply comes back)."""
    path = path_encode(b"/org/freedesktop/systemd1/unit", unit.encode())
    bus.call_method(SD, SD_PATH, MANAGER, b"Subscribe", [])
    _add_match(bus, f"type='signal',sender='{SD.decode()}',path='{path.decode()}',interface='{PROPERTIES.decode()}',member='PropertiesChanged'")
    args = apply_signature(b"ss", [unit.encode(), b"fail"])
    # AddRef (what `systemd-run --wait` sends; pystemd's table lacks it): this connection holds the unit
    # until it closes, so an ended unit is not collected before its exit code is read.
    args += signature_array(props)[:-1] + [(ord(b"r"), b"sv"), (ord(b"s"), b"AddRef"), (ord(b"v"), b"b"), (ord(b"b"), True),
                                           (-1, None), (-1, None), (-1, None)]
    args += [(ord(b"a"), b"(sa(sv))"), (-1, None)]
    bus.call_method(SD, SD_PATH, MANAGER, b"StartTransientUnit", args)


def _add_match(bus: DBusAddress, rule: str) -> None:
    """Have the bus route signals matching `rule` to us, with no callback: sd_bus_process then hands
    each one back (see _drain), so a drained queue is known to be empty."""
    bus.call_method(b"org.freedesktop.DBus", b"/org/freedesktop/DBus", b"org.freedesktop.DBus", b"AddMatch",
                    apply_signature(b"s", [rule.encode()]))


def _drain(bus: DBusAddress, on_message: Callable | None = None) -> None:
    """Take every message sd-bus has read or can read now, each to `on_message`: those read while a
    call waited for its reply sit in sd-bus's queue, where polling the socket cannot see them. With
    no match callbacks, only an empty queue makes sd_bus_process return no message."""
    while not (msg := bus.process()).is_empty():
        if on_message is not None:
            on_message(msg)


def _wait_bus(bus: DBusAddress, seconds: float) -> None:
    """After _drain: wait until a message arrives or `seconds` pass, as sd_bus_wait but without the
    GIL. pystemd's wait holds it, and a thread waiting there for a unit's job (which may need
    tupperd's secrets agent, on the event loop) left the loop a few milliseconds a second: each
    credential delivery took 15-30 s, a rotation over four containers over two minutes."""
    poller = select.poll()
    poller.register(bus.get_fd(), select.POLLIN)
    poller.poll(max(0, int(seconds * 1000)))  # releases the GIL


def _wait_exit(bus: DBusAddress, path: bytes) -> int:
    """Wait until the unit's process has ended; its exit code (128 + the signal if it was killed)."""
    while True:
        job = bus.get_property(SD, path, UNIT, b"Job", b"(uo)")
        sub = _s(bus.get_property(SD, path, UNIT, b"SubState", b"s"))
        if not (job and job[0]) and sub in _FINISHED:
            break
        _drain(bus)  # the signals only wake the wait; the state is read as properties
        _wait_bus(bus, 0.5)
    code = int(bus.get_property(SD, path, SERVICE, b"ExecMainCode", b"i"))
    status = int(bus.get_property(SD, path, SERVICE, b"ExecMainStatus", b"i"))
    # ExecMainCode is a CLD_* value: 1 exited (status = exit code), 2 killed / 3 dumped (status = signal).
    return status if code == 1 else 128 + status


def shell_properties(path: str, argv: list[str], *, tty: str, term: str, env: dict[str, str] | None = None, user: str = "root",
                     workdir: str | None = None) -> dict[bytes, object]:
    """The transient service of an interactive login on the container's pseudo-terminal `tty` (what
    machined's OpenMachineShell starts): the terminal is its stdin, stdout and stderr and its controlling
    terminal; it gets SIGHUP when the terminal hangs up (the user's side went away). User= makes systemd
    set HOME, USER, LOGNAME and SHELL; the working directory is the user's home unless `workdir`."""
    words = [a.replace("$", "$$").encode() for a in argv]
    variables = {"TERM": term or "vt220", **(env or {})}
    return {
        b"Description": f"tupper shell on {tty}".encode(),
        b"ExecStart": [(path.encode(), words, False)],  # argv[0] may differ from the path: "-bash" is a login shell
        b"CollectMode": b"inactive-or-failed",
        b"User": user.encode(),
        b"WorkingDirectory": (workdir or "-~").encode(),  # "-": where the home does not exist (nobody's), "/"
        b"TTYPath": tty.encode(),
        b"StandardInput": b"tty",
        b"StandardOutput": b"tty",
        b"StandardError": b"tty",
        b"SendSIGHUP": True,
        b"IgnoreSIGPIPE": False,
        b"Environment": [f"{k}={v}".encode() for k, v in variables.items()],
    }


def run_shell(leader: int, unit: str, props: dict[bytes, object], started: Callable[[Exception | None], None]) -> int:
    """Start the shell's transient unit (see shell_properties), call `started` (None, or why it could
    not start), then wait for it to end and return its exit code. One connection throughout: it holds
    the unit (AddRef) until the exit code is read; if this process dies, systemd collects the unit."""
    path = path_encode(b"/org/freedesktop/systemd1/unit", unit.encode())
    bus = DBusAddress(f"unix:path={bus_socket(leader)}".encode())
    try:
        bus.open()
        _start_transient(bus, unit, props)
    except DBusBaseError as exc:
        bus.close()
        started(Failed(f"the container's systemd refused the shell: {_why(exc)}"))
        raise Failed(f"the container's systemd refused the shell: {_why(exc)}") from None
    started(None)
    try:
        try:
            return _wait_exit(bus, path)
        finally:
            _unload(bus, unit, path)
    except DBusBaseError as exc:  # the container stopped under the shell
        raise Failed(f"lost the shell's unit {unit}: {_why(exc)}") from None
    finally:
        bus.close()


def _unload(bus: DBusAddress, unit: str, path: bytes) -> None:
    """Leave nothing behind in the container: stop an exited unit, reset a failed one (both unload it)."""
    try:
        state = _s(bus.get_property(SD, path, UNIT, b"ActiveState", b"s"))
        method = b"ResetFailedUnit" if state == "failed" else b"StopUnit"
        sig = b"s" if method == b"ResetFailedUnit" else b"ss"
        values = [unit.encode()] if method == b"ResetFailedUnit" else [unit.encode(), b"replace"]
        bus.call_method(SD, SD_PATH, MANAGER, method, apply_signature(sig, values))
    except Exception:  # noqa: BLE001 - the unit may already be gone (container stopping); nothing to clean then
        pass


def run_job(leader: int, unit: str, method: str, timeout: float) -> str:
    """`method` (StartUnit, StopUnit, RestartUnit, ReloadUnit) of `unit`, waited for: the job's result
    as systemd's JobRemoved says it ("done", "failed", "canceled", "timeout", "dependency", "skipped")."""
    if method not in JOB_METHODS:
        raise ValueError(method)
    results: dict[str, str] = {}

    def removed(msg) -> None:
        if msg.is_signal(MANAGER, b"JobRemoved"):
            msg.process_reply(False)
            _id, job, _unit, result = msg.body
            results[_s(job)] = _s(result)

    bus = DBusAddress(f"unix:path={bus_socket(leader)}".encode())
    bus.open()
    try:
        try:
            # Subscribe + the match first: a quick job can end before the reply to its method comes back.
            bus.call_method(SD, SD_PATH, MANAGER, b"Subscribe", [])
            _add_match(bus, f"type='signal',sender='{SD.decode()}',path='{SD_PATH.decode()}',interface='{MANAGER.decode()}',member='JobRemoved'")
            reply = bus.call_method(SD, SD_PATH, MANAGER, method.encode(), apply_signature(b"ss", [unit.encode(), b"replace"]))
        except DBusBaseError as exc:
            raise Failed(f"the container's systemd refused {method}({unit}): {_why(exc)}") from None
        body = reply.body  # pystemd unwraps a single return value: the job's object path, as bytes
        job = _s(body if isinstance(body, bytes) else body[0])
        deadline = time.monotonic() + timeout
        while True:
            _drain(bus, removed)  # JobRemoved may have come before the method's reply
            if job in results:
                return results[job]
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failed(f"{unit}: {method} did not finish within {timeout:.0f}s")
            _wait_bus(bus, min(left, 1.0))
    finally:
        bus.close()


class UnitWatch:
    """Follows units of one container as they change (tupperd's event loop, dbus-next): `on_change(unit,
    active_state, sub_state)` for every ActiveState/SubState change systemd announces."""

    def __init__(self, bus, paths: dict[str, str]) -> None:
        self._bus = bus
        self._paths = paths  # systemd object path -> unit name

    @classmethod
    async def open(cls, leader: int, units: list[str], on_change) -> UnitWatch:
        from dbus_next import Message, MessageType
        from dbus_next.aio import MessageBus

        bus = await MessageBus(bus_address=f"unix:path={bus_socket(leader)}").connect()
        watch = cls(bus, {unit_object_path(u): u for u in units})
        try:
            def on_message(msg: Message) -> None:
                if (msg.message_type == MessageType.SIGNAL and msg.member == "PropertiesChanged" and msg.path in watch._paths
                        and msg.body[0] == UNIT.decode()):
                    changed = msg.body[1]
                    if "ActiveState" in changed or "SubState" in changed:
                        active = changed["ActiveState"].value if "ActiveState" in changed else ""
                        sub = changed["SubState"].value if "SubState" in changed else ""
                        on_change(watch._paths[msg.path], active, sub)

            bus.add_message_handler(on_message)
            rule = (f"type='signal',sender='{SD.decode()}',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged',"
                    f"path_namespace='/org/freedesktop/systemd1/unit'")
            for dest, path, iface, member, sig, body in (
                ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s", [rule]),
                (SD.decode(), SD_PATH.decode(), MANAGER.decode(), "Subscribe", "", []),  # systemd signals only to subscribers
            ):
                reply = await bus.call(Message(destination=dest, path=path, interface=iface, member=member, signature=sig, body=body))
                if reply is None or reply.message_type == MessageType.ERROR:
                    raise Failed(f"{member}: {reply.error_name if reply else 'no reply'}: {reply.body[0] if reply and reply.body else ''}")
        except BaseException:
            watch.close()
            raise
        return watch

    async def states(self) -> dict[str, tuple[str, str]]:
        """{unit: (ActiveState, SubState)} of the followed units, as systemd has them now."""
        from dbus_next import Message, MessageType

        out = {}
        for path, unit in self._paths.items():
            got = []
            for prop in ("ActiveState", "SubState"):
                reply = await self._bus.call(Message(destination=SD.decode(), path=path, interface="org.freedesktop.DBus.Properties",
                                                     member="Get", signature="ss", body=[UNIT.decode(), prop]))
                if reply is None or reply.message_type == MessageType.ERROR:
                    raise Failed(f"{unit}: {prop}: {reply.error_name if reply else 'no reply'}")
                got.append(reply.body[0].value)
            out[unit] = (got[0], got[1])
        return out

    def close(self) -> None:
        """Disconnect and close the socket now. dbus-next's disconnect() only shuts the socket down and
        leaves the fd to the garbage collector: one fd per stopped container in tupperd, for an unbounded time."""
        bus = self._bus
        bus.disconnect()

        def close(fut=None) -> None:
            if fut is not None and not fut.cancelled():
                fut.exception()  # retrieved: an abrupt end is expected here, not worth a warning
            for f in (bus._stream, bus._sock):  # dbus-next has no public close
                try:
                    f.close()
                except OSError:
                    pass

        done = bus._disconnect_future  # resolved by dbus-next once its reader is removed
        if done.done():
            close(done)
        else:
            done.add_done_callback(close)
