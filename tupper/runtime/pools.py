"""Warm pools (docs/pools.md): containers of an image booted ahead, with systemd running and no
components, that `tupper run` claims instead of booting a new one.

What a pool should hold is the store's tupperd config, `<store>/tupperd.toml`:

    [pool]
    debian-bookworm = 2    # image = how many ready containers tupperd keeps booted

`tupper pool set/rm` (and the D-Bus methods SetPool/RemovePool) rewrite that file; tupperd reads it
at start and refills each pool in the background, one boot at a time. A pool container is a
container record with `pool` = its image and a neutral name (`tpool-<8 hex>`); `ps` lists it only
with --all. This module holds the pure parts: the file, the choice of keys that force a cold start,
the names, the listing; the runtime (tupper.runtime.runtime) boots and claims them.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import attrs

from tupper import durable, tomlfile
from tupper.errors import InvalidInput
from tupper.model.network import DEFAULT_NETWORK, NetworkSpec
from tupper.model.resources import Resources
from tupper.model.spec import Spec
from tupper.runtime.records import Record

CONFIG = "tupperd.toml"
PREFIX = "tpool-"
MAX_SIZE = 64  # containers per pool: each holds ~25 MB and a share of the boot work


def config_path(root: Path) -> Path:
    return root / CONFIG


def load(root: Path) -> dict[str, int]:
    """The [pool] table of the store's tupperd.toml: image -> size (no file: no pools). A bad value is
    exit 2, naming the file and the key."""
    path = config_path(root)
    if not path.exists():
        return {}
    data, display = tomlfile.load(path, "tupperd config")
    top = tomlfile.Table(data, display)
    unknown = sorted(set(data) - {"pool"})
    if unknown:
        raise top.error(unknown[0], "unknown key (this file has one table: [pool], image = size)")
    table = top.table("pool")
    out = {}
    for image in sorted(table.data):
        size = table.get(image, int, required=True)
        if isinstance(size, bool) or not 0 <= size <= MAX_SIZE:
            raise table.error(image, f"a pool size is a whole number from 0 to {MAX_SIZE}, got {size!r}")
        out[image] = size
    return out


def render(pools: dict[str, int]) -> str:
    lines = ["# Warm pools: tupperd keeps this many containers of each image booted, ready for `tupper run`.",
             "# Written by `tupper pool set` / `tupper pool rm`; edit it by hand and restart tupperd, or use those.",
             "", "[pool]"]
    lines += [f'"{image}" = {size}' for image, size in sorted(pools.items()) if size > 0]
    return "\n".join(lines) + "\n"


def save(root: Path, pools: dict[str, int]) -> None:
    durable.write_bytes(config_path(root), render(pools).encode())


def check_size(size: int, where: str = "--size") -> int:
    if not 0 <= size <= MAX_SIZE:
        raise InvalidInput(f"{where}: a pool size is a whole number from 0 to {MAX_SIZE}, got {size}",
                           hint="0 empties the pool; `tupper pool rm IMAGE` removes it")
    return size


def new_name(taken: set[str]) -> str:
    while True:
        name = PREFIX + secrets.token_hex(4)
        if name not in taken:
            return name


# The network a pool container boots on: the one a spec without [network] joins.
POOL_NETWORK = NetworkSpec()


def cold_reasons(spec: Spec, *, systemd_host: bool, cgroup_kind: str) -> list[str]:
    """Why this spec cannot take a pool container (it needs something a running container cannot take
    after its boot); empty: it can. The keys and why, as docs/pools.md lists them."""
    why = []
    if systemd_host:
        why.append("this host runs systemd: its machined registers a machine at boot (claims are not supported there yet)")
    if spec.volumes:
        why.append("[[volumes]] are bound by nspawn at boot")
    if spec.network.mode != POOL_NETWORK.mode or spec.network.network != POOL_NETWORK.network:
        why.append(f"[network] asks for {spec.network.mode}"
                   + (f" on {spec.network.network}" if spec.network.mode == "private" else "")
                   + f"; pool containers boot on the default network ({DEFAULT_NETWORK})")
    if cgroup_kind == "v2" and any(u.resources != Resources() for u in spec.components):
        why.append("component [resources] on a pure cgroup2 host are set by the container's systemd at its units' start")
    return why


@attrs.frozen
class PoolMember:
    name: str
    state: str  # ready, booting, failed, ...
    since: float  # when its boot started

    def to_json(self) -> dict:
        return {"name": self.name, "state": self.state, "age": round(max(0.0, time.time() - self.since), 1)}


@attrs.frozen
class PoolView:
    """One pool as `tupper pool ls` shows it."""

    image: str
    size: int
    members: tuple[PoolMember, ...]

    @property
    def ready(self) -> int:
        return sum(m.state == "ready" for m in self.members)

    def to_json(self) -> dict:
        oldest = min((m.since for m in self.members if m.state == "ready"), default=None)
        return {"image": self.image, "size": self.size, "ready": self.ready,
                "booting": sum(m.state == "booting" for m in self.members),
                "age": round(time.time() - oldest, 1) if oldest is not None else None,
                "containers": [m.to_json() for m in self.members]}


def member_state(rec: Record) -> str:
    """ready (booted, systemd running, nobody working on it), booting, or what else its record says."""
    if rec.alive() and rec.phase == "running" and not rec.owner_alive():
        return "ready"
    if rec.phase == "creating" and rec.owner_alive():
        return "booting"
    return rec.state()


def views(configured: dict[str, int], members: list[Record]) -> list[PoolView]:
    """Every configured pool, and any image with pool containers left over (size 0: being drained)."""
    by_image: dict[str, list[Record]] = {}
    for rec in members:
        by_image.setdefault(rec.pool, []).append(rec)
    return [PoolView(image, configured.get(image, 0),
                     tuple(PoolMember(r.name, member_state(r), r.started_at or r.created_at)
                           for r in sorted(by_image.get(image, []), key=lambda r: r.created_at)))
            for image in sorted(set(configured) | set(by_image))]


def is_pool_name(name: str) -> bool:
    return name.startswith(PREFIX)

