"""The pure parts of container networks at run time: names of interfaces, tags and default subnets of
stores, the files written into a container, the nspawn options, the table's owner, and which
containers keep an address."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from tupper.container import firewall, nspawn
from tupper.model import network as net
from tupper.runtime import network as plumbing
from tupper.store import networks as netstore


def test_host_interfaces_fit_ifnamsiz_and_differ_by_store_and_name():
    a = plumbing.host_interface("", "web")
    assert a.startswith("tv-") and len(a) <= 15
    assert len(plumbing.host_interface("5d", "x" * 64)) == 15
    assert plumbing.host_interface("5d", "web") != plumbing.host_interface("a0", "web") != plumbing.host_interface("5d", "web2")


def test_store_tags_and_default_subnets():
    assert netstore.tag_of(True, "default") == ""
    assert netstore.tag_of(False, "59d9b51d") == "59"
    assert netstore.default_subnet("") == "10.88.0.0/24"
    subnets = {netstore.default_subnet(f"{i:02x}") for i in range(256)}
    assert len(subnets) == 256 and all(net.make("n", s, None, "x").subnet.is_private for s in subnets)
    assert "10.88.0.0/24" not in subnets


def test_resolv_conf_keeps_the_hosts_nameservers_but_not_loopback_ones():
    host = "# comment\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\nnameserver fd00::53\nsearch example.org\noptions edns0\nbogus line\n"
    text = plumbing.resolv_conf(host)
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == ["nameserver 10.0.0.2", "nameserver fd00::53", "search example.org", "options edns0"]


def test_hosts_file_names_the_container_and_its_peers_by_name_and_hostname():
    text = plumbing.hosts_file("web_1", "10.88.0.3", [("web_1", "10.88.0.3"), ("db", "10.88.0.2")], "tupper0")
    lines = text.splitlines()
    assert "127.0.0.1\tlocalhost" in lines
    assert "10.88.0.3\tweb_1 web-1" in lines  # the hostname nspawn gives it ('_' becomes '-')
    assert "10.88.0.2\tdb" in lines and sum("web_1" in line for line in lines) == 1
    assert plumbing.hosts_file("solo", "127.0.1.1", [], None).splitlines()[-1] == "127.0.1.1\tsolo"


def test_nspawn_network_options():
    assert nspawn.network_args("private", "/proc/1/fd/5") == ["--network-namespace-path=/proc/1/fd/5"]
    assert nspawn.network_args("none", None) == ["--private-network"]
    assert nspawn.network_args("host", None) == []
    with pytest.raises(ValueError):
        nspawn.network_args("private", None)
    argv = nspawn.boot_argv("w", Path("/r"), [], nspawn.Host(systemd=False), network=["--private-network"])
    assert "--private-network" in argv


def test_the_table_names_its_store_in_a_chain_no_packet_passes():
    a = net.make("a", "10.88.0.0/24", None, "x")
    commands = firewall.ruleset([a], [], "tupper5d", "/var/lib/tupper-test")
    owner = [c["add"]["rule"] for c in commands if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == firewall.OWNER_CHAIN]
    assert owner == [{"family": "inet", "table": "tupper5d", "chain": "owner", "expr": [{"accept": None}],
                      "comment": "store /var/lib/tupper-test"}]
    chain = next(c["add"]["chain"] for c in commands if c.get("add", {}).get("chain", {}).get("name") == "owner")
    assert "hook" not in chain  # a regular chain: nothing jumps to it
    tables = {obj.get("table") or obj.get("name") for c in commands for verb in c.values() for obj in verb.values()}
    assert tables == {"tupper5d"}


def _rec(alive: bool, phase: str, owner_alive: bool):
    return types.SimpleNamespace(alive=lambda: alive, phase=phase, owner_alive=lambda: owner_alive)


@pytest.mark.parametrize("alive, phase, owner_alive, holds", [
    (True, "running", False, True),
    (False, "stopped", False, False),
    (False, "starting", True, True),  # being started by a live process: its address is not taken away
    (False, "creating", True, True),
    (False, "starting", False, False),  # its starter died
    (False, "removing", True, False),
])  # fmt: skip
def test_which_containers_keep_their_address(alive, phase, owner_alive, holds):
    assert plumbing.holds_address(_rec(alive, phase, owner_alive)) is holds
    assert plumbing.holds_address(None) is False
