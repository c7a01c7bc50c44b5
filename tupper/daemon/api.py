"""The D-Bus API of tupperd (bus name org.tupper1), with dbus-next: the one module that exports objects.

/org/tupper1                      org.tupper1.Manager    run, list, get, stop, kill, remove, start, shutdown, exec,
                                                         images, components, volumes, the store
/org/tupper1/container/<label>    org.tupper1.Container  properties, start/stop/kill, unit control; UnitStateChanged
/org/tupper1/job/<id>             org.tupper1.Job        one Run/Start/Stop/Restart under way: State, Wait()

Run, Start, Stop and Restart answer at once with a job (as systemd's StartUnit does): its object, and
Manager.JobRemoved when it ends; Job.Wait() answers when it has ended, with its result or its error.
Every property's EmitsChangedSignal annotation says what PropertiesChanged does for it (typed.prop).

Methods that change anything are @privileged: the caller's uid, as the bus daemon reports it, must be
root or in the admin group; others get org.freedesktop.DBus.Error.AccessDenied.
"""
# No `from __future__ import annotations`: dbus-next reads the signature strings from the annotations.

import array
import asyncio
import contextlib
import grp
import json
import logging
import os
import pwd
import socket

from dbus_next import BusType, Message, MessageType
from dbus_next.aio import MessageBus
from dbus_next.aio.message_bus import _MessageWriter
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface, method, signal

from tupper.busnames import (
    ACCESS_DENIED,
    BUS_NAME,
    CONTAINER_IFACE,
    JOB_IFACE,
    MANAGER_IFACE,
    MANAGER_PATH,
    container_path,
    error_text,
)
from tupper.daemon.typed import prop, variant_map
from tupper.errors import InvalidInput, TupperError

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


class _PatientWriter(_MessageWriter):
    """dbus-next 0.2.3's writer takes a full socket (EAGAIN, when dbus-daemon reads slower than tupperd
    writes: 50 runs at once, each with its signals) for a lost connection, and tupperd then exited with
    every container's call unanswered. This one waits for the socket to be writable again. Otherwise as
    dbus-next's write_callback: one message at a time, its descriptors with its first bytes."""

    def write_callback(self):
        try:
            while True:
                if self.buf is None:
                    if self.messages.qsize() == 0:
                        self.loop.remove_writer(self.fd)
                        return
                    buf, unix_fds, fut = self.messages.get_nowait()
                    self.unix_fds = unix_fds
                    self.buf = memoryview(buf)
                    self.offset = 0
                    self.fut = fut
                try:
                    if self.unix_fds and self.negotiate_unix_fd:
                        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.unix_fds))]
                        self.offset += self.sock.sendmsg([self.buf[self.offset:]], ancdata)
                        self.unix_fds = None
                    else:
                        self.offset += self.sock.send(self.buf[self.offset:])
                except (BlockingIOError, InterruptedError):
                    return  # still registered as the writer: called again once the socket can take more
                if self.offset >= len(self.buf):
                    self.buf = None
                    if self.fut is not None and not self.fut.done():
                        self.fut.set_result(None)
                else:
                    return
        except Exception as e:  # noqa: BLE001 - as dbus-next: the connection is lost
            if self.fut is not None and not self.fut.done():
                self.fut.set_exception(e)
            self.bus._finalize(e)


