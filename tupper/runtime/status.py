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

    @property
    def name(self) -> str:
        return self.state.name

    def to_json(self) -> dict:
        return {**self.state.to_json(), "component": self.component}


@attrs.frozen
class ContainerStatus:
    record: Record
    units: tuple[UnitStatus, ...]
    system_state: str | None = None  # the container's `systemctl is-system-running`; None when not asked or not running

    @classmethod
    def of(cls, rec: Record, states: dict[str, UnitState], system_state: str | None) -> ContainerStatus:
        """`states`: what the container's systemd answered (empty when it is not running); a unit it
        did not answer for is shown inactive."""
        units = tuple(UnitStatus(component=c.name, state=states.get(u) or UnitState(name=u, active_state="inactive", sub_state="dead"))
                      for c in rec.components for u in c.units)
        return cls(record=rec, units=units, system_state=system_state)

    @property
    def name(self) -> str:
        return self.record.name

    def to_json(self) -> dict:
        out = self.record.to_json()
        if self.system_state is not None:
            out["system_state"] = self.system_state
        out["units"] = [u.to_json() for u in self.units]
        return out
