"""Talking to the systemd inside a container, over its own system bus: the one adapter for it.

Python's GIL must stay free while a call waits: tupperd's event loop, which also serves every
container's secrets agent, runs beside the threads that call here. pystemd keeps the GIL while sd-bus
blocks (sd_bus_call, sd_bus_wait), so ContainerBus (properties and unit methods) speaks over
tupper.dbuswire, whose waits are socket reads; pystemd, imported only here, carries the jobs waited for
and the transient exec units, whose waits poll the bus's descriptor (_wait_bus) and whose calls systemd
answers at once (it replies to a job method when the job is queued). asyncio callers use
asyncio.to_thread. The one asynchronous piece, UnitWatch (tupperd follows unit state changes as they
happen), uses dbus-next on tupperd's event loop, imported only there. D-Bus names stay as systemd spells
them; bytes become str here.
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

from tupper import dbuswire
from tupper.errors import Failed

SD = b"org.freedesktop.systemd1"
SD_PATH = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
UNIT = b"org.freedesktop.systemd1.Unit"
SERVICE = b"org.freedesktop.systemd1.Service"
JOB_METHODS = ("StartUnit", "StopUnit", "RestartUnit", "ReloadUnit")
PROPERTIES = b"org.freedesktop.DBus.Properties"
_FINISHED = ("exited", "failed", "dead")
CALL_TIMEOUT = 25.0  # seconds a call to a container's systemd may wait for its answer (sd-bus's default)


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


def _rule(path: str | bytes, interface: bytes, member: str) -> str:
    """The match rule for systemd's signal `member` of `interface` on the object `path`."""
    return f"type='signal',sender='{SD.decode()}',path='{_s(path)}',interface='{interface.decode()}',member='{member}'"


def _wire_why(exc: Exception) -> str:
    """A dbuswire failure in a few words: the error reply's text, or what the socket said."""
    if isinstance(exc, dbuswire.BusError):
        return exc.text
    if isinstance(exc, TimeoutError):
        return f"no answer within {CALL_TIMEOUT:.0f}s"
    return str(exc) or type(exc).__name__


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

    def watch(self, units: list[str], *, jobs: bool = True) -> None: ...

    def wait_change(self, timeout: float) -> None: ...

    def power_off(self) -> None: ...

    def stop_unit(self, name: str) -> None: ...

    def restart_unit(self, name: str) -> None: ...

    def reload(self) -> None: ...

    def start_unit(self, name: str) -> None: ...

    def loaded(self, names: list[str]) -> list[str]: ...


# Opens a SystemdBus to the container whose PID 1 is `leader`: (leader, timeout=, alive=) -> bus.
Connect = Callable[..., SystemdBus]


