"""The D-Bus API of tupperd (bus name org.tupper1), with dbus-next: the one module that exports objects.

/org/tupper1                      org.tupper1.Manager    run, list, get, stop, kill, remove, start, shutdown, exec
/org/tupper1/container/<label>    org.tupper1.Container  properties, stop/kill, unit control; UnitStateChanged

Methods that change anything are @privileged: the caller's uid, as the bus daemon reports it, must be
root or in the admin group; others get org.freedesktop.DBus.Error.AccessDenied.
"""
# No `from __future__ import annotations`: dbus-next reads the signature strings from the annotations.

import asyncio
import grp
import json
import logging
import os
import pwd

from dbus_next import BusType, Message, MessageType
from dbus_next.aio import MessageBus
from dbus_next.errors import DBusError
from dbus_next.service import PropertyAccess, ServiceInterface, dbus_property, method, signal

from tupper.busnames import ACCESS_DENIED, BUS_NAME, CONTAINER_IFACE, MANAGER_IFACE, MANAGER_PATH, container_path, error_text
from tupper.errors import TupperError

__all__ = ["BUS_NAME", "MANAGER_PATH", "container_path"]  # tupperd's names, from tupper.busnames

log = logging.getLogger("tupperd")

def uid_allowed(uid: int, admin_group: str | None) -> bool:
    """root, or a user whose primary or supplementary group is `admin_group`."""
    if uid == 0:
        return True
    if not admin_group:
        return False
    try:
        group = grp.getgrnam(admin_group)
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return user.pw_gid == group.gr_gid or user.pw_name in group.gr_mem


def close_fds(fds: list[int]) -> None:
    """Close the descriptors a call brought, once: the list is emptied so a second call does nothing."""
    while fds:
        fd = fds.pop()
        try:
            os.close(fd)
        except OSError:
            pass


def privileged(fn):
    """Mark a method as changing state: only root or the admin group may call it."""
    fn.__tupper_privileged__ = True
    return fn


def dbus_error(exc: TupperError) -> DBusError:
    return DBusError(exc.dbus_name, error_text(exc))


async def guarded(coro):
    """Await a daemon call; tupper's errors become org.tupper1.Error.* replies, and so does an OSError
    (a full store, a vanished file): never "the service interface raised an error" with a traceback."""
    try:
        return await coro
    except TupperError as exc:
        raise dbus_error(exc) from None
    except OSError as exc:
        raise dbus_error(os_error(exc)) from None
    except DBusError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug: logged whole in tupperd's log, one line to the caller
        from tupper.errors import Failed

        logging.getLogger("tupperd").exception("unexpected error")
        raise dbus_error(Failed(f"tupperd hit an unexpected error ({type(exc).__name__}: {exc})",
                                hint="its log (journalctl -u tupperd, or tupperd's stderr) has the details; please report it")) from None


def os_error(exc: OSError) -> TupperError:
    import errno

    from tupper.errors import Failed

    where = f": {exc.filename}" if exc.filename else ""
    hint = ("the store is full: see `tupper store info`; remove containers or images you no longer need "
            "(stop and rm keep working on a full store), or grow the pool") if exc.errno == errno.ENOSPC else None
    return Failed(f"{exc.strerror or exc}{where}", hint=hint)


