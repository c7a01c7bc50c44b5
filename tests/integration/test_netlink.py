"""Bridges and veths over netlink, in namespaces made for the test: one plays the host, two play
containers (the real host's links are not touched). Traffic stays inside those namespaces."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import time

import pytest

from tupper.container import netlink, netns
from tupper.model import network as net


@pytest.fixture
def spaces():
    """Three processes, each in a network namespace of its own: host, c1, c2."""
    procs = [subprocess.Popen(["unshare", "--net", "sleep", "300"]) for _ in range(3)]
    try:
        # Until unshare has run, a process is still in our namespace: work "in" it would be the host's.
        mine = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + 10
        while any(os.stat(f"/proc/{p.pid}/ns/net").st_ino == mine for p in procs):
            assert time.monotonic() < deadline, "unshare --net did not make the namespaces"
            time.sleep(0.01)
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def reaches(src: int, dst: int, address: str) -> bool:
    """A TCP connection from namespace `src` to a listener on `address` in namespace `dst`."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with netns.run_in(dst, lambda: socket.socket(family)) as listener, netns.run_in(src, lambda: socket.socket(family)) as client:
        listener.bind((address, 0))
        listener.listen(1)
        client.settimeout(3)
        try:
            client.connect((address, listener.getsockname()[1]))
        except OSError:
            return False
        listener.accept()[0].close()
        return True


def in_ns(pid: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", *argv], capture_output=True, text=True, timeout=20)


def test_two_containers_on_a_bridge_reach_each_other_and_the_gateway(spaces):
    host, c1, c2 = spaces
    n = net.make("t0", "10.77.0.0/24", "fd00:77::/64", "test")
    netlink.ensure_bridge(host, n)
    netlink.ensure_bridge(host, n)  # again: nothing changes, nothing fails
    a1, a2 = ipaddress.IPv4Address("10.77.0.2"), ipaddress.IPv4Address("10.77.0.3")
    netlink.attach(host, c1, n, "tv-c1", a1, net.address6(n, a1))
    netlink.attach(host, c2, n, "tv-c2", a2, net.address6(n, a2))
    assert {"tp-t0", "tv-c1", "tv-c2"} <= set(netlink.links(host))
    assert netlink.links(c1) == ["host0", "lo"]
    assert "10.77.0.2/24" in in_ns(c1, "ip", "-4", "addr", "show", "host0").stdout
    assert "default via 10.77.0.1" in in_ns(c1, "ip", "route").stdout
    assert reaches(c1, c2, "10.77.0.3") and reaches(c2, host, "10.77.0.1")
    assert reaches(c1, c2, "fd00:77::3")
    with netns.run_in(c1, socket.socket) as s:  # nobody has .9: no answer
        s.settimeout(1)
        with pytest.raises(OSError):
            s.connect(("10.77.0.9", 80))
    assert (in_ns(host, "cat", "/proc/sys/net/ipv4/conf/tp-t0/route_localnet").stdout.strip()) == "1"
    assert netlink.detach(host, "tv-c1") and not netlink.detach(host, "tv-c1")
    assert "tv-c1" not in netlink.links(host) and netlink.links(c1) == ["lo"]
    netlink.detach(host, "tv-c2")
    netlink.remove_bridge(host, n)
    assert netlink.links(host) == ["lo"]
