"""What `tupper status` shows about one container: its record and its units as the container's systemd
sees them, typed until the edge (the CLI's JSON, tupperd's D-Bus reply) turns them into JSON once."""

from __future__ import annotations

import attrs

from tupper.container.systemd import UnitState
from tupper.runtime.records import Record


@attrs.frozen
class UnitStatus:
    """One component unit: systemd's view of it, and the component it belongs to."""

    component: str
    state: UnitState
    oom: bool = False  # its main process (or another of its processes) was killed by the OOM killer

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def result(self) -> str:
        """systemd's result, or "oom-kill" where systemd inside saw only a SIGKILL (cgroup v1)."""
        return "oom-kill" if self.oom else self.state.result

    def to_json(self) -> dict:
        return {**self.state.to_json(), "result": self.result, "component": self.component, "oom": self.oom}


@attrs.frozen
class ComponentHealth:
    """What a component's health check last said: tupperd's tracker, or (without tupperd) one check now."""

    component: str
    state: str  # starting, healthy, unhealthy (tupper.model.health.STATES)
    check: str = ""  # what is checked
    detail: str = ""  # what the last check said
    restarts: int = 0  # restarts of its units for failed checks, since tupperd began checking

    def to_json(self) -> dict:
        return {"state": self.state, "check": self.check, "detail": self.detail, "restarts": self.restarts}


def container_state(record_state: str, failed_units: bool, health: tuple[ComponentHealth, ...] | list[ComponentHealth]) -> str:
    """A running container with a failed component unit or an unhealthy component is `degraded` (as
    `systemctl is-system-running` says of a system with a failed unit); any other state is the record's."""
    if record_state == "running" and (failed_units or any(h.state == "unhealthy" for h in health)):
        return "degraded"
    return record_state


@attrs.frozen
class ContainerStatus:
    record: Record
    units: tuple[UnitStatus, ...]
    system_state: str | None = None  # the container's `systemctl is-system-running`; None when not asked or not running
    oom_kills: int = 0  # OOM kills in the container (its components' included)
    component_oom_kills: tuple[tuple[str, int], ...] = ()
    health: tuple[ComponentHealth, ...] = ()

    @property
    def state(self) -> str:
        return container_state(self.record.state(), any(u.state.active_state == "failed" for u in self.units), self.health)

    @classmethod
    def of(cls, rec: Record, states: dict[str, UnitState], system_state: str | None,
           oom_kills: int = 0, component_oom_kills: dict[str, int] | None = None,
           health: tuple[ComponentHealth, ...] = ()) -> ContainerStatus:
        """`states`: what the container's systemd answered (empty when it is not running); a unit it
        did not answer for is shown inactive. A unit that died of a signal counts as killed by the OOM
        killer where its component had OOM kills, or where the container had kills in no component's
        cgroup (its own memory_max: on cgroup v1 the kernel counts them in the container's cgroup)."""
        per = component_oom_kills or {}
        unattributed = oom_kills - sum(per.values()) > 0
        units = []
        for c in rec.components:
            for u in c.units:
                state = states.get(u) or UnitState(name=u, active_state="inactive", sub_state="dead")
                oom = (per.get(c.name, 0) > 0 or unattributed) and state.result in ("signal", "oom-kill")
                units.append(UnitStatus(component=c.name, state=state, oom=oom))
        return cls(record=rec, units=tuple(units), system_state=system_state, oom_kills=oom_kills,
                   component_oom_kills=tuple(sorted(per.items())), health=health)

    @property
    def name(self) -> str:
        return self.record.name

    def to_json(self) -> dict:
        out = self.record.to_json()
        out["state"] = self.state
        if self.system_state is not None:
            out["system_state"] = self.system_state
        out["units"] = [u.to_json() for u in self.units]
        out["oom_kills"] = self.oom_kills
        comps = dict(self.component_oom_kills)
        health = {h.component: h for h in self.health}
        for c in out["components"]:
            c["oom_kills"] = comps.get(c["name"], 0)
            if c["name"] in health:
                c["health"] = health[c["name"]].to_json()
        return out
