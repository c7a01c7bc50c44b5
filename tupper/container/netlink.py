"""Bridges and veth pairs over netlink (pyroute2), for container networks (tupper.runtime.network).

Every function takes `host`, the PID of a process in the namespace that plays the host (tupperd's own
PID in tupper; a namespace of their own in the tests), and works there through tupper.container.netns.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
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


def index_of(name: str) -> int | None:
    """The index of link `name` in the calling thread's namespace (if_nametoindex(3): one ioctl, where a
    netlink lookup through pyroute2 takes a millisecond), None where there is none."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _sysctl(path: str, value: str) -> None:
    Path("/proc/sys/net", path).write_text(value)


def ensure_bridge(host: int, net: Network) -> bool:
    """The network's bridge with the gateway address(es), up; forwarding on, and route_localnet on the
    bridge (published ports answer on 127.0.0.1: see tupper.container.firewall). True where the
    bridge was made now."""

    def work() -> bool:
        made = False
        with IPRoute() as ipr:
            index = index_of(net.bridge)
            if index is None:
                ipr.link("add", ifname=net.bridge, kind="bridge")
                index = index_of(net.bridge)
                made = True
                if index is None:
                    raise OSError(errno.ENODEV, f"the bridge {net.bridge} vanished as it was made")
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
        return made

    return netns.run_in(host, work)


def remove_bridge(host: int, net: Network) -> None:
    def work() -> None:
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=net.bridge):
                _delete(ipr, index)

    netns.run_in(host, work)


def attach(host: int, container: int | None, net: Network, host_if: str, address: ipaddress.IPv4Address,
           address6: ipaddress.IPv6Address | None = None, *, netns_fd: int | None = None) -> None:
    """A veth pair: `host_if` on the bridge, its peer made right in the namespace of process
    `container` (or the one open as `netns_fd`) as host0, with the address(es), up, with the default
    route through the bridge. Made there, not moved there: moving a link between namespaces waits for
    the kernel's RCU grace periods (about 20 ms here), and a pair whose peer lives in the container's
    namespace goes with that namespace, so no crash can leave it whole on the host."""
    where = {"net_ns_fd": netns_fd} if netns_fd is not None else {"net_ns_pid": container}

    def on_host() -> None:
        with IPRoute() as ipr:
            if (left := index_of(host_if)) is not None:  # left by a crash: made again
                _delete(ipr, left)
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": CONTAINER_IF, **where})
            bridge, index = index_of(net.bridge), index_of(host_if)
            if bridge is None or index is None:
                raise OSError(errno.ENODEV, f"the bridge {net.bridge} or the link {host_if} vanished while it was set up")
            ipr.link("set", index=index, master=bridge, state="up")

    def inside() -> None:
        index, lo = index_of(CONTAINER_IF), index_of("lo")
        if index is None or lo is None:
            raise OSError(errno.ENODEV, f"no {CONTAINER_IF} in the container's namespace")
        with IPRoute() as ipr:
            ipr.addr("add", index=index, address=str(address), prefixlen=net.subnet.prefixlen)
            if address6 is not None:
                ipr.addr("add", index=index, address=str(address6), prefixlen=64, flags=0x02)  # IFA_F_NODAD
            ipr.link("set", index=index, state="up")
            ipr.link("set", index=lo, state="up")
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
