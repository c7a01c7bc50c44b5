"""What `tupper stats` shows: each container's (and each component's) use of CPU, memory, IO and pids, and
the pressure it is under, read from its cgroups (tupper.container.cgroups reads the files).

A sample holds counters (CPU time used, bytes read); a rate needs two samples, so the caller that
streams keeps the previous one (`cpu_percent(previous)`); a single sample gives the average since the
container started. Serialized once, at the edge (`to_json`).
"""

from __future__ import annotations

import attrs

PRESSURE_KINDS = ("cpu", "memory", "io")


@attrs.frozen
class Pressure:
    """PSI avg10 (percent of the last 10 s some / all tasks stalled); None where the kernel has no figure."""

    some: float | None = None
    full: float | None = None

    def to_json(self) -> dict:
        return {"some_avg10": self.some, "full_avg10": self.full}


@attrs.frozen
class Usage:
    at: float  # time.time() of the reading
    cpu_ns: int | None = None  # CPU time used since the cgroup was made
    memory: int | None = None  # in use, without the inactive page cache (as podman and docker count it)
    memory_peak: int | None = None
    memory_limit: int | None = None  # None: no limit of its own
    io_read: int | None = None  # bytes
    io_write: int | None = None
    pids: int | None = None
    pids_limit: int | None = None
    pressure: tuple[tuple[str, Pressure], ...] = ()

    def cpu_percent(self, previous: Usage | None, since: float) -> float | None:
        """Percent of one CPU: since `previous` (same cgroup), else on average since `since` (time.time())."""
        if self.cpu_ns is None:
            return None
        if previous is not None and previous.cpu_ns is not None and self.at > previous.at:
            return max(0.0, (self.cpu_ns - previous.cpu_ns) / (self.at - previous.at) / 1e7)
        if self.at > since:
            return self.cpu_ns / (self.at - since) / 1e7
        return None

    def to_json(self) -> dict:
        return {"cpu_ns": self.cpu_ns, "memory": self.memory, "memory_peak": self.memory_peak, "memory_limit": self.memory_limit,
                "io_read": self.io_read, "io_write": self.io_write, "pids": self.pids, "pids_limit": self.pids_limit,
                "pressure": {k: p.to_json() for k, p in self.pressure}, "at": self.at}


@attrs.frozen
class ContainerStats:
    name: str
    state: str
    started: float  # time.time() when it started (for averages since then)
    usage: Usage
    components: tuple[tuple[str, Usage], ...] = ()

    def to_json(self, previous: ContainerStats | None = None) -> dict:
        prev_components = dict(previous.components) if previous else {}
        out = {"name": self.name, "state": self.state, **self.usage.to_json(),
               "cpu_percent": _round(self.usage.cpu_percent(previous.usage if previous else None, self.started))}
        out["components"] = [{"name": n, **u.to_json(), "cpu_percent": _round(u.cpu_percent(prev_components.get(n), self.started))}
                             for n, u in self.components]
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
