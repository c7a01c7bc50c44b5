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
class ContainerStatus:
    record: Record
    units: tuple[UnitStatus, ...]
    system_state: str | None = None  # the container's `systemctl is-system-running`; None when not asked or not running
    oom_kills: int = 0  # OOM kills in the container (its components' included)
    component_oom_kills: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, rec: Record, states: dict[str, UnitState], system_state: str | None,
           oom_kills: int = 0, component_oom_kills: dict[str, int] | None = None) -> ContainerStatus:
        """`states`: what the container's systemd answered (empty when it is not running); a unit it
        did not answer for is shown inactive. A unit of a component that had OOM kills and that died
        of a signal counts as killed by the OOM killer."""
        per = component_oom_kills or {}
        units = []
        for c in rec.components:
            for u in c.units:
                state = states.get(u) or UnitState(name=u, active_state="inactive", sub_state="dead")
                oom = per.get(c.name, 0) > 0 and state.result in ("signal", "oom-kill")
                units.append(UnitStatus(component=c.name, state=state, oom=oom))
        return cls(record=rec, units=tuple(units), system_state=system_state, oom_kills=oom_kills,
                   component_oom_kills=tuple(sorted(per.items())))

    @property
    def name(self) -> str:
        return self.record.name

    def to_json(self) -> dict:
        out = self.record.to_json()
        if self.system_state is not None:
            out["system_state"] = self.system_state
        out["units"] = [u.to_json() for u in self.units]
        out["oom_kills"] = self.oom_kills
        comps = dict(self.component_oom_kills)
        for c in out["components"]:
            c["oom_kills"] = comps.get(c["name"], 0)
        return out
