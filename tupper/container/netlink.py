"""Bridges and veth pairs over netlink (pyroute2), for container networks (tupper.runtime.network).

Every function takes `host`, the PID of a process in the namespace that plays the host (tupperd's own
PID in tupper; a namespace of their own in the tests), and works there through tupper.container.netns.
"""

from __future__ import annotations

import errno
import ipaddress
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tupper.container import netns
from tupper.model.network import Network

CONTAINER_IF = "host0"  # the container's end, as systemd-nspawn --network-veth names it


def _delete(ipr: IPRoute, index: int) -> bool:
    """Delete a link; False where it is gone already (a veth goes with its peer's namespace, at any moment)."""
    try:
        ipr.link("del", index=index)
        return True
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return False
        raise


def _sysctl(path: str, value: str) -> None:
    Path("/proc/sys/net", path).write_text(value)


def ensure_bridge(host: int, net: Network) -> None:
    """The network's bridge with the gateway address(es), up; forwarding on, and route_localnet on the
    bridge (published ports answer on 127.0.0.1: see tupper.container.firewall)."""

    def work() -> None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=net.bridge)
            if not found:
                ipr.link("add", ifname=net.bridge, kind="bridge")
                found = ipr.link_lookup(ifname=net.bridge)
            index = found[0]
            have = {(a.get("address"), a["prefixlen"]) for a in ipr.get_addr(index=index)}
            if (str(net.gateway), net.subnet.prefixlen) not in have:
                ipr.addr("add", index=index, address=str(net.gateway), prefixlen=net.subnet.prefixlen)
            if net.subnet6 is not None and (str(net.gateway6), 64) not in have:
                ipr.addr("add", index=index, address=str(net.gateway6), prefixlen=64)
            ipr.link("set", index=index, state="up")
        _sysctl("ipv4/ip_forward", "1")
        _sysctl(f"ipv4/conf/{net.bridge}/route_localnet", "1")
        if net.subnet6 is not None:
            _sysctl("ipv6/conf/all/forwarding", "1")

    netns.run_in(host, work)


def remove_bridge(host: int, net: Network) -> None:
    def work() -> None:
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=net.bridge):
                _delete(ipr, index)

    netns.run_in(host, work)


def attach(host: int, container: int | None, net: Network, host_if: str, address: ipaddress.IPv4Address,
           address6: ipaddress.IPv6Address | None = None, *, netns_fd: int | None = None) -> None:
    """A veth pair: `host_if` on the bridge, its peer in the namespace of process `container` (or the
    one open as `netns_fd`) as host0 with the address(es), up, with the default route through the bridge."""
    where = {"net_ns_fd": netns_fd} if netns_fd is not None else {"net_ns_pid": container}
    peer = "p" + host_if[1:]  # its name until it is host0 in the container (as long as host_if: IFNAMSIZ)

    def on_host() -> None:
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=host_if):  # left by a crash: made again
                _delete(ipr, index)
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": peer})
            bridge = ipr.link_lookup(ifname=net.bridge)[0]
            ipr.link("set", index=ipr.link_lookup(ifname=host_if)[0], master=bridge, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname=peer)[0], **where)

    def inside() -> None:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=peer)[0]
            ipr.link("set", index=index, ifname=CONTAINER_IF)
            ipr.addr("add", index=index, address=str(address), prefixlen=net.subnet.prefixlen)
            if address6 is not None:
                ipr.addr("add", index=index, address=str(address6), prefixlen=64, flags=0x02)  # IFA_F_NODAD
            ipr.link("set", index=index, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=str(net.gateway))
            if address6 is not None and net.gateway6 is not None:
                ipr.route("add", dst="::/0", gateway=str(net.gateway6), family=10)

    netns.run_in(host, on_host)
    if netns_fd is not None:
        netns.run_in_fd(netns_fd, inside)
    else:
        assert container is not None
        netns.run_in(container, inside)


def detach(host: int, host_if: str) -> bool:
    """Remove the veth pair (its peer goes with it); False where it was gone already."""

    def work() -> bool:
        with IPRoute() as ipr:
            return any([_delete(ipr, index) for index in ipr.link_lookup(ifname=host_if)])

    return netns.run_in(host, work)


def links(host: int) -> list[str]:
    def work() -> list[str]:
        with IPRoute() as ipr:
            return sorted(str(link.get("ifname")) for link in ipr.get_links())

    return netns.run_in(host, work)


def routes(host: int) -> list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    """(device, destination) of the host's routes, IPv4 and IPv6 (main table)."""

    def work() -> list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]]:
        out: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
        with IPRoute() as ipr:
            names = {link["index"]: str(link.get("ifname")) for link in ipr.get_links()}
            for family, zero in ((2, "0.0.0.0"), (10, "::")):
                for r in ipr.get_routes(family=family, table=254):
                    dst = r.get("dst") or zero
                    out.append((names.get(r.get("oif"), "?"), ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False)))
        return out

    return netns.run_in(host, work)
