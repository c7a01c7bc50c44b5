"""tupper's nftables table, applied by the real nft in a network namespace made for the test (the host's
ruleset is not touched): the JSON is accepted, the table reads back as built, and replacing it with no
network removes it."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess

import pytest

from tupper.container import firewall
from tupper.model import network as net

pytestmark = pytest.mark.skipif(shutil.which("nft") is None, reason="nft is installed by make setup")


def nft_in_netns(commands: list[dict], then: str = "nft list ruleset") -> str:
    """Apply `commands` and run `then`, in a new network namespace (its own nftables)."""
    p = subprocess.run(["unshare", "--net", "sh", "-c", f"nft -j -f - && {then}"], input=json.dumps({"nftables": commands}),
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_the_table_applies_and_reads_back():
    a, b = net.make("a", "10.88.0.0/24", "fd00:88::/64", "x"), net.make("b", "10.89.0.0/24", None, "x")
    ep = firewall.Endpoint("w1", "a", ipaddress.IPv4Address("10.88.0.2"), net.address6(a, ipaddress.IPv4Address("10.88.0.2")),
                           (net.Port(8080, 80), net.Port(5353, 53, "udp", "127.0.0.1")))
    text = nft_in_netns(firewall.ruleset([a, b], [ep]))
    assert "table inet tupper" in text
    assert 'fib daddr type local meta nfproto ipv4 tcp dport 8080 dnat ip to 10.88.0.2:80 comment "container w1: 8080->80/tcp"' in text
    assert "dnat ip6 to [fd00:88::2]:80" in text
    assert 'ip daddr 127.0.0.1 udp dport 5353 dnat ip to 10.88.0.2:53' in text
    assert 'iifname "tp-a" oifname "tp-b" drop' in text
    assert 'ip saddr 127.0.0.0/8 oifname "tp-a" masquerade' in text
    assert text.count("table ") == 1  # one table, tupper's


def test_replacing_with_no_network_removes_the_table():
    a = net.make("a", "10.88.0.0/24", None, "x")
    both = firewall.ruleset([a], []) + firewall.ruleset([], [])
    assert nft_in_netns(both).strip() == ""


def test_covers_reads_which_bridges_the_applied_table_fences():
    from tupper.container import netns

    a, b, c = (net.make(n, f"10.{x}.0.0/24", None, "x") for n, x in (("a", 88), ("b", 89), ("c", 90)))
    fd = netns.new()  # the namespace's own nftables: the host's ruleset is not touched
    try:
        def inside() -> tuple[bool, ...]:
            firewall._nft = None  # libnftables keeps its netlink socket: one opened here, in the test's namespace
            before = firewall.covers("tuppert", a.bridge)
            firewall.apply(firewall.ruleset([a], [], "tuppert"))
            one = (firewall.covers("tuppert", a.bridge), firewall.covers("tuppert", b.bridge))
            firewall.apply(firewall.ruleset([a, b], [], "tuppert"))  # two bridges: a set in the rule
            two = (firewall.covers("tuppert", a.bridge), firewall.covers("tuppert", b.bridge), firewall.covers("tuppert", c.bridge))
            firewall.apply(firewall.ruleset([], [], "tuppert"))
            return (before, *one, *two, firewall.covers("tuppert", a.bridge))

        assert netns.run_in_fd(fd, inside) == (False, True, False, True, True, False, False)
    finally:
        import os

        firewall._nft = None
        os.close(fd)