class TupperBus(MessageBus):
    """A MessageBus that checks the caller of @privileged methods before dispatching them, and that
    owns the file descriptors a call brings: they are closed when its reply (or error) is sent, on
    every path (refused, unknown method, failure, success), so no method closes them itself."""

    def __init__(self, *args, admin_group: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.admin_group = admin_group
        self._writer.__class__ = _PatientWriter

    def _send_reply(self, msg):
        send_reply = super()._send_reply(msg)
        inner_call = send_reply.__call__
        fds = list(msg.unix_fds)

        class SendReply(type(send_reply)):  # type: ignore[misc]  # the class dbus-next made the reply with
            def __call__(self, reply):
                try:
                    inner_call(reply)
                finally:
                    close_fds(fds)

            def __exit__(self, exc_type, exc_value, tb):
                # dbus-next 0.2.3 sends the error reply, then drops _exit's answer: the exception went on to
                # asyncio, which logged a traceback for every error reply (a name that does not exist...).
                # Handled here; only what is not a DBusError (guarded() turns tupper's errors into those)
                # is a bug worth a traceback in the log.
                if exc_type is not None and not issubclass(exc_type, DBusError):
                    log.error("%s.%s failed", msg.interface, msg.member, exc_info=(exc_type, exc_value, tb))
                return self._exit(exc_type, exc_value, tb)

        send_reply.__class__ = SendReply
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
    async def Run(self, spec_path: "s", name: "s", keep_failed: "b") -> "oo":
        """Run the spec file at spec_path (absolute); name overrides the spec's when not empty. The spec
        is checked first (errors come back at once); returns the container's object path and the job
        booting it (Job.Wait gives the run's result: the record, the units, the seconds taken)."""
        job = await self._guard(self.daemon.run_file(spec_path, name or None, keep_failed))
        return [container_path(job.container), job.path]

    @method()
    @privileged
    async def RunText(self, toml: "s", base_dir: "s", name: "s", keep_failed: "b") -> "oo":
        """Run a spec given as TOML text; component paths are relative to base_dir. As Run."""
        job = await self._guard(self.daemon.run_text(toml, base_dir, name or None, keep_failed))
        return [container_path(job.container), job.path]

    @method()
    @privileged
    async def RunWith(self, spec_path: "s", name: "s", options: "a{sv}") -> "oo":
        """As Run, with options: keep_failed (b), cold (b: boot a new container even where a warm pool of
        the spec's image holds a ready one)."""
        opts = {str(k): v.value for k, v in options.items()}
        job = await self._guard(self._run_with(spec_path, name, opts))
        return [container_path(job.container), job.path]

    async def _run_with(self, spec_path: str, name: str, opts: dict):
        unknown = sorted(set(opts) - {"keep_failed", "cold"})
        if unknown:
            raise InvalidInput(f"RunWith: unknown option {unknown[0]!r} (known: keep_failed, cold)")
        if not all(isinstance(v, bool) for v in opts.values()):
            raise InvalidInput("RunWith: options keep_failed and cold are booleans (b)")
        return await self.daemon.run_file(spec_path, name or None, opts.get("keep_failed", False), opts.get("cold", False))

    @method()
    @privileged
    async def SetPool(self, image: "s", size: "u") -> "a{sv}":
        """Keep `size` containers of `image` booted, ready for runs of that image (0 empties the pool);
        tupperd fills it in the background, one boot at a time. Returns the pool as ListPools has it."""
        return variant_map(await self._guard(self.daemon.set_pool(image, int(size))))

    @method()
    async def ListPools(self) -> "aa{sv}":
        """Every warm pool: image, size, ready, booting, age (of its oldest ready container, seconds) and
        its containers ({name, state, age}), as `tupper pool ls --json`."""
        return [variant_map(p) for p in await self._guard(self.daemon.list_pools())]

    @method()
    @privileged
    async def RemovePool(self, image: "s") -> "as":
        """Forget the pool of `image` and remove its containers; returns their names."""
        return await self._guard(self.daemon.remove_pool(image))

    @method()
    def List(self) -> "a(ssuso)":
        """Every container: name, state, leader PID (0 when not running), image, object path."""
        return [[r["name"], r["state"], r["leader_pid"] or 0, r["image"], container_path(r["name"])] for r in self.daemon.list()]

    @method()
    def ListJSON(self) -> "s":
        """The same as `tupper ps --json` (a convenience; ListContainers is the same, typed)."""
        return json.dumps(self.daemon.list())

    @method()
    def ListContainers(self) -> "aa{sv}":
        """Every container as `tupper ps --json` has it, typed: one a{sv} each."""
        return [variant_map(r) for r in self.daemon.list()]

    @method()
    async def GetContainerByPID(self, pid: "u") -> "o":
        """The container a host process belongs to (its cgroup is the container's), as machined's GetMachineByPID."""
        return container_path(await self._guard(self.daemon.container_of_pid(pid)))

    @method()
    def GetContainer(self, name: "s") -> "o":
        try:
            self.daemon.get(name)
        except TupperError as exc:
            raise dbus_error(exc) from None
        return container_path(name)

    @method()
    async def GetJSON(self, name: "s") -> "s":
        """The same as `tupper status NAME --json` (a convenience; GetStatus is the same, typed)."""
        return json.dumps((await self._guard(self.daemon.status(name))).to_json())

    @method()
    async def GetStatus(self, name: "s") -> "a{sv}":
        """`tupper status NAME --json`, typed: the record, the state, the units read from the container's systemd."""
        return variant_map((await self._guard(self.daemon.status(name))).to_json())

    @method()
    async def InspectJSON(self, name: "s") -> "s":
        """Everything about one container as JSON (a convenience; Inspect is the same, typed)."""
        return json.dumps(await self._guard(self.daemon.inspect(name)))

    @method()
    async def Inspect(self, name: "s") -> "a{sv}":
        """Everything about one container (`tupper inspect --json`), typed: record, root, machine name,
        cgroups, mounts, components with digests, last exit, the image's os-release."""
        return variant_map(await self._guard(self.daemon.inspect(name)))

    @method()
    @privileged
    async def Start(self, name: "s") -> "o":
        """Boot a stopped (or crash-looping) container again; returns the job (a running one: a job
        that is done at once)."""
        return (await self._guard(self.daemon.start_job(name))).path

    @method()
    @privileged
    async def Stop(self, name: "s", timeout: "d") -> "o":
        """PowerOff, SIGKILL after timeout seconds (< 0: the spec's [stop] timeout); returns the job."""
        return (await self._guard(self.daemon.stop_job(name, None if timeout < 0 else timeout))).path

    @method()
    @privileged
    async def Restart(self, name: "s", timeout: "d") -> "o":
        """Stop (SIGKILL after timeout seconds; < 0: the spec's) then start again; returns the job."""
        return (await self._guard(self.daemon.restart_job(name, None if timeout < 0 else timeout))).path

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
        """What `tupper stats --no-stream --json NAME…` prints (a convenience; GetStats is the same, typed)."""
        return json.dumps(await self._guard(self.daemon.stats(list(names))))

    @method()
    async def GetStats(self, names: "as") -> "aa{sv}":
        """CPU, memory, IO, pids and pressure of each container (no names: every running one) and its
        components, from their cgroups, typed."""
        return [variant_map(s) for s in await self._guard(self.daemon.stats(list(names)))]

    @method()
    async def ListImages(self) -> "aa{sv}":
        """The store's images, as `tupper image ls --json` lists them (name, suite, built_at, used_by, …)."""
        return [variant_map(i) for i in await self._guard(self.daemon.list_images())]

    @method()
    async def ListComponents(self) -> "aa{sv}":
        """Installed components, as `tupper component ls --json` lists them (name, version, digest, used_by, …)."""
        return [variant_map(c) for c in await self._guard(self.daemon.list_components())]

    @method()
    async def ListVolumes(self) -> "aa{sv}":
        """Named volumes, as `tupper volume ls --json` lists them (name, path, created_at, used_by)."""
        return [variant_map(v) for v in await self._guard(self.daemon.list_volumes())]

    @method()
    async def InspectVolume(self, name: "s") -> "a{sv}":
        """One named volume with its size (a walk of its files), as `tupper volume inspect --json`."""
        return variant_map(await self._guard(self.daemon.inspect_volume(name)))

    @method()
    async def GetStore(self) -> "a{sv}":
        """The store as `tupper store info --json` shows it: path, backend, backing, size, used, free, pool file."""
        return variant_map(await self._guard(self.daemon.store_info()))

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

    @prop("const")
    def Version(self) -> "s":
        from tupper import __version__

        return __version__

    @prop("const")
    def StoreRoot(self) -> "s":
        return str(self.daemon.runtime.store.root)

    @prop("false")
    def PoolUsage(self) -> "t":
        """Bytes used in the store's filesystem (changes with every write: read it, no signal)."""
        return int(self.daemon.runtime.store.info()["used"])

    @prop("false")
    def PoolLimit(self) -> "t":
        """The store filesystem's size in bytes (a loopback pool can be grown: read it, no signal)."""
        return int(self.daemon.runtime.store.info()["size"])

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

    @signal()
    def JobRemoved(self, job_id: "u", path: "o", container: str, verb: str, result: str) -> "uosss":
        """A job has ended: result is done, failed or canceled (as systemd's JobRemoved)."""
        return [job_id, path, container, verb, result]


class JobInterface(ServiceInterface):
    """One Run, Start, Stop or Restart under way (or ended less than a minute ago)."""

    def __init__(self, job) -> None:
        super().__init__(JOB_IFACE)
        self.job = job

    @prop("const")
    def Id(self) -> "u":
        return self.job.id

    @prop("const")
    def Verb(self) -> "s":
        """run, start, stop or restart."""
        return self.job.verb

    @prop("const")
    def Container(self) -> "s":
        return self.job.container

    @prop("true")
    def State(self) -> "s":
        """running, then done, failed or canceled."""
        return self.job.state

    @prop("true")
    def Error(self) -> "s":
        """Why a failed job failed ("" otherwise): the message Wait's error carries."""
        return self.job.error

    @method()
    async def Wait(self) -> "a{sv}":
        """Answer once the job has ended: its result (run: the record, units and seconds, as `tupper run
        --json`; the others: name and state), or the error it ended with (org.tupper1.Error.*)."""
        return variant_map(await guarded(self.job.wait()))


_UNSET = object()


class ContainerInterface(ServiceInterface):
    def __init__(self, daemon, name: str) -> None:
        super().__init__(CONTAINER_IFACE)
        self.daemon = daemon
        self.container = name  # not `name`: ServiceInterface.name is the interface's name
        self._published: dict[str, object] = {}  # what PropertiesChanged last said (publish)
        self._held = None  # the record, while publish reads every property from it (one read, not one each)

    def _rec(self):
        return self._held if self._held is not None else self.daemon.get(self.container)

    @contextlib.contextmanager
    def holding(self, rec):
        """Properties read from `rec` while this lasts: a caller that reads them all (publish, the export's
        InterfacesAdded) reads the record once, not once per property."""
        self._held = rec
        try:
            yield
        finally:
            self._held = None

    async def _guard(self, coro):
        return await guarded(coro)

    def publish(self, rec=None) -> None:
        """PropertiesChanged with every property annotated "true" whose value differs from the one last
        announced (or first read): called after each thing that can change them, so the annotation holds.
        `rec`: the container's record, if the caller has just read it (else it is read once, here)."""
        from tupper.daemon.typed import emitting

        changed = {}
        try:
            with self.holding(rec if rec is not None else self.daemon.get(self.container)):
                for name, emits in emitting(self).items():
                    if emits != "true":
                        continue
                    value = getattr(self, name)
                    if self._published.get(name, _UNSET) != value:
                        self._published[name] = value
                        changed[name] = value
        except TupperError:  # the record went away under us: nothing to announce
            return
        if changed:
            self.emit_properties_changed(changed)

    @prop("const")
    def Name(self) -> "s":
        return self.container

    @prop("true")
    def State(self) -> "s":
        return self.daemon.state_of(self.container, self._held)

    @prop("const")
    def Image(self) -> "s":
        return self._rec().image

    @prop("true")
    def LeaderPID(self) -> "u":
        """The host pid of the container's nspawn (0 when not running)."""
        rec = self._rec()
        return rec.leader_pid if rec.alive() else 0

    @prop("true")
    def StartedAt(self) -> "t":
        """Microseconds since the epoch (0: never started)."""
        return int(self._rec().started_at * 1_000_000)

    @prop("const")
    def Components(self) -> "as":
        return [c.name for c in self._rec().components]

    @prop("true")
    def Versions(self) -> "a{ss}":
        """Component -> installed version it runs (changes with an upgrade)."""
        return {c.name: c.version for c in self._rec().components}

    @prop("true")
    def Units(self) -> "as":
        """The component units (an upgrade may change them)."""
        return list(self._rec().units)

    @prop("const")
    def RestartPolicy(self) -> "s":
        return self._rec().restart_policy

    @prop("const")
    def NetworkMode(self) -> "s":
        """private, host or none."""
        return self._rec().network.mode

    @prop("const")
    def Network(self) -> "s":
        """The network it joins in private mode ("" in host or none mode)."""
        rec = self._rec()
        return rec.network.network if rec.network.mode == "private" else ""

    @prop("true")
    def Address(self) -> "s":
        """Its IPv4 address on its network while it runs ("" otherwise)."""
        rec = self._rec()
        return rec.address if rec.alive() else ""

    @prop("true")
    def Address6(self) -> "s":
        rec = self._rec()
        return rec.address6 if rec.alive() else ""

    @prop("const")
    def Ports(self) -> "a(qqss)":
        """Published ports: host port, container port, protocol (tcp, udp), host address ("" all)."""
        return [[p.host, p.container, p.protocol, p.address] for p in self._rec().network.ports]

    @prop("const")
    def Labels(self) -> "a{ss}":
        """The spec's [labels]."""
        return dict(self._rec().labels)

    @prop("const")
    def Secrets(self) -> "a{ss}":
        """Credential ID -> secret name granted to this container (names only, never values)."""
        return dict(self._rec().grants)

    @method()
    @privileged
    async def Start(self) -> "o":
        """As Manager.Start: returns the job."""
        return (await self._guard(self.daemon.start_job(self.container))).path

    @method()
    @privileged
    async def Stop(self, timeout: "d") -> "o":
        """As Manager.Stop: returns the job."""
        return (await self._guard(self.daemon.stop_job(self.container, None if timeout < 0 else timeout))).path

    @method()
    @privileged
    async def Restart(self, timeout: "d") -> "o":
        """As Manager.Restart: returns the job."""
        return (await self._guard(self.daemon.restart_job(self.container, None if timeout < 0 else timeout))).path

    @method()
    @privileged
    async def Kill(self, signal_number: "i") -> "s":
        return await self._guard(self.daemon.kill(self.container, signal_number))

    @prop("true")
    def Health(self) -> "a{ss}":
        """Component -> starting, healthy or unhealthy, for the components with a health check."""
        return self.daemon.health_of(self.container, self._held)

    @prop("true")
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
