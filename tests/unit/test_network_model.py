"""Container networks as values: the spec's [network], network definitions, address allocation, and
tupper's nftables table as a function of them (the JSON libnftables takes)."""

from __future__ import annotations

import ipaddress

import pytest

from tupper.container import firewall
from tupper.errors import InvalidInput
from tupper.model import network as net
from tupper.tomlfile import Table


def parse(**table) -> net.NetworkSpec:
    return net.parse(Table(table, "spec.toml", "network"))


def test_defaults_and_ports():
    assert parse() == net.NetworkSpec("private", "tupper0", ())
    spec = parse(ports=[{"host": 8080, "container": 80}, {"host": 5353, "protocol": "udp", "address": "127.0.0.1"},
                        {"host": 8443, "container": 443, "address": "[2001:db8::5]"}])
    assert [p.describe() for p in spec.ports] == ["8080->80/tcp", "127.0.0.1:5353->5353/udp", "[2001:db8::5]:8443->443/tcp"]
    assert net.NetworkSpec.from_json(spec.to_json(), "record") == spec
    for mode in ("host", "none"):
        assert net.NetworkSpec.from_json(net.NetworkSpec(mode).to_json()) == net.NetworkSpec(mode)
    assert net.NetworkSpec.from_json(None).mode == "host"  # records from before networks


def test_a_port_without_host_leaves_the_host_port_to_tupper():
    (p,) = parse(ports=[{"container": 8080}]).ports
    assert (p.host, p.container) == (net.ANY_PORT, 8080)
    assert not p.clashes(net.Port(net.ANY_PORT, 8080))  # nothing is taken before tupper picks one


@pytest.mark.parametrize("table, message", [
    ({"mode": "bridge"}, "network.mode: must be one of private, host, none"),
    ({"mode": "host", "ports": [{"host": 80}]}, "network.ports: publishing ports needs mode = \"private\""),
    ({"mode": "none", "network": "a"}, "network.network: only with mode = \"private\""),
    ({"network": "Bad_Name"}, "network.network: invalid network name 'Bad_Name'"),
    ({"ports": [{"protocol": "udp"}]}, "network.ports[0].container: missing: give `container`"),
    ({"network": "elevenchars"}, "network.network: invalid network name 'elevenchars'"),
    ({"ports": [{"host": 0}]}, "network.ports[0].host: port 0 is out of range"),
    ({"ports": [{"host": 80, "container": 70000}]}, "network.ports[0].container: port 70000 is out of range"),
    ({"ports": [{"host": 80, "protocol": "sctp"}]}, "network.ports[0].protocol: must be \"tcp\" or \"udp\""),
    ({"ports": [{"host": 80, "address": "localhost"}]}, "network.ports[0].address: 'localhost' is not an IP address"),
    ({"ports": [{"host": 80}, {"host": 80, "address": "127.0.0.1"}]}, "network.ports[1]: host port 80/tcp is published twice"),
    ({"ports": [{"host": 80, "hostport": 1}]}, "network.ports[0].hostport: unknown key"),
    ({"ports": [{"host": 80, "address": "::1"}]}, "network.ports[0].address: ::1 cannot be forwarded"),
])  # fmt: skip
def test_bad_network_tables_name_the_key(table, message):
    with pytest.raises(InvalidInput) as err:
        parse(**table)
    assert str(err.value).startswith(f"spec.toml: {message}"), str(err.value)


def test_ports_clash_only_on_the_same_protocol_port_and_address():
    p = net.Port(80, 80)
    assert p.clashes(net.Port(80, 8080, address="127.0.0.1"))
    assert not p.clashes(net.Port(80, 80, "udp"))
    assert not net.Port(80, 80, address="127.0.0.1").clashes(net.Port(80, 80, address="10.0.0.1"))


