"""The store's network file: definitions, allocations kept across reopenings, never an address twice,
refusals (overlap, in use, unknown)."""

from __future__ import annotations

import contextlib
import ipaddress
import threading

import pytest

from tupper.errors import Busy, Exists, InvalidInput, NotFound
from tupper.model import network as net
from tupper.store.networks import Networks


@pytest.fixture
def networks(tmp_path):
    lock = threading.Lock()

    @contextlib.contextmanager
    def locked():
        with lock:
            yield

    return lambda: Networks(tmp_path, locked)


def test_create_allocate_release_and_remove(networks):
    n = networks()
    n.create(net.make("a", "10.88.0.0/24", None, "x"))
    assert [x.name for x in n.list()] == ["a"]
    assert n.allocate("a", "w1") == ipaddress.IPv4Address("10.88.0.2")
    assert n.allocate("a", "w2") == ipaddress.IPv4Address("10.88.0.3")
    assert networks().allocate("a", "w1") == ipaddress.IPv4Address("10.88.0.2")  # kept, also when reopened
    with pytest.raises(Busy, match="used by w1, w2"):
        n.remove("a")
    assert n.release("w1") == ["a"]
    assert n.allocate("a", "w3") == ipaddress.IPv4Address("10.88.0.2")  # freed, handed out again
    n.release("w2"), n.release("w3")
    n.remove("a")
    assert n.list() == [] and list(n.allocations()) == []


def test_refusals(networks):
    n = networks()
    n.create(net.make("a", "10.88.0.0/24", None, "x"))
    with pytest.raises(Exists):
        n.create(net.make("a", "10.99.0.0/24", None, "x"))
    with pytest.raises(InvalidInput, match="overlaps network a"):
        n.create(net.make("b", "10.88.0.0/16", None, "x"))
    with pytest.raises(NotFound, match="no network 'c'"):
        n.allocate("c", "w1")
    with pytest.raises(NotFound):
        n.remove("c")


def test_parallel_allocations_never_share_an_address(networks):
    n = networks()
    n.create(net.make("a", "10.88.0.0/24", None, "x"))
    got: list[ipaddress.IPv4Address] = []
    threads = [threading.Thread(target=lambda i=i: got.append(networks().allocate("a", f"c{i}"))) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 40


def test_the_default_network_is_made_on_first_use(networks):
    d = networks().ensure_default()
    assert (d.name, str(d.subnet)) == ("tupper0", "10.88.0.0/24")
    assert networks().ensure_default() == d