class TupperBus(MessageBus):
    """A MessageBus that checks the caller of @privileged methods before dispatching them, and that
    owns the file descriptors a call brings: they are closed when its reply (or error) is sent, on
    every path (refused, unknown method, failure, success), so no method closes them itself."""

    def __init__(self, *args, admin_group: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.admin_group = admin_group

    def _send_reply(self, msg):
        send_reply = super()._send_reply(msg)
        if not msg.unix_fds:
            return send_reply
        inner_call = send_reply.__call__
        fds = list(msg.unix_fds)

        class ClosingSendReply(type(send_reply)):  # type: ignore[misc]  # the class dbus-next made the reply with
            def __call__(self, reply):
                try:
                    inner_call(reply)
                finally:
                    close_fds(fds)

        send_reply.__class__ = ClosingSendReply
        return send_reply

    def send(self, msg):
        """Send `msg`; the descriptors a reply carries (OpenShell's terminal) are the bus's too: closed once
        the message is written, or failed to be (dbus-next only copies their numbers into its queue)."""
        future = super().send(msg)
        if msg.unix_fds and msg.message_type == MessageType.METHOD_RETURN:
            fds = list(msg.unix_fds)
            future.add_done_callback(lambda _fut: close_fds(fds))
        return future

    def _make_method_handler(self, interface, method_):
        inner = super()._make_method_handler(interface, method_)
        if not getattr(method_.fn, "__tupper_privileged__", False):
            return inner

        def handler(msg, send_reply):
            async def check():
                try:
                    allowed = await self.caller_allowed(msg.sender)
                except Exception as exc:  # noqa: BLE001 - a caller we cannot identify is refused
                    log.warning("cannot identify caller %s: %s", msg.sender, exc)
                    allowed = False
                if allowed:
                    inner(msg, send_reply)
                else:
                    send_reply(Message.new_error(msg, ACCESS_DENIED, f"{method_.name} changes state: only root or members of group "
                                                                     f"{self.admin_group or '(none)'} may call it"))

            asyncio.ensure_future(check())

        return handler

    async def caller_allowed(self, sender: str) -> bool:
        reply = await self.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                        interface="org.freedesktop.DBus", member="GetConnectionUnixUser",
                                        signature="s", body=[sender]))
        if reply is None or reply.message_type == MessageType.ERROR:
            return False
        return uid_allowed(reply.body[0], self.admin_group)


