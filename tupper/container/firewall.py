"""tupper's nftables rules (issue 11), as a pure function of its networks and the containers on them.

One table of tupper's own, `inet tupper`, is the whole of it: tupper never touches another table. The
table is not edited rule by rule: it is rebuilt from the state (networks in the store, running
containers' addresses and published ports) and replaced in one nftables transaction whenever that
state changes, so a crash between two edits cannot leave a stale rule, re-adoption after a tupperd
restart is the same rebuild, and removing the last network removes the table.

What the rules allow (docs/network.md):
- outbound: a container reaches anything its host reaches, its source masqueraded behind the host;
- same network: containers reach each other; different networks: nothing (forward drop);
- the host: containers may not open connections to the host's own services (input from a bridge is
  dropped, except replies, ICMP and ICMPv6 neighbour discovery);
- published ports: DNAT in prerouting (from outside) and output (from the host itself), so
  127.0.0.1:PORT works: route_localnet on the bridge lets the rewritten packet leave with its
  loopback source, which the postrouting rule masquerades to the bridge address.

This module builds the JSON commands of libnftables (libnftables-json(5)); `apply` hands them to
libnftables through Debian's python3-nftables (loaded from its path when the running Python is not
Debian's own, as in tupper's venv).
"""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import os
import threading
from pathlib import Path
from typing import Any, Final

import attrs

from tupper.model.network import Network, Port

FAMILY: Final = "inet"
TABLE: Final = "tupper"
Command = dict[str, Any]


@attrs.frozen
class Endpoint:
    """A running container on a network: its addresses and the ports published to it."""

    container: str
    network: str
    address: ipaddress.IPv4Address
    address6: ipaddress.IPv6Address | None = None
    ports: tuple[Port, ...] = ()