def test_network_definitions():
    n = net.make("tupper0", "10.88.0.0/24", "fd00:88::/64", "x")
    assert (n.bridge, str(n.gateway), str(n.gateway6)) == ("tp-tupper0", "10.88.0.1", "fd00:88::1")
    assert net.Network.from_json(n.to_json()) == n
    other = net.make("tupper0", "10.88.0.0/24", None, "x", tag="5d")  # another store's: a bridge of its own
    assert other.bridge == "tp5d-tupper0" and len(net.make("abcdefghij", "10.1.0.0/24", None, "x", "ff").bridge) == 15
    for subnet, message in (("10.88.0.0/33", "--subnet"), ("8.8.8.0/24", "not a private range"), ("10.0.0.0/8", "/16 to /29")):
        with pytest.raises(InvalidInput, match=message):
            net.make("a", subnet, None, "x")
    with pytest.raises(InvalidInput, match="unique local /64"):
        net.make("a", "10.1.0.0/24", "2001:db8::/64", "x")
    assert net.overlaps(n, net.make("b", "10.88.0.128/25", None, "x"))
    assert not net.overlaps(n, net.make("b", "10.89.0.0/24", None, "x"))


def test_allocation_skips_the_gateway_and_taken_addresses_and_ends():
    n = net.make("small", "10.90.0.0/29", "fd00:90::/64", "x")  # hosts .1-.6, .1 the gateway
    taken: set[ipaddress.IPv4Address] = set()
    got = []
    for _ in range(5):
        a = net.allocate(n, taken)
        taken.add(a)
        got.append(str(a))
    assert got == ["10.90.0.2", "10.90.0.3", "10.90.0.4", "10.90.0.5", "10.90.0.6"]
    with pytest.raises(InvalidInput, match="no free address left"):
        net.allocate(n, taken)
    taken.discard(ipaddress.IPv4Address("10.90.0.4"))
    assert str(net.allocate(n, taken)) == "10.90.0.4"
    assert str(net.address6(n, ipaddress.IPv4Address("10.90.0.4"))) == "fd00:90::4"


def rules_text(commands: list[dict]) -> list[tuple[str, str]]:
    return [(c["add"]["rule"]["chain"], c["add"]["rule"]["comment"]) for c in commands if "rule" in c.get("add", {})]


def test_the_table_is_replaced_whole_and_dropped_with_the_last_network():
    assert firewall.ruleset([], []) == [{"add": {"table": {"family": "inet", "name": "tupper"}}},
                                        {"delete": {"table": {"family": "inet", "name": "tupper"}}}]
    commands = firewall.ruleset([net.make("a", "10.88.0.0/24", None, "x")], [])
    assert commands[1] == {"delete": {"table": {"family": "inet", "name": "tupper"}}}
    assert all(c["add"].get("rule", c["add"].get("chain", {"table": "tupper"}))["table"] == "tupper"
               for c in commands[2:] if "add" in c and "table" not in c["add"])


def test_networks_are_kept_apart_and_ports_forwarded_from_outside_and_from_the_host():
    a, b = net.make("a", "10.88.0.0/24", "fd00:88::/64", "x"), net.make("b", "10.89.0.0/24", None, "x")
    ep = firewall.Endpoint("w1", "a", ipaddress.IPv4Address("10.88.0.2"), net.address6(a, ipaddress.IPv4Address("10.88.0.2")),
                           (net.Port(8080, 80), net.Port(5353, 53, "udp", "127.0.0.1")))
    gone = firewall.Endpoint("w9", "nowhere", ipaddress.IPv4Address("10.1.0.2"), None, (net.Port(9, 9),))
    rules = rules_text(firewall.ruleset([a, b], [ep, gone]))
    assert ("forward", "network a: not to other networks") in rules and ("forward", "network b: not to other networks") in rules
    assert ("input", "containers do not reach host services") in rules
    forwards = [r for r in rules if r[1].startswith("container w1")]
    # 8080: IPv4 and IPv6, each in prerouting and output; 127.0.0.1:5353/udp: IPv4 only
    assert sorted(forwards) == sorted([("prerouting", "container w1: 8080->80/tcp")] * 2 + [("output", "container w1: 8080->80/tcp")] * 2
                                      + [("prerouting", "container w1: 127.0.0.1:5353->53/udp"), ("output", "container w1: 127.0.0.1:5353->53/udp")])
    assert not any("w9" in r[1] for r in rules)  # a container on a network that is gone gets nothing
