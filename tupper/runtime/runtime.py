"""The orchestrator: the one place that knows the order of operations for run, stop, rm, exec and logs.

run: snapshot → components bound and their units written → nspawn --boot under a monitor → the
container's bus → wait for the component units → record. The CLI (and later the daemon) calls this.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import stat
import threading
import time
import uuid
from pathlib import Path, PurePosixPath

import attrs

from tupper import durable, proc
from tupper.container import cgroups, kmsg, nspawn, probe, rootcopy, unitfiles
from tupper.container.inroot import Root
from tupper.container.systemd import Connect, ContainerBus, SystemdBus, UnitState, run_command
from tupper.errors import Busy, Exists, Failed, InvalidInput, NotFound
from tupper.model import health
from tupper.model.network import NetworkSpec
from tupper.model.resources import Resources
from tupper.model.spec import Spec, check_name
from tupper.progress import SILENT, Progress
from tupper.runtime import limits, monitor, pools, records, shells
from tupper.runtime.keeper import Keeper
from tupper.runtime.live import LiveChanges
from tupper.runtime.network import Plumbing
from tupper.runtime.records import ComponentEntry, Record, VolumeEntry
from tupper.runtime.stats import ContainerStats, Pressure, Usage
from tupper.runtime.status import ComponentHealth, ContainerStatus
from tupper.store.images import ImageDef, Images, find_definition
from tupper.store.store import FREE_FOR_CONTAINER, Store
from tupper.store.volumes import Volumes

log = logging.getLogger("tupper")



@attrs.frozen
class UnitFailure:
    unit: str
    active_state: str
    result: str
    journal: list[str]

    def lines(self) -> list[str]:
        return [f"unit {self.unit} failed (result: {self.result})", *(f"    {line}" for line in self.journal)]


@attrs.frozen
class HealthFailure:
    """A component whose units became active but whose health check never passed."""

    component: str
    check: str  # what was checked, as the manifest says it
    detail: str  # what the last check said
    seconds: float
    journal: list[str]

    def lines(self) -> list[str]:
        return [f"component {self.component} never became healthy in {self.seconds:.1f}s: {self.check}: {self.detail}",
                *(f"    {line}" for line in self.journal)]


class RunFailed(Failed):
    """A run or start whose units failed. Its message is the whole story for the user: which units,
    their result, their last journal lines, and what became of the container."""

    def __init__(self, summary: str, failures: list[UnitFailure] | list[HealthFailure], kept: bool) -> None:
        lines = [summary]
        for f in failures:
            lines += f.lines()
        lines.append("the container was kept for inspection (tupper rm --force to remove)" if kept
                     else "the container was stopped and removed")
        super().__init__("\n".join(lines))
        self.summary = summary
        self.failures = failures
        self.kept = kept


@attrs.frozen
class RunResult:
    record: dict
    units: list[UnitState]
    seconds: float

    def to_json(self) -> dict:
        return {**self.record, "units": [u.to_json() for u in self.units], "seconds": round(self.seconds, 3)}


@attrs.frozen
class OOMCounter:
    """The files a container's OOM kills are counted in (cgroups.oom_kills reads them), and its memory
    cgroup as the kernel's log names it, to tell which component a killed process was in."""

    total: Path | None  # the container's own cgroup
    components: tuple[tuple[str, Path | None], ...]
    nested: bool  # v2: the container's count includes its components'; v1 counts each cgroup alone
    memcg: str | None = None  # the container's memory cgroup, as a path in its hierarchy ("/…/NAME")
    units: tuple[tuple[str, str], ...] = ()  # unit -> component (v2: the kernel names the unit's cgroup)

    def read(self) -> tuple[int, dict[str, int]]:
        per = {name: cgroups.oom_kills(path) for name, path in self.components}
        total = cgroups.oom_kills(self.total)
        return (total if self.nested else total + sum(per.values())), per

    def component_of(self, kill: kmsg.OOMKill) -> str | None:
        """The component the killed process was in ("" for none of them), None: not this container's.
        v1: tupper's component cgroups are right below the container's; v2: the unit's cgroup is the
        container systemd's (…/NAME/system.slice/UNIT)."""
        if self.memcg is None:
            return None
        first = kmsg.below(kill.task_memcg, self.memcg)
        if first is None:
            return None
        names = {name for name, _ in self.components}
        if first in names:
            return first
        rest = kill.task_memcg[len(self.memcg.rstrip("/")) + 1:].split("/")
        units = dict(self.units)
        return next((units[part] for part in rest if part in units), "")


@attrs.frozen
class UpdateResult:
    resources: Resources  # the limits now
    notes: tuple[str, ...]  # what this host cannot apply
    applied: bool  # to the running container (else at its next start)

    def to_json(self) -> dict:
        return {"resources": self.resources.to_json(), "notes": list(self.notes), "applied": self.applied}


