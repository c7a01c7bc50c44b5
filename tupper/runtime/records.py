"""Per-container state on disk (`containers/<name>/record.json`), so any tupper process can find what runs.

The monitor writes `exit.json` when nspawn exits; the state shown to users is derived from both and /proc.
Every write is durable and atomic (temporary file, fsync, rename, fsync of the directory): after a
crash or a power cut a reader finds the old record or the new one, never half of one.

A multi-step operation (create, start, stop, remove, a live upgrade) first records its phase and its
owner (pid + start time). If the owner dies before it records the end, the record says so
(`interrupted()`), and `Runtime.recover` finishes or undoes the operation.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import attrs

from tupper import proc
from tupper.durable import write_json
from tupper.errors import NotFound
from tupper.model.health import HealthCheck
from tupper.model.network import NetworkSpec
from tupper.model.resources import Resources

RECORD = "record.json"
EXIT = "exit.json"


# Phases an operation passes through; a record left in one of them by a dead owner was interrupted.
TRANSITIONAL = frozenset({"creating", "starting", "stopping", "removing"})
# States `tupper prune` removes, in containers that do not run (a `failed` one kept running by --keep-failed does).
PRUNABLE = frozenset({"stopped", "failed", "exited", "crash-loop"})


def _strs(value) -> tuple[str, ...]:
    return tuple(str(v) for v in value or ())


@attrs.frozen
class ComponentEntry:
    """One component as the container was made with it (or live-upgraded to): typed in memory, a JSON
    object on disk (the keys of records written before this type existed are the same)."""

    name: str
    version: str
    mount: str
    source: str  # the component's directory on the host (an installed version, or a spec's path)
    units: tuple[str, ...] = attrs.field(converter=_strs)
    env: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=lambda kv: tuple((str(k), str(v)) for k, v in kv or ()))
    requires: tuple[str, ...] = attrs.field(default=(), converter=_strs)
    secrets: tuple[str, ...] = attrs.field(default=(), converter=_strs)
    on_rotate: str = "restart"
    resources: Resources = Resources()  # limits of this component's units (the spec's, then `tupper update`'s)
    health: HealthCheck | None = None  # its manifest's [health] check

    @classmethod
    def from_json(cls, data: dict) -> ComponentEntry:
        fields = {f.name: data[f.name] for f in attrs.fields(cls) if f.name in data}
        fields["resources"] = Resources.from_json(data.get("resources"), f"record: components.{data.get('name')}.resources")
        fields["health"] = HealthCheck.from_json(data.get("health"), f"record: components.{data.get('name')}")
        return cls(**fields)

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "mount": self.mount, "source": self.source, "units": list(self.units),
                "env": [list(kv) for kv in self.env], "requires": list(self.requires), "secrets": list(self.secrets),
                "on_rotate": self.on_rotate, "resources": self.resources.to_json(),
                **({"health": self.health.to_json()} if self.health else {})}


@attrs.frozen
class VolumeEntry:
    """One bind of the spec's [[volumes]], as the container was made with it: the host path nspawn binds
    (a named volume's subvolume, or the spec's host path, resolved) and, for a named volume, its name."""

    source: str
    target: str
    read_only: bool = False
    volume: str = ""  # the named volume's name; "" for a host path

    @classmethod
    def from_json(cls, data: dict) -> VolumeEntry:
        return cls(source=str(data["source"]), target=str(data["target"]), read_only=bool(data.get("read_only", False)),
                   volume=str(data.get("volume") or ""))

    def to_json(self) -> dict:
        return {"source": self.source, "target": self.target, "read_only": self.read_only, "volume": self.volume or None}


@attrs.frozen
class PendingUpgrade:
    """A live upgrade under way: what to roll back to if its process dies half-way."""

    component: str
    version: str  # the version it replaces
    source: str  # ... and its directory
    to_source: str  # the directory of the version it installs

    def to_json(self) -> dict:
        return attrs.asdict(self)


@attrs.define
class Record:
    name: str
    dir: Path
    image: str
    spec_file: str
    created_at: float
    stop_timeout: float
    start_timeout: float = 60.0
    restart_policy: str = "no"
    restart_delay: float = 1.0
    restart_limit: int = 5
    grants: dict = attrs.Factory(dict)  # credential ID -> secret name (names only, never values)
    labels: dict = attrs.Factory(dict)  # the spec's [labels]
    components: list[ComponentEntry] = attrs.Factory(list)
    volumes: list[VolumeEntry] = attrs.Factory(list)  # the spec's [[volumes]]
    resources: Resources = Resources()  # limits of the whole container (the spec's, then `tupper update`'s)
    network: NetworkSpec = NetworkSpec()  # its [network]; records from before networks: the host's
    address: str = ""  # its IPv4 address on its network while it runs (private mode), else ""
    address6: str = ""
    phase: str = "creating"  # creating → running | failed; starting → running | failed; stopping → stopped; crash-loop; removing
    owner_pid: int = 0  # the process doing the operation of a transitional phase (or a live upgrade)
    owner_starttime: int = 0
    upgrade: PendingUpgrade | None = None  # a live upgrade under way
    nspawn_pid: int = 0
    nspawn_starttime: int = 0
    monitor_pid: int = 0
    leader_pid: int = 0
    started_at: float = 0.0
    # The name its current (or last) boot was made under: nspawn's machine name, its cgroups, its veth.
    # "" means `name`; it differs for a container claimed from a warm pool until its next start.
    machine: str = ""
    # A warm pool's container, booted ahead with no components: the image whose pool it waits in ("" once claimed).
    pool: str = ""

    FIELDS = ("name", "image", "spec_file", "created_at", "stop_timeout", "start_timeout", "restart_policy", "restart_delay", "restart_limit", "grants", "labels", "components", "volumes", "resources", "network", "address", "address6", "phase",
              "owner_pid", "owner_starttime", "upgrade", "nspawn_pid", "nspawn_starttime", "monitor_pid", "leader_pid", "started_at",
              "machine", "pool")

    @property
    def boot_name(self) -> str:
        """The name nspawn, the cgroups and the veth pair of its current (or last) boot have."""
        return self.machine or self.name

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs"

    @property
    def units(self) -> list[str]:
        return [u for c in self.components for u in c.units]

    def credential_grants(self) -> dict[str, dict[str, str]]:
        """{unit: {credential ID: secret name}}: what each unit may load from the agent."""
        out: dict[str, dict[str, str]] = {}
        for c in self.components:
            creds = {cred: self.grants[cred] for cred in c.secrets if cred in self.grants}
            for unit in c.units:
                if creds and unit.endswith(".service"):
                    out[unit] = creds
        return out

    def save(self, *, sync: bool = True) -> None:
        """sync=False: see durable.write_json (the caller makes it durable later)."""
        write_json(self.dir / RECORD, self.to_disk(), sync=sync)

    def component(self, name: str) -> ComponentEntry | None:
        return next((c for c in self.components if c.name == name), None)

    def to_disk(self) -> dict:
        out = {f: getattr(self, f) for f in self.FIELDS}
        out["components"] = [c.to_json() for c in self.components]
        out["volumes"] = [v.to_json() for v in self.volumes]
        out["resources"] = self.resources.to_json()
        out["network"] = self.network.to_json()
        out["upgrade"] = self.upgrade.to_json() if self.upgrade else None
        return out

    def begin(self, phase: str) -> None:
        """Record that this process starts an operation (saved by the caller)."""
        self.phase = phase
        self.owner_pid, self.owner_starttime = os.getpid(), proc.pid_starttime(os.getpid()) or 0

    def end(self, phase: str) -> None:
        """Record the operation's outcome and that nobody works on the container any more."""
        self.phase = phase
        self.owner_pid = self.owner_starttime = 0
        self.save()

    def owner_alive(self) -> bool:
        return self.owner_pid > 0 and proc.pid_alive(self.owner_pid, self.owner_starttime)

    def interrupted(self) -> bool:
        """An operation was under way and the process doing it is gone (killed, crashed, power cut)."""
        if self.owner_pid == 0 and self.phase != "creating":
            return False  # records from before owners were recorded: nothing is under way
        return (self.phase in TRANSITIONAL or self.upgrade is not None) and not self.owner_alive()

    @classmethod
    def load(cls, directory: Path) -> Record:
        try:
            data = json.loads((directory / RECORD).read_text())
        except FileNotFoundError:
            raise NotFound(f"no container {directory.name!r}", hint="see `tupper ps`") from None
        fields = {f: data[f] for f in cls.FIELDS if f in data}
        fields["components"] = [ComponentEntry.from_json(c) for c in data.get("components", [])]
        fields["volumes"] = [VolumeEntry.from_json(v) for v in data.get("volumes", [])]
        fields["resources"] = Resources.from_json(data.get("resources"), "record: resources")
        fields["network"] = NetworkSpec.from_json(data.get("network"))
        fields["upgrade"] = PendingUpgrade(**data["upgrade"]) if data.get("upgrade") else None
        return cls(dir=directory, **fields)

    def exit_info(self) -> dict | None:
        try:
            return json.loads((self.dir / EXIT).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def alive(self) -> bool:
        return self.nspawn_pid > 0 and proc.pid_alive(self.nspawn_pid, self.nspawn_starttime)

    def state(self) -> str:
        """running, starting, stopping, removing, failed, stopped, exited, created, crash-loop."""
        if self.alive():
            return {"creating": "starting", "starting": "starting", "stopping": "stopping", "removing": "removing",
                    "failed": "failed"}.get(self.phase, "running")
        if self.phase == "removing":
            return "removing"
        if self.nspawn_pid == 0:
            return "created" if self.phase == "creating" else "stopped"
        info = self.exit_info()
        if self.phase in ("failed", "crash-loop"):
            return self.phase
        if self.phase in ("stopping", "stopped"):
            return "stopped"
        if info is None or info.get("returncode") is None:
            # The monitor died before the container; no exit status is known.
            return "exited"
        return "stopped" if info.get("returncode") == 0 else "failed"

    def to_json(self) -> dict:
        state = self.state()
        running = state in ("running", "starting", "stopping", "failed") and self.alive()
        out = {
            "name": self.name,
            "state": state,
            "image": self.image,
            "leader_pid": self.leader_pid if running else None,
            "created_at": self.created_at,
            "started_at": self.started_at or None,
            "spec": self.spec_file,
            "components": [{"name": c.name, "version": c.version, "mount": c.mount, "resources": c.resources.to_json()} for c in self.components],
            "resources": self.resources.to_json(),
            "restart_policy": self.restart_policy,
            "secrets": dict(self.grants),
            "labels": dict(self.labels),
            "volumes": [v.to_json() for v in self.volumes],
            "network": {"mode": self.network.mode, "name": self.network.network if self.network.mode == "private" else None,
                        "address": (self.address or None) if running else None,
                        "address6": (self.address6 or None) if running else None,
                        "ports": [p.to_json() for p in self.network.ports]},
            "ports": [p.describe() for p in self.network.ports],
        }
        if (info := self.exit_info()) and not running:
            out["exit"] = info
        if self.interrupted():
            out["interrupted"] = self.phase if self.phase in TRANSITIONAL else "upgrading"
        return out


def prunable(container: dict) -> bool:
    """Whether `tupper prune` removes this container (its JSON, as `ps --json` gives it): in one of the
    PRUNABLE states, and not running (no leader PID)."""
    return container.get("state") in PRUNABLE and not container.get("leader_pid")


def mark_exit(directory: Path, returncode: int | None, note: str = "") -> None:
    """nspawn's exit; `returncode` None: it exited, with a status nobody could see (its monitor was gone)."""
    data: dict = {"returncode": returncode, "exited_at": time.time()}
    if note:
        data["note"] = note
    write_json(directory / EXIT, data)
