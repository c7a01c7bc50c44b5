"""Live changes to running containers: a component swapped for another installed version (upgrade and
its rollback, also after a crash), unit jobs, secret rotation. The container keeps running throughout;
the runtime (tupper.runtime.runtime) serves these verbs and hands them here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Protocol

import attrs

from tupper import proc
from tupper.container import systemd, unitfiles
from tupper.container.systemd import Connect, SystemdBus
from tupper.errors import Busy, Failed, InvalidInput, TupperError
from tupper.progress import SILENT, Progress
from tupper.runtime import records
from tupper.runtime.records import Record
from tupper.store.store import Store

# After an upgrade's units are active they must stay so this long: a service that dies right after
# its start job finished (Type=exec, a crash on start-up) fails the upgrade and is rolled back.
UPGRADE_SETTLE = 0.1


class RuntimeView(Protocol):
    """What live changes ask of the runtime: the store and its records (tupper.runtime.runtime.Runtime;
    a fake in tests/unit/test_live.py)."""

    store: Store
    connect_bus: Connect

    def record(self, name: str) -> Record: ...

    def records(self) -> list[Record]: ...

    def running(self, name: str) -> Record: ...


@attrs.frozen
class LiveChanges:
    rt: RuntimeView

    def upgrade(self, name: str, component: str, version: str, progress: Progress = SILENT) -> dict:
        """Swap one component of a running container for another installed version: new bind mount
        inside the container, new units, reload, restart only its units, wait. Rolls back by itself."""
        from tupper.model import components as comp
        from tupper.store.packages import Installer

        rec = self.rt.running(name)
        entry = rec.component(component)
        if entry is None:
            raise InvalidInput(f"container {name!r} has no component {component!r} (it has: {', '.join(c.name for c in rec.components)})")
        target = Installer(self.rt.store).get(component, version)
        new = comp.load(target.path, f"component {component} {version}")
        if new.mount != entry.mount:
            raise InvalidInput(f"{component} {version} mounts at {new.mount}, the running one at {entry.mount}: a live upgrade keeps the mount point")
        clash = {u for c in rec.components if c.name != component for u in c.units} & set(new.units)
        if clash:
            raise InvalidInput(f"{component} {version} brings unit(s) {', '.join(sorted(clash))} that another component of {name!r} has")
        old = comp.load(Path(entry.source), f"component {component} {entry.version}")
        by_name = {c.name: c for c in rec.components}
        if rec.upgrade is not None:
            raise Busy(f"container {name!r} has an upgrade of {rec.upgrade.component} under way")
        missing = [r for r in new.requires if r not in by_name]
        if missing:
            raise InvalidInput(f"{component} {version} requires {', '.join(missing)}, which container {name!r} does not have")
        ungranted = [cred for cred in new.secrets if cred not in rec.grants]
        if ungranted:
            raise InvalidInput(f"{component} {version} needs credential(s) {', '.join(ungranted)}, which container {name!r} was not granted")

        new_files, old_files = self._component_files(rec, component, new), self._component_files(rec, component, old)
        stale = [p for p in old_files if p not in new_files]  # units the new version no longer has
        t0 = time.monotonic()
        # Written before anything changes: if this process dies half-way, `recover` puts the old version back.
        rec.upgrade = records.PendingUpgrade(component=component, version=entry.version, source=entry.source, to_source=str(target.path))
        rec.owner_pid, rec.owner_starttime = os.getpid(), proc.pid_starttime(os.getpid()) or 0
        rec.save()
        try:
            with self.rt.connect_bus(rec.leader_pid, timeout=5.0, alive=rec.alive) as bus:
                try:
                    with progress.step(f"Upgrading {component} {entry.version} → {version} in {name}"):
                        self._swap(rec, bus, entry.mount, str(target.path), new_files, stale, old.units, new.units, progress)
                except (Failed, OSError) as exc:
                    # OSError: a unit file could not be written (the container changed its unit directory
                    # into a link to nothing, a full store): the old version goes back all the same.
                    why = exc.message if isinstance(exc, Failed) else f"{exc.filename or ''}: {exc.strerror}".lstrip(": ")
                    try:
                        with progress.step(f"Rolling back {component} to {entry.version}"):
                            self._swap(rec, bus, entry.mount, entry.source, old_files, [p for p in new_files if p not in old_files],
                                       new.units, old.units, progress)
                    except (Failed, OSError) as again:
                        why_not = again.message if isinstance(again, Failed) else f"{again.filename or ''}: {again.strerror}".lstrip(": ")
                        raise Failed(f"upgrade of {component} to {version} failed ({why}), and so did the rollback to "
                                     f"{entry.version} ({why_not}): {component} may not be running in {name}",
                                     hint=f"see `tupper status {name}`; `tupper component upgrade {name} {component} {entry.version}` "
                                          "tries again") from None
                    raise Failed(f"upgrade of {component} to {version} failed ({why}); rolled back to {entry.version}, "
                                 "which is active again") from None
            upgraded = attrs.evolve(entry, version=version, source=str(target.path), units=new.units, requires=new.requires,
                                    secrets=new.secrets, on_rotate=new.on_rotate, health=new.health)
            rec.components = [upgraded if c is entry else c for c in rec.components]
        finally:
            rec.upgrade = None
            rec.owner_pid = rec.owner_starttime = 0
            rec.save()
        return {"name": name, "component": component, "version": version, "seconds": round(time.monotonic() - t0, 3)}

    def _component_files(self, rec: Record, component: str, c) -> dict[str, str]:
        """The unit files and the target file of `rec` with component `component` as `c` (a Component)."""
        by_name = {x.name: x for x in rec.components}
        env = list(by_name[component].env)
        required = [u for r in c.requires if r in by_name for u in by_name[r].units]
        others = [u for x in rec.components if x.name != component for u in x.units]
        return {**unitfiles.component_files(c, env, required, c.secrets),
                **unitfiles.target_file(rec.name, others + list(c.units))}

    def recover_upgrade(self, rec: Record) -> str:
        """A live upgrade whose process died: put the recorded (old) version back, files and mount."""
        from tupper.model import components as comp

        pending = rec.upgrade
        assert pending is not None
        entry = rec.component(pending.component)
        assert entry is not None
        old = comp.load(Path(entry.source), f"component {entry.name} {entry.version}")
        old_files = self._component_files(rec, entry.name, old)
        try:
            new = comp.load(Path(pending.to_source), f"component {entry.name}")
            new_units, new_files = new.units, self._component_files(rec, entry.name, new)
        except TupperError:  # the new version was removed meanwhile: its unit names are in the rootfs only
            new_units, new_files = (), {}
        extra = [p for p in new_files if p not in old_files]
        if rec.alive():
            with self.rt.connect_bus(rec.leader_pid, timeout=5.0, alive=rec.alive) as bus:
                self._swap(rec, bus, entry.mount, entry.source, old_files, extra, tuple(new_units), old.units, SILENT)
        else:
            self.rt.store.ensure_root(rec.rootfs)
            unitfiles.remove(rec.rootfs, extra)
            unitfiles.write(rec.rootfs, old_files)
        rec.upgrade = None
        rec.owner_pid = rec.owner_starttime = 0
        rec.save()
        return f"component {entry.name} rolled back to {entry.version} (its upgrade was interrupted)"

    def _swap(self, rec: Record, bus: SystemdBus, mount: str, source: str, files: dict[str, str], remove: list[str],
              old_units: tuple[str, ...], new_units: tuple[str, ...], progress: Progress) -> None:
        from tupper.container import mountns

        for unit in old_units:
            if unit not in new_units:
                bus.stop_unit(unit)
        unitfiles.remove(rec.rootfs, remove)
        unitfiles.write(rec.rootfs, files)
        mountns.replace_mount(rec.leader_pid, source, mount)
        bus.reload()
        for unit in new_units:
            bus.restart_unit(unit)
        self._wait_jobs(rec, bus, list(new_units), rec.start_timeout, progress)

    def _wait_jobs(self, rec: Record, bus: SystemdBus, units: list[str], timeout: float, progress: Progress) -> None:
        """Wait until the units' jobs are done and they are active, and stay active a moment (a service
        that dies right after starting counts as failed)."""
        deadline = time.monotonic() + timeout
        while any(bus.has_job(u) for u in units):
            if time.monotonic() > deadline:
                raise Failed(f"units did not start within {timeout:.0f}s")
            time.sleep(0.01)
        settle_until = time.monotonic() + UPGRADE_SETTLE
        while True:
            states = [bus.unit_state(u) for u in units]
            bad = [s for s in states if s.active_state not in ("active", "activating", "reloading")]
            if bad:
                raise Failed(", ".join(f"{s.name} is {s.active_state} ({s.result or s.sub_state})" for s in bad))
            if time.monotonic() >= settle_until and all(s.active_state == "active" for s in states):
                return
            if time.monotonic() > deadline:
                raise Failed(f"units did not become active within {timeout:.0f}s")
            time.sleep(0.02)

    def unit_job(self, name: str, unit: str, method: str) -> str:
        """Start, stop, restart or reload one of the container's units through its systemd, waited for;
        the job's result ("done", "failed", …)."""
        if unit not in self.rt.record(name).units:
            raise InvalidInput(f"{unit}: not a unit of container {name!r} (its units: {', '.join(self.rt.record(name).units)})")
        rec = self.rt.running(name)
        return systemd.run_job(rec.leader_pid, unit, method, rec.start_timeout)

    def secret_holders(self) -> list[tuple[str, str, str]]:
        """(container, credential ID, secret name) for every container granted a secret: names only."""
        return [(rec.name, cred, secret) for rec in self.rt.records() for cred, secret in sorted(rec.grants.items())]

    def rotate_secret(self, secret: str) -> list[str]:
        """Make every running unit that loads `secret` pick up its current value, by its component's
        on_rotate policy, through the container's systemd; containers keep running.
        restart: the unit restarts and loads the value from the agent. reload: systemd 252 loads
        credentials only at start, so tupper writes the value into the unit's credentials (in the
        container's memory), then asks systemd to reload the unit."""
        from tupper.container import mountns
        from tupper.store.secrets import SecretStore

        secrets = SecretStore(self.rt.store)
        secrets.info(secret)  # NotFound for an unknown name
        done = []
        for rec in self.rt.records():
            if not rec.alive():
                continue
            for c in rec.components:
                creds = [cred for cred in c.secrets if rec.grants.get(cred) == secret]
                for unit in (u for u in c.units if u.endswith(".service")) if creds else ():
                    if c.on_rotate == "reload":
                        version, value = secrets.value(secret)
                        for cred in creds:
                            mountns.refresh_credential(rec.leader_pid, unit, cred, value)
                            secrets.audit(container=rec.name, unit=unit, credential=cred, secret=secret, version=version,
                                          result="delivered (reload)")
                        del value
                        done.append(f"{rec.name}/{unit}: reload {self.unit_job(rec.name, unit, 'ReloadUnit')}")
                    else:
                        done.append(f"{rec.name}/{unit}: restart {self.unit_job(rec.name, unit, 'RestartUnit')}")
        return done
