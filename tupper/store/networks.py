"""The store's networks (issue 11): their definitions and every address handed out on them, in one
file (`networks.json` at the store's root), written durably and changed only under the store's lock,
so allocations survive tupperd restarts and no address is handed out twice. A container holds its
address while it runs (tupper.runtime.network allocates it at start and releases it at stop).

    {"networks": {"tupper0": {"name": "tupper0", "subnet": "10.88.0.0/24", "subnet6": null}},
     "allocations": {"tupper0": {"web-1": "10.88.0.2"}}}
"""

from __future__ import annotations

import builtins
import ipaddress
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from tupper import durable
from tupper.errors import Busy, Exists, InvalidInput, NotFound
from tupper.model import network as netmodel
from tupper.model.network import Network

FILE = "networks.json"


def tag_of(is_default: bool, ident: str) -> str:
    """A store's network tag: "" for the default store, else two hex digits of its ident. It names the
    store's bridges (tpXX-NAME), veths (tvXX-…) and nftables table (tupperXX); the table also names
    its store, so the rare two stores with one tag are told apart (tupper.runtime.network refuses)."""
    return "" if is_default else ident[:2]


def default_subnet(tag: str) -> str:
    """The default network's subnet: 10.88.0.0/24 in the default store, 10.X.Y.0/24 (X from 200)
    in another, from its tag."""
    if not tag:
        return netmodel.DEFAULT_SUBNET
    n = int(tag, 16)
    return f"10.{200 + n // 16}.{(n % 16) * 16}.0/24"


class Networks:
    def __init__(self, root: Path, lock: Callable[[], AbstractContextManager[None]], tag: str = "") -> None:
        self.path = root / FILE
        self.lock = lock  # the store's lock: every change reads, changes and writes the file under it
        self.tag = tag

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"networks": {}, "allocations": {}}
        except ValueError as exc:
            raise InvalidInput(f"{self.path}: not valid JSON ({exc})", hint="restore it, or remove it if no container uses a network") from None
        data.setdefault("networks", {})
        data.setdefault("allocations", {})
        return data

    def _write(self, data: dict, *, sync: bool = True) -> None:
        durable.write_json(self.path, data, 0o600, sync=sync)

    def list(self) -> list[Network]:
        return [Network.from_json(n, self.tag) for _, n in sorted(self._read()["networks"].items())]

    def get(self, name: str) -> Network:
        data = self._read()["networks"].get(name)
        if data is None:
            raise NotFound(f"no network {name!r}", hint="see `tupper network ls`")
        return Network.from_json(data, self.tag)

    def users(self, name: str) -> dict[str, str]:
        """Container -> address on network `name`."""
        return dict(self._read()["allocations"].get(name, {}))

    def create(self, net: Network) -> Network:
        with self.lock():
            data = self._read()
            if net.name in data["networks"]:
                raise Exists(f"a network named {net.name!r} exists already")
            for other in (Network.from_json(n, self.tag) for n in data["networks"].values()):
                if netmodel.overlaps(net, other):
                    raise InvalidInput(f"network {net.name}: {net.subnet} overlaps network {other.name} ({other.subnet})",
                                       hint="pick another --subnet")
            data["networks"][net.name] = net.to_json()
            data["allocations"].setdefault(net.name, {})
            self._write(data)
        return net

    def ensure_default(self) -> Network:
        """The default network, made on first use."""
        with self.lock():
            data = self._read()
            if netmodel.DEFAULT_NETWORK not in data["networks"]:
                net = netmodel.make(netmodel.DEFAULT_NETWORK, default_subnet(self.tag), None, "default network", self.tag)
                data["networks"][net.name] = net.to_json()
                data["allocations"].setdefault(net.name, {})
                self._write(data)
            return Network.from_json(data["networks"][netmodel.DEFAULT_NETWORK], self.tag)

    def remove(self, name: str) -> None:
        with self.lock():
            data = self._read()
            if name not in data["networks"]:
                raise NotFound(f"no network {name!r}", hint="see `tupper network ls`")
            users = sorted(data["allocations"].get(name, {}))
            if users:
                raise Busy(f"network {name!r} is used by {', '.join(users)}", hint="remove those containers first")
            del data["networks"][name]
            data["allocations"].pop(name, None)
            self._write(data)

    def allocate(self, name: str, container: str) -> ipaddress.IPv4Address:
        """The container's address on network `name`: the one it has, else the lowest free one."""
        with self.lock():
            data = self._read()
            if name not in data["networks"]:
                raise NotFound(f"no network {name!r}", hint=f"create it: tupper network create {name}")
            net = Network.from_json(data["networks"][name], self.tag)
            mine = data["allocations"].setdefault(name, {})
            if container in mine:
                return ipaddress.IPv4Address(mine[container])
            address = netmodel.allocate(net, {ipaddress.IPv4Address(a) for a in mine.values()})
            mine[container] = str(address)
            self._write(data)
            return address

    def release(self, container: str) -> builtins.list[str]:
        """Give back every address of `container`; returns the networks it was on."""
        with self.lock():
            data = self._read()
            left = [n for n, allocs in data["allocations"].items() if container in allocs]
            for n in left:
                del data["allocations"][n][container]
            if left:
                self._write(data)
            return left

    def rename(self, old: str, new: str, *, sync: bool = True) -> None:
        """The addresses of container `old` are `new`'s now (a warm pool's container claimed under its name).
        sync=False: durable once the caller has called durable.sync(self.path, self.path.parent)."""
        with self.lock():
            data = self._read()
            moved = [allocs for allocs in data["allocations"].values() if old in allocs]
            for allocs in moved:
                allocs[new] = allocs.pop(old)
            if moved:
                self._write(data, sync=sync)

    def allocations(self) -> Iterator[tuple[str, str, ipaddress.IPv4Address]]:
        """(network, container, address) of every allocation."""
        for n, allocs in sorted(self._read()["allocations"].items()):
            for container, address in sorted(allocs.items()):
                yield n, container, ipaddress.IPv4Address(address)

    def prune(self, keep: Callable[[str], bool]) -> builtins.list[str]:
        """Release the addresses of containers `keep(name)` says no longer hold one (stopped, gone, or
        crashed without a clean-up); returns their names."""
        with self.lock():
            data = self._read()
            gone = sorted({c for allocs in data["allocations"].values() for c in allocs if not keep(c)})
            for allocs in data["allocations"].values():
                for c in gone:
                    allocs.pop(c, None)
            if gone:
                self._write(data)
            return gone