@attrs.define
class Runtime:
    store: Store
    host: nspawn.Host = attrs.Factory(nspawn.Host.detect)
    # True in tupperd, which runs the secrets agents; a container with granted secrets needs one.
    serves_secrets: bool = False
    # How the runtime reaches a container's systemd (a fake in tests/unit/test_runtime.py).
    connect_bus: Connect = ContainerBus.connect
    # The store's keeper, the parent of every container's nspawn (tupper.runtime.keeper); reached on first use.
    keeper: Keeper = attrs.field(default=attrs.Factory(
        lambda self: Keeper(self.store.root, self.store.run_dir, None if self.host.systemd else self.store.cgroup_parent), takes_self=True))
    # Boots under way at once, for every caller of this Runtime (tupperd sets it: BOOTS); None: no limit.
    boots: threading.BoundedSemaphore | None = None

    # ---- containers on disk -------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        return self.store.containers_dir / name

    def record(self, name: str) -> Record:
        check_name(name, "container name")
        return Record.load(self._dir(name))

    def records(self, only=None) -> list[Record]:
        """Every container's record; `only(directory name)`: those whose directory it accepts (read no other)."""
        out = []
        for d in sorted(self.store.containers_dir.iterdir()):
            if only is not None and not only(d.name):
                continue
            try:
                out.append(Record.load(d))
            except (NotFound, ValueError, KeyError, TypeError):
                continue  # a half-created container; its creator cleans it up
        return out

    def shutdown_order(self) -> list[Record]:
        """Running containers in the order `shutdown --all` stops them: the last started first."""
        return sorted((r for r in self.records() if r.alive()), key=lambda r: r.started_at, reverse=True)

    @property
    def net(self) -> Plumbing:
        """Networks: the host's side of every container's network (tupper.runtime.network)."""
        return Plumbing(self.store, self.records)

    def create_network(self, name: str, subnet: str | None, subnet6: str | None) -> dict:
        """`tupper network create`: a network in the store (its bridge is made when a container joins)."""
        net = self.net.create(name, subnet, subnet6)
        return next(n for n in self.net.list() if n["name"] == net.name)

    def list_networks(self) -> list[dict]:
        return self.net.list()

    def remove_network(self, name: str) -> None:
        """Refused while a container (running or not) is configured to join it."""
        self.net.remove(name)

    def images_in_use(self, image: str) -> list[str]:
        return [r.name for r in self.records() if r.image == image]

    # ---- the store's images and components, and the store itself ------------------------------

    def list_images(self) -> list[dict]:
        """Every built image, with the containers made from it and its size: total, exclusive (what it
        alone holds: a layer's own changes) and shared (with its layers, its parent, its containers)."""
        images = Images(self.store).list()
        usage = self.store.tree_usage([i.path for i in images])
        out = []
        for i in images:
            total, exclusive, shared = usage.get(i.path, (None, None, None))
            out.append(dict(i.to_json(), used_by=self.images_in_use(i.name), size=total, exclusive=exclusive, shared=shared))
        return out

    def remove_image(self, name: str) -> None:
        """Delete an image; refused while a container was made from it or a layer is built on it."""
        Images(self.store).remove(name, users=self.images_in_use(name))

    def prunable_images(self) -> list[str]:
        """Images nothing keeps: no container made from them, no layer on them, not pinned; layers first
        (their parents may become prunable once they are gone: they are listed after them)."""
        images = {i.name: i for i in Images(self.store).list()}
        kept = {n for n, i in images.items() if i.pinned or self.images_in_use(n)}
        # A parent is kept while a kept image descends from it.
        for name in list(kept):
            parent = images[name].parent
            while parent in images and parent not in kept:
                kept.add(parent)
                parent = images[parent].parent
        out: list[str] = []
        left = [n for n in images if n not in kept]
        while left:  # children before parents
            leaves = [n for n in left if not any(images[c].parent == n for c in left)]
            out += sorted(leaves)
            left = [n for n in left if n not in leaves]
        return out

    def prune_images(self, names: list[str]) -> list[dict]:
        """Remove these images (what prunable_images listed); each with the bytes its files took."""
        done: list[dict] = []
        images = Images(self.store)
        for name in names:
            size = images.size(name)
            try:
                self.remove_image(name)
            except (Busy, NotFound) as exc:  # used or removed meanwhile: kept, and said
                done.append({"name": name, "state": "kept", "why": exc.message})
                continue
            done.append({"name": name, "state": "removed", "bytes": size})
        return done

    def pin_image(self, name: str, pinned: bool) -> None:
        """A pinned image is never pruned."""
        images = Images(self.store)
        images.get(name)
        images.update_meta(name, pinned=pinned)

    def list_components(self) -> list[dict]:
        """Every installed component version, with the containers that use it."""
        from tupper.store.packages import Installer

        return [dict(i.to_json(), used_by=self.components_in_use(i.path)) for i in Installer(self.store).list()]

    def remove_component(self, name: str, version: str) -> None:
        """Uninstall one version; refused while a container uses it (or is being upgraded to it)."""
        from tupper.store.packages import Installer

        installer = Installer(self.store)
        installer.remove(name, version, users=self.components_in_use(installer.get(name, version).path))

    def unmount_store(self) -> None:
        """Unmount the store's loopback pool; refused while tupperd serves it or a container runs."""
        if pid := self.store.daemon_pid():
            raise Busy(f"tupperd (pid {pid}) serves the store {self.store.root}", hint="stop tupperd first")
        running = [r.name for r in self.records() if r.alive()]
        if running:
            raise Busy(f"containers are running: {', '.join(running)}", hint="stop them first")
        self.store.unmount()

    # ---- run ----------------------------------------------------------------------------------

    def resolve_image(self, spec: Spec, progress: Progress = SILENT) -> Path:
        """The image subvolume for the spec, building it from its definition when missing (a layer's
        missing parents first, from their own definitions)."""
        images = Images(self.store)
        if images.exists(spec.image):
            return images.path(spec.image)
        wanted, chain = spec.image, []
        while not images.exists(wanted):
            definition = find_definition(wanted, [spec.base_dir / "images", spec.base_dir.parent / "images"])
            if definition is None:
                raise InvalidInput(
                    f"{spec.file}: image: no image {wanted!r}: not built or imported, and no {wanted}.toml in any images/ directory",
                    hint="build one with `tupper image build FILE`, or import one with `tupper image import FILE`",
                )
            chain.append(ImageDef.from_file(definition))
            if chain[-1].parent is None or len(chain) > 16:
                break
            wanted = chain[-1].parent
        for image_def in reversed(chain):
            built = images.build(image_def, progress=progress)
        return built.path

    def run(self, spec: Spec, *, keep_failed: bool = False, progress: Progress = SILENT, cold: bool = False) -> RunResult:
        """create + start; a failed run leaves nothing behind unless `keep_failed`. A run whose process
        dies half-way is undone by `recover` (the record says `creating` with a dead owner). Where a warm
        pool holds a ready container of the spec's image (and `cold` is false), that one is claimed
        instead (`claim`)."""
        t0 = time.monotonic()
        if not cold:
            claimed = self.claim(spec, keep_failed=keep_failed, progress=progress)
            if claimed is not None:
                return RunResult(claimed[0].to_json(), claimed[1], time.monotonic() - t0)
        new_volumes = [v.source for v in spec.volumes if v.named and not Volumes(self.store).exists(v.source)]
        try:
            rec = self.create(spec, progress)
        except BaseException:
            self._drop_volumes(new_volumes)
            raise
        try:
            states = self.start(rec, keep_failed=keep_failed, progress=progress, first=True)
        except RunFailed as exc:
            if not exc.kept:
                with self.store.lock():
                    self._discard(rec.dir, rec.name)
                self._drop_volumes(new_volumes)
            raise
        except BaseException:
            with self.store.lock():
                self._discard(rec.dir, rec.name)
            self._drop_volumes(new_volumes)
            raise
        return RunResult(rec.to_json(), states, time.monotonic() - t0)

    def create(self, spec: Spec, progress: Progress = SILENT, *, pool: str = "") -> Record:
        """Snapshot the image, write the components' units, save the record. Nothing runs yet. `pool`:
        a warm pool's container of that image (no components, no units of tupper's).

        The container's directory appears complete with its record in one rename (the record says
        `creating`, owned by this process), so a crash at any moment leaves either nothing under
        containers/ or a record that `recover` and `rm` can undo; never a root without a record."""
        cdir = self._dir(spec.name)
        self._check_name_free(spec)  # before a possibly long image build; checked again under the lock
        image_path = self.resolve_image(spec, progress)
        self.store.require_free(FREE_FOR_CONTAINER, f"run {spec.name}")
        self._check_units_do_not_shadow_the_image(spec, image_path)
        self._check_secrets(spec)
        network = self._check_network(spec)
        volumes = self._check_volumes(spec)
        staging = self.store.scratch("new", spec.name)
        staging.mkdir(mode=0o700)
        with contextlib.ExitStack() as undo:
            undo.callback(self.store.remove_tree, staging)
            rec = Record(dir=staging, pool=pool, **self._spec_fields(spec, network, volumes))
            rec.begin("creating")
            rec.save()
            with self.store.lock():
                self._check_name_free(spec)
                for v in spec.volumes:  # under the lock that `volume rm` takes: the record names it before anyone can remove it
                    if v.named:
                        Volumes(self.store).create(v.source, exist_ok=True)
                os.rename(staging, cdir)
                durable.fsync_dir(cdir.parent)
            undo.pop_all()
        rec.dir = cdir
        with contextlib.ExitStack() as undo:
            undo.callback(self._discard, cdir, spec.name)
            with progress.step(f"Snapshotting image {spec.image}"):
                self.store.make_root(image_path, rec.rootfs)
                self._prepare_rootfs(rec.rootfs, spec, units=not pool)
            undo.pop_all()
        return rec

    @staticmethod
    def _spec_fields(spec: Spec, network: NetworkSpec, volumes: list[VolumeEntry]) -> dict:
        """What a container's record takes from its spec (a new one's, or a claimed pool container's)."""
        return dict(
            name=spec.name,
            image=spec.image,
            spec_file=spec.file,
            created_at=time.time(),
            stop_timeout=spec.stop_timeout,
            start_timeout=spec.start_timeout,
            restart_policy=spec.restart_policy,
            restart_delay=spec.restart_delay,
            restart_limit=spec.restart_limit,
            grants=dict(spec.grants),
            labels=dict(spec.labels),
            volumes=volumes,
            components=[
                records.ComponentEntry(name=u.component.name, version=u.component.version, mount=u.component.mount,
                                       units=u.component.units, source=str(u.component.root), env=u.env,
                                       requires=u.component.requires, secrets=u.component.secrets,
                                       on_rotate=u.component.on_rotate, resources=u.resources, health=u.component.health)
                for u in spec.components
            ],
            resources=spec.resources,
            network=network,
        )

    def _check_name_free(self, spec: Spec) -> None:
        if self._dir(spec.name).exists():
            raise self.name_taken(spec)
        machine = nspawn.machine_name(spec.name)
        for other in self.store.containers_dir.iterdir():
            if nspawn.machine_name(other.name) == machine:
                raise Exists(f"{spec.file}: name: {spec.name!r} and the existing container {other.name!r} would have the same "
                             f"machine name {machine!r} ('_' becomes '-')", hint="pick another name")

    @staticmethod
    def name_taken(spec: Spec) -> Exists:
        return Exists(f"{spec.file}: name: a container named {spec.name!r} already exists", hint=f"pick another name, or `tupper rm {spec.name}`")

    def _check_secrets(self, spec: Spec) -> None:
        if not spec.grants:
            return
        if not self.serves_secrets:
            raise Failed(f"{spec.file}: secrets are delivered by tupperd's agent; run this spec through tupperd (without --direct)")
        from tupper.store.secrets import SecretStore

        secrets = SecretStore(self.store)
        for cred, secret in spec.grants:
            if not secrets.exists(secret):
                raise InvalidInput(f"{spec.file}: secrets.{cred}: no secret {secret!r} in the store",
                                   hint=f"set it first: tupper secret set {secret} < FILE")

    def _check_volumes(self, spec: Spec) -> list[VolumeEntry]:
        """The binds of the spec's [[volumes]]. A named volume is its subvolume in the store; a host path may
        neither lie in the store nor contain it (nor tupper's run directory, with the secrets agents'
        sockets): nothing of the store is bound into a container but a named volume."""
        private = [os.path.realpath(p) for p in (self.store.root, self.store.pool_file, Path("/run/tupper")) if p is not None]
        out = []
        for i, v in enumerate(spec.volumes):
            if v.named:
                out.append(VolumeEntry(str(Volumes(self.store).path(v.source)), v.target, v.read_only, volume=v.source))
                continue
            for mine in private:
                if v.source == mine or v.source.startswith(mine.rstrip("/") + "/"):
                    raise InvalidInput(f"{spec.file}: volumes[{i}].source: {v.source} is inside tupper's store ({mine})",
                                       hint="keep data in a named volume instead: source = \"NAME\" (see `tupper volume create`)")
                if mine.startswith(v.source.rstrip("/") + "/"):
                    raise InvalidInput(f"{spec.file}: volumes[{i}].source: {v.source} contains tupper's store ({mine})",
                                       hint="bind a directory that holds only what the container needs")
            out.append(VolumeEntry(v.source, v.target, v.read_only))
        return out

    def _volume_binds(self, rec: Record) -> list[nspawn.Bind]:
        """The volumes' binds, each source checked again (a host path may have gone since the run) and its
        mount point made inside the root: a directory, or an empty file for a file."""
        binds = []
        with Root(rec.rootfs) as root:
            for v in rec.volumes:
                try:
                    is_dir = stat.S_ISDIR(os.stat(v.source).st_mode)
                except OSError as exc:
                    what = f"volume {v.volume!r} ({v.source})" if v.volume else f"host path {v.source}"
                    raise Failed(f"container {rec.name!r}: {what}, bound at {v.target}, is not there: {exc.strerror}",
                                 hint=f"`tupper volume create {v.volume}`" if v.volume else "restore it, or `tupper rm` the container") from None
                try:
                    if is_dir:
                        os.close(root.makedirs(v.target))
                    else:
                        root.touch(v.target)
                except OSError as exc:
                    raise Failed(f"container {rec.name!r}: cannot make the mount point {v.target} of a volume in its root: {exc.strerror}",
                                 hint=f"the container has something else at {v.target}: a {'file' if is_dir else 'directory or symlink'}") from None
                binds.append(nspawn.Bind(Path(v.source), v.target, v.read_only))
        return binds

    def _drop_volumes(self, names: list[str]) -> None:
        """Remove the named volumes a failed run made, unless a container uses them meanwhile."""
        if not names:
            return
        volumes = Volumes(self.store)
        with self.store.lock():
            used = self.volumes_in_use()
            for name in names:
                if volumes.exists(name) and not used.get(name):
                    volumes.remove(name, [])

    def _check_network(self, spec: Spec) -> NetworkSpec:
        """Exit 2 before anything is made: a network that does not exist, a host port taken. Host ports
        the spec leaves to tupper are picked here, and kept for the container's life."""
        if spec.network.mode != "private":
            return spec.network
        self.net.network_of(spec.network.network, f"{spec.file}: network.network")
        return attrs.evolve(spec.network, ports=self.net.check_ports(spec.name, spec.network.ports, f"{spec.file}: network.ports"))

    @staticmethod
    def _check_units_do_not_shadow_the_image(spec: Spec, image: Path) -> None:
        """A component unit named like one of the image's own (dbus.service, …) would replace it."""
        for use in spec.components:
            for i, unit in enumerate(use.component.units):
                for d in ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system"):
                    if os.path.lexists(image / d / unit):
                        raise InvalidInput(f"{use.component.manifest_file}: units[{i}]: {unit} would replace the image's own /{d}/{unit}",
                                           hint="rename the unit")

    def start(self, rec: Record, *, keep_failed: bool = False, progress: Progress = SILENT, first: bool = False) -> list[UnitState]:
        """Boot an existing container and wait for its units. On a unit failure the container is
        stopped (or kept running in state `failed`) and RunFailed is raised. `first`: the boot of
        `run`, which keeps the phase `creating` (an interrupted run is undone, not just stopped)."""
        if rec.alive():
            return []  # starting a running container does nothing, as stopping a stopped one does
        if rec.interrupted() or rec.phase == "removing":
            raise Busy(f"container {rec.name!r} is left half-done by an interrupted {rec.phase}",
                       hint=f"`tupper store check --repair` finishes it, or `tupper rm {rec.name}`")
        with self._boot_slot(progress):
            return self._boot(rec, keep_failed=keep_failed, progress=progress, first=first)

    @contextlib.contextmanager
    def _boot_slot(self, progress: Progress):
        """One of `boots` for the time of a boot (a claim takes none: it boots nothing)."""
        if self.boots is None:
            yield
            return
        if not self.boots.acquire(blocking=False):
            progress.note("other containers are booting; this one waits for one of them")
            self.boots.acquire()
        try:
            yield
        finally:
            self.boots.release()

    def _boot(self, rec: Record, *, keep_failed: bool, progress: Progress, first: bool) -> list[UnitState]:
        if not first:
            rec.begin("starting")
        rec.machine = ""  # this boot is made under its own name (a claimed pool container's was the pool's)
        rec.save()
        with contextlib.ExitStack() as undo:
            undo.callback(self._abort_start, rec)  # whatever fails from here on ends the phase
            # The kernel limits many containers run into (inotify instances above all): raised where they
            # are low, and named where they cannot be (tupper.runtime.limits).
            for note in limits.prepare(progress, sum(r.alive() for r in self.records()) + 1):
                progress.note(note)
            (rec.dir / records.EXIT).unlink(missing_ok=True)
            self.store.ensure_root(rec.rootfs)  # an overlay root taken down since (a reboot, `store unmount`)
            binds = [nspawn.Bind(Path(c.source), c.mount) for c in rec.components]
            self._make_mount_points(rec, [b.target for b in binds])
            binds += self._volume_binds(rec)
            if rec.grants:
                if not self.serves_secrets:
                    raise Failed(f"container {rec.name!r} has secrets, which tupperd's agent delivers: start it through tupperd")
                # The directory, not the socket file: a restarted tupperd makes a new socket the container still sees.
                binds.append(nspawn.Bind(self.store.agent_dir(rec.name), unitfiles.AGENT_DIR))
            elif rec.pool:
                # The mount point a claim puts the agent's directory on: /run/host is read-only once booted.
                empty = self.store.run_dir / "empty"
                empty.mkdir(mode=0o555, parents=True, exist_ok=True)
                binds.append(nspawn.Bind(empty, unitfiles.AGENT_DIR))
            with progress.step(f"Booting {rec.name}"):
                joining = self.net.prepare(rec)
                try:
                    # The namespace is wired up (veth pair, host0, /etc/hosts) while the monitor and nspawn's
                    # process are made; nspawn is executed only once that is done (monitor.Gate).
                    with monitor.Gate(joining.wire) if joining else contextlib.nullcontext() as gate:
                        argv = nspawn.boot_argv(rec.boot_name, rec.rootfs, binds, self.host, cgroups.systemd_properties(rec.resources),
                                                nspawn.network_args(rec.network.mode, joining.path if joining else None))
                        self._make_cgroups(rec, progress)
                        self._start(rec, argv, gate.fd if gate else None)
                finally:
                    if joining is not None:  # nspawn joined it (or never will): the container's processes hold it now
                        os.close(joining.fd)
                self.net.publish(rec)  # while systemd inside boots
                bus = self.connect_bus(rec.leader_pid, timeout=rec.start_timeout, alive=rec.alive)
            undo.callback(bus.close)
            if rec.pool:
                with progress.step("Waiting for systemd to finish booting"):
                    self._wait_booted(rec, bus)
            try:
                states = self._settle_units(rec, bus, keep_failed, progress)
            except RunFailed:
                undo.pop_all()  # the container was dealt with, its phase recorded
                bus.close()
                raise
            undo.pop_all()
            bus.close()
        return states

    def _settle_units(self, rec: Record, bus: SystemdBus, keep_failed: bool, progress: Progress) -> list[UnitState]:
        """Wait for the container's units to be active and its components healthy; record it running.
        On a failure it is stopped (unless `keep_failed`), recorded `failed`, and RunFailed raised."""
        with progress.step(f"Starting {len(rec.units)} unit(s)"):
            states, failures = self._wait_units(rec, bus, rec.units, rec.start_timeout, progress)
        unhealthy: list[HealthFailure] = []
        if not failures and (checked := [c for c in rec.components if c.health]):
            with progress.step(f"Waiting for {len(checked)} health check(s)"):
                unhealthy = self._wait_healthy(rec, checked, progress)
        if failures or unhealthy:
            if not keep_failed:
                self._halt(rec, bus, rec.stop_timeout)
                self.net.release(rec)
            rec.end("failed")
            if failures:
                names = ", ".join(f"{f.unit} ({f.result or f.active_state})" for f in failures)
                raise RunFailed(f"{rec.name}: unit(s) failed: {names}", failures, kept=keep_failed)
            names = ", ".join(f.component for f in unhealthy)
            raise RunFailed(f"{rec.name}: component(s) never became healthy: {names}", unhealthy, kept=keep_failed)
        rec.end("running")
        return states

    def _abort_start(self, rec: Record) -> None:
        """A start that broke half-way (an exception, Ctrl-C): the container must not keep running."""
        if rec.alive():
            self._kill(rec)
        self.net.release(rec)
        rec.end("failed")

    def _prepare_rootfs(self, rootfs: Path, spec: Spec, *, units: bool = True) -> None:
        # A machine id of its own: journald files and `journalctl --root` find the container's journal by it.
        # Everything written into the root stays inside it (tupper.inroot): an image may hold symlinks.
        with Root(rootfs) as root:
            root.write_text("etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
            # nspawn sets the hostname to the machine name only where the image has no /etc/hostname.
            root.unlink("etc/hostname")
        if units:  # a pool container gets its units when claimed: systemd must never have seen their names
            unitfiles.write(rootfs, unitfiles.plan(spec))

    @staticmethod
    def _make_mount_points(rec: Record, targets: list[str]) -> None:
        """Component mount points, made inside the root before nspawn starts: nspawn then only mounts.
        (nspawn of systemd 252 creates a missing one by path after resolving it, so a root that changed
        in between could get the directory made outside it; see tupper.inroot.)"""
        with Root(rec.rootfs) as root:
            for target in targets:
                try:
                    os.close(root.makedirs(target))
                except OSError as exc:
                    raise Failed(f"container {rec.name!r}: cannot make the mount point {target} in its root: {exc.strerror}",
                                 hint=f"the container changed {target} or a directory above it into something else; "
                                      f"`tupper rm {rec.name}` and run it again") from None

    def _make_cgroups(self, rec: Record, progress: Progress, *, exist: bool = False) -> None:
        """The container's cgroups with its limits, and its components' (cgroup v1), before nspawn
        starts in them. On a systemd host machined makes the scope (with the limits as properties).
        `exist`: the container's own are there (a claimed pool container's): its limits only."""
        if self.host.systemd:
            return
        parent = self.store.cgroup_parent
        layout = cgroups.Layout.detect()
        try:
            if not exist:
                cgroups.create(rec.boot_name, parent=parent, layout=layout)
            notes = cgroups.apply(cgroups.controller_dirs(rec.boot_name, parent, layout=layout), rec.resources, layout.kind)
            for c in rec.components:
                cgroups.create_component(rec.boot_name, c.name, parent=parent, layout=layout)
                for note in cgroups.apply(cgroups.controller_dirs(rec.boot_name, parent, component=c.name, layout=layout), c.resources, layout.kind):
                    notes.append(f"component {c.name}: {note}")
        except cgroups.LimitError as exc:
            raise Failed(f"container {rec.name!r}: {exc.strerror}", hint="check the [resources] of its spec (docs/resources.md)") from None
        for note in notes:
            progress.note(f"{rec.name}: {note}")

    def _start(self, rec: Record, argv: list[str], gate: int | None = None) -> None:
        """Start nspawn under the store's keeper (tupper.runtime.keeper); record the processes and PID 1."""
        rec.monitor_pid, rec.nspawn_pid = self.keeper.spawn(rec.name, rec.dir, argv, rec.dir / "console.log", self.keeper.cgroup, gate)
        rec.nspawn_starttime = proc.pid_starttime(rec.nspawn_pid) or 0
        rec.started_at = time.time()
        try:
            rec.leader_pid = monitor.find_leader(rec.nspawn_pid, rec.alive, rec.dir / "console.log")
        except Failed as exc:  # a kernel limit is the usual reason when many start at once: name it
            why = limits.explain_log(monitor.tail(rec.dir / "console.log", 20))
            raise Failed(exc.message, hint=why or exc.hint) from None
        rec.save()

    @staticmethod
    def _wait_booted(rec: Record, bus: SystemdBus) -> None:
        """Until the container's systemd has finished booting (a pool container is ready then): woken by
        its StartupFinished, asked at least every 0.1 s (the boot's own jobs do not wake it)."""
        bus.watch([], jobs=False)
        deadline = time.monotonic() + rec.start_timeout
        while (state := bus.system_state()) in ("initializing", "starting"):
            if not rec.alive():
                raise Failed(f"{rec.name}: the container exited while it booted")
            if time.monotonic() > deadline:
                raise Failed(f"{rec.name}: systemd is still {state} after {rec.start_timeout:.0f}s")
            bus.wait_change(0.1)

    def _wait_units(self, rec: Record, bus: SystemdBus, units: list[str], timeout: float, progress: Progress, longest: float = 0.1):
        """Until every unit is active (their states), or some failed (their states and the failures).
        The states are read when systemd announces a change (bus.watch, subscribed before the first
        read: no change is missed), and at least every `longest` seconds. A look asks each unit's
        ActiveState only (one call each: a unit that is starting answers late, and the whole state is
        six); the whole states are read once, at the end."""
        bus.watch(units)
        deadline = time.monotonic() + timeout
        booted = False  # systemd left initializing/starting: it never goes back, so it is not asked again
        said = -1
        while True:
            active = {u: bus.active_state(u) for u in units}
            up = sum(a == "active" for a in active.values())
            if up != said:  # said when it changes, not at every look (through tupperd, each is a signal)
                progress.update(f"{up}/{len(units)} active")
                said = up
            if up == len(units):
                return [bus.unit_state(u) for u in units], []
            failed = [u for u, a in active.items() if a == "failed"]
            booted = booted or (not failed and bus.system_state() not in ("initializing", "starting"))
            if not failed and booted:
                # Boot is over: a unit that is neither active nor on its way will not start (e.g. a
                # dependency failed, so its job was cancelled). Its state is read again once its job is
                # known to be gone: the job may have run between the two reads (a claimed pool
                # container's units start while systemd is already `running`).
                failed = [u for u, a in active.items() if a == "inactive" and not bus.has_job(u) and bus.active_state(u) == "inactive"]
            if not failed and time.monotonic() > deadline:
                failed = [u for u, a in active.items() if a != "active"]
            if failed:
                states = [bus.unit_state(u) for u in units]
                return states, [self._failure(rec, s) for s in states if s.name in failed]
            if not rec.alive():
                raise Failed(f"{rec.name}: the container exited while its units were starting")
            bus.wait_change(longest)

    def _wait_healthy(self, rec: Record, checked: list[ComponentEntry], progress: Progress) -> list[HealthFailure]:
        """Readiness: each checked component's check, often at first, until it passes once or its
        start deadline (start_period + retries x interval) passes. The checks of several components
        interleave; a run waits for the slowest."""
        t0 = time.monotonic()
        trackers = {c.name: health.Tracker(c.health.resolve(dict(c.env)), since=t0, restart_limit=0) for c in checked if c.health}
        due = dict.fromkeys(trackers, t0)
        delay: dict[str, float | None] = dict.fromkeys(trackers, None)
        while any(t.state == "starting" for t in trackers.values()):
            if not rec.alive():
                raise Failed(f"{rec.name}: the container exited while its health checks ran")
            name = min((n for n, t in trackers.items() if t.state == "starting"), key=lambda n: due[n])
            time.sleep(max(0.0, due[name] - time.monotonic()))
            tracker = trackers[name]
            result = probe.run(tracker.check, rec.leader_pid)
            tracker.feed(result.ok, result.detail, time.monotonic())
            wait = delay[name] = tracker.next_delay(delay[name])
            due[name] = time.monotonic() + wait
            progress.update(f"{sum(t.state == 'healthy' for t in trackers.values())}/{len(trackers)} healthy")
        took = time.monotonic() - t0
        return [HealthFailure(n, t.check.describe(), t.detail, took, self._component_journal(rec, n))
                for n, t in trackers.items() if t.state != "healthy"]

    def _component_journal(self, rec: Record, component: str) -> list[str]:
        entry = rec.component(component)
        units = entry.units if entry else ()
        return [line for u in units for line in self.journal_tail(rec, u, 5)]

    def _failure(self, rec: Record, s: UnitState) -> UnitFailure:
        result = s.result if s.result and s.result != "success" else ("dependency" if s.active_state == "inactive" else s.active_state)
        return UnitFailure(s.name, s.active_state, result, self.journal_tail(rec, s.name, 10))

    def journal_tail(self, rec: Record, unit: str | None, lines: int) -> list[str]:
        argv = self.logs_argv(rec, unit=unit, lines=lines, follow=False)
        out = proc.run(argv, check=False)
        return [line for line in out.stdout.splitlines() if line and not line.startswith("-- ")]

    def _discard(self, cdir: Path, name: str) -> None:
        """Undo a run, or finish a remove: nothing of the container may remain. Called with the store
        lock held. The directory leaves containers/ in one rename before it is deleted, so a crash
        leaves either the container (still removable) or garbage in tmp/ that `store check` removes."""
        boot_name = name
        try:
            rec = Record.load(cdir)
            boot_name = rec.boot_name
            if rec.alive():
                self._kill(rec)
        except NotFound:
            pass
        if not self.host.systemd:
            cgroups.remove(boot_name, parent=self.store.cgroup_parent)
        nspawn.remove_runtime_dirs(boot_name)
        if not cdir.exists():
            return
        trash = self.store.scratch("trash", name)
        os.rename(cdir, trash)
        durable.fsync_dir(cdir.parent)
        self.store.remove_tree(trash)

    # ---- stop / kill / rm ---------------------------------------------------------------------

    def restart(self, name: str, timeout: float | None = None, progress: Progress = SILENT) -> Record:
        """stop (PowerOff, SIGKILL after the timeout), then start; a stopped container is just started."""
        self.stop(name, timeout)
        self.start(self.record(name), progress=progress)
        return self.record(name)

    def stop(self, name: str, timeout: float | None = None) -> Record:
        rec = self.record(name)
        if not rec.alive():
            if rec.interrupted() and rec.phase == "stopping":
                rec.end("stopped")
            return rec
        timeout = rec.stop_timeout if timeout is None else timeout
        rec.begin("stopping")
        _save_if_possible(rec)
        bus = None
        try:
            bus = self.connect_bus(rec.leader_pid, timeout=1.0, alive=rec.alive)
        except Failed:
            pass
        self._halt(rec, bus, timeout)
        if bus is not None:
            bus.close()
        self.net.release(rec)
        _end_if_possible(rec, "stopped")
        return rec

    def _halt(self, rec: Record, bus: SystemdBus | None, timeout: float) -> None:
        """PowerOff over D-Bus; SIGKILL the container when it is not down within `timeout`."""
        if bus is not None:
            try:
                bus.power_off()
            except Exception:  # noqa: BLE001 - the bus may go away mid-call as the container shuts down
                pass
        if not monitor.wait_exit(rec.nspawn_pid, rec.alive, time.monotonic() + timeout):
            self._kill(rec)
        self._wait_monitor(rec)

    def _kill(self, rec: Record) -> None:
        """SIGKILL the container's PID 1 (the kernel then kills its whole PID namespace); nspawn then
        exits by itself, cleaning up after it. nspawn is killed too only if it does not."""
        if rec.leader_pid and rec.alive() and proc.pid_alive(rec.leader_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.leader_pid, signal.SIGKILL)
        if not monitor.wait_exit(rec.nspawn_pid, rec.alive, time.monotonic() + 3.0) and rec.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.nspawn_pid, signal.SIGKILL)
            monitor.wait_exit(rec.nspawn_pid, rec.alive, time.monotonic() + 3.0)
        self._wait_monitor(rec)

    def _wait_monitor(self, rec: Record, timeout: float = 5.0) -> None:
        """After nspawn exited: until the process that parented it (the keeper; a monitor process per
        container in tupper before 2026-12) has recorded its exit and cleaned up, or the keeper that
        adopted it where that process was killed."""
        if rec.monitor_pid and proc.pid_alive(rec.monitor_pid) and not self.keeper.parents(rec.monitor_pid):
            monitor.wait_exit(rec.monitor_pid, lambda: proc.pid_alive(rec.monitor_pid), time.monotonic() + timeout)
        else:
            self.keeper.wait(rec.nspawn_pid, timeout)
        self.reap(rec)

    def reap(self, rec: Record) -> None:
        """After nspawn exited: what its keeper does last (the exit recorded, cgroups and nspawn's
        runtime dirs removed), done here when the keeper was killed before it could."""
        if rec.alive() or (rec.monitor_pid and proc.pid_alive(rec.monitor_pid)):
            return
        if rec.nspawn_pid and rec.exit_info() is None and rec.dir.exists():
            with contextlib.suppress(OSError):
                records.mark_exit(rec.dir, None, note="its keeper process was killed: the exit status is unknown")
        if not self.host.systemd:
            cgroups.remove(rec.boot_name, parent=self.store.cgroup_parent)
        nspawn.remove_runtime_dirs(rec.boot_name)

    def update(self, name: str, component: str | None, changes: dict[str, str]) -> UpdateResult:
        """Change resource limits of a container (or of one of its components), live if it runs
        (like `podman update`, `systemctl set-property`); kept in the record for its next starts."""
        from tupper.model import resources

        rec = self.record(name)
        entry = None
        if component is not None:
            entry = rec.component(component)
            if entry is None:
                raise InvalidInput(f"container {name!r} has no component {component!r} (it has: {', '.join(c.name for c in rec.components)})")
        if not changes:
            raise InvalidInput("nothing to update: give at least one limit", hint="see `tupper update --help`")
        old = entry.resources if entry is not None else rec.resources
        where = f"tupper update {name}" + (f" --component {component}" if component else "") + ": resources"
        new = resources.parse_mapping({k: resources.from_text(v) for k, v in changes.items()}, where, base=old)
        notes: list[str] = []
        if rec.alive():
            notes = self._apply_live(rec, component, new, old)
        if entry is not None:
            rec.components = [attrs.evolve(c, resources=new) if c is entry else c for c in rec.components]
        else:
            rec.resources = new
        rec.save()
        return UpdateResult(new, tuple(notes), applied=rec.alive())

    def _apply_live(self, rec: Record, component: str | None, new: Resources, old: Resources) -> list[str]:
        if self.host.systemd:
            raise Failed(f"container {rec.name!r}: live updates on a host run by systemd (through machined's scope) are not "
                         "supported yet", hint="stop the container, update it, start it again")
        layout = cgroups.Layout.detect()
        if component is not None and layout.kind == "v2":
            raise Failed(f"container {rec.name!r}: live updates of a component on a pure cgroup2 host (through the "
                         "container's systemd) are not supported yet", hint="stop the container, update it, start it again")
        dirs = cgroups.controller_dirs(rec.boot_name, self.store.cgroup_parent, component=component, layout=layout)
        try:
            return cgroups.apply(dirs, new, layout.kind)
        except cgroups.LimitError as exc:
            with contextlib.suppress(cgroups.LimitError):
                cgroups.apply(dirs, old, layout.kind)  # what was there before, as far as it goes back
            raise Failed(f"container {rec.name!r}: {exc.strerror}; nothing changed") from None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> Record:
        """SIGKILL: the container ends now (nspawn and everything in it), recorded as stopped. Any other
        signal goes to its PID 1 (systemd: SIGRTMIN+3 halts, SIGTERM re-executes, …)."""
        if not 1 <= sig <= signal.SIGRTMAX:
            raise InvalidInput(f"invalid signal number {sig}")
        if sig != signal.SIGKILL:
            rec = self.running(name)
            os.kill(rec.leader_pid, sig)
            return rec
        rec = self.record(name)
        rec.begin("stopping")
        _save_if_possible(rec)
        self._kill(rec)
        self.net.release(rec)
        _end_if_possible(rec, "stopped")
        return rec

    def remove(self, name: str, *, force: bool = False) -> None:
        """Delete a container; also whatever an interrupted operation or a damaged record left of one."""
        check_name(name, "container name")
        cdir = self._dir(name)
        try:
            rec = Record.load(cdir)
        except (NotFound, ValueError, KeyError, TypeError):  # no record, or one that cannot be read: what is left goes
            if not cdir.is_dir():
                raise
            with self.store.lock():
                self.discard_broken(cdir)
            return
        if rec.owner_alive() and rec.phase in records.TRANSITIONAL:
            raise Busy(f"container {name!r} is {rec.state()} (pid {rec.owner_pid} is working on it)", hint="wait for it to finish")
        if rec.alive() and not force and not rec.interrupted():
            raise Busy(f"container {name!r} is {rec.state()}", hint=f"stop it first (`tupper stop {name}`) or use --force")
        rec.begin("removing")
        _save_if_possible(rec)
        if rec.alive():
            self._kill(rec)
        self.net.release(rec)
        with self.store.lock():
            self._discard(rec.dir, name)

    def discard_broken(self, cdir: Path) -> None:
        """Remove a container directory whose record is missing or unreadable (store lock held)."""
        if not self.host.systemd:
            cgroups.remove(cdir.name, parent=self.store.cgroup_parent)
        if cdir.exists():
            trash = self.store.scratch("trash", cdir.name)
            os.rename(cdir, trash)
            self.store.remove_tree(trash)

    # ---- after a crash ---------------------------------------------------------------------------

    def recover(self, rec: Record) -> str | None:
        """Finish or undo the operation a dead process left half-done on `rec`; say what was done.

        creating: the run never returned success, so it is undone (the container is removed);
        starting: the container is stopped (state `failed`); stopping: the stop is finished;
        removing: the removal is finished; a live upgrade: the old version is put back."""
        if not rec.interrupted():
            return None
        phase = rec.phase
        if phase in ("creating", "removing"):
            with self.store.lock():
                self._discard(rec.dir, rec.name)
            self.net.release(rec)
            return f"removed (its {'run' if phase == 'creating' else 'rm'} was interrupted)"
        if phase == "starting":
            if rec.alive():
                self._kill(rec)
            self.net.release(rec)
            rec.end("failed")
            return "stopped, state failed (its start was interrupted)"
        if phase == "stopping":
            if rec.alive():
                self._halt(rec, None, min(rec.stop_timeout, 5.0))
            self.net.release(rec)
            rec.end("stopped")
            return "stopped (its stop was interrupted)"
        if rec.upgrade is not None:
            return self.live.recover_upgrade(rec)
        return None


    # ---- warm pools (tupper.runtime.pools, docs/pools.md) ------------------------------------------

    def pool_members(self, image: str | None = None) -> list[Record]:
        """The pools' containers (of one image), ready, booting or broken."""
        # A pool container's directory has a pool name until it is claimed (renamed): no other record is read.
        return [r for r in self.records(pools.is_pool_name) if r.pool and (image is None or r.pool == image)]

    def list_pools(self) -> list[pools.PoolView]:
        return pools.views(pools.load(self.store.root), self.pool_members())

    def set_pool(self, image: str, size: int) -> pools.PoolView:
        """Keep `size` containers of `image` booted (tupperd fills the pool in the background; see fill_pool)."""
        pools.check_size(size)
        if self.host.systemd:
            raise Failed("warm pools are not supported on a host run by systemd yet (machined registers a machine at its boot)",
                         hint="run without a pool; `tupper run` boots cold")
        if not Images(self.store).exists(image):
            raise NotFound(f"no image {image!r} in the store", hint="`tupper image ls` lists them; build or import it first")
        with self.store.lock():
            configured = pools.load(self.store.root)
            configured[image] = size
            pools.save(self.store.root, configured)
        return next(v for v in self.list_pools() if v.image == image)

    def remove_pool(self, image: str) -> list[str]:
        """Forget the pool of `image` and remove its containers that are not being claimed; their names."""
        with self.store.lock():
            configured = pools.load(self.store.root)
            if image not in configured and not self.pool_members(image):
                raise NotFound(f"no pool of image {image!r}", hint="`tupper pool ls` lists them")
            configured.pop(image, None)
            pools.save(self.store.root, configured)
        return self.drain_pool(image)

    def drain_pool(self, image: str) -> list[str]:
        """Remove what the pool of `image` holds beyond its size: extra ready containers (the newest
        first), and members that died or failed to boot. Booting ones are left to their booter."""
        size = pools.load(self.store.root).get(image, 0)
        members = self.pool_members(image)
        ready = sorted((r for r in members if pools.member_state(r) == "ready"), key=lambda r: r.started_at)
        doomed = ready[size:] + [r for r in members if pools.member_state(r) not in ("ready", "booting")]
        return [rec.name for rec in doomed if self._retire(rec)]

    def _retire(self, rec: Record) -> bool:
        """Remove a pool container unless someone (a claim) took it meanwhile."""
        with self.store.lock():
            try:
                rec = Record.load(rec.dir)
            except (NotFound, ValueError, KeyError, TypeError):
                return False
            if not rec.pool or rec.owner_alive():
                return False
            rec.begin("removing")
            rec.save()
        if rec.alive():
            self._kill(rec)
        self.net.release(rec)
        with self.store.lock():
            self._discard(rec.dir, rec.name)
        return True

    def pool_wants(self) -> list[str]:
        """The images whose pool has fewer ready or booting containers than its size, the emptiest first."""
        configured = pools.load(self.store.root)
        views = [v for v in pools.views(configured, self.pool_members()) if v.size > 0]
        short = [(sum(m.state in ("ready", "booting") for m in v.members) - v.size, v.image) for v in views]
        return [image for gap, image in sorted(short) if gap < 0]

    def fill_pool(self, image: str, progress: Progress = SILENT) -> Record:
        """Boot one container into the pool of `image`: no components, systemd booted to `running`."""
        taken = {d.name for d in self.store.containers_dir.iterdir()}
        spec = Spec(name=pools.new_name(taken), image=image, components=(), file=f"<pool {image}>", network=pools.POOL_NETWORK)
        rec = self.create(spec, progress, pool=image)
        try:
            self.start(rec, progress=progress, first=True)
        except BaseException:
            with self.store.lock():
                self._discard(rec.dir, rec.name)
            raise
        return self.record(rec.name)

    def claim(self, spec: Spec, *, keep_failed: bool = False, progress: Progress = SILENT) -> tuple[Record, list[UnitState]] | None:
        """Run `spec` in a ready container of its image's warm pool, if there is one and the spec asks
        for nothing a booted container cannot take (pools.cold_reasons); None: boot cold instead.

        The container takes the spec's name (its directory renamed, its address moved), hostname,
        limits, components (bind mounts put into its mount namespace), unit files, secrets agent and
        published ports; then its units are started through its systemd without a daemon-reload where
        systemd never loaded their names (see docs/pools.md). A claim that fails half-way, or whose
        units fail, destroys the container: it never goes back into the pool."""
        if not self.pool_members(spec.image):
            return None
        why = pools.cold_reasons(spec, systemd_host=self.host.systemd, cgroup_kind=cgroups.Layout.detect().kind)
        if why:
            progress.note(f"{spec.name}: booting cold, not from the pool: {why[0]}")
            return None
        self._check_name_free(spec)
        self._check_units_do_not_shadow_the_image(spec, Images(self.store).path(spec.image))
        self._check_secrets(spec)
        network = self._check_network(spec)
        rec = self._take_from_pool(spec, network)
        if rec is None:
            return None
        try:
            states = self._configure_claimed(rec, spec, keep_failed, progress)
        except RunFailed as exc:
            if not exc.kept:
                with self.store.lock():
                    self._discard(rec.dir, rec.name)
            raise
        except BaseException:
            if rec.alive():
                self._kill(rec)
            self.net.release(rec)
            with self.store.lock():
                self._discard(rec.dir, rec.name)
            raise
        return rec, states

    def _take_from_pool(self, spec: Spec, network: NetworkSpec) -> Record | None:
        """Under the network and store locks: the oldest ready pool container of the spec's image becomes
        the spec's container (record, directory, address), owned by this process (phase `creating`: a
        claim cut short is undone by `recover`, like a run).

        These writes are not fsynced here: a killed tupperd leaves them in the page cache, where its
        successor reads them, which is all that a container that still runs needs. They only matter on
        disk after a power cut, when no container runs; _sync_claim makes them durable while the
        container's systemd starts the units, before the run answers. A power cut before that leaves a
        state that the journal (ext4) or the transaction (btrfs) of the store orders like the writes: the
        pool container (dead: drained) or the claim cut short (removed)."""
        net = self.net
        with net.lock():
            with self.store.lock():
                self._check_name_free(spec)
                ready = sorted((r for r in self.pool_members(spec.image) if pools.member_state(r) == "ready"), key=lambda r: r.started_at)
                if not ready:
                    return None
                rec = ready[0]
                old = rec.name
                rec.begin("creating")
                rec.machine, rec.pool = rec.boot_name, ""
                for key, value in self._spec_fields(spec, network, []).items():
                    setattr(rec, key, value)
                rec.started_at = rec.created_at
                rec.save(sync=False)
                os.rename(rec.dir, self._dir(spec.name))
                rec.dir = self._dir(spec.name)
            net.networks.rename(old, spec.name, sync=False)
        return rec

    def _sync_claim(self, rec: Record) -> None:
        """What _take_from_pool wrote, on disk: the record, its directory's new name, the address's new owner."""
        networks = self.net.networks.path
        durable.sync(rec.dir / records.RECORD, rec.dir, self.store.containers_dir, networks, networks.parent)

    def _configure_claimed(self, rec: Record, spec: Spec, keep_failed: bool, progress: Progress) -> list[UnitState]:
        from tupper.container import mountns

        with progress.step(f"Claiming a warm {spec.image} container for {rec.name}"):
            mountns.set_hostname(rec.leader_pid, nspawn.machine_name(rec.name))
            self._make_cgroups(rec, progress, exist=True)
            binds = [(c.source, c.mount) for c in rec.components]
            self._make_mount_points(rec, [target for _, target in binds])
            if rec.grants:
                binds.append((str(self.store.agent_dir(rec.name)), unitfiles.AGENT_DIR))
            for source, target in binds:
                mountns.replace_mount(rec.leader_pid, source, target)
            unitfiles.write(rec.rootfs, unitfiles.plan(spec))
        bus = self.connect_bus(rec.leader_pid, timeout=5.0, alive=rec.alive)
        try:
            # systemd reads a unit file when a name is first referred to; one it has never seen is loaded
            # from disk, drop-ins included, by StartUnit. A name it holds (the image refers to it) needs a reload.
            if bus.loaded([unitfiles.TARGET, *rec.units]):
                bus.reload()
            bus.start_unit(unitfiles.TARGET)
            # While its systemd starts them (~20 ms): the claim made durable, its published ports, its name in
            # every /etc/hosts (as in a cold start, where this is done while systemd boots: in place before
            # the run is reported done).
            self._sync_claim(rec)
            self.net.publish(rec)
            return self._settle_units(rec, bus, keep_failed, progress)
        finally:
            bus.close()

    # ---- named volumes -------------------------------------------------------------------------

    def volumes_in_use(self) -> dict[str, list[str]]:
        """Named volume -> the containers (running or not) whose record names it."""
        used: dict[str, list[str]] = {}
        for rec in self.records():
            for v in rec.volumes:
                if v.volume:
                    used.setdefault(v.volume, []).append(rec.name)
        return used

    def create_volume(self, name: str) -> dict:
        with self.store.lock():
            Volumes(self.store).create(name)
        return self.inspect_volume(name, size=False)

    def list_volumes(self) -> list[dict]:
        """Every named volume with the containers that use it (no size: that takes a walk of each)."""
        volumes, used = Volumes(self.store), self.volumes_in_use()
        return [volumes.get(name, used.get(name, ())).to_json() for name in volumes.names()]

    def inspect_volume(self, name: str, *, size: bool = True) -> dict:
        volumes = Volumes(self.store)
        out = volumes.get(name, self.volumes_in_use().get(name, ())).to_json()
        out["size"] = volumes.size(volumes.path(name)) if size else None
        return out

    def remove_volume(self, name: str) -> None:
        """Delete a named volume and its data; refused while any container record names it."""
        volumes = Volumes(self.store)
        volumes.get(name)
        with self.store.lock():
            volumes.remove(name, self.volumes_in_use().get(name, []))

    def prune_volumes(self) -> list[str]:
        """Remove every named volume no container record names."""
        volumes, removed = Volumes(self.store), []
        with self.store.lock():
            used = self.volumes_in_use()
            for name in volumes.names():
                if not used.get(name):
                    volumes.remove(name, [])
                    removed.append(name)
        return removed

    # ---- cp ------------------------------------------------------------------------------------

    def copy_from(self, name: str, path: str, dest: str) -> rootcopy.CopyResult:
        """`tupper cp NAME:PATH DEST`: PATH resolved inside the container's root (tupper.container.rootcopy)."""
        where = f"{name}:{path}"
        rootcopy.container_path(path, where)
        rec = self.record(name)
        with self._copy_root(rec, path, where, write=False) as (root, inner):
            return rootcopy.copy_out(root, inner, dest, where, root_name=PurePosixPath(path).name or rec.name)

    def copy_to(self, name: str, src: str, path: str) -> rootcopy.CopyResult:
        """`tupper cp SRC NAME:PATH`: written inside the container's root, never through a symlink out of it."""
        where = f"{name}:{path}"
        rootcopy.container_path(path, where)
        rec = self.record(name)
        with self._copy_root(rec, path, where, write=True) as (root, inner):
            try:
                return rootcopy.copy_in(src, root, inner, where)
            except OSError as exc:
                if exc.errno == errno.EROFS:
                    raise Failed(f"{where}: read-only in the container (a read-only volume or a component's mount)") from None
                raise

    @contextlib.contextmanager
    def _copy_root(self, rec: Record, path: str, where: str, *, write: bool):
        """(the root to copy in, the path in it). A running container: its root as its processes see it,
        mounts included (/proc/LEADER/root). A stopped one: its snapshot, or the volume or component whose
        mount point holds `path` (nothing is mounted in the snapshot)."""
        pure = PurePosixPath("/" + rootcopy.container_path(path, where))
        self.store.ensure_root(rec.rootfs)
        for v in rec.volumes:
            if v.read_only and write and (pure == PurePosixPath(v.target) or PurePosixPath(v.target) in pure.parents):
                raise InvalidInput(f"{where}: {v.target} is a read-only volume of the container")
        for c in rec.components:
            if write and (pure == PurePosixPath(c.mount) or PurePosixPath(c.mount) in pure.parents):
                raise InvalidInput(f"{where}: {c.mount} is component {c.name}'s read-only mount")
        base, inner = str(rec.rootfs), path
        if rec.alive() and rec.leader_pid:
            base = f"/proc/{rec.leader_pid}/root"
        else:
            for target, source in [(v.target, v.source) for v in rec.volumes] + [(c.mount, c.source) for c in rec.components]:
                t = PurePosixPath(target)
                if pure == t or t in pure.parents:
                    if os.path.isdir(source):
                        base, inner = source, "/" + str(pure.relative_to(t)).lstrip(".") + ("/" if path.endswith("/") else "")
                    else:  # a file volume: its directory on the host, and its name there
                        base, inner = os.path.dirname(source), "/" + os.path.basename(source)
                    break
        try:
            root = Root(base)
        except OSError as exc:
            raise Failed(f"{where}: cannot open the container's root {base}: {exc.strerror}") from None
        with root:
            if base.startswith("/proc/") and not rec.alive():  # it stopped, and the pid may be another process's now
                raise Failed(f"{where}: container {rec.name!r} stopped during the copy; try again")
            yield root, inner

    # ---- inside the container -----------------------------------------------------------------

    def running(self, name: str) -> Record:
        rec = self.record(name)
        if not rec.alive() or not rec.leader_pid:
            raise Failed(f"container {name!r} is not running (state: {rec.state()})")
        return rec

    def status(self, name: str, health: tuple[ComponentHealth, ...] | None = None) -> ContainerStatus:
        """Its record, its units as its systemd sees them, OOM kills. `health`: what tupperd's checks
        know; None (no tupperd checks it) runs each check once now."""
        rec = self.record(name)
        if health is None:
            health = self._health_now(rec)
        states: dict[str, UnitState] = {}
        system_state = None
        if rec.alive() and rec.leader_pid:
            try:
                with self.connect_bus(rec.leader_pid, timeout=2.0, alive=rec.alive) as bus:
                    system_state = bus.system_state()
                    states = {u: bus.unit_state(u) for u in rec.units}
            except Failed:
                pass
        total, ooms = self.oom_counter(rec).read()
        return ContainerStatus.of(rec, states, system_state, total, ooms, health)

    def inspect(self, name: str) -> dict:
        """Everything about one container (`tupper inspect`): its record, where it lives on the host (root,
        machine name, cgroups), what is bound into it, its components with their installed digests, its
        last exit, and the os-release of its image."""
        from tupper.store.packages import Installer

        rec = self.record(name)
        out = rec.to_json()
        out["rootfs"] = str(rec.rootfs)
        out["machine"] = nspawn.machine_name(rec.name)
        out["nspawn_pid"] = rec.nspawn_pid if rec.alive() else None
        out["monitor_pid"] = rec.monitor_pid if rec.alive() else None
        out["phase"] = rec.phase
        out["cgroups"] = {k: str(v) for k, v in cgroups.controller_dirs(rec.boot_name, self.store.cgroup_parent).items()}
        out["mounts"] = [{"source": c.source, "target": c.mount, "read_only": True, "component": c.name} for c in rec.components]
        out["mounts"] += [{"source": v.source, "target": v.target, "read_only": v.read_only, "component": None, "volume": v.volume or None}
                          for v in rec.volumes]
        if rec.grants:
            out["mounts"].append({"source": str(self.store.agent_dir(rec.name)), "target": unitfiles.AGENT_DIR, "read_only": False,
                                  "component": None})
        installed = {str(i.path): i for i in Installer(self.store).list()}
        for entry, c in zip(out["components"], rec.components, strict=True):
            found = installed.get(c.source)
            entry["source"] = c.source
            entry["units"] = list(c.units)
            entry["installed"] = found is not None
            entry["digest"] = found.digest if found else None
        out["last_exit"] = rec.exit_info()
        image = Images(self.store)
        release: dict[str, str] = {}
        if image.exists(rec.image):
            with Root(image.path(rec.image)) as root:
                text = root.read_text("etc/os-release") or root.read_text("usr/lib/os-release") or ""
            for line in text.splitlines():
                key, sep, value = line.partition("=")
                if sep and key.strip() and not key.startswith("#"):
                    release[key.strip()] = value.strip().strip('"')
        out["image_os_release"] = release
        return out

    def oom_counter(self, rec: Record) -> OOMCounter:
        """Where the container's OOM kills are counted: found once, read as often as wanted (tupperd)."""
        parent = self.store.cgroup_parent
        layout = cgroups.Layout.detect()
        mine = cgroups.controller_dirs(rec.boot_name, parent, layout=layout)
        top = mine.get("memory") or mine.get("unified")
        hierarchy = layout.controller("memory")  # the unified one on a pure cgroup2 host
        memcg = "/" + str(top.relative_to(hierarchy.mount)) if top is not None and hierarchy is not None else None
        return OOMCounter(total=top,
                          components=tuple((c.name, cgroups.controller_dirs(rec.boot_name, parent, component=c.name, layout=layout).get("memory"))
                                           for c in rec.components),
                          nested=layout.kind == "v2", memcg=memcg,
                          units=tuple((u, c.name) for c in rec.components for u in c.units))

    @staticmethod
    def run_checks(checks: list[tuple[health.HealthCheck, int]]) -> list[probe.Result]:
        """Resolved health checks of running containers, (check, leader PID) each, one after the other:
        tupperd's liveness checks due at one moment (blocking; tupperd runs it in a worker thread)."""
        return probe.run_many(checks)

    def _health_now(self, rec: Record) -> tuple[ComponentHealth, ...]:
        if not (rec.alive() and rec.leader_pid and rec.state() == "running"):
            return ()
        out = []
        for c in rec.components:
            if c.health:
                check = c.health.resolve(dict(c.env))
                result = probe.run(check, rec.leader_pid)
                out.append(ComponentHealth(c.name, "healthy" if result.ok else "unhealthy", check.describe(), result.detail))
        return tuple(out)

    def stats(self, names: list[str] | None = None) -> list[ContainerStats]:
        """CPU, memory, IO, pids and pressure of the named containers (default: every running one) and of
        their components, read from their cgroups (tupper.runtime.stats)."""
        recs = [self.record(n) for n in names] if names else [r for r in self.records() if r.alive() and not r.pool]
        layout = cgroups.Layout.detect()
        return [self._stats(rec, layout) for rec in recs]

    def _stats(self, rec: Record, layout: cgroups.Layout) -> ContainerStats:
        parent = self.store.cgroup_parent
        now = time.time()
        if not rec.alive() or self.host.systemd:
            return ContainerStats(rec.name, rec.state(), rec.started_at, Usage(at=now))
        usage = Usage(at=now, **cgroups.usage(cgroups.controller_dirs(rec.boot_name, parent, layout=layout), layout.kind),
                      pressure=_pressure(cgroups.pressure(layout.unified_dir(parent, rec.boot_name))))
        comps = []
        for c in rec.components:
            unit_dirs = [d for u in c.units if (d := cgroups.unit_dir(rec.boot_name, u, parent, layout, unified=True)) is not None]
            if layout.kind == "v2":  # the component's units' cgroups, added up
                parts = [cgroups.usage({"unified": d}, "v2") for d in unit_dirs]
                figures = {k: sum(p[k] or 0 for p in parts) if any(p.get(k) is not None for p in parts) else None
                           for k in ("cpu_ns", "memory", "memory_peak", "io_read", "io_write", "pids")}
            else:
                figures = cgroups.usage(cgroups.controller_dirs(rec.boot_name, parent, component=c.name, layout=layout), layout.kind)
            # A component's pressure: its most stalled unit's.
            worst: dict[str, tuple[float | None, float | None]] = {}
            for d in unit_dirs:
                for kind, (some, full) in cgroups.pressure(d).items():
                    was = worst.get(kind, (None, None))
                    worst[kind] = (_max(was[0], some), _max(was[1], full))
            comps.append((c.name, Usage(at=now, **figures, pressure=_pressure(worst))))
        return ContainerStats(rec.name, rec.state(), rec.started_at, usage, tuple(comps))

    # ---- components ---------------------------------------------------------------------------

    def resolve_component(self, name: str, version: str | None, where: str) -> Path:
        """spec.Resolver: an installed component's directory in the store."""
        from tupper.store.packages import Installer

        try:
            return Installer(self.store).get(name, version).path
        except NotFound as exc:
            raise InvalidInput(f"{where}: {exc.message}", hint=exc.hint) from None

    def components_in_use(self, path: Path) -> list[str]:
        return [r.name for r in self.records()
                if any(c.source == str(path) for c in r.components) or (r.upgrade is not None and r.upgrade.to_source == str(path))]

    # ---- live changes to running containers (tupper.runtime.live) -----------------------------

    @property
    def live(self) -> LiveChanges:
        return LiveChanges(self)

    def upgrade(self, name: str, component: str, version: str, progress: Progress = SILENT) -> dict:
        return self.live.upgrade(name, component, version, progress)

    def unit_job(self, name: str, unit: str, method: str) -> str:
        return self.live.unit_job(name, unit, method)

    def secret_holders(self) -> list[tuple[str, str, str]]:
        return self.live.secret_holders()

    def rotate_secret(self, secret: str) -> list[str]:
        return self.live.rotate_secret(secret)

    def exec_fds(self, name: str, argv: list[str], stdin: int, stdout: int, stderr: int, *, env: dict[str, str] | None = None,
                 user: str | None = None, workdir: str | None = None) -> int:
        """exec with the caller's file descriptors (the daemon receives them over D-Bus); `env`, `user`
        and `workdir` as `tupper exec -e/-u/-w` give them, each checked against the container first."""
        rec = self.running(name)
        root = f"/proc/{rec.leader_pid}/root"
        shells.check_options(root, name, "exec", env=env, user=user, workdir=workdir)
        path = shells.command_path(root, name, argv[0] if argv else "")
        return run_command(rec.leader_pid, [path, *argv[1:]], stdin=stdin, stdout=stdout, stderr=stderr, env=env, user=user,
                           workdir=workdir or "/")

    def container_of_pid(self, pid: int) -> str:
        """The container a host process is part of: its own nspawn, or a descendant of it (every process
        of a container descends from its nspawn; orphans go to the container's PID 1), as machined's
        GetMachineByPID answers."""
        if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
            raise NotFound(f"no process {pid}")
        owners = {}
        for rec in self.records():
            if rec.alive():
                owners[rec.nspawn_pid] = rec.name
                owners[rec.leader_pid] = rec.name
        seen, current = set(), pid
        while current > 1 and current not in seen:
            if current in owners:
                return owners[current]
            seen.add(current)
            current = _parent_pid(current)
        raise NotFound(f"process {pid} is not part of any container")

    def open_shell(self, name: str, *, user: str | None = None, argv: list[str] | None = None, env: dict[str, str] | None = None,
                   workdir: str | None = None, term: str = "", rows: int = 0, cols: int = 0) -> shells.Session:
        """`tupper shell` and `exec -it`: a login shell of `user` (default root), or `argv`, on a new
        pseudo-terminal inside the container; the caller relays the session's master and closes it, then
        reads the exit code from `session.exit` (see runtime/shells.py)."""
        rec = self.running(name)
        return shells.open_session(rec.leader_pid, name, argv=argv, user=user, env=env, workdir=workdir, term=term,
                                   rows=rows, cols=cols)

    @staticmethod
    def logs_argv(rec: Record, *, unit: str | None = None, lines: int | None = None, follow: bool = False, component: str | None = None,
                  since: str | None = None, until: str | None = None, priority: str | None = None,
                  output: str = "short-precise") -> list[str]:
        """journalctl on the host, reading the container's journal files (no process inside). Every
        option is checked first (tupper.model.journal): a bad one is an InvalidInput naming it."""
        from tupper.model import journal

        root = f"/proc/{rec.leader_pid}/root" if rec.alive() and rec.leader_pid else str(rec.rootfs)
        argv = ["journalctl", f"--root={root}", "--no-pager", f"--output={journal.output(output)}"]
        units = [unit] if unit else []
        if component is not None:
            entry = next((c for c in rec.components if c.name == component), None)
            if entry is None:
                known = ", ".join(c.name for c in rec.components) or "none"
                raise InvalidInput(f"--component {component}: container {rec.name} has no component {component!r}",
                                   hint=f"its components: {known}")
            units += entry.units
        for name in units:
            argv += ["--unit", name]
        if since is not None:
            argv.append(f"--since={journal.timestamp(since, '--since')}")
        if until is not None:
            argv.append(f"--until={journal.timestamp(until, '--until')}")
        if priority is not None:
            argv.append(f"--priority={journal.priority(priority)}")
        if lines is not None:
            argv += ["--lines", str(lines)]
        if follow:
            argv.append("--follow")
        return argv


def _parent_pid(pid: int) -> int:
    """PPid of a process (0 where it does not exist, or is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return 0


def _pressure(figures: dict[str, tuple[float | None, float | None]]) -> tuple[tuple[str, Pressure], ...]:
    return tuple((kind, Pressure(some, full)) for kind, (some, full) in figures.items())


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _save_if_possible(rec: Record) -> None:
    """Stopping and removing must work on a full disk: the phase is saved if there is room for it."""
    try:
        rec.save()
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        log.warning("%s: no space left to record the phase %s; going on", rec.name, rec.phase)


def _end_if_possible(rec: Record, phase: str) -> None:
    try:
        rec.end(phase)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        log.warning("%s: no space left to record the phase %s", rec.name, phase)