class ManagerInterface(ServiceInterface):
    def __init__(self, daemon) -> None:
        super().__init__(MANAGER_IFACE)
        self.daemon = daemon

    async def _guard(self, coro):
        return await guarded(coro)

    # ---- methods ------------------------------------------------------------------------------

    @method()
    @privileged
    async def Run(self, spec_path: "s", name: "s", keep_failed: "b") -> "os":
        """Run the spec file at spec_path (absolute); name overrides the spec's when not empty.
        Returns the container's object path and its record as JSON."""
        rec = await self._guard(self.daemon.run_file(spec_path, name or None, keep_failed))
        return [container_path(rec["name"]), json.dumps(rec)]

    @method()
    @privileged
    async def RunText(self, toml: "s", base_dir: "s", name: "s", keep_failed: "b") -> "os":
        """Run a spec given as TOML text; component paths are relative to base_dir."""
        rec = await self._guard(self.daemon.run_text(toml, base_dir, name or None, keep_failed))
        return [container_path(rec["name"]), json.dumps(rec)]

    @method()
    def List(self) -> "a(ssuso)":
        """Every container: name, state, leader PID (0 when not running), image, object path."""
        return [[r["name"], r["state"], r["leader_pid"] or 0, r["image"], container_path(r["name"])] for r in self.daemon.list()]

    @method()
    def ListJSON(self) -> "s":
        """The same as `tupper ps --json`."""
        return json.dumps(self.daemon.list())

    @method()
    def GetContainer(self, name: "s") -> "o":
        try:
            self.daemon.get(name)
        except TupperError as exc:
            raise dbus_error(exc) from None
        return container_path(name)

    @method()
    async def GetJSON(self, name: "s") -> "s":
        """The same as `tupper status NAME --json` (units read from the container's systemd)."""
        return json.dumps((await self._guard(self.daemon.status(name))).to_json())

    @method()
    async def InspectJSON(self, name: "s") -> "s":
        """Everything about one container as JSON (`tupper inspect --json`): record, root, machine name,
        cgroups, mounts, components with digests, last exit, the image's os-release."""
        return json.dumps(await self._guard(self.daemon.inspect(name)))

    @method()
    @privileged
    async def Start(self, name: "s") -> "s":
        """Boot a stopped (or crash-looping) container again; returns its state."""
        return await self._guard(self.daemon.start(name))

    @method()
    @privileged
    async def Stop(self, name: "s", timeout: "d") -> "s":
        """PowerOff, SIGKILL after timeout seconds (< 0: the spec's [stop] timeout); returns the state."""
        return await self._guard(self.daemon.stop(name, None if timeout < 0 else timeout))

    @method()
    @privileged
    async def Restart(self, name: "s", timeout: "d") -> "s":
        """Stop (SIGKILL after timeout seconds; < 0: the spec's) then start again; returns the state."""
        return await self._guard(self.daemon.restart(name, None if timeout < 0 else timeout))

    @method()
    @privileged
    async def Kill(self, name: "s", signal_number: "i") -> "s":
        """Send a signal to the container's PID 1 (9 = SIGKILL: stop it now); returns the state."""
        return await self._guard(self.daemon.kill(name, signal_number))

    @method()
    @privileged
    async def Remove(self, name: "s", force: "b") -> None:
        await self._guard(self.daemon.remove(name, force))

    @method()
    @privileged
    async def Shutdown(self, all_containers: "b") -> "as":
        """Stop every running container, the last started first; returns their names in stop order."""
        return await self._guard(self.daemon.shutdown_all()) if all_containers else []

    @method()
    @privileged
    async def Exec(self, name: "s", argv: "as", stdin: "h", stdout: "h", stderr: "h") -> "i":
        """Run argv in the container as a transient unit on the given file descriptors; returns its exit code."""
        return await self._guard(self.daemon.exec(name, argv, stdin, stdout, stderr))

    @method()
    @privileged
    async def ExecWith(self, name: "s", argv: "as", env: "a{ss}", user: "s", workdir: "s", stdin: "h", stdout: "h", stderr: "h") -> "i":
        """Exec with environment variables, as `user` ("" root) in `workdir` ("" /)."""
        return await self._guard(self.daemon.exec(name, argv, stdin, stdout, stderr, env=dict(env) or None, user=user or None,
                                                  workdir=workdir or None))

    @method()
    @privileged
    async def OpenShell(self, name: "s", user: "s", argv: "as", env: "a{ss}", workdir: "s", term: "s", rows: "q",
                        cols: "q") -> "hs":
        """An interactive session on a new pseudo-terminal inside the container (as machined's
        OpenMachineShell): a login shell of `user` ("" root), or `argv` where not empty, in `workdir` ("" the
        user's home), with TERM=`term` and the terminal sized rows x cols (0: leave it). Returns the
        terminal's master (relay it; closing it hangs the session up) and the session's id for ShellExit."""
        session = await self._guard(self.daemon.open_shell(name, user=user or None, argv=list(argv) or None, env=dict(env) or None,
                                                           workdir=workdir or None, term=term, rows=rows, cols=cols))
        return [session.master, session.unit]

    @method()
    @privileged
    async def ShellExit(self, session: "s") -> "i":
        """Wait for the session OpenShell returned to end; its exit code (128 + the signal that killed it)."""
        return await self._guard(self.daemon.shell_exit(session))

    @method()
    @privileged
    async def Upgrade(self, name: "s", component: "s", version: "s") -> "s":
        """Swap a component of a running container for another installed version, live; rolls back
        by itself if the new units do not become active (then the call fails). Returns JSON."""
        return json.dumps(await self._guard(self.daemon.upgrade(name, component, version)))

    @method()
    @privileged
    async def Update(self, name: "s", component: "s", limits: "a{ss}") -> "(a{ss}asb)":
        """Change resource limits of a container ("" as component) or of one of its components, live
        if it runs; `limits` as in a spec's [resources] ({"memory_max": "1G", "cpu_max": "150%"}).
        Returns the limits now, what this host cannot apply, and whether the running container got them."""
        return _update_reply(await self._guard(self.daemon.update(name, component or None, dict(limits))))

    @method()
    @privileged
    async def CreateNetwork(self, name: "s", subnet: "s", ipv6: "s") -> "(sssssa{ss}as)":
        """Create a network: its IPv4 subnet ("" picks a free 10.X.0.0/24) and IPv6 /64 ("" none).
        Returns it as ListNetworks does."""
        return _network(await self._guard(self.daemon.network_create(name, subnet or None, ipv6 or None)))

    @method()
    async def ListNetworks(self) -> "a(sssssa{ss}as)":
        """Every network: name, subnet, IPv6 subnet ("" none), bridge, gateway, the running containers
        on it with their addresses, and every container configured to join it."""
        return [_network(n) for n in await self._guard(self.daemon.network_list())]

    @method()
    @privileged
    async def RemoveNetwork(self, name: "s") -> None:
        """Remove a network; refused while a container is configured to join it."""
        await self._guard(self.daemon.network_remove(name))

    @method()
    async def Stats(self, names: "as") -> "s":
        """What `tupper stats --no-stream --json NAME…` prints (no names: every running container): CPU,
        memory, IO, pids and pressure of each container and its components, from their cgroups."""
        return json.dumps(await self._guard(self.daemon.stats(list(names))))

    @method()
    def SecretHolders(self) -> "a(sss)":
        """Which containers hold which secrets: (container, credential ID, secret name). Never values."""
        return [list(t) for t in self.daemon.secret_holders()]

    @method()
    @privileged
    async def RotateSecret(self, secret: "s") -> "as":
        """Re-deliver a secret's current value to every running unit that loads it (restart or reload
        by its component's policy); returns what was done, one "container/unit: action result" each."""
        return await self._guard(self.daemon.rotate_secret(secret))

    # ---- properties and signals -----------------------------------------------------------------

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        from tupper import __version__

        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def StoreRoot(self) -> "s":
        return str(self.daemon.runtime.store.root)

    @signal()
    def ContainerAdded(self, name: str, path: str) -> "so":
        return [name, path]

    @signal()
    def ContainerRemoved(self, name: str, path: str) -> "so":
        return [name, path]

    @signal()
    def ContainerStateChanged(self, name: str, state: str) -> "ss":
        return [name, state]

    @signal()
    def HealthChanged(self, name: str, component: str, state: str, detail: str) -> "ssss":
        """A component's health: starting (also when tupperd restarts it for failed checks), healthy or
        unhealthy; detail is what the last check said."""
        return [name, component, state, detail]

    @signal()
    def OOMKilled(self, name: str, component: str, kills: "u", pid: "u", process: str) -> "ssuus":
        """The kernel's OOM killer killed a process of a container: in `component` ("": in none of them),
        `kills` counted there since the container started; the process's host pid and name as the
        kernel's log gives them (0 and "" where it cannot be read)."""
        return [name, component, kills, pid, process]

    @signal()
    def Progress(self, name: str, kind: str, text: str) -> "sss":
        """Progress of a long operation on container `name`: kind is step, done, failed, update or note."""
        return [name, kind, text]


