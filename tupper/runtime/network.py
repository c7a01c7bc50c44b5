"""Container networks at run time (docs/network.md): the one place that orders the network work of a
container's start and stop, and keeps the host's side (bridges, nftables table, every container's
/etc/hosts) in step with what runs.

start (private mode), `prepare`: the network's bridge (and its rules, at its first use) → an address
from the store → a new network namespace with a veth pair whose peer is made in it as host0, with
address and routes, from the host over netlink → /etc/hosts and /etc/resolv.conf in the root.
systemd-nspawn then joins that namespace (`--network-namespace-path`), so host0 is configured before
systemd inside starts anything. `publish`, while systemd boots: `sync` (the container's port
forwards, the other containers' /etc/hosts). The namespace lives as long as the container's
processes: when the container ends, the kernel deletes it, and the veth pair with it.

`sync` rebuilds everything that depends on which containers run, from the store's state alone: the
nftables table (one transaction: the rules of every network a container holds an address on, and
the port forwards of every running container; no table when no container runs) and each running
container's /etc/hosts. It releases addresses of containers that no longer run. It is called after
every start, stop, kill and removal, by a container's monitor when the container ends by itself, and
by tupperd when it starts (re-adoption after a crash or a SIGKILL is the same rebuild). Bridges live
until `network rm`.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
from pyroute2.netlink.exceptions import NetlinkError

from tupper.container import firewall, netlink, netns, nspawn
from tupper.container.inroot import Root
from tupper.errors import Busy, Failed, InvalidInput, NotFound
from tupper.model import network as netmodel
from tupper.model.network import Network, Port
from tupper.runtime.records import TRANSITIONAL, Record
from tupper.store import networks as netstore
from tupper.store.networks import Networks
from tupper.store.store import Store

log = logging.getLogger("tupper")

HOST_RESOLV = Path("/etc/resolv.conf")
LOCK = ".network.lock"


def host_interface(tag: str, name: str) -> str:
    """The host end of a container's veth pair: tvX-<10 hex digits of its name> (IFNAMSIZ is 16)."""
    return f"tv{tag}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"


def holds_address(rec: Record | None) -> bool:
    """A container keeps its address while it runs or while a live process is starting it."""
    if rec is None:
        return False
    return rec.alive() or (rec.phase in TRANSITIONAL and rec.phase != "removing" and rec.owner_alive())


def host_port_taken(port: Port) -> str | None:
    """Why a process of the host holds the port (it would be shadowed by the forward), else None."""
    family = socket.AF_INET6 if port.family == "ip6" else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM if port.protocol == "tcp" else socket.SOCK_DGRAM) as s:
        try:
            s.bind((port.address or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port.host))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "a process on this host uses it"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{port.address} is not an address of this host"
            return exc.strerror or str(exc)
    return None


def resolv_conf(host_text: str) -> str:
    """The container's resolv.conf: the host's, without nameservers on the host's loopback (the
    container's loopback is its own), so a host running a local resolver gives containers none."""
    out = ["# written by tupper from the host's /etc/resolv.conf (loopback nameservers left out)"]
    for line in host_text.splitlines():
        words = line.split()
        if words[:1] == ["nameserver"] and len(words) > 1:
            try:
                if ipaddress.ip_address(words[1].split("%")[0]).is_loopback:
                    continue
            except ValueError:
                continue
        if words and words[0] in ("nameserver", "search", "domain", "options"):
            out.append(line.strip())
    return "\n".join(out) + "\n"


def hosts_file(me: str, address: str, peers: list[tuple[str, str]], network: str | None) -> str:
    """A container's /etc/hosts: localhost, its own name, and (private mode) every container running on
    its network, by container name and by hostname where the two differ."""

    def names(n: str) -> str:
        host = nspawn.machine_name(n)
        return n if host == n else f"{n} {host}"

    lines = ["# written by tupper" + (f": this container and the others on network {network}" if network else ""),
             "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{address}\t{names(me)}"]
    lines += [f"{a}\t{names(n)}" for n, a in sorted(peers) if n != me]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _clear_errors(what: str) -> Iterator[None]:
    """netlink's and nftables' errors as tupper's: one line saying what failed, never "internal error"."""
    try:
        yield
    except NetlinkError as exc:
        code, text = (exc.args + ("",))[:2] if exc.args else (0, "")
        raise Failed(f"{what}: the kernel refused a network change: {text or os.strerror(code)} (netlink error {code})") from None
    except firewall.FirewallError as exc:
        raise Failed(f"{what}: {exc.strerror}") from None


