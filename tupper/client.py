"""The CLI's side of the D-Bus API: calls tupperd over the system bus (bus activation starts it).

Blocking facade over dbus-next; errors named org.tupper1.Error.* come back as the matching TupperError.
"""

from __future__ import annotations

import asyncio
import json
import os

from dbus_next import BusType, Message, MessageType
from dbus_next.aio import MessageBus

from tupper import errors

BUS_NAME = "org.tupper1"
MANAGER_PATH = "/org/tupper1"
MANAGER_IFACE = "org.tupper1.Manager"

_ERRORS = {
    "org.tupper1.Error.InvalidSpec": errors.InvalidInput,
    "org.tupper1.Error.NotFound": errors.NotFound,
    "org.tupper1.Error.Exists": errors.Exists,
    "org.tupper1.Error.Busy": errors.Busy,
    "org.tupper1.Error.Failed": errors.Failed,
}


def bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/dbus/system_bus_socket")


class Client:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        address = bus_address()
        try:
            self.bus = self.loop.run_until_complete(self._connect())
        except (OSError, ValueError) as exc:
            raise errors.Failed(f"cannot connect to the system bus at {address}: {exc}",
                                hint="start one (make setup does: dbus-daemon --system --fork), or use tupper --direct") from None

    @staticmethod
    async def _connect() -> MessageBus:
        # dbus-next binds a bus to the loop running when it is made: make it inside our loop.
        return await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()

    def close(self) -> None:
        self.bus.disconnect()
        self.loop.close()

    def call(self, member: str, signature: str = "", body: list | None = None, *, path: str = MANAGER_PATH,
             interface: str = MANAGER_IFACE, unix_fds: list[int] | None = None) -> list:
        return self.loop.run_until_complete(self.acall(member, signature, body, path=path, interface=interface, unix_fds=unix_fds))

    async def acall(self, member, signature="", body=None, *, path=MANAGER_PATH, interface=MANAGER_IFACE, unix_fds=None) -> list:
        msg = Message(destination=BUS_NAME, path=path, interface=interface, member=member, signature=signature,
                      body=body or [], unix_fds=unix_fds or [])
        reply = await self.bus.call(msg)
        if reply.message_type == MessageType.ERROR:
            raise _error(reply)
        return reply.body

    def subscribe(self, rule: str, handler) -> None:
        """Receive signals matching `rule` (a D-Bus match rule) while calls run."""
        self.loop.run_until_complete(self._add_match(rule))
        self.bus.add_message_handler(lambda m: handler(m) if m.message_type == MessageType.SIGNAL else None)

    async def _add_match(self, rule: str) -> None:
        reply = await self.bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                            interface="org.freedesktop.DBus", member="AddMatch", signature="s", body=[rule]))
        if reply.message_type == MessageType.ERROR:
            raise _error(reply)

    def wait_forever(self) -> None:
        self.loop.run_until_complete(self.bus.wait_for_disconnect())

    # ---- the verbs ----------------------------------------------------------------------------

    def run(self, spec_path: str, name: str | None, keep_failed: bool) -> dict:
        return json.loads(self.call("Run", "ssb", [spec_path, name or "", keep_failed])[1])

    def list(self) -> list[dict]:
        return json.loads(self.call("ListJSON")[0])

    def status(self, name: str) -> dict:
        return json.loads(self.call("GetJSON", "s", [name])[0])

    def start(self, name: str) -> str:
        return self.call("Start", "s", [name])[0]

    def stop(self, name: str, timeout: float | None) -> str:
        return self.call("Stop", "sd", [name, -1.0 if timeout is None else float(timeout)])[0]

    def kill(self, name: str, signal_number: int) -> str:
        return self.call("Kill", "si", [name, signal_number])[0]

    def remove(self, name: str, force: bool) -> None:
        self.call("Remove", "sb", [name, force])

    def shutdown_all(self) -> list[str]:
        return self.call("Shutdown", "b", [True])[0]

    def exec(self, name: str, argv: list[str], fds: tuple[int, int, int] = (0, 1, 2)) -> int:
        return self.call("Exec", "sashhh", [name, argv, 0, 1, 2], unix_fds=list(fds))[0]


def _error(reply: Message) -> errors.TupperError:
    text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else reply.error_name
    if reply.error_name == "org.freedesktop.DBus.Error.AccessDenied":
        return errors.Failed(f"access denied: {text}", hint="run as root or as a member of tupperd's admin group")
    if reply.error_name in ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.Spawn.ChildExited",
                            "org.freedesktop.DBus.Error.Spawn.ExecFailed", "org.freedesktop.DBus.Error.NameHasNoOwner"):
        return errors.Failed(f"tupperd is not available: {text}", hint="install its bus activation files with `make setup`, or start `tupperd`")
    cls = _ERRORS.get(reply.error_name, errors.Failed)
    hint = None
    if text.endswith(")") and " (hint: " in text:  # tupper.api.dbus_error puts the hint there
        text, _, hint = text[:-1].rpartition(" (hint: ")
    return cls(text, hint=hint)
