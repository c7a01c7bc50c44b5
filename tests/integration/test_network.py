"""Container networks through tupperd, on real network namespaces, bridges and nftables (docs/network.md):
two copies of examples/web.toml side by side, forwards that answer on the host's 127.0.0.1 (TCP, UDP,
IPv6), names between containers, isolation between networks and from the host, a taken host port
refused, forwards that outlive a SIGKILLed tupperd, and nothing left after 30 start/stop cycles. All
traffic stays on this machine: the host's loopback and the suite's own bridges."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import REPO, SERVICES, busctl, label, wait_for, write_component, write_spec

SLEEPER = "[Service]\nType=exec\nExecStart=/bin/sleep infinity\n"
# A UDP echo server on the port given, on every address of the container.
UDP_ECHO = """#!/usr/bin/python3
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b"echo " + data, peer)
"""


def tag(root: Path) -> str:
    """The test store's network tag (tupper.store.networks.tag_of): its bridges are tpXX-*, veths tvXX-*."""
    return hashlib.sha256(str(root).encode()).hexdigest()[:2]


def links(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return sorted(link["ifname"] for link in json.loads(out) if link["ifname"].startswith(prefix))


def nft_table(root: Path) -> str:
    p = subprocess.run(["nft", "list", "table", "inet", f"tupper{tag(root)}"], capture_output=True, text=True)
    return p.stdout if p.returncode == 0 else ""


def http_get(host: str, port: int, family: int = socket.AF_INET, timeout: float = 3) -> bytes:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def reach(tupper, name: str, host: str, port: int) -> bool:
    """From inside container `name`: does a TCP connection to host:port open (bash's /dev/tcp, 2 s)?"""
    p = tupper("exec", name, "--", "timeout", "2", "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}")
    return p.returncode == 0


def web_spec(tmp_path: Path, extra: str = "") -> Path:
    """examples/web.toml as it is (host port left to tupper), its component paths made absolute."""
    text = (REPO / "examples/web.toml").read_text().replace('"../services/', f'"{SERVICES}/') + extra
    path = tmp_path / f"web-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text)
    return path


def published(tupper, name: str) -> int:
    (port,) = tupper.json("port", name)
    return port["host"]


@pytest.fixture
def network(tupper):
    """Networks of one test, removed afterwards (after the test's containers: `names` is set up first)."""
    made: list[str] = []

    def new(*options: str) -> str:
        name = f"t{uuid.uuid4().hex[:7]}"
        made.append(name)
        tupper("network", "create", name, *options, check=True)
        return name

    yield new
    # This runs before `names` removes the test's containers: those on these networks go first.
    users = {n["name"]: n["containers"] for n in tupper.json("network", "ls")}
    for name in made:
        for container in users.get(name, []):
            tupper("rm", "--force", container)
        tupper("network", "rm", name, check=True)


def test_two_copies_of_the_web_example_answer_on_their_own_localhost_ports_and_by_name(tupper, names, tmp_path, store_root, bus):
    a, b = names("a"), names("b")
    spec = web_spec(tmp_path)
    for n in (a, b):
        p = tupper("run", spec, "--name", n)
        assert p.returncode == 0, p.stderr
        assert re.search(r"^ports: \d+->8080/tcp$", p.stdout, re.M), p.stdout
    ports = {n: published(tupper, n) for n in (a, b)}
    assert ports[a] != ports[b]
    for n in (a, b):
        reply = http_get("127.0.0.1", ports[n])
        assert reply.startswith(b"HTTP/1.0 200") and b"Hello from a tupper container" in reply
        assert {u["name"]: u["active_state"] for u in tupper.json("status", n)["units"]} == {"hello.service": "active", "web.service": "active"}
    # ps, port, status and D-Bus say where each one is
    rows = {r["name"]: r for r in tupper.json("ps")}
    addr = {n: rows[n]["network"]["address"] for n in (a, b)}
    assert rows[a]["ports"] == [f"{ports[a]}->8080/tcp"] and addr[a] != addr[b]
    text = tupper("ps", check=True).stdout
    assert "PORTS" in text and f"{ports[b]}->8080/tcp" in text
    assert tupper("port", a, check=True).stdout.strip() == f"8080/tcp -> 0.0.0.0:{ports[a]}"
    prop = busctl(bus, "get-property", "org.tupper1", f"/org/tupper1/container/{label(a)}", "org.tupper1.Container", "Address")
    assert prop.stdout.strip() == f's "{addr[a]}"', prop.stderr
    # straight to the container's address from the host, and from one container to the other by name
    assert http_get(addr[a], 8080).startswith(b"HTTP/1.0 200")
    assert reach(tupper, b, a, 8080) and reach(tupper, a, b, 8080)
    hosts = tupper("exec", b, "--", "cat", "/etc/hosts", check=True).stdout
    assert f"{addr[a]}\t{a}" in hosts and f"{addr[b]}\t{b}" in hosts
    assert tupper("exec", b, "--", "hostname", check=True).stdout.strip() == b
    # names follow containers as they go
    tupper("stop", a, check=True)
    wait_for(lambda: a not in tupper("exec", b, "--", "cat", "/etc/hosts").stdout, 5, "a's name to leave b's /etc/hosts")
    with pytest.raises(OSError):
        http_get("127.0.0.1", ports[a], timeout=1)
    assert http_get("127.0.0.1", ports[b]).startswith(b"HTTP/1.0 200")


def test_udp_is_forwarded_and_a_taken_host_port_is_refused(tupper, names, tmp_path):
    comp = write_component(tmp_path / "udp", "udp", {"udp-echo.service": "[Service]\nType=exec\nExecStart=/opt/udp/bin/echo 5300\n"},
                           files={"bin/echo": UDP_ECHO})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = f'[network]\n[[network.ports]]\nhost = {port}\ncontainer = 5300\nprotocol = "udp"\naddress = "127.0.0.1"\n'
    name = names()
    tupper("run", write_spec(tmp_path / "udp.toml", [comp], extra=extra), "--name", name, check=True)

    def echo() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            s.sendto(b"ping", ("127.0.0.1", port))
            return s.recvfrom(2048)[0]

    wait_for(lambda: _quiet(echo) == b"echo ping", 10, "the UDP echo through the forward")

    # The same host port in another spec: exit 2, one line naming the file and key, nothing made.
    other = names()
    spec = write_spec(tmp_path / "taken.toml", [comp], extra=extra)
    p = tupper("run", spec, "--name", other)
    assert p.returncode == 2, p.stderr
    first = p.stderr.splitlines()[0]
    assert first == f"tupper: {spec}: network.ports[0]: host port {port}/udp is published by container {name} already", p.stderr
    assert "Traceback" not in p.stderr and other not in [r["name"] for r in tupper.json("ps")]


def _quiet(fn):
    try:
        return fn()
    except OSError:
        return None


def test_networks_are_kept_apart_and_the_host_is_closed_unless_published(tupper, names, network, tmp_path):
    comp = write_component(tmp_path / "web", "web", {"srv.service": "[Service]\nType=exec\nExecStart=/usr/bin/python3 /opt/web/bin/web-server "
                                                     "--port 8000 --bind 0.0.0.0 --root /opt/web\n"},
                           files={"bin/web-server": (SERVICES / "web/bin/web-server").read_text(), "index.html": "hi\n"})
    net_a, net_b = network(), network()
    on = {}
    for n, net in (("a1", net_a), ("a2", net_a), ("b1", net_b)):
        on[n] = names(n)
        tupper("run", write_spec(tmp_path / f"{n}.toml", [comp], extra=f'[network]\nnetwork = "{net}"\n'), "--name", on[n], check=True)
    addr = {n: tupper.json("status", on[n])["network"]["address"] for n in on}
    assert reach(tupper, on["a2"], on["a1"], 8000), "same network: reachable by name"
    assert reach(tupper, on["a2"], addr["a1"], 8000)
    assert not reach(tupper, on["b1"], addr["a1"], 8000), "another network: not reachable"
    assert not reach(tupper, on["a1"], addr["b1"], 8000)
    # A service of the host on every address: not reachable from a container through the bridge.
    nets = {n["name"]: n for n in tupper.json("network", "ls")}
    with socket.socket() as srv:
        srv.bind(("0.0.0.0", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        assert not reach(tupper, on["a1"], nets[net_a]["gateway"], port)
    # Removing a network in use is refused; ls shows who runs on it.
    assert sorted(nets[net_a]["running"]) == sorted([on["a1"], on["a2"]])
    p = tupper("network", "rm", net_a)
    assert p.returncode == 1 and f"network {net_a!r} is used by" in p.stderr


def test_ipv6_network_with_a_forward_on_the_bridge_address(tupper, names, network, tmp_path):
    v6 = f"fd{uuid.uuid4().hex[:2]}:{uuid.uuid4().hex[:4]}::/64"
    net = network("--ipv6", v6)
    name = names()
    spec = web_spec(tmp_path, "").read_text().replace('mode = "private"', f'mode = "private"\nnetwork = "{net}"')
    path = tmp_path / "web6.toml"
    path.write_text(spec)
    tupper("run", path, "--name", name, check=True)
    st = tupper.json("status", name)
    address6 = st["network"]["address6"]
    assert address6 and ipaddress.ip_address(address6) in ipaddress.ip_network(v6)  # (fd43:0b90::/64 holds fd43:b90::2)
    assert http_get(address6, 8080, socket.AF_INET6).startswith(b"HTTP/1.0 200")  # the container's own IPv6 address
    gateway6 = next(n for n in tupper.json("network", "ls") if n["name"] == net)["subnet6"].replace("::/64", "::1")
    assert http_get(gateway6, published(tupper, name), socket.AF_INET6).startswith(b"HTTP/1.0 200")  # DNAT for IPv6


def test_forwards_outlive_a_sigkilled_tupperd_and_its_successor_keeps_them(tupper, names, tmp_path, bus, store_root):
    name = names()
    tupper("run", web_spec(tmp_path), "--name", name, check=True)
    port = published(tupper, name)
    before = nft_table(store_root)
    bus.stop_tupperd(signal.SIGKILL)
    assert http_get("127.0.0.1", port).startswith(b"HTTP/1.0 200")
    assert tupper.json("status", name)["state"] == "running"  # bus activation starts a new tupperd, which re-adopts
    assert nft_table(store_root) == before
    assert http_get("127.0.0.1", port).startswith(b"HTTP/1.0 200")


def test_thirty_start_stop_cycles_leave_no_veth_rule_or_address(tupper, names, tmp_path, store_root):
    comp = write_component(tmp_path / "s", "s", {"sleeper.service": SLEEPER})
    name = names()
    spec = write_spec(tmp_path / "s.toml", [comp], extra="[network]\n[[network.ports]]\ncontainer = 9\n")
    tupper("run", spec, "--name", name, check=True)
    port = published(tupper, name)
    veths_before = links(f"tv{tag(store_root)}-")
    for _ in range(30):
        tupper("stop", name, check=True)
        assert f"dport {port} " not in nft_table(store_root)
        tupper("start", name, check=True)
        assert f"dport {port} " in nft_table(store_root)
    assert len(links(f"tv{tag(store_root)}-")) == len(veths_before)
    tupper("rm", "--force", name, check=True)
    assert f"dport {port} " not in nft_table(store_root)
    allocations = json.loads((store_root / "networks.json").read_text())["allocations"]
    assert all(name not in a for a in allocations.values())
    running = [r for r in tupper.json("ps") if r["state"] in ("running", "starting", "degraded") and r["network"]["mode"] == "private"]
    if not running:  # nothing of the store's networking is left but its networks' bridges
        assert links(f"tv{tag(store_root)}-") == [] and nft_table(store_root) == ""


def test_store_check_finds_a_veth_pair_a_crash_left_and_repair_removes_it(tupper, store_root):
    t = tag(store_root)
    left, peer = f"tv{t}-0123456789", f"pv{t}-0123456789"  # as a start cut between making the pair and moving its end
    subprocess.run(["ip", "link", "add", left, "type", "veth", "peer", "name", peer], check=True)
    try:
        p = tupper("store", "check", "--json")
        findings = json.loads(p.stdout)
        assert p.returncode == 1 and any(f["kind"] == "network" and f["path"] == f"link {left}" for f in findings), findings
        tupper("store", "check", "--repair", check=True)
        assert links(left) == [] and links(peer) == []
    finally:
        subprocess.run(["ip", "link", "del", left], capture_output=True)


def test_host_and_none_modes(tupper, names, tmp_path):
    comp = write_component(tmp_path / "s", "s", {"sleeper.service": SLEEPER})
    host, none = names("host"), names("none")
    tupper("run", write_spec(tmp_path / "h.toml", [comp], extra='[network]\nmode = "host"\n'), "--name", host, check=True)
    tupper("run", write_spec(tmp_path / "n.toml", [comp], extra='[network]\nmode = "none"\n'), "--name", none, check=True)
    ifaces = {n: tupper("exec", n, "--", "ls", "/sys/class/net", check=True).stdout.split() for n in (host, none)}
    assert ifaces[none] == ["lo"]
    assert set(ifaces[host]) == set(subprocess.run(["ls", "/sys/class/net"], capture_output=True, text=True).stdout.split())
    assert tupper.json("status", host)["network"]["address"] is None


OUTSIDE_SERVER = """
import socket, sys
s = socket.socket()
s.bind(("0.0.0.0", 7777))
s.listen(1)
print("ready", flush=True)
c, peer = s.accept()
c.sendall(peer[0].encode())
c.close()
"""


def test_outbound_traffic_is_masqueraded_behind_the_host(tupper, names, tmp_path):
    """A namespace of the test's own plays "the outside": a veth from the host (198.51.100.1/30, a
    documentation range) to it (198.51.100.2). A container connects there; the outside sees the host's
    address, not the container's."""
    holder = subprocess.Popen(["unshare", "--net", "sleep", "600"])
    host_if, out_if = f"tx{uuid.uuid4().hex[:8]}", f"ty{uuid.uuid4().hex[:8]}"
    server = None
    try:
        wait_for(lambda: os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"), 5, "the namespace")
        for argv in (["ip", "link", "add", host_if, "type", "veth", "peer", "name", out_if],
                     ["ip", "link", "set", out_if, "netns", str(holder.pid)],
                     ["ip", "addr", "add", "198.51.100.1/30", "dev", host_if], ["ip", "link", "set", host_if, "up"],
                     ["nsenter", "-t", str(holder.pid), "-n", "ip", "addr", "add", "198.51.100.2/30", "dev", out_if],
                     ["nsenter", "-t", str(holder.pid), "-n", "ip", "link", "set", out_if, "up"],
                     ["nsenter", "-t", str(holder.pid), "-n", "ip", "link", "set", "lo", "up"]):
            subprocess.run(argv, check=True)
        server = subprocess.Popen(["nsenter", "-t", str(holder.pid), "-n", sys.executable, "-c", OUTSIDE_SERVER],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        comp = write_component(tmp_path / "s", "s", {"sleeper.service": SLEEPER})
        name = names()
        tupper("run", write_spec(tmp_path / "s.toml", [comp]), "--name", name, check=True)
        assert tupper.json("status", name)["network"]["address"].startswith("10.")
        p = tupper("exec", name, "--", "timeout", "5", "bash", "-c", "exec 3<>/dev/tcp/198.51.100.2/7777; cat <&3")
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == "198.51.100.1", "the outside sees the host's address"
    finally:
        if server is not None:
            server.kill()
            server.wait()
        holder.kill()
        holder.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
