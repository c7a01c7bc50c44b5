"""Per-container state on disk (`containers/<name>/record.json`), so any tupper process can find what runs.

The monitor writes `exit.json` when nspawn exits; the state shown to users is derived from both and /proc.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import attrs

from tupper import proc
from tupper.errors import NotFound

RECORD = "record.json"
EXIT = "exit.json"


def write_json(path: Path, data: dict) -> None:
    """Atomic write: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


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
    components: list[dict] = attrs.Factory(list)  # {name, version, mount, units}
    phase: str = "creating"  # creating → starting → running | failed; stopping; crash-loop
    nspawn_pid: int = 0
    nspawn_starttime: int = 0
    monitor_pid: int = 0
    leader_pid: int = 0
    started_at: float = 0.0

    FIELDS = ("name", "image", "spec_file", "created_at", "stop_timeout", "start_timeout", "restart_policy", "restart_delay", "restart_limit", "grants", "components", "phase",
              "nspawn_pid", "nspawn_starttime", "monitor_pid", "leader_pid", "started_at")

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs"

    @property
    def units(self) -> list[str]:
        return [u for c in self.components for u in c["units"]]

    def credential_grants(self) -> dict[str, dict[str, str]]:
        """{unit: {credential ID: secret name}}: what each unit may load from the agent."""
        out: dict[str, dict[str, str]] = {}
        for c in self.components:
            creds = {cred: self.grants[cred] for cred in c.get("secrets", []) if cred in self.grants}
            for unit in c["units"]:
                if creds and unit.endswith(".service"):
                    out[unit] = creds
        return out

    def save(self) -> None:
        write_json(self.dir / RECORD, {f: getattr(self, f) for f in self.FIELDS})

    @classmethod
    def load(cls, directory: Path) -> Record:
        try:
            data = json.loads((directory / RECORD).read_text())
        except FileNotFoundError:
            raise NotFound(f"no container {directory.name!r}", hint="see `tupper ps`") from None
        return cls(dir=directory, **{f: data[f] for f in cls.FIELDS if f in data})

    def exit_info(self) -> dict | None:
        try:
            return json.loads((self.dir / EXIT).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def alive(self) -> bool:
        return self.nspawn_pid > 0 and proc.pid_alive(self.nspawn_pid, self.nspawn_starttime)

    def state(self) -> str:
        """running, starting, stopping, failed, stopped, exited, created."""
        if self.alive():
            return {"creating": "starting", "starting": "starting", "stopping": "stopping", "failed": "failed"}.get(self.phase, "running")
        if self.nspawn_pid == 0:
            return "created" if self.phase == "creating" else "stopped"
        info = self.exit_info()
        if self.phase in ("failed", "crash-loop"):
            return self.phase
        if self.phase == "stopping":
            return "stopped"
        if info is None:
            # The monitor died with the container; no exit status is known.
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
            "components": [{k: c[k] for k in ("name", "version", "mount")} for c in self.components],
            "restart_policy": self.restart_policy,
            "secrets": dict(self.grants),
        }
        if (info := self.exit_info()) and not running:
            out["exit"] = info
        return out


def mark_exit(directory: Path, returncode: int) -> None:
    write_json(directory / EXIT, {"returncode": returncode, "exited_at": time.time()})