def _match(left: Any, right: Any, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def _meta(key: str) -> dict:
    return {"meta": {"key": key}}


def _prefix(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> dict:
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _names(names: list[str]) -> Any:
    return names[0] if len(names) == 1 else {"set": names}


def _chain(table: str, name: str, kind: str, hook: str, prio: int) -> Command:
    return {"add": {"chain": {"family": FAMILY, "table": table, "name": name, "type": kind, "hook": hook, "prio": prio,
                              "policy": "accept"}}}


def _rule(table: str, chain: str, expr: list[dict], comment: str) -> Command:
    return {"add": {"rule": {"family": FAMILY, "table": table, "chain": chain, "expr": expr, "comment": comment}}}


ESTABLISHED = _match({"ct": {"key": "state"}}, {"set": ["established", "related"]}, "in")
LOCAL_DESTINATION = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")


OWNER_CHAIN: Final = "owner"


def ruleset(networks: list[Network], endpoints: list[Endpoint], table: str = TABLE, owner: str = "") -> list[Command]:
    """The commands that replace table inet tupper with what these networks and endpoints need (and
    delete it when there is no network). `owner`: the store, named in a chain no packet goes through
    (`table_owner` reads it back), so two stores can never take each other's table."""
    # "add" first: deleting a table that does not exist fails the whole transaction.
    out: list[Command] = [{"add": {"table": {"family": FAMILY, "name": table}}},
                          {"delete": {"table": {"family": FAMILY, "name": table}}}]
    if not networks:
        return out
    out.append({"add": {"table": {"family": FAMILY, "name": table}}})
    out.append({"add": {"chain": {"family": FAMILY, "table": table, "name": OWNER_CHAIN}}})
    out.append(_rule(table, OWNER_CHAIN, [{"accept": None}], f"store {owner}"))
    out += [_chain(table, "prerouting", "nat", "prerouting", -100), _chain(table, "output", "nat", "output", -100),
            _chain(table, "postrouting", "nat", "postrouting", 100), _chain(table, "forward", "filter", "forward", 0),
            _chain(table, "input", "filter", "input", 0)]
    bridges = sorted(n.bridge for n in networks)
    out.append(_rule(table, "forward", [ESTABLISHED, {"accept": None}], "replies"))
    out.append(_rule(table, "input", [_match(_meta("iifname"), _names(bridges)), ESTABLISHED, {"accept": None}], "replies to the host's connections"))
    out.append(_rule(table, "input", [_match(_meta("iifname"), _names(bridges)), _match(_meta("l4proto"), {"set": ["icmp", "ipv6-icmp"]}, "in"),
                               {"accept": None}], "ping and IPv6 neighbour discovery"))
    out.append(_rule(table, "input", [_match(_meta("iifname"), _names(bridges)), {"drop": None}], "containers do not reach host services"))
    for net in sorted(networks, key=lambda n: n.name):
        out.append(_rule(table, "forward", [_match(_meta("iifname"), net.bridge), _match(_meta("oifname"), net.bridge), {"accept": None}],
                         f"network {net.name}: among its containers"))
        others = [b for b in bridges if b != net.bridge]
        if others:
            out.append(_rule(table, "forward", [_match(_meta("iifname"), net.bridge), _match(_meta("oifname"), _names(others)), {"drop": None}],
                             f"network {net.name}: not to other networks"))
        out.append(_rule(table, "postrouting", [_match(_payload("ip", "saddr"), _prefix(net.subnet)),
                                         _match(_meta("oifname"), net.bridge, "!="), {"masquerade": None}],
                         f"network {net.name}: outbound"))
        if net.subnet6:
            out.append(_rule(table, "postrouting", [_match(_payload("ip6", "saddr"), _prefix(net.subnet6)),
                                             _match(_meta("oifname"), net.bridge, "!="), {"masquerade": None}],
                             f"network {net.name}: outbound (IPv6)"))
        out.append(_rule(table, "postrouting", [_match(_payload("ip", "saddr"), _prefix(ipaddress.IPv4Network("127.0.0.0/8"))),
                                         _match(_meta("oifname"), net.bridge), {"masquerade": None}],
                         f"network {net.name}: published ports reached from 127.0.0.1"))
    by_name = {n.name: n for n in networks}
    for ep in sorted(endpoints, key=lambda e: e.container):
        if ep.network not in by_name:
            continue
        for port in ep.ports:
            out += port_rules(ep, port, table)
    return out


def port_rules(ep: Endpoint, port: Port, table: str = TABLE) -> list[Command]:
    """DNAT of one published port, in prerouting (from elsewhere) and output (from the host itself)."""
    out = []
    targets: list[tuple[str, Any]] = []
    if port.family in ("", "ip"):
        targets.append(("ip", ep.address))
    if port.family in ("", "ip6") and ep.address6 is not None:
        targets.append(("ip6", ep.address6))
    for family, address in targets:
        expr: list[dict] = [LOCAL_DESTINATION]
        if port.address:
            expr.append(_match(_payload(family, "daddr"), port.address))
        else:
            expr.append(_match(_meta("nfproto"), "ipv4" if family == "ip" else "ipv6"))
        expr.append(_match(_payload(port.protocol, "dport"), port.host))
        expr.append({"dnat": {"family": family, "addr": str(address), "port": port.container}})
        comment = f"container {ep.container}: {port.describe()}"
        out += [_rule(table, "prerouting", expr, comment), _rule(table, "output", expr, comment)]
    return out


NFTABLES_MODULE = Path("/usr/lib/python3/dist-packages/nftables/nftables.py")


class FirewallError(OSError):
    pass


def _nftables() -> Any:
    try:
        import nftables  # Debian's python3-nftables, where it is importable
    except ImportError:
        if not NFTABLES_MODULE.is_file():
            raise FirewallError(errno.ENOENT, "python3-nftables is not installed (`make setup` installs it)") from None
        spec = importlib.util.spec_from_file_location("tupper_nftables", NFTABLES_MODULE)
        assert spec is not None and spec.loader is not None
        nftables = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(nftables)
    return nftables


_lock = threading.Lock()
_nft: Any = None


def _after_fork() -> None:
    # A container's monitor is a fork of tupperd: a lock held by another thread at that moment would stay held.
    global _lock, _nft
    _lock, _nft = threading.Lock(), None


os.register_at_fork(after_in_child=_after_fork)


def apply(commands: list[Command]) -> None:
    """Run the commands in one nftables transaction (all or nothing), in the caller's network namespace."""
    global _nft
    with _lock:
        if _nft is None:
            _nft = _nftables().Nftables()
            _nft.set_json_output(True)
        rc, _out, err = _nft.json_cmd({"nftables": commands})
    if rc != 0:
        raise FirewallError(errno.EINVAL, f"nftables refused tupper's table: {err.strip() or rc}")


def _list(what: dict) -> list[dict] | None:
    global _nft
    with _lock:
        if _nft is None:
            _nft = _nftables().Nftables()
            _nft.set_json_output(True)
        rc, out, _err = _nft.json_cmd({"nftables": [{"list": what}]})
    return out.get("nftables", []) if rc == 0 and isinstance(out, dict) else None


def table_exists(table: str) -> bool:
    return _list({"table": {"family": FAMILY, "name": table}}) is not None


def table_owner(table: str) -> str | None:
    """The store that made the table (its `owner` chain's comment), "" for a table without one, None
    where there is no such table."""
    chain = _list({"chain": {"family": FAMILY, "table": table, "name": OWNER_CHAIN}})
    if chain is None:  # no such chain: no such table, or one that is not tupper's
        return "" if table_exists(table) else None
    for item in chain:
        comment = item.get("rule", {}).get("comment", "")
        if comment.startswith("store "):
            return comment[len("store "):]
    return ""


def covers(table: str, bridge: str) -> bool:
    """The table holds the rules of the network with this bridge (its input rules name it): a container
    attached to that bridge is fenced in from its first packet, before its own port rules are added."""
    chain = _list({"chain": {"family": FAMILY, "table": table, "name": "input"}})
    for item in chain or []:
        for expr in item.get("rule", {}).get("expr", []):
            m = expr.get("match", {})
            if m.get("left") == {"meta": {"key": "iifname"}}:
                right = m.get("right")
                if right == bridge or (isinstance(right, dict) and bridge in right.get("set", [])):
                    return True
    return False
