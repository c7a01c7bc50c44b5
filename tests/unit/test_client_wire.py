"""The CLI's own D-Bus wire code (tupper.client) against dbus-next's marshaller, byte for byte."""

from __future__ import annotations

import pytest
from dbus_next import Variant
from dbus_next._private.marshaller import Marshaller

from tupper import dbuswire as client

CASES = [
    ("s", ["hello"]),
    ("ssb", ["/abs/spec.toml", "", True]),
    ("sssb", ["image = 'x'\n", "/srv", "name", False]),
    ("sd", ["web", -1.0]),
    ("si", ["web", 9]),
    ("sb", ["web", True]),
    ("sss", ["web", "svc", "1.2.0"]),
    ("sashhh", ["web", ["sh", "-c", "echo ünïcode"], 0, 1, 2]),
    ("as", [[]]),
    ("a(ssuso)", [[["web", "running", 4242, "debian-bookworm", "/org/tupper1/container/web"],
                   ["db", "stopped", 0, "debian-bookworm", "/org/tupper1/container/db"]]]),
    ("a(ssss)", [[["hello.service", "active", "running", "success"]]]),
    ("os", ["/org/tupper1/container/web", '{"name": "web"}']),
    ("sss", ["web", "step", "Booting web"]),
    ("g", ["a(ssuso)"]),
    ("yqutx", [7, 65535, 2**32 - 1, 2**64 - 1, -(2**63)]),
]


@pytest.mark.parametrize("signature, body", CASES, ids=[c[0] for c in CASES])
def test_marshal_matches_dbus_next(signature, body):
    ours = bytearray()
    client._marshal(ours, signature, body)
    assert bytes(ours) == bytes(Marshaller(signature, body).marshall())


@pytest.mark.parametrize("signature, body", CASES, ids=[c[0] for c in CASES])
def test_unmarshal_reads_what_dbus_next_writes(signature, body):
    data = bytes(Marshaller(signature, body).marshall())
    values, end = client._unmarshal(data, 0, signature)
    assert end == len(data)
    assert values == body


def test_variants_and_dicts_as_in_properties_changed():
    body = ["org.tupper1.Container", {"State": Variant("s", "running"), "LeaderPID": Variant("u", 7)}, ["Units"]]
    data = bytes(Marshaller("sa{sv}as", body).marshall())
    values, _ = client._unmarshal(data, 0, "sa{sv}as")
    assert values == ["org.tupper1.Container", {"State": ("s", "running"), "LeaderPID": ("u", 7)}, ["Units"]]
    ours = bytearray()
    client._marshal(ours, "sa{sv}as", ["org.tupper1.Container", {"State": ("s", "running"), "LeaderPID": ("u", 7)}, ["Units"]])
    assert bytes(ours) == data


def test_big_endian_messages_are_read_too():
    import struct

    data = struct.pack(">I", 5) + b"hello\0"
    assert client._unmarshal(data, 0, "s", ">")[0] == ["hello"]