class ContainerBus:
    """One connection to one container's system bus, shared by every call for that container. It is
    tupper.dbuswire's (its waits are socket reads, without the GIL), not pystemd's: a booting systemd
    answers late, and pystemd keeps the GIL while it waits: 60-70 ms a call at boot (measured with six
    boots at once), in which tupperd's event loop and every other start stood still."""

    def __init__(self, leader: int, timeout: float = CALL_TIMEOUT) -> None:
        self.leader = leader
        self.address = f"unix:path={bus_socket(leader)}"
        self._conn = dbuswire.Connection(self.address, timeout=timeout)
        self._conn.handlers.append(self._on_signal)
        self._news = 0  # signals come in since the last wait_change
        self._watched: set[str] = set()  # units whose changes systemd sends us (watch, wait_change)
        self._subscribed = self._jobs = False

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
                    # Bounded by a second a try (dbus-daemon may not run yet behind its socket), so
                    # that alive() and the deadline are looked at.
                    bus = cls(leader, timeout=max(0.05, min(1.0, deadline - time.monotonic())))
                    bus.system_state()
                    bus._conn.set_timeout(CALL_TIMEOUT)
                    return bus
                except (Failed, OSError, ValueError) as exc:
                    last = exc
                    if bus is not None:
                        bus.close()
            time.sleep(0.01)
        raise Failed(f"the container's system bus did not answer within {timeout:.0f}s ({last})")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ContainerBus:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_signal(self, _msg) -> None:
        self._news += 1

    # ---- properties ----------------------------------------------------------------------------

    def _get(self, path: str, iface: str, prop: str):
        try:
            (value,) = self._conn.call("Get", "ss", [iface, prop], path=path, interface=PROPERTIES.decode(), destination=SD.decode())
            return value[1]  # the variant's value
        except (dbuswire.BusError, OSError, ValueError) as exc:
            raise Failed(f"the container's systemd did not answer {prop}: {_wire_why(exc)}") from None

    def _call(self, method: str, sig: str = "", *args) -> list:
        try:
            return self._conn.call(method, sig, list(args), path=SD_PATH.decode(), interface=MANAGER.decode(), destination=SD.decode())
        except (dbuswire.BusError, OSError, ValueError) as exc:
            what = f"{method}({', '.join(map(str, args))})"
            raise Failed(f"the container's systemd refused {what}: {_wire_why(exc)}") from None

    def system_state(self) -> str:
        return self._get(SD_PATH.decode(), MANAGER.decode(), "SystemState")

    def unit_state(self, name: str) -> UnitState:
        path, unit = unit_object_path(name), UNIT.decode()
        active = self._get(path, unit, "ActiveState")
        sub = self._get(path, unit, "SubState")
        enter = int(self._get(path, unit, "ActiveEnterTimestampMonotonic"))
        leave = int(self._get(path, unit, "InactiveExitTimestampMonotonic"))
        result, main_pid = "", 0
        if name.endswith(".service"):
            result = self._get(path, SERVICE.decode(), "Result")
            main_pid = int(self._get(path, SERVICE.decode(), "MainPID"))
        return UnitState(name, active, sub, result, main_pid, enter, leave)

    def active_state(self, name: str) -> str:
        return self._get(unit_object_path(name), UNIT.decode(), "ActiveState")

    def has_job(self, name: str) -> bool:
        job = self._get(unit_object_path(name), UNIT.decode(), "Job")  # (uo): (0, "/") where there is none
        return bool(job and job[0])

    def watch(self, units: list[str], *, jobs: bool = True) -> None:
        """Have systemd send us the changes of `units`, the end of its boot (StartupFinished) and, with
        `jobs`, the end of every job, for wait_change: call it before reading the states whose change
        is to be waited for."""
        if not self._subscribed:
            self._call("Subscribe")
            self._conn.add_match(_rule(SD_PATH, MANAGER, "StartupFinished"))
            self._subscribed = True
        if jobs and not self._jobs:
            self._conn.add_match(_rule(SD_PATH, MANAGER, "JobRemoved"))
            self._jobs = True
        for unit in sorted(set(units) - self._watched):
            self._conn.add_match(_rule(unit_object_path(unit), PROPERTIES, "PropertiesChanged"))
            self._watched.add(unit)

    def wait_change(self, timeout: float) -> None:
        """Until systemd announces a change of a watched unit or the end of a job, or `timeout` passes;
        at once where such news came in since the last wait (while calls waited for their replies).
        Polling the states every few milliseconds was a call each."""
        deadline = time.monotonic() + timeout
        try:
            while not self._news and (left := deadline - time.monotonic()) > 0:
                self._conn.wait_message(left)
        except (dbuswire.BusError, OSError, ValueError) as exc:
            raise Failed(f"the container's system bus failed: {_wire_why(exc)}") from None
        self._news = 0

    # ---- methods -------------------------------------------------------------------------------

    def power_off(self) -> None:
        self._call("PowerOff")

    def stop_unit(self, name: str) -> None:
        self._call("StopUnit", "ss", name, "replace")

    def restart_unit(self, name: str) -> None:
        self._call("RestartUnit", "ss", name, "replace")

    def reload(self) -> None:
        self._call("Reload")

    def start_unit(self, name: str) -> None:
        self._call("StartUnit", "ss", name, "replace")

    def loaded(self, names: list[str]) -> list[str]:
        """Which of `names` systemd holds in memory now (loaded, or a stub for a name something referred
        to). ListUnitsByPatterns only lists; it loads nothing (ListUnitsByNames would). A name with a
        glob character cannot be asked for exactly: it counts as loaded."""
        if not names:
            return []
        if any(c in name for name in names for c in "*?[\\"):
            return list(names)
        (units,) = self._call("ListUnitsByPatterns", "asas", [], list(names))
        found = {entry[0] for entry in units}
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
    _add_match(bus, _rule(path, PROPERTIES, "PropertiesChanged"))
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
            _add_match(bus, _rule(SD_PATH, MANAGER, "JobRemoved"))
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
