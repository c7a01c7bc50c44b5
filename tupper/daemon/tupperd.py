"""tupperd: owns org.tupper1 on the system bus and supervises every container of one store.

The daemon keeps no state of its own that is not on disk: at start it re-adopts every container from
its record and /proc (watching its nspawn with a pidfd, following its units over the container's own
bus), so a SIGKILLed tupperd loses nothing. SIGTERM leaves containers running.
"""

from __future__ import annotations

import argparse
import asyncio
import builtins
import concurrent.futures
import contextlib
import functools
import heapq
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import attrs
from dbus_next.constants import NameFlag, RequestNameReply

from tupper import proc
from tupper.busnames import JOB_PREFIX, error_text
from tupper.container.kmsg import KernelLog, OOMKill
from tupper.container.systemd import UnitWatch
from tupper.daemon import api
from tupper.daemon.agent import Agent
from tupper.daemon.pools import PoolKeeper
from tupper.errors import Failed, InvalidInput, NotFound, TupperError
from tupper.model import spec as specmod
from tupper.model.health import Tracker
from tupper.progress import Progress
from tupper.runtime import limits, shells
from tupper.runtime.records import Record
from tupper.runtime.runtime import OOMCounter, RunFailed, Runtime, UpdateResult
from tupper.runtime.status import ComponentHealth, ContainerStatus, UnitStatus, container_state
from tupper.store.secrets import SecretStore
from tupper.store.store import Store

log = logging.getLogger("tupperd")

# Restart policy (spec [restart]): the n-th consecutive failure waits delay * 2**(n-1) s (at most
# RESTART_MAX_DELAY); after `limit` consecutive failures the container is left in state "crash-loop".
# A container that ran for STABLE_AFTER s before failing starts counting from zero again.
RESTART_MAX_DELAY = 60.0
STABLE_AFTER = 60.0
# OOM kills of processes that are not a unit's main process change no unit state: counters are read this often.
OOM_SWEEP = 2.0
# Checks of healthy components fall due on multiples of this (s), so those of many containers go out together.
HEALTH_TICK = 0.25
OOM_RECORDS = 100  # kernel OOM records kept for containers that have not looked yet
SESSION_KEPT = 60.0  # seconds an ended shell session's exit code waits for ShellExit
JOB_KEPT = 60.0  # seconds an ended job stays on the bus (its State, Error and Wait)



class SignalProgress(Progress):
    """Progress of an operation, sent as Manager.Progress signals (from worker threads)."""

    def __init__(self, daemon: Daemon, name: str) -> None:
        self.daemon = daemon
        self.name = name

    def _emit(self, kind: str, text: str) -> None:
        self.daemon.call_soon(self.daemon.manager.Progress, self.name, kind, text)

    @contextlib.contextmanager
    def step(self, text: str):
        t0 = time.monotonic()
        self._emit("step", text)
        try:
            yield
        except BaseException:
            self._emit("failed", text)
            raise
        self._emit("done", f"{text} ({time.monotonic() - t0:.2f}s)")

    def update(self, text: str) -> None:
        self._emit("update", text)

    def note(self, text: str) -> None:
        self._emit("note", text)


@attrs.define(eq=False)
class Watched:
    """What the daemon holds for one container it supervises."""

    name: str
    iface: api.ContainerInterface
    pidfd: int | None = None
    nspawn_pid: int = 0
    units: UnitWatch | None = None  # its units' state changes, forwarded as UnitStateChanged
    failures: int = 0
    restart_task: asyncio.Task | None = None
    deliberate: bool = False  # stopped or killed on purpose: no restart
    state: str = ""
    lock: asyncio.Lock = attrs.Factory(asyncio.Lock)
    unit_states: dict[str, str] = attrs.Factory(dict)  # component unit -> ActiveState, as its systemd last said
    transition: str | None = None  # "starting" or "stopping" while tupperd does it (said before the record says it)
    health: dict[str, Tracker] = attrs.Factory(dict)  # component -> its health check's tracker
    health_leader: int = 0  # the PID 1 its checks reach the container through
    health_generation: int = 0  # +1 at every attach and detach: queued checks of an older one are dropped
    oom_kills: dict[str, int] = attrs.Factory(dict)  # component ("" for the container) -> OOM kills seen
    oom: OOMCounter | None = None  # where they are counted

    def health_view(self) -> tuple[ComponentHealth, ...]:
        return tuple(ComponentHealth(c, t.state, t.check.describe(), t.detail, t.restarts) for c, t in sorted(self.health.items()))


@attrs.define(eq=False)
class Job:
    """A Run, Start, Stop or Restart under way: an object on the bus (api.JobInterface) from the moment
    the method answers until JOB_KEPT seconds after it ended."""

    id: int
    verb: str
    container: str
    task: asyncio.Future | None = None
    iface: api.JobInterface | None = None
    state: str = "running"  # then done, failed or canceled
    error: str = ""

    @property
    def path(self) -> str:
        return f"{JOB_PREFIX}/{self.id}"

    async def wait(self) -> dict:
        assert self.task is not None
        return await asyncio.shield(self.task)


Due = tuple["Watched", int, str, Tracker, float]  # a check due: container, its health generation, component, tracker, delay