@attrs.frozen
class Joining:
    """A container's network namespace, open as `fd` (the caller closes it once nspawn has joined it,
    or will not), and the work that wires it up (`wire`: its veth pair, host0, /etc/hosts)."""

    fd: int
    wire: Callable[[], None]

    @property
    def path(self) -> str:
        """The namespace as systemd-nspawn's --network-namespace-path opens it (through this process's fd)."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"


class Plumbing:
    """The network side of the runtime, for one store."""

    def __init__(self, store: Store, records: Callable[[], list[Record]]) -> None:
        self.store = store
        self.records = records  # the store's containers (Runtime.records)
        self.tag = netstore.tag_of(store.is_default, store.ident)
        self.networks = Networks(store.root, store.lock, self.tag)
        self.table = f"{firewall.TABLE}{self.tag}"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One network change at a time in this store (the table is rebuilt from a consistent view)."""
        fd = os.open(self.store.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ---- networks ---------------------------------------------------------------------------------

    def network_of(self, rec_or_name: str, where: str) -> Network:
        """The named network (the default one is made on first use); exit 2 when it does not exist."""
        if rec_or_name == netmodel.DEFAULT_NETWORK:
            return self.networks.ensure_default()
        try:
            return self.networks.get(rec_or_name)
        except NotFound as exc:
            raise InvalidInput(f"{where}: no network {rec_or_name!r}",
                               hint=f"create it first: tupper network create {rec_or_name}") from exc

    def create(self, name: str, subnet: str | None, subnet6: str | None) -> Network:
        where = f"tupper network create {name}"
        net = netmodel.make(name, subnet or self._free_subnet(), subnet6, where, self.tag)
        self._check_routes(net, where)
        return self.networks.create(net)

    def _free_subnet(self) -> str:
        """A /24 for a network made without --subnet: the first 10.X.0.0/24 from 10.89 on that neither
        another network of this store nor a route of the host covers."""
        taken = [n.subnet for n in self.networks.list()]
        routes = [r for _, r in netlink.routes(os.getpid()) if r.prefixlen > 0]  # the default route covers everything
        for x in range(89, 200):
            candidate = ipaddress.IPv4Network(f"10.{x}.0.0/24")
            if not any(candidate.overlaps(t) for t in taken) and not any(candidate.overlaps(r) for r in routes):
                return str(candidate)
        raise InvalidInput("tupper network create: no free 10.X.0.0/24 left", hint="give one with --subnet")

    def _check_routes(self, net: Network, where: str) -> None:
        mine = {n.bridge for n in self.networks.list()}
        for dev, route in netlink.routes(os.getpid()):
            if dev in mine or route.prefixlen == 0:
                continue
            if route.overlaps(net.subnet) or (net.subnet6 is not None and route.overlaps(net.subnet6)):
                raise InvalidInput(f"{where}: {net.subnet6 if route.version == 6 else net.subnet} overlaps the host's route "
                                   f"{route} on {dev}", hint="pick another --subnet (or --ipv6)")

    def remove(self, name: str) -> None:
        with self.lock():
            net = self.networks.get(name)
            recs = {r.name: r for r in self.records()}
            users = sorted(r.name for r in recs.values() if r.network.mode == "private" and r.network.network == name)
            if users:
                raise Busy(f"network {name!r} is used by {', '.join(users)}", hint="remove those containers first")
            # Addresses of containers that are gone (their release could not be written: a full store).
            self.networks.prune(lambda n: holds_address(recs.get(n)))
            self.networks.remove(name)
            with _clear_errors(f"network {name!r}"):
                netlink.remove_bridge(os.getpid(), net)
            self._sync_locked()

    def list(self) -> builtins.list[dict]:
        users: dict[str, dict[str, str]] = {}
        for network, container, address in self.networks.allocations():
            users.setdefault(network, {})[container] = str(address)
        configured = {rec.name: rec.network.network for rec in self.records() if rec.network.mode == "private"}
        out = []
        for net in self.networks.list():
            out.append({**net.to_json(), "bridge": net.bridge, "gateway": str(net.gateway),
                        "gateway6": str(net.gateway6) if net.gateway6 else None,
                        "running": users.get(net.name, {}),
                        "containers": sorted(n for n, network in configured.items() if network == net.name)})
        return out

    # ---- a container's start ---------------------------------------------------------------------

    def check_ports(self, name: str, ports: tuple[Port, ...], where: str) -> tuple[Port, ...]:
        """The ports with a host port picked where the spec left it to tupper; exit 2 where another
        running container publishes one of them already, or a process of the host listens on it."""
        if not ports:
            return ()  # no record to read
        others = [(rec.name, q) for rec in self.records() if rec.name != name and holds_address(rec) for q in rec.network.ports]
        out: builtins.list[Port] = []
        for i, p in enumerate(ports):
            if p.host == netmodel.ANY_PORT:
                p = attrs.evolve(p, host=self._free_port(p, [q for _, q in others] + out))
            for other, q in others:
                if p.clashes(q):
                    raise InvalidInput(f"{where}[{i}]: host port {p.host}/{p.protocol} is published by container {other} already",
                                       hint=f"pick another host port, or stop {other}")
            problem = host_port_taken(p)
            if problem:
                raise InvalidInput(f"{where}[{i}]: host port {p.host}/{p.protocol}: {problem}", hint="pick another host port")
            out.append(p)
        return tuple(out)

    @staticmethod
    def _free_port(port: Port, published: builtins.list[Port]) -> int:
        for _ in range(100):
            with socket.socket(socket.AF_INET6 if port.family == "ip6" else socket.AF_INET,
                               socket.SOCK_STREAM if port.protocol == "tcp" else socket.SOCK_DGRAM) as s:
                s.bind((port.address, 0))
                candidate = s.getsockname()[1]
            if not any(attrs.evolve(port, host=candidate).clashes(q) for q in published):
                return candidate
        raise InvalidInput("no free host port found", hint="give `host` in [[network.ports]]")

    def prepare(self, rec: Record) -> Joining | None:
        """Before nspawn: the container's network namespace, new and empty, open for nspawn to join by
        path; None where nspawn needs none of tupper's (host mode; none mode: nspawn's own
        --private-network). `Joining.wire` does the rest and must be done before nspawn starts, which
        it may do while the caller makes ready to start nspawn (see Runtime.start): the address (in
        the record, saved by the caller), the bridge and its rules, the veth pair and /etc/hosts. The
        container's own port rules and the other containers' /etc/hosts follow in `publish`, while it
        boots."""
        if rec.network.mode != "private":
            self._write_names(rec, "127.0.1.1", [], None)
            return None
        fd = netns.new()
        return Joining(fd, lambda: self._wire(rec, fd))

    def _wire(self, rec: Record, fd: int) -> None:
        spec = rec.network
        where = f"{rec.spec_file}: network"
        with self.lock():
            ports = self.check_ports(rec.name, spec.ports, f"{where}.ports")
            if ports != spec.ports:  # a record from a spec whose host ports were left to tupper (created before that was kept)
                rec.network = attrs.evolve(spec, ports=ports)
            net = self.network_of(spec.network, f"{where}.network")
            address = self.networks.allocate(net.name, rec.name)
            peers = [(c, str(a)) for n, c, a in self.networks.allocations() if n == net.name]
        try:
            address6 = netmodel.address6(net, address)
            rec.address, rec.address6 = str(address), str(address6) if address6 else ""
            with _clear_errors(f"container {rec.name!r}: its network"):
                made = netlink.ensure_bridge(os.getpid(), net)
                if made or not firewall.covers(self.table, net.bridge):  # a network's first use (or a table lost)
                    with self.lock():
                        self._sync_locked()
                netlink.attach(os.getpid(), None, net, host_interface(self.tag, rec.boot_name), address, address6, netns_fd=fd)
            self._write_names(rec, str(address), peers, net.name)
        except BaseException:
            self.release(rec)
            raise

    def publish(self, rec: Record) -> None:
        """Once nspawn runs: the container's published ports and its name in the other containers'
        /etc/hosts (the rebuild), done while its systemd boots, before the start is reported done."""
        if rec.network.mode == "private":
            with self.lock():
                self._sync_locked()

    def release(self, rec: Record) -> None:
        """After the container ended (or its start failed): its address, rules and name go."""
        with self.lock():
            rec.address = rec.address6 = ""  # saved by the caller, with the container's new phase
            try:
                self.networks.release(rec.name)
            except OSError as exc:  # a full store: the rules go all the same; the next sync releases it
                if exc.errno != errno.ENOSPC:
                    raise
                log.warning("%s: no space left to release its address; the next network change does", rec.name)
            # Its veth pair goes with its namespace, which the kernel deletes once the last process in it is gone.
            self._sync_locked()

    def sync(self) -> None:
        """The whole rebuild, with the sweep of what crashes left (tupperd's start, a monitor, store check)."""
        with self.lock():
            self._sync_locked(sweep=True)

    def _sync_locked(self, sweep: bool = False) -> None:
        with _clear_errors("container networks"):
            self._rebuild(sweep)

    def _rebuild(self, sweep: bool) -> None:
        recs = {r.name: r for r in self.records()}
        try:
            self.networks.prune(lambda name: holds_address(recs.get(name)))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        nets = {n.name: n for n in self.networks.list()}
        endpoints: list[firewall.Endpoint] = []
        by_network: dict[str, list[tuple[str, str]]] = {}
        for network, container, address in self.networks.allocations():
            rec = recs.get(container)
            if not holds_address(rec) or network not in nets:
                continue
            assert rec is not None
            endpoints.append(firewall.Endpoint(container, network, address, netmodel.address6(nets[network], address),
                                               rec.network.ports))
            by_network.setdefault(network, []).append((container, str(address)))
        used = [nets[n] for n in sorted(by_network)]  # the rules of networks a container holds an address on
        owner = firewall.table_owner(self.table)
        if owner not in (None, str(self.store.root)):
            raise Failed(f"the nftables table inet {self.table} belongs to the store {owner or '(unknown)'}, not {self.store.root}: "
                         "two stores with one network tag", hint="stop that store's containers, or use another store root")
        firewall.apply(firewall.ruleset(used, endpoints, self.table, str(self.store.root)))
        for network, members in by_network.items():
            named = [(c, a) for c, a in members if not recs[c].pool]  # a warm pool's containers are nobody's peers yet
            for member, member_address in members:
                if holds_address(recs[member]):
                    self._write_names(recs[member], member_address, named, network)
        if sweep:
            # Veth pairs left whole on the host: a start cut short between making the pair and handing
            # one end (pv…) to the container's namespace, which would have taken the pair with it.
            keep = {host_interface(self.tag, recs[c].boot_name) for members in by_network.values() for c, _ in members}
            present = set(netlink.links(os.getpid()))
            for link in present:
                if link.startswith(f"tv{self.tag}-") and link not in keep and "p" + link[1:] in present:
                    netlink.detach(os.getpid(), link)

    def _write_names(self, rec: Record, address: str, peers: builtins.list[tuple[str, str]], network: str | None) -> None:
        """/etc/hosts (and, on a private network, /etc/resolv.conf) in the container's root. Written
        through tupper.inroot: the root belongs to the container, which may have made /etc a symlink."""
        try:
            with Root(rec.rootfs) as root:
                root.write_text("etc/hosts", hosts_file(rec.name, address, peers, network), 0o644)
                if network is not None:
                    try:
                        host = HOST_RESOLV.read_text()
                    except OSError:
                        host = ""
                    root.write_text("etc/resolv.conf", resolv_conf(host), 0o644)
        except OSError as exc:
            log.warning("%s: cannot write /etc/hosts: %s", rec.name, exc)

    def leftovers(self) -> builtins.list[tuple[str, str]]:
        """(what, why) of this store's networking that nothing running needs: what `sync` removes."""
        recs = {r.name: r for r in self.records()}
        out = []
        holders = set()
        for network, container, address in self.networks.allocations():
            if holds_address(recs.get(container)):
                holders.add(container)
            else:
                out.append((f"address {address} on network {network}", f"held for {container}, which does not run"))
        present = set(netlink.links(os.getpid()))
        keep = {host_interface(self.tag, recs[c].boot_name) for c in holders}
        out += [(f"link {link}", "a veth pair of no running container") for link in sorted(present)
                if link.startswith(f"tv{self.tag}-") and link not in keep and "p" + link[1:] in present]
        if not holders and firewall.table_exists(self.table):
            out.append((f"nftables table inet {self.table}", "no container runs on a network"))
        return out



def main(argv: list[str] | None = None) -> int:
    """`python -m tupper.runtime.network --root ROOT sync`: what a container's monitor runs when the
    container ended by itself (a fresh process: the monitor is a fork of a threaded tupperd, where
    netlink and nftables libraries are not safe to use)."""
    import argparse

    from tupper.runtime.runtime import Runtime

    ap = argparse.ArgumentParser(prog="python -m tupper.runtime.network")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("action", choices=["sync"])
    args = ap.parse_args(argv)
    Runtime(Store.open(args.root, create=False)).net.sync()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
