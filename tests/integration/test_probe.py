"""http and tcp health checks connect inside the network namespace of the process they check: a real
namespace made here (unshare --net) with a server on its own loopback that the host cannot reach."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest
from helpers import wait_for

from tupper.container import netns, probe
from tupper.model.health import HealthCheck, Target

SERVER = """
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(4)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    with c:
        c.recv(4096)
        c.sendall(b"HTTP/1.0 204 No Content\\r\\n\\r\\n")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def netns_server():
    port = free_port()
    p = subprocess.Popen(["unshare", "--net", "sh", "-c", f'ip link set lo up && exec "$0" -c "$1" {port}', sys.executable, SERVER],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield p.pid, port
    finally:
        p.kill()
        p.wait()


def check(kind: str, port: int, path: str = "/") -> HealthCheck:
    return HealthCheck(kind, address=str(port), target=Target("127.0.0.1", port, path), timeout=2.0)


def test_http_and_tcp_checks_run_in_the_checked_process_network_namespace(netns_server):
    pid, port = netns_server
    assert not netns.same_netns(pid)
    with pytest.raises(ConnectionRefusedError):  # not on the host's loopback
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    assert probe.run(check("http", port, "/health"), pid) == probe.Result(True, "HTTP 204")
    assert probe.run(check("tcp", port), pid) == probe.Result(True, f"connected to port {port}")
    closed = free_port()
    assert probe.run(check("tcp", closed), pid) == probe.Result(False, "connection refused")
    # The thread that entered the namespace is gone, and nothing stays open.
    wait_for(lambda: threading.active_count() == threads, 5, "the namespace thread to end")
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_check_of_a_process_that_is_gone_fails_with_a_reason(netns_server):
    pid, port = netns_server
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    result = probe.run(check("tcp", port), pid)
    assert not result.ok and "gone" in result.detail
