"""Container networks as values (issue 11): a spec's `[network]` and `[[network.ports]]`, a network's
definition (bridge, subnets) and the address allocation kept for it in the store. Parsed and checked
here; the bridge, veths and nftables rules are made by tupper.container (netlink, firewall).

```toml
[network]
mode = "private"        # "private" (default): a namespace of its own on a bridge; "host"; "none" (loopback only)
network = "tupper0"     # the network to join (private mode); created on first use for the default
[[network.ports]]
host = 8080             # the host port
container = 80          # the container's (default: the host port)
protocol = "tcp"        # or "udp"
address = "127.0.0.1"   # the host address it answers on (default: every host address)
```
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Final

import attrs

from tupper.errors import InvalidInput
from tupper.tomlfile import Table

MODES: Final = ("private", "host", "none")
PROTOCOLS: Final = ("tcp", "udp")
DEFAULT_NETWORK: Final = "tupper0"
DEFAULT_SUBNET: Final = "10.88.0.0/24"
NETWORK_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,9}$")  # a bridge is named after it: IFNAMSIZ is 16 with "tpXX-"


ANY_PORT: Final = 0  # a Port's host port before tupper picked one


@attrs.frozen
class Port:
    host: int  # ANY_PORT in a spec that lets tupper choose
    container: int
    protocol: str = "tcp"
    address: str = ""  # "" = every host address; else an IPv4 or IPv6 address of the host

    @property
    def family(self) -> str:
        """"ip", "ip6" or "" (both) for the address it answers on."""
        if not self.address:
            return ""
        return "ip6" if ":" in self.address else "ip"

    def describe(self) -> str:
        """As podman writes it: 127.0.0.1:8080->80/tcp, 8080->80/udp, [::1]:8080->80/tcp."""
        where = f"[{self.address}]:" if self.family == "ip6" else f"{self.address}:" if self.address else ""
        return f"{where}{self.host}->{self.container}/{self.protocol}"

    def clashes(self, other: Port) -> bool:
        """Both would take the same host port: same protocol and port, addresses overlapping."""
        return (self.host != ANY_PORT and self.protocol == other.protocol and self.host == other.host
                and (not self.address or not other.address or self.address == other.address))

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "container": self.container, "protocol": self.protocol, "address": self.address}


@attrs.frozen
class NetworkSpec:
    mode: str = "private"
    network: str = DEFAULT_NETWORK
    ports: tuple[Port, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode == "private":
            out["network"] = self.network
        if self.ports:
            out["ports"] = [p.to_json() for p in self.ports]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, where: str = "record") -> NetworkSpec:
        """A record's; records written before networks existed ran on the host's network."""
        if not data:
            return cls(mode="host")
        try:
            return parse(Table(data, where, "network"))
        except InvalidInput as exc:  # a damaged record: its readers treat it as one they cannot read
            raise ValueError(exc.message) from None


def _port_number(t: Table, key: str, default: int | None = None) -> int:
    value = t.get(key, int, default, required=default is None)
    if not 1 <= value <= 65535:
        raise t.error(key, f"port {value} is out of range (1-65535)")
    return value


def parse_port(t: Table) -> Port:
    """One `[[network.ports]]` entry. Without `host`, tupper picks a free host port when the container
    is created (as podman's `-p 80`) and keeps it; `tupper port NAME` shows it."""
    if "host" not in t.data and "container" not in t.data:
        raise t.error("container", "missing: give `container` (the container's port) and, to choose it, `host`")
    host = _port_number(t, "host") if "host" in t.data else ANY_PORT
    container = _port_number(t, "container", host or None)
    protocol = t.get("protocol", str, "tcp")
    if protocol not in PROTOCOLS:
        raise t.error("protocol", f"must be \"tcp\" or \"udp\", got {protocol!r}")
    address = t.get("address", str, "")
    if address:
        try:
            address = str(ipaddress.ip_address(address.strip("[]")))
        except ValueError:
            raise t.error("address", f"{address!r} is not an IP address") from None
        if address == "::1":
            raise t.error("address", "::1 cannot be forwarded (IPv6 has no route_localnet): use 127.0.0.1, "
                                     "or one of the host's own IPv6 addresses")
    t.check_unknown()
    return Port(host, container, protocol, address)


def parse(t: Table) -> NetworkSpec:
    """A spec's `[network]` table (empty: a private network on the default network)."""
    mode = t.get("mode", str, "private")
    if mode not in MODES:
        raise t.error("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    network = t.get("network", str, DEFAULT_NETWORK)
    check_network_name(network, t.where("network"))
    if "network" in t.data and mode != "private":
        raise t.error("network", f"only with mode = \"private\" (this spec says {mode!r})")
    ports = tuple(parse_port(p) for p in t.tables("ports"))
    t.check_unknown()
    if ports and mode != "private":
        raise t.error("ports", f"publishing ports needs mode = \"private\" (with mode = {mode!r} the container "
                               + ("uses the host's ports directly)" if mode == "host" else "has no network to publish)"))
    for i, p in enumerate(ports):
        for q in ports[:i]:
            if p.clashes(q):
                raise t.error(f"ports[{i}]", f"host port {p.host}/{p.protocol} is published twice")
    return NetworkSpec(mode, network, ports)


def check_network_name(name: str, where: str) -> str:
    if not NETWORK_NAME_RE.fullmatch(name):
        raise InvalidInput(f"{where}: invalid network name {name!r}: a lowercase letter, then lowercase letters, "
                           "digits and '-', at most 10 (it names the bridge)")
    return name


# ---- networks and their addresses ---------------------------------------------------------------


@attrs.frozen
class Network:
    name: str
    subnet: ipaddress.IPv4Network
    subnet6: ipaddress.IPv6Network | None = None
    tag: str = ""  # the store's (tupper.store.networks.tag_of): "" for the default store

    @property
    def bridge(self) -> str:
        """tp-NAME for the default store's networks, tpXX-NAME for another store's (XX: its tag), so
        that two stores on one host do not share a bridge."""
        return f"tp{self.tag}-{self.name}"

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The bridge's own address: the subnet's first."""
        return self.subnet.network_address + 1

    @property
    def gateway6(self) -> ipaddress.IPv6Address | None:
        return self.subnet6.network_address + 1 if self.subnet6 else None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "subnet": str(self.subnet), "subnet6": str(self.subnet6) if self.subnet6 else None}

    @classmethod
    def from_json(cls, data: dict[str, Any], tag: str = "") -> Network:
        return make(data["name"], data["subnet"], data.get("subnet6"), "record", tag)


def make(name: str, subnet: str, subnet6: str | None, where: str, tag: str = "") -> Network:
    """A network definition from `tupper network create`'s options, checked."""
    check_network_name(name, where)
    try:
        net = ipaddress.IPv4Network(subnet)
    except ValueError as exc:
        raise InvalidInput(f"{where}: --subnet {subnet!r}: {exc} (write it like 10.88.0.0/24)") from None
    if not 16 <= net.prefixlen <= 29:
        raise InvalidInput(f"{where}: --subnet {subnet}: a prefix from /16 to /29, please")
    if not net.is_private:
        raise InvalidInput(f"{where}: --subnet {subnet} is not a private range (10/8, 172.16/12, 192.168/16)")
    net6 = None
    if subnet6:
        try:
            net6 = ipaddress.IPv6Network(subnet6)
        except ValueError as exc:
            raise InvalidInput(f"{where}: --ipv6 {subnet6!r}: {exc} (write it like fd00:88::/64)") from None
        if net6.prefixlen != 64 or not net6.subnet_of(ipaddress.IPv6Network("fc00::/7")):
            raise InvalidInput(f"{where}: --ipv6 {subnet6}: a unique local /64 (fd00::/8), please")
    return Network(name, net, net6, tag)


def overlaps(a: Network, b: Network) -> bool:
    return a.subnet.overlaps(b.subnet) or bool(a.subnet6 and b.subnet6 and a.subnet6.overlaps(b.subnet6))


def allocate(net: Network, taken: set[ipaddress.IPv4Address]) -> ipaddress.IPv4Address:
    """The lowest free container address: not the network's, the gateway's, the broadcast or a taken one."""
    for host in net.subnet.hosts():
        if host != net.gateway and host not in taken:
            return host
    raise InvalidInput(f"network {net.name} ({net.subnet}) has no free address left",
                       hint="remove containers on it, or make a network with a larger --subnet")


def address6(net: Network, address: ipaddress.IPv4Address) -> ipaddress.IPv6Address | None:
    """A container's IPv6 address, derived from its IPv4 one (so one allocation covers both)."""
    if net.subnet6 is None:
        return None
    return net.subnet6.network_address + (int(address) - int(net.subnet.network_address))