REFILL_DELAY = 0.2  # seconds after a run before the pool keeper may boot a replacement
WORKERS = 128  # threads for blocking calls (see serve)
# Containers booting at once (Runtime.boots); the others wait their turn (said as progress); a claim from a
# warm pool boots nothing and never waits. All at once is slower: 50 systemd boots sharing two CPUs with
# tupperd's Python finished together, later than in batches (docs/benchmarks.md, "Cold start at scale").
BOOTS = max(4, 3 * (os.cpu_count() or 1))
# Seconds after a start before tupperd subscribes to the container's unit changes (and looks at its OOM
# counters): the start's answer goes out first. A change in between is caught: _follow_units reads the
# units' states once subscribed.
FOLLOW_DELAY = 0.05


class Daemon:
    def __init__(self, runtime: Runtime, bus: api.TupperBus) -> None:
        self.runtime = runtime
        self.bus = bus
        self.loop = asyncio.get_running_loop()
        self.manager = api.ManagerInterface(self)
        self.watched: dict[str, Watched] = {}
        self.creating: set[str] = set()
        self.tasks: set[asyncio.Task] = set()  # background work that must not be collected half-way
        self.secrets = SecretStore(runtime.store)
        self.agents: dict[str, Agent] = {}
        self.sessions: dict[str, shells.Session] = {}  # shell sessions by id (their unit's name)
        self.jobs: dict[int, Job] = {}
        self.job_seq = 0
        runtime.serves_secrets = True
        self.health_queue: builtins.list[tuple[float, int, Watched, int, str, float]] = []  # (due, seq, …): a heap
        self.health_seq = 0
        self.health_wakeup = asyncio.Event()
        self.kmsg: KernelLog | None = None  # which processes the OOM killer kills (opened in begin)
        self.pools = PoolKeeper(runtime, busy=lambda: bool(self.creating))
        self.oom_records: builtins.list[OOMKill] = []

    def call_soon(self, fn, *args) -> None:
        if threading.current_thread() is threading.main_thread():
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    # ---- start-up and re-adoption ---------------------------------------------------------------

    async def begin(self) -> None:
        """Claim the store, finish what a crash left half-done, re-adopt every container on disk,
        export the API, then take the bus name."""
        self.store_claim = self.runtime.store.claim_for_daemon()
        try:
            self.kmsg = KernelLog.open()
        except OSError as exc:
            log.info("cannot read the kernel log (%s): OOM kills will be counted, not named", exc.strerror)
        await asyncio.to_thread(self._recover)
        self.bus.export(api.MANAGER_PATH, self.manager)
        for rec in self.runtime.records():
            if rec.pool:
                continue  # a warm pool's: the pool keeper looks after it (tupper.daemon.pools)
            await self._track(rec, announce=False)
            if rec.alive() and rec.grants:
                await self._redeliver(rec)
        reply = await self.bus.request_name(api.BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise Failed(f"cannot own {api.BUS_NAME} on the system bus ({reply.name}): another tupperd runs, or the policy forbids it")
        log.info("tupperd ready: %d container(s) adopted, store %s", len(self.watched), self.runtime.store.root)

    def _recover(self) -> None:
        """Operations a dead process left half-done are finished or undone, its scratch space removed;
        anything else `tupper store check` would report is logged (not repaired: that is the admin's call)."""
        from tupper.runtime import check

        store = self.runtime.store
        for rec in self.runtime.records():
            try:
                if (done := self.runtime.recover(rec)) is not None:
                    log.warning("%s: %s", rec.name, done)
            except (TupperError, OSError) as exc:
                log.error("%s: could not recover from an interrupted %s: %s", rec.name, rec.phase, exc)
        for entry in store.stale_scratch():
            try:
                store.remove_tree(entry)
                log.info("removed %s, left by a process that is gone", entry)
            except (TupperError, OSError) as exc:
                log.error("could not remove %s: %s", entry, exc)
        # Half-written files of atomic writes cut by a kill (the file they were to replace is whole).
        for path in check.stale_temps(store.root):
            try:
                path.unlink()
                log.info("removed %s, half-written by a process that is gone", path)
            except OSError as exc:
                log.error("could not remove %s: %s", path, exc)
        # Agent directories are tupperd's own: those of containers that are gone (a run cut short) go too.
        agents = store.agents_dir
        granted = {r.name for r in self.runtime.records() if r.grants}
        for d in sorted(agents.iterdir()) if agents.is_dir() else []:
            if d.name not in granted:
                shutil.rmtree(d, ignore_errors=True)
        # Re-adoption of the network: the nftables table, hosts files and addresses, rebuilt from the store.
        try:
            self.runtime.net.sync()
        except (TupperError, OSError) as exc:
            log.error("could not rebuild the containers' network state: %s", exc)
        for finding in check.check(self.runtime):
            log.warning("store check: %s: %s (tupper store check --repair would %s)", finding.path, finding.detail, finding.repair)

    async def _redeliver(self, rec: Record) -> None:
        """A unit that (re)started while no tupperd served its secrets (a rotation cut short by a crash)
        failed to load its credentials: now that the agent is back, start it again."""
        try:
            status = await asyncio.to_thread(self.runtime.status, rec.name)
            for unit in status.units:
                if unit.name in rec.credential_grants() and unit.state.active_state == "failed":
                    result = await self.unit_job(rec.name, unit.name, "RestartUnit")
                    log.warning("%s: %s had failed while no agent served its credentials: restarted (%s)", rec.name, unit.name, result)
        except (TupperError, OSError) as exc:
            log.error("%s: could not restart units that missed their credentials: %s", rec.name, exc)

    async def _track(self, rec: Record, *, announce: bool = True, started: bool = False) -> Watched:
        w = self.watched.get(rec.name)
        if w is None:
            w = Watched(rec.name, api.ContainerInterface(self, rec.name))
            self.watched[rec.name] = w
            with w.iface.holding(rec):  # the export's InterfacesAdded carries every property
                self.bus.export(api.container_path(rec.name), w.iface)
            if announce:
                self.manager.ContainerAdded(rec.name, api.container_path(rec.name))
        w.state = rec.state()
        if rec.grants:
            await self._open_agent(rec.name)
        if announce:
            self.manager.ContainerStateChanged(rec.name, w.state)
        if rec.alive():
            await self._attach(w, rec, started=started)
        return w

    async def _open_agent(self, name: str, fallback: dict[str, dict[str, str]] | None = None) -> None:
        """The container's secrets agent; it reads the grants from the record (or `fallback` while the
        record does not exist yet, during a run)."""
        if name in self.agents:
            return

        def grants() -> dict[str, dict[str, str]]:
            try:
                return self.runtime.record(name).credential_grants()
            except NotFound:
                return fallback or {}

        agent = Agent(name, self.secrets, grants, self.runtime.store.agent_dir(name))
        await agent.open()
        self.agents[name] = agent

    async def _close_agent(self, name: str) -> None:
        agent = self.agents.pop(name, None)
        if agent is not None:
            await agent.close()

    def _untrack(self, name: str) -> None:
        w = self.watched.pop(name, None)
        if name in self.agents:
            asyncio.ensure_future(self._close_agent(name))
        if w is None:
            return
        self._detach(w)
        if w.restart_task:
            w.restart_task.cancel()
        self.bus.unexport(api.container_path(name))
        self.manager.ContainerRemoved(name, api.container_path(name))

    async def _attach(self, w: Watched, rec: Record, *, started: bool = False) -> None:
        """Watch the container's nspawn (pidfd), follow its units over its own bus, check its components'
        health, count its OOM kills. `started`: we just started it (its units were active a moment ago,
        its checks passed, every OOM kill in its fresh cgroups is news): the call that started it is
        answered at once and the units are followed from a task, which then reads where they stand
        (catching a change made before its subscription). Else it is adopted: followed, then read, before
        this returns (checks start over; kills so far are old news)."""
        self._detach(w)
        try:
            fd = os.pidfd_open(rec.nspawn_pid)
        except ProcessLookupError:
            return
        if not proc.pid_alive(rec.nspawn_pid, rec.nspawn_starttime):  # the pid was reused
            os.close(fd)
            return
        w.pidfd, w.nspawn_pid = fd, rec.nspawn_pid
        self.loop.add_reader(fd, lambda: asyncio.ensure_future(self._on_exit(w, fd)))
        if started:
            w.oom = self.runtime.oom_counter(rec)
            self._start_health(w, rec, healthy=True)
            self._set_state(w, rec)
            generation = w.health_generation

            def follow() -> None:  # once the answer to the start has gone out: it waits for none of this
                if w.pidfd != fd or w.health_generation != generation:
                    return  # stopped (or re-attached) in between
                self._check_oom(w)
                task = asyncio.ensure_future(self._follow_units(w, rec, fd))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

            self.loop.call_later(FOLLOW_DELAY, follow)
            return
        await self._follow_units(w, rec, fd)
        if w.pidfd != fd:
            return
        w.oom = self.runtime.oom_counter(rec)
        # Adopted: where its units and OOM counters stand now; changes arrive as signals from here on.
        try:
            status = await asyncio.to_thread(self.runtime.status, rec.name, ())
            if w.pidfd == fd:
                w.unit_states.update({u.name: u.state.active_state for u in status.units})
                w.oom_kills = {"": status.oom_kills, **dict(status.component_oom_kills)}
        except (TupperError, OSError) as exc:
            log.warning("%s: cannot read its units' state: %s", rec.name, exc)
        if w.pidfd == fd:
            self._start_health(w, rec, healthy=False)
            self._set_state(w)
            self._check_oom(w)

    async def _follow_units(self, w: Watched, rec: Record, fd: int) -> None:
        """Subscribe to the container's unit changes (`_on_unit`); then, for a container just started,
        report any unit that is no longer active (it changed before the subscription took)."""
        try:
            await self._subscribe_units(w, rec)
            if w.units is None or w.pidfd != fd:
                return
            for unit, (active, sub) in (await w.units.states()).items():
                if w.pidfd == fd and active != "active" and w.unit_states.get(unit) != active:
                    self._on_unit(w, unit, active, sub)
        except Exception as exc:  # noqa: BLE001 - the container runs without unit signals; say so
            if w.pidfd == fd:
                log.warning("%s: cannot follow its units over its bus: %s", rec.name, exc)

    def _detach(self, w: Watched) -> None:
        w.health_generation += 1
        w.health.clear()
        w.unit_states.clear()
        w.oom_kills.clear()
        w.oom = None
        if w.pidfd is not None:
            self.loop.remove_reader(w.pidfd)
            os.close(w.pidfd)
            w.pidfd = None
        if w.units is not None:
            w.units.close()
            w.units = None

    async def _subscribe_units(self, w: Watched, rec: Record) -> None:
        pidfd = w.pidfd
        watch = await UnitWatch.open(rec.leader_pid, rec.units, lambda unit, active, sub: self._on_unit(w, unit, active, sub))
        if w.pidfd != pidfd or pidfd is None:  # stopped or re-attached while we connected: not ours to keep
            watch.close()
            return
        w.units = watch

    def _on_unit(self, w: Watched, unit: str, active: str, sub: str) -> None:
        w.iface.UnitStateChanged(unit, active, sub)
        if active:
            w.unit_states[unit] = active
            self._set_state(w)
            if active in ("failed", "inactive", "activating"):  # a death: perhaps the OOM killer's
                self._check_oom(w)

    # ---- health (liveness) ----------------------------------------------------------------------

    def _start_health(self, w: Watched, rec: Record, *, healthy: bool) -> None:
        now = time.monotonic()
        w.health = {c.name: Tracker(c.health.resolve(dict(c.env)), since=now, state="healthy" if healthy else "starting")
                    for c in rec.components if c.health}
        w.health_leader = rec.leader_pid
        w.health_generation += 1
        for component, tracker in w.health.items():
            self._schedule_check(w, component, tracker, None)

    def _schedule_check(self, w: Watched, component: str, tracker: Tracker, previous: float | None) -> None:
        """Queue the component's next check: soon while it starts, else at its interval, rounded up to
        HEALTH_TICK so that the checks of many containers fall due together and go out as one batch."""
        delay = tracker.next_delay(previous)
        due = time.monotonic() + delay
        if tracker.state != "starting":
            due = math.ceil(due / HEALTH_TICK) * HEALTH_TICK
        self.health_seq += 1
        heapq.heappush(self.health_queue, (due, self.health_seq, w, w.health_generation, component, delay))
        self.health_wakeup.set()

    async def _health_scheduler(self) -> None:
        """Every checked component of every container, from one queue: wake when the first is due, hand
        every due http and tcp check to a worker thread as one batch, each exec check to its own."""
        while True:
            if not self.health_queue:
                await self.health_wakeup.wait()
                self.health_wakeup.clear()
                continue
            wait = self.health_queue[0][0] - time.monotonic()
            if wait > 0:
                self.health_wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.health_wakeup.wait(), wait)  # an earlier check may be queued meanwhile
                continue
            now = time.monotonic()
            batch: builtins.list[Due] = []
            execs: builtins.list[Due] = []
            while self.health_queue and self.health_queue[0][0] <= now:
                _, _, w, generation, component, delay = heapq.heappop(self.health_queue)
                tracker = w.health.get(component)
                if generation != w.health_generation or tracker is None:
                    continue  # the container stopped or restarted since: its checks started over
                (execs if tracker.check.kind == "exec" else batch).append((w, generation, component, tracker, delay))
            for group in ([batch] if batch else []) + [[e] for e in execs]:
                asyncio.ensure_future(self._run_checks(group))

    async def _run_checks(self, group: builtins.list[Due]) -> None:
        results = await asyncio.to_thread(self.runtime.run_checks, [(t.check, w.health_leader) for w, _, _, t, _ in group])
        for (w, generation, component, tracker, delay), result in zip(group, results, strict=True):
            if generation != w.health_generation:
                continue
            before = tracker.state
            action = tracker.feed(result.ok, result.detail, time.monotonic())
            if action == "restart":
                self._health_changed(w, component, tracker)
                asyncio.ensure_future(self._restart_component(w, generation, component, tracker))
                continue  # checked again once the restart is done
            if tracker.state != before:
                self._health_changed(w, component, tracker)
            self._schedule_check(w, component, tracker, delay if tracker.state == "starting" else None)

    async def _restart_component(self, w: Watched, generation: int, component: str, tracker: Tracker) -> None:
        """Restart the component's service units through the container's systemd, then check it often again."""
        try:
            rec = self.runtime.record(w.name)
        except NotFound:
            return
        entry = rec.component(component)
        units = [u for u in (entry.units if entry else ()) if u.endswith(".service")]
        log.warning("%s: %s failed its health check %d time(s) in a row (%s: %s): restarting %s (restart %d of at most %d in a row)",
                    w.name, component, tracker.check.retries, tracker.check.describe(), tracker.detail, ", ".join(units),
                    tracker.streak, tracker.limit)
        async with w.lock:
            for unit in units:
                if generation != w.health_generation:
                    return  # stopped meanwhile
                try:
                    await asyncio.to_thread(self.runtime.unit_job, w.name, unit, "RestartUnit")
                except (TupperError, OSError) as exc:
                    log.warning("%s: could not restart %s: %s", w.name, unit, exc.message if isinstance(exc, TupperError) else exc)
        if generation == w.health_generation:
            tracker.since = time.monotonic()  # the start deadline counts from the restart's end
            self._schedule_check(w, component, tracker, None)

    def _health_changed(self, w: Watched, component: str, tracker: Tracker) -> None:
        if tracker.state == "unhealthy":
            log.warning("%s: %s is unhealthy after %d restart(s): %s", w.name, component, tracker.streak, tracker.detail)
        else:
            log.info("%s: %s is %s (%s)", w.name, component, tracker.state, tracker.detail)
        self.manager.HealthChanged(w.name, component, tracker.state, tracker.detail)
        self._set_state(w)  # publishes Health with the state

    # ---- OOM kills ------------------------------------------------------------------------------

    def _check_oom(self, w: Watched) -> None:
        """Announce OOM kills since the last look (after a unit died, and every OOM_SWEEP s): a few small
        cgroup files, read on the loop; when a count moved, the kernel's log says which process died
        and in which component (one OOMKilled per kill; without the log, one per count that moved)."""
        if w.oom is None:
            return
        total, per = w.oom.read()
        counts = {"": total, **per}
        before = dict(w.oom_kills)
        grew = {c: k for c, k in counts.items() if k > before.get(c, 0)}
        if not grew:
            return
        w.oom_kills.update(grew)
        kills = self._kernel_oom_kills(w.oom)
        for component, kill in kills:
            units = ", ".join(u for u, c in w.oom.units if c == component)
            log.warning("%s: the OOM killer killed %s (pid %d) in %s (memory cgroup %s); %d kill(s) since it started",
                        w.name, kill.task, kill.pid, f"component {component} ({units})" if component else "the container",
                        kill.memcg, total)
            self.manager.OOMKilled(w.name, component, counts.get(component, total), kill.pid, kill.task)
        if not kills:
            for component, count in grew.items():
                if component or total > sum(per.values()):  # the container's count also moves with its components'
                    log.warning("%s: the OOM killer killed %d process(es) in %s", w.name, count - before.get(component, 0),
                                f"component {component}" if component else "the container")
                    self.manager.OOMKilled(w.name, component, count, 0, "")

    def _kernel_oom_kills(self, counter: OOMCounter) -> list[tuple[str, OOMKill]]:
        """The kernel's records of kills in this container not yet announced, with their component. The
        log is read once for every container: records of others wait for their own look."""
        if self.kmsg is not None:
            try:
                self.oom_records += self.kmsg.oom_kills()
            except OSError as exc:
                log.warning("cannot read the kernel log (%s): OOM kills are counted, not named", exc)
                self.kmsg.close()
                self.kmsg = None
            del self.oom_records[:-OOM_RECORDS]
        mine = [(c, k) for k in self.oom_records if (c := counter.component_of(k)) is not None]
        for _, k in mine:
            self.oom_records.remove(k)
        return mine

    async def _oom_sweep(self) -> None:
        while True:
            await asyncio.sleep(OOM_SWEEP)
            for w in list(self.watched.values()):
                try:
                    self._check_oom(w)
                except OSError as exc:
                    log.debug("%s: OOM counters: %s", w.name, exc)

    # ---- state ------------------------------------------------------------------------------

    def get(self, name: str) -> Record:
        specmod.check_name(name, "container name")
        if name not in self.watched:
            raise NotFound(f"no container {name!r}", hint="see `tupper ps`")
        return self.runtime.record(name)

    def state_of(self, name: str, rec: Record | None = None) -> str:
        """`rec`: its record, if the caller has just read it."""
        rec = rec if rec is not None and name in self.watched else self.get(name)
        return self._state(self.watched[name], rec)

    def health_of(self, name: str, rec: Record | None = None) -> dict[str, str]:
        if rec is None or name not in self.watched:
            self.get(name)
        return {h.component: h.state for h in self.watched[name].health_view()}

    def _state(self, w: Watched, rec: Record) -> str:
        """The record's state, or `degraded` for a running container with a failed component unit or an
        unhealthy component (what this daemon follows of it)."""
        if w.transition:
            return w.transition
        failed = any(state == "failed" for unit, state in w.unit_states.items() if unit in rec.units)
        return container_state(rec.state(), failed, w.health_view())

    def _set_state(self, w: Watched, rec: Record | None = None) -> str:
        """Publish the container's state if it changed; `rec`: its record, if the caller holds it fresh."""
        try:
            rec = rec or self.runtime.record(w.name)
            state = self._state(w, rec)
        except NotFound:
            return w.state
        if state != w.state:
            w.state = state
            self.manager.ContainerStateChanged(w.name, state)
        w.iface.publish(rec)  # State, LeaderPID, StartedAt, addresses…: whatever changed with it
        return state

    @contextlib.contextmanager
    def _transition(self, w: Watched, state: str):
        """starting or stopping, said at once (ContainerStateChanged, State) and held while tupperd does
        it; then the state the record has is published, on every path."""
        w.transition = state
        self._set_state(w)
        try:
            yield
        finally:
            w.transition = None
            self._set_state(w)

    def list(self) -> builtins.list[dict]:
        out = []
        for name in sorted(self.watched):
            try:
                rec = self.runtime.record(name)
            except NotFound:
                continue
            w = self.watched[name]
            entry = rec.to_json()
            entry["state"] = self._state(w, rec)
            health = {h.component: h.to_json() for h in w.health_view()}
            for c in entry["components"]:
                if c["name"] in health:
                    c["health"] = health[c["name"]]
            out.append(entry)
        return out

    async def status(self, name: str) -> ContainerStatus:
        self.get(name)
        w = self.watched[name]
        # Health as this daemon's checks know it (a container it does not check: none, not a check now).
        return await asyncio.to_thread(self.runtime.status, name, w.health_view())

    async def stats(self, names: builtins.list[str]) -> builtins.list[dict]:
        for name in names:
            self.get(name)
        found = await asyncio.to_thread(self.runtime.stats, names or None)
        return [s.to_json() for s in found if s.name in self.watched]

    async def inspect(self, name: str) -> dict:
        self.get(name)
        return await asyncio.to_thread(self.runtime.inspect, name)

    async def units(self, name: str) -> builtins.list[UnitStatus]:
        return list((await self.status(name)).units)

    # ---- jobs ---------------------------------------------------------------------------------

    def submit(self, verb: str, container: str, coro) -> Job:
        """Run `coro` as a job: on the bus at once, JobRemoved and its State when it ends."""
        self.job_seq += 1
        job = Job(self.job_seq, verb, container)
        job.iface = api.JobInterface(job)
        self.bus.export(job.path, job.iface)
        self.jobs[job.id] = job
        job.task = asyncio.ensure_future(coro)
        job.task.add_done_callback(lambda task: self._job_done(job, task))
        return job

    def _job_done(self, job: Job, task: asyncio.Future) -> None:
        if task.cancelled():
            job.state = "canceled"
        elif (exc := task.exception()) is not None:
            job.state = "failed"
            job.error = error_text(exc) if isinstance(exc, TupperError) else f"{type(exc).__name__}: {exc}"
        else:
            job.state = "done"
        assert job.iface is not None
        job.iface.emit_properties_changed({"State": job.state, "Error": job.error})
        self.manager.JobRemoved(job.id, job.path, job.container, job.verb, job.state)
        self.loop.call_later(JOB_KEPT, self._forget_job, job)

    def _forget_job(self, job: Job) -> None:
        if self.jobs.pop(job.id, None) is not None:
            self.bus.unexport(job.path, job.iface)

    async def start_job(self, name: str) -> Job:
        self._watched(name)  # a name that does not exist is refused by the method, not by its job
        return self.submit("start", name, self._result(name, self.start(name)))

    async def stop_job(self, name: str, timeout: float | None) -> Job:
        self._watched(name)
        return self.submit("stop", name, self._result(name, self.stop(name, timeout)))

    async def restart_job(self, name: str, timeout: float | None) -> Job:
        self._watched(name)
        return self.submit("restart", name, self._result(name, self.restart(name, timeout)))

    @staticmethod
    async def _result(name: str, coro) -> dict:
        return {"name": name, "state": await coro}

    # ---- operations ---------------------------------------------------------------------------

    async def run_file(self, spec_path: str, name: str | None, keep_failed: bool, cold: bool = False) -> Job:
        """The spec is read and checked here (its errors are the method's); the boot is the job's."""
        path = Path(spec_path)
        if not path.is_absolute():
            raise InvalidInput(f"{spec_path}: the daemon needs an absolute spec path")
        spec = await asyncio.to_thread(specmod.load, path, name, self.runtime.resolve_component)
        return self._run_job(spec, keep_failed, cold)

    async def run_text(self, text: str, base_dir: str, name: str | None, keep_failed: bool) -> Job:
        if not os.path.isabs(base_dir):
            raise InvalidInput(f"{base_dir}: base directory must be absolute")
        spec = await asyncio.to_thread(specmod.from_text, text, Path(base_dir), "<spec>", name, self.runtime.resolve_component)
        return self._run_job(spec, keep_failed)

    def _run_job(self, spec: specmod.Spec, keep_failed: bool, cold: bool = False) -> Job:
        if spec.name in self.creating or spec.name in self.watched:
            raise self.runtime.name_taken(spec)  # a run of the same name under way here: before its record exists
        self.creating.add(spec.name)
        return self.submit("run", spec.name, self._run(spec, keep_failed, cold))

    async def _run(self, spec: specmod.Spec, keep_failed: bool, cold: bool = False) -> dict:
        """The boot of a new container; spec.name is in self.creating (_run_job put it there)."""
        self.manager.ContainerStateChanged(spec.name, "starting")
        try:
            progress = SignalProgress(self, spec.name)
            if spec.grants:
                grants = dict(spec.grants)
                await self._open_agent(spec.name, {
                    unit: {c: grants[c] for c in use.component.secrets}
                    for use in spec.components if use.component.secrets for unit in use.component.service_units})
            try:
                result = await asyncio.to_thread(self.runtime.run, spec, keep_failed=keep_failed, progress=progress, cold=cold)
            except RunFailed as exc:
                if exc.kept:
                    await self._track(self.runtime.record(spec.name))
                else:
                    await self._close_agent(spec.name)
                raise
            except BaseException:
                if spec.name not in self.watched:
                    await self._close_agent(spec.name)
                raise
            rec = self.runtime.record(spec.name)
            w = await self._track(rec, started=True)
            self._set_state(w, rec)
            return result.to_json()
        finally:
            self.creating.discard(spec.name)
            # A claim took one: refill, once the answer has gone out (the boot would compete with it).
            self.loop.call_later(REFILL_DELAY, self.pools.poke)

    async def start(self, name: str) -> str:
        w = self._watched(name)
        if self.runtime.record(name).alive():
            return self.state_of(name)  # running already: nothing to do (as a stop of a stopped one)
        async with w.lock:
            if w.restart_task:
                w.restart_task.cancel()
                w.restart_task = None
            w.failures, w.deliberate = 0, False
            await self._start(w, SignalProgress(self, name))
        return self.state_of(name)

    async def _start(self, w: Watched, progress: Progress) -> None:
        rec = self.runtime.record(w.name)
        with self._transition(w, "starting"):
            await asyncio.to_thread(self.runtime.start, rec, progress=progress)
        await self._attach(w, self.runtime.record(w.name), started=True)
        self._set_state(w)

    async def restart(self, name: str, timeout: float | None) -> str:
        """stop, then start (a stopped container is just started): what `systemctl restart` is to a unit."""
        await self.stop(name, timeout)
        return await self.start(name)

    async def stop(self, name: str, timeout: float | None) -> str:
        w = self._watched(name)
        w.deliberate = True
        if w.restart_task:
            w.restart_task.cancel()
            w.restart_task = None
        async with w.lock:
            with self._transition(w, "stopping"):
                rec = await asyncio.to_thread(self.runtime.stop, name, timeout)
                self._detach(w)
            return self._set_state(w, rec)

    async def kill(self, name: str, signal_number: int) -> str:
        w = self._watched(name)
        if signal_number == signal.SIGKILL:
            w.deliberate = True  # killed on purpose: no restart
            if w.restart_task:
                w.restart_task.cancel()
        await asyncio.to_thread(self.runtime.kill, name, signal_number)
        if signal_number == signal.SIGKILL:
            await self._settle(w)
        return self.state_of(name)

    async def remove(self, name: str, force: bool) -> None:
        specmod.check_name(name, "container name")
        if name not in self.watched and name not in self.creating:
            # Not a container this daemon follows, but perhaps what is left of one (no or a damaged record).
            await asyncio.to_thread(self.runtime.remove, name, force=force)
            return
        w = self._watched(name)
        deliberate, w.deliberate = w.deliberate, True  # no restart while it goes
        if w.restart_task:
            w.restart_task.cancel()
        async with w.lock:
            try:
                await asyncio.to_thread(self.runtime.remove, name, force=force)  # refuses a running one without force
            except BaseException:
                w.deliberate = deliberate
                raise
        self._untrack(name)

    async def shutdown_all(self) -> builtins.list[str]:
        order = [r for r in self.runtime.shutdown_order() if r.name in self.watched]
        for rec in order:
            await self.stop(rec.name, None)
        return [r.name for r in order]

    async def exec(self, name: str, argv: builtins.list[str], stdin: int, stdout: int, stderr: int, *,
                   env: dict[str, str] | None = None, user: str | None = None, workdir: str | None = None) -> int:
        """The descriptors belong to the call: the bus closes them when the reply goes out (api.TupperBus)."""
        self._watched(name)
        return await asyncio.to_thread(functools.partial(self.runtime.exec_fds, name, argv, stdin, stdout, stderr,
                                                         env=env, user=user, workdir=workdir))

    async def open_shell(self, name: str, **options) -> shells.Session:
        """runtime.open_shell; the session's exit code is kept for ShellExit until it is read, or for a
        minute after the session ends (a caller that went away does not leave it here for ever)."""
        self._watched(name)
        session = await asyncio.to_thread(functools.partial(self.runtime.open_shell, name, **options))
        self.sessions[session.unit] = session

        def forget() -> None:
            self.sessions.pop(session.unit, None)

        def ended(_fut) -> None:  # in the session's thread
            self.loop.call_soon_threadsafe(lambda: self.loop.call_later(SESSION_KEPT, forget))

        session.exit.add_done_callback(ended)
        return session

    async def shell_exit(self, session_id: str) -> int:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound(f"no shell session {session_id!r} (it ended more than {SESSION_KEPT:.0f}s ago, or never was)")
        code = await asyncio.wrap_future(session.exit)
        self.sessions.pop(session_id, None)
        return code

    # ---- secrets ------------------------------------------------------------------------------

    def secret_holders(self) -> builtins.list[tuple[str, str, str]]:
        return [h for h in self.runtime.secret_holders() if h[0] in self.watched]

    async def rotate_secret(self, secret: str) -> builtins.list[str]:
        return await asyncio.to_thread(self.runtime.rotate_secret, secret)

    async def upgrade(self, name: str, component: str, version: str) -> dict:
        w = self._watched(name)
        async with w.lock:
            try:
                return await asyncio.to_thread(self.runtime.upgrade, name, component, version, SignalProgress(self, name))
            finally:
                w.iface.publish()  # Versions, Units

    async def update(self, name: str, component: str | None, changes: dict[str, str]) -> UpdateResult:
        w = self._watched(name)
        async with w.lock:
            result = await asyncio.to_thread(self.runtime.update, name, component, changes)
        w.iface.publish()  # Resources
        return result

    async def unit_job(self, name: str, unit: str, method: str) -> str:
        self._watched(name)
        return await asyncio.to_thread(self.runtime.unit_job, name, unit, method)

    # ---- the store ----------------------------------------------------------------------------

    async def list_images(self) -> builtins.list[dict]:
        return await asyncio.to_thread(self.runtime.list_images)

    async def list_components(self) -> builtins.list[dict]:
        return await asyncio.to_thread(self.runtime.list_components)

    async def list_volumes(self) -> builtins.list[dict]:
        return await asyncio.to_thread(self.runtime.list_volumes)

    async def inspect_volume(self, name: str) -> dict:
        return await asyncio.to_thread(self.runtime.inspect_volume, name)

    async def store_info(self) -> dict:
        return await asyncio.to_thread(self.runtime.store.info)

    async def container_of_pid(self, pid: int) -> str:
        name = await asyncio.to_thread(self.runtime.container_of_pid, pid)
        self._watched(name)
        return name

    # ---- networks -----------------------------------------------------------------------------

    # ---- warm pools -------------------------------------------------------------------------------

    async def set_pool(self, image: str, size: int) -> dict:
        view = await asyncio.to_thread(self.runtime.set_pool, image, size)
        self.pools.poke()
        return view.to_json()

    async def list_pools(self) -> builtins.list[dict]:
        return [v.to_json() for v in await asyncio.to_thread(self.runtime.list_pools)]

    async def remove_pool(self, image: str) -> builtins.list[str]:
        return await asyncio.to_thread(self.runtime.remove_pool, image)

    async def network_create(self, name: str, subnet: str | None, ipv6: str | None) -> dict:
        return await asyncio.to_thread(self.runtime.create_network, name, subnet, ipv6)

    async def network_list(self) -> builtins.list[dict]:
        return await asyncio.to_thread(self.runtime.list_networks)

    async def network_remove(self, name: str) -> None:
        await asyncio.to_thread(self.runtime.remove_network, name)

    def _watched(self, name: str) -> Watched:
        self.get(name)
        return self.watched[name]

    async def _settle(self, w: Watched) -> None:
        """After a stop or kill: stop watching, publish the state."""
        self._detach(w)
        self._set_state(w)

    # ---- supervision --------------------------------------------------------------------------

    async def _on_exit(self, w: Watched, fd: int) -> None:
        if w.pidfd != fd:
            return  # already handled (a stop detached it)
        self._detach(w)
        # Wait for whoever is operating on the container (a stop, a restart) to finish first.
        async with w.lock:
            try:
                rec = self.runtime.record(w.name)
            except NotFound:
                return  # removed (rm --force killed it): nothing is left to supervise
            # The monitor records nspawn's exit status right after it exits; give it a moment.
            deadline = time.monotonic() + 2.0
            while rec.exit_info() is None and proc.pid_alive(rec.monitor_pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(self.runtime.reap, rec)  # the monitor's duties, if it was killed
            if rec.network.mode == "private" and not w.deliberate:
                # Its monitor starts a sync too; this one covers a monitor that was killed first.
                await asyncio.to_thread(self.runtime.net.sync)
            self._set_state(w)
            if w.deliberate or rec.alive():
                return
            info = rec.exit_info() or {}
            failed = info.get("returncode", 1) != 0
            log.info("%s: exited (status %s), restart policy %s", w.name, info.get("returncode"), rec.restart_policy)
            if rec.restart_policy == "always" or (rec.restart_policy == "on-failure" and failed):
                if time.time() - rec.started_at >= STABLE_AFTER:
                    w.failures = 0
                w.failures += 1
                self._schedule_restart(w, rec)

    def _schedule_restart(self, w: Watched, rec: Record) -> None:
        if w.failures > rec.restart_limit:
            rec.phase = "crash-loop"
            rec.save()
            log.warning("%s: failed %d times in a row: crash-loop, not restarting (tupper start %s to try again)",
                        w.name, w.failures - 1, w.name)
            self._set_state(w)
            return
        delay = min(rec.restart_delay * 2 ** (w.failures - 1), RESTART_MAX_DELAY)
        log.info("%s: restarting in %.1fs (attempt %d)", w.name, delay, w.failures)
        w.restart_task = asyncio.ensure_future(self._restart_later(w, delay))

    async def _restart_later(self, w: Watched, delay: float) -> None:
        await asyncio.sleep(delay)
        w.restart_task = None
        if w.deliberate or self.watched.get(w.name) is not w:
            return
        async with w.lock:
            try:
                await self._start(w, Progress())
                log.info("%s: restarted", w.name)
                return
            except (TupperError, OSError) as exc:
                log.warning("%s: restart failed: %s", w.name, exc.message if isinstance(exc, TupperError) else exc)
            w.failures += 1
            self._schedule_restart(w, self.runtime.record(w.name))


async def serve(root: Path | None, admin_group: str | None) -> None:
    # Every blocking call (a start, an exec running its command, a stop waiting for the container) takes
    # a worker thread until it ends. asyncio's default pool has CPUs + 4 (6 here): the 7th of 50 runs
    # at once waited for a free one, and 6 long `exec`s left none for anything else.
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="tupperd"))
    store = Store.open(root)
    runtime = Runtime(store, boots=threading.BoundedSemaphore(BOOTS))
    for note in limits.prepare(Progress(), sum(r.alive() for r in runtime.records())):  # open files above all: tupperd holds some per container
        log.warning("%s", note)
    try:
        runtime.keeper.hold()  # up before the first start, and while tupperd runs
    except TupperError as exc:
        log.warning("the store's keeper process: %s (each start tries again)", exc)
    try:
        bus = await api.connect_system_bus(admin_group)
        daemon = Daemon(runtime, bus)
        await daemon.begin()
        daemon.pools.start()
        sweep = asyncio.ensure_future(daemon._oom_sweep())
        checks = asyncio.ensure_future(daemon._health_scheduler())
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            daemon.loop.add_signal_handler(sig, stop.set)
        disconnected = asyncio.ensure_future(bus.wait_for_disconnect())
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait([disconnected, waiter], return_when=asyncio.FIRST_COMPLETED)
        sweep.cancel()
        checks.cancel()
        await asyncio.to_thread(daemon.pools.stop)
        if daemon.kmsg is not None:
            daemon.kmsg.close()
        # Containers keep running: their nspawns are the keeper's children, and the next tupperd adopts them.
        log.info("tupperd exiting; %d container(s) left running", sum(1 for w in daemon.watched.values() if w.pidfd is not None))
    finally:
        runtime.keeper.release()


def _few_malloc_arenas() -> None:
    """glibc gives each thread that allocates an arena of its own (up to 8 per core) and keeps them: the
    worker threads of parallel starts made tupperd's RSS grow by 16 MB for good (bench/density.py: 72 MB
    with 100 containers, 54 MB with one arena). Two arenas: its threads mostly wait on containers."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tupperd", description="tupper's daemon: the org.tupper1 D-Bus API and the supervisor of containers.")
    p.add_argument("--root", type=Path, help="store root (default: $TUPPER_ROOT, `root` in /etc/tupper/tupper.toml, or /var/lib/tupper)")
    p.add_argument("--admin-group",
                   help="members of this group may call the mutating methods besides root "
                        "(default: $TUPPER_ADMIN_GROUP, `admin_group` in /etc/tupper/tupper.toml, or tupper)")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    _few_malloc_arenas()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="tupperd: %(message)s", stream=sys.stderr)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # --debug traces tupper, not each netlink message
    try:
        from tupper import config

        asyncio.run(serve(args.root, args.admin_group or config.admin_group()))
    except TupperError as exc:
        log.error("%s", exc.message)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
