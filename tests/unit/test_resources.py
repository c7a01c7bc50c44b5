"""Resource limits as values: sizes, CPU shares, weights and pids as users write them, their order,
and their round trip through the record."""

from __future__ import annotations

import math

import pytest

from tupper.errors import InvalidInput
from tupper.model.resources import UNLIMITED, Resources, human, parse_mapping


@pytest.mark.parametrize(("text", "size"), [
    (0, 0), (4096, 4096), ("4096", 4096), ("512M", 512 << 20), ("2G", 2 << 30), ("1.5G", 3 << 29), ("100k", 100 << 10),
    ("64MiB", 64 << 20), ("1T", 1 << 40), ("infinity", UNLIMITED), ("max", UNLIMITED), (" 8M ", 8 << 20),
])
def test_sizes(text, size):
    assert parse_mapping({"memory_low": text}, "s.toml: resources").memory_low == size


@pytest.mark.parametrize(("value", "message"), [
    (-1, "resources.memory_max: a size cannot be negative, got -1"),
    ("12X", "resources.memory_max: not a size: '12X'"),
    ("-5M", "resources.memory_max: not a size: '-5M'"),
    ("", "resources.memory_max: not a size: ''"),
    (True, "resources.memory_max: expected a size"),
    (1.5, "resources.memory_max: expected a size"),
    ("99999999E", "resources.memory_max: '99999999E' is too large"),
    (0, "resources.memory_max: 0 bytes leaves nothing to run in"),
])
def test_bad_sizes_name_the_key(value, message):
    with pytest.raises(InvalidInput) as info:
        parse_mapping({"memory_max": value}, "s.toml: resources")
    assert info.value.message.startswith("s.toml: " + message)


def test_cpu_share_is_a_percentage_of_one_cpu():
    assert parse_mapping({"cpu_max": "150%"}, "r").cpu_max == 150.0
    assert parse_mapping({"cpu_max": "12.5%"}, "r").cpu_max == 12.5
    assert math.isinf(parse_mapping({"cpu_max": "infinity"}, "r").cpu_max)
    for bad, why in [(2, "expected a percentage of one CPU"), ("2", "not a CPU share"), ("0%", "between 1% and"),
                     ("0.5%", "between 1% and"), ("nan%", "not a CPU share"), ("-50%", "not a CPU share")]:
        with pytest.raises(InvalidInput, match=why):
            parse_mapping({"cpu_max": bad}, "r")


def test_weights_and_pids():
    res = parse_mapping({"cpu_weight": 1, "io_weight": 10000, "pids_max": 64}, "r")
    assert (res.cpu_weight, res.io_weight, res.pids_max) == (1, 10000, 64)
    assert parse_mapping({"pids_max": "infinity"}, "r").pids_max == UNLIMITED
    for key, bad, why in [("cpu_weight", 0, "between 1 and 10000"), ("io_weight", 10001, "between 1 and 10000"),
                          ("cpu_weight", "100", "expected an integer"), ("pids_max", 0, "at least 1"), ("pids_max", -3, "at least 1"),
                          ("pids_max", "lots", "expected a number of tasks")]:
        with pytest.raises(InvalidInput, match=f"r.{key}: .*{why}"):
            parse_mapping({key: bad}, "r")


@pytest.mark.parametrize(("limits", "key"), [
    ({"memory_low": "2G", "memory_high": "1G"}, "memory_low"),
    ({"memory_high": "2G", "memory_max": "1G"}, "memory_high"),
    ({"memory_min": "512M", "memory_max": "256M"}, "memory_min"),
    ({"memory_min": "2G", "memory_low": "infinity", "memory_max": "1G"}, "memory_min"),
])
def test_memory_limits_must_be_ordered(limits, key):
    with pytest.raises(InvalidInput, match=f"s: resources.{key}: .* is above .*ordered memory_min ≤ memory_low ≤ memory_high ≤ memory_max"):
        parse_mapping(limits, "s: resources")


def test_an_unknown_key_suggests_the_known_one():
    with pytest.raises(InvalidInput, match=r"r.memory_maxx: unknown key \(did you mean 'memory_max'\?\)"):
        parse_mapping({"memory_maxx": "1G"}, "r")


def test_limits_round_trip_through_their_json_form():
    res = parse_mapping({"memory_low": "256M", "memory_max": "1.5G", "memory_swap_max": 0, "cpu_max": "150%", "cpu_weight": 50,
                         "io_weight": 200, "pids_max": "infinity", "memory_high": "infinity"}, "r")
    data = res.to_json()
    assert data["cpu_max"] == "150%" and data["pids_max"] == "infinity" and data["memory_max"] == 3 << 29
    assert Resources.from_json(data) == res
    assert not Resources() and Resources.from_json(None) == Resources()


def test_update_changes_only_what_it_names_and_checks_the_whole():
    base = parse_mapping({"memory_high": "512M", "memory_max": "1G", "cpu_max": "50%"}, "r")
    assert parse_mapping({"cpu_max": "100%"}, "update", base=base) == Resources(memory_high=512 << 20, memory_max=1 << 30, cpu_max=100.0)
    with pytest.raises(InvalidInput, match="memory_high: 512M is above memory_max \\(256M\\)"):
        parse_mapping({"memory_max": "256M"}, "update", base=base)


def test_human_sizes():
    assert [human("memory_max", v) for v in (512 << 20, 3 << 29, 1000, UNLIMITED)] == ["512M", "1.5G", "1000", "infinity"]
    assert human("cpu_max", 150.0) == "150%" and human("pids_max", 64) == "64"
