"""The CLI's side of the D-Bus API: calls tupperd over the system bus (bus activation starts it), on
tupper.dbuswire's small blocking client (importing asyncio and dbus-next would cost the CLI more than
its calls: tupperd keeps dbus-next)."""

from __future__ import annotations

import builtins
import os

from tupper import errors
from tupper.busnames import JOB_IFACE, error_from
from tupper.dbuswire import Connection, Message, _error_text, plain

__all__ = ["Client", "Message", "bus_address"]


def bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/dbus/system_bus_socket")


class Client(Connection):
    """tupperd's verbs, on the system bus."""

    def __init__(self) -> None:
        address = bus_address()
        try:
            super().__init__(address)
        except (OSError, ValueError) as exc:
            raise errors.Failed(f"cannot connect to the system bus at {address}: {exc}",
                                hint="start one (make setup does: dbus-daemon --system --fork), or use tupper --direct") from None

    def _error(self, reply: Message) -> errors.TupperError:
        """tupperd's errors (org.tupper1.Error.*) as the TupperError they stand for."""
        return error_from(reply.error_name, _error_text(reply))

    # ---- the verbs ----------------------------------------------------------------------------

    def run(self, spec_path: str, name: str | None, keep_failed: bool, wait: bool = True, cold: bool = False,
            meanwhile=None) -> dict:
        """Run answers at once with the job; Wait answers when it has ended (with the run's result, or
        its error). wait=False: only the job, as {name, job}. cold: RunWith's option (no warm pool).
        meanwhile: as call's, once Wait is sent (while the container starts)."""
        if cold:
            options = {"keep_failed": ("b", keep_failed), "cold": ("b", True)}
            container, job = self.call("RunWith", "ssa{sv}", [spec_path, name or "", options])
        else:
            container, job = self.call("Run", "ssb", [spec_path, name or "", keep_failed])
        return self.wait(job, meanwhile) if wait else {"container": container, "job": job}

    def wait(self, job: str, meanwhile=None) -> dict:
        return plain("a{sv}", self.call("Wait", path=job, interface=JOB_IFACE, meanwhile=meanwhile)[0])

    def _job_verb(self, member: str, signature: str, body: list, wait: bool) -> str:
        job = self.call(member, signature, body)[0]
        return self.wait(job)["state"] if wait else job

    def list(self) -> builtins.list[dict]:
        return _json(self.call("ListJSON")[0])

    def status(self, name: str) -> dict:
        return _json(self.call("GetJSON", "s", [name])[0])

    def start(self, name: str, wait: bool = True) -> str:
        """The container's state once started (wait=False: the job's object path, at once)."""
        return self._job_verb("Start", "s", [name], wait)

    def stop(self, name: str, timeout: float | None, wait: bool = True) -> str:
        return self._job_verb("Stop", "sd", [name, -1.0 if timeout is None else float(timeout)], wait)

    def inspect(self, name: str) -> dict:
        return _json(self.call("InspectJSON", "s", [name])[0])

    def restart(self, name: str, timeout: float | None, wait: bool = True) -> str:
        return self._job_verb("Restart", "sd", [name, -1.0 if timeout is None else float(timeout)], wait)

    def kill(self, name: str, signal_number: int) -> str:
        return self.call("Kill", "si", [name, signal_number])[0]

    def remove(self, name: str, force: bool) -> None:
        self.call("Remove", "sb", [name, force])

    def shutdown_all(self) -> builtins.list[str]:
        return self.call("Shutdown", "b", [True])[0]

    def rotate_secret(self, secret: str) -> builtins.list[str]:
        return self.call("RotateSecret", "s", [secret])[0]

    def secret_holders(self) -> builtins.list[builtins.list[str]]:
        return self.call("SecretHolders")[0]

    def upgrade(self, name: str, component: str, version: str) -> dict:
        return _json(self.call("Upgrade", "sss", [name, component, version])[0])

    def stats(self, names: builtins.list[str]) -> builtins.list[dict]:
        return _json(self.call("Stats", "as", [names])[0])

    def update(self, name: str, component: str | None, changes: dict[str, str]) -> dict:
        limits, notes, applied = self.call("Update", "ssa{ss}", [name, component or "", changes])[0]
        return {"resources": limits, "notes": notes, "applied": applied}

    def network_create(self, name: str, subnet: str | None, ipv6: str | None) -> dict:
        return _network(self.call("CreateNetwork", "sss", [name, subnet or "", ipv6 or ""])[0])

    def network_list(self) -> builtins.list[dict]:
        return [_network(n) for n in self.call("ListNetworks")[0]]

    def network_remove(self, name: str) -> None:
        self.call("RemoveNetwork", "s", [name])

    def pool_set(self, image: str, size: int) -> dict:
        return plain("a{sv}", self.call("SetPool", "su", [image, size])[0])

    def pool_list(self) -> builtins.list[dict]:
        return plain("aa{sv}", self.call("ListPools")[0])

    def pool_remove(self, image: str) -> builtins.list[str]:
        return list(self.call("RemovePool", "s", [image])[0])

    def open_shell(self, name: str, *, user: str | None, argv: builtins.list[str] | None, env: dict[str, str] | None,
                   workdir: str | None, term: str, rows: int, cols: int) -> tuple[int, str]:
        """(the terminal's master, the session's id)."""
        body, fds = self.call_fds("OpenShell", "ssasa{ss}ssqq", [name, user or "", argv or [], env or {}, workdir or "", term, rows, cols])
        master = fds.pop(body[0])
        for fd in fds:
            os.close(fd)
        return master, body[1]

    def shell_exit(self, session: str) -> int:
        return self.call("ShellExit", "s", [session])[0]

    def exec(self, name: str, argv: builtins.list[str], fds: tuple[int, int, int] = (0, 1, 2), *, env: dict[str, str] | None = None,
             user: str | None = None, workdir: str | None = None) -> int:
        if env or user or workdir:
            return self.call("ExecWith", "sasa{ss}sshhh", [name, argv, env or {}, user or "", workdir or "", 0, 1, 2], unix_fds=list(fds))[0]
        return self.call("Exec", "sashhh", [name, argv, 0, 1, 2], unix_fds=list(fds))[0]


def _network(fields: list) -> dict:
    """A network as the D-Bus API gives it, (sssssa{ss}as), as `network ls --json` shows it."""
    name, subnet, subnet6, bridge, gateway, running, containers = fields
    return {"name": name, "subnet": subnet, "subnet6": subnet6 or None, "bridge": bridge, "gateway": gateway,
            "running": dict(running), "containers": list(containers)}


def _json(text: str):
    import json

    return json.loads(text)