class ContainerInterface(ServiceInterface):
    def __init__(self, daemon, name: str) -> None:
        super().__init__(CONTAINER_IFACE)
        self.daemon = daemon
        self.container = name  # not `name`: ServiceInterface.name is the interface's name

    def _rec(self):
        return self.daemon.get(self.container)

    async def _guard(self, coro):
        return await guarded(coro)

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.container

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self.daemon.state_of(self.container)

    @dbus_property(access=PropertyAccess.READ)
    def Image(self) -> "s":
        return self._rec().image

    @dbus_property(access=PropertyAccess.READ)
    def LeaderPID(self) -> "u":
        rec = self._rec()
        return rec.leader_pid if rec.alive() else 0

    @dbus_property(access=PropertyAccess.READ)
    def StartedAt(self) -> "t":
        """Microseconds since the epoch (0: never started)."""
        return int(self._rec().started_at * 1_000_000)

    @dbus_property(access=PropertyAccess.READ)
    def Components(self) -> "as":
        return [c.name for c in self._rec().components]

    @dbus_property(access=PropertyAccess.READ)
    def Units(self) -> "as":
        return self._rec().units

    @dbus_property(access=PropertyAccess.READ)
    def RestartPolicy(self) -> "s":
        return self._rec().restart_policy

    @dbus_property(access=PropertyAccess.READ)
    def NetworkMode(self) -> "s":
        """private, host or none."""
        return self._rec().network.mode

    @dbus_property(access=PropertyAccess.READ)
    def Network(self) -> "s":
        """The network it joins in private mode ("" in host or none mode)."""
        rec = self._rec()
        return rec.network.network if rec.network.mode == "private" else ""

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> "s":
        """Its IPv4 address on its network while it runs ("" otherwise); PropertiesChanged announces it."""
        rec = self._rec()
        return rec.address if rec.alive() else ""

    @dbus_property(access=PropertyAccess.READ)
    def Address6(self) -> "s":
        rec = self._rec()
        return rec.address6 if rec.alive() else ""

    @dbus_property(access=PropertyAccess.READ)
    def Ports(self) -> "a(qqss)":
        """Published ports: host port, container port, protocol (tcp, udp), host address ("" all)."""
        return [[p.host, p.container, p.protocol, p.address] for p in self._rec().network.ports]

    @dbus_property(access=PropertyAccess.READ)
    def Labels(self) -> "a{ss}":
        """The spec's [labels] (constant for the container's life)."""
        return dict(self._rec().labels)

    @dbus_property(access=PropertyAccess.READ)
    def Secrets(self) -> "a{ss}":
        """Credential ID -> secret name granted to this container (names only, never values)."""
        return dict(self._rec().grants)

    @method()
    @privileged
    async def Stop(self, timeout: "d") -> "s":
        return await self._guard(self.daemon.stop(self.container, None if timeout < 0 else timeout))

    @method()
    @privileged
    async def Restart(self, timeout: "d") -> "s":
        return await self._guard(self.daemon.restart(self.container, None if timeout < 0 else timeout))

    @method()
    @privileged
    async def Kill(self, signal_number: "i") -> "s":
        return await self._guard(self.daemon.kill(self.container, signal_number))

    @dbus_property(access=PropertyAccess.READ)
    def Health(self) -> "a{ss}":
        """Component -> starting, healthy or unhealthy, for the components with a health check
        (PropertiesChanged announces changes)."""
        return self.daemon.health_of(self.container)

    @dbus_property(access=PropertyAccess.READ)
    def Resources(self) -> "a{ss}":
        """The container's resource limits, as in a spec's [resources] (the set ones only)."""
        return self.resources_of(None)

    def resources_of(self, component: str | None) -> dict[str, str]:
        rec = self._rec()
        entry = rec.component(component) if component else None
        return {k: str(v) for k, v in (entry.resources if entry else rec.resources).to_json().items()}

    @method()
    @privileged
    async def Update(self, component: "s", limits: "a{ss}") -> "(a{ss}asb)":
        """Change resource limits of this container ("" as component) or of one of its components; see Manager.Update."""
        return _update_reply(await self._guard(self.daemon.update(self.container, component or None, dict(limits))))

    @method()
    @privileged
    async def StartUnit(self, unit: "s") -> "s":
        """Start one of the container's component units; returns the job result (done, failed, …)."""
        return await self._guard(self.daemon.unit_job(self.container, unit, "StartUnit"))

    @method()
    @privileged
    async def StopUnit(self, unit: "s") -> "s":
        return await self._guard(self.daemon.unit_job(self.container, unit, "StopUnit"))

    @method()
    @privileged
    async def RestartUnit(self, unit: "s") -> "s":
        return await self._guard(self.daemon.unit_job(self.container, unit, "RestartUnit"))

    @method()
    async def ListUnits(self) -> "a(ssss)":
        """The component units: name, ActiveState, SubState, Result."""
        units = await self._guard(self.daemon.units(self.container))
        return [[u.name, u.state.active_state, u.state.sub_state, u.state.result] for u in units]

    @signal()
    def UnitStateChanged(self, unit: str, active_state: str, sub_state: str) -> "sss":
        return [unit, active_state, sub_state]


def _network(n: dict) -> list:
    return [n["name"], n["subnet"], n["subnet6"] or "", n["bridge"], n["gateway"], n["running"], n["containers"]]


def _update_reply(result) -> list:
    return [{k: str(v) for k, v in result.resources.to_json().items()}, list(result.notes), result.applied]


async def connect_system_bus(admin_group: str | None) -> TupperBus:
    bus = TupperBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True, admin_group=admin_group)
    await bus.connect()
    return bus
