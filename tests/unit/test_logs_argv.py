"""`tupper logs` options become journalctl's argv (Runtime.logs_argv), each checked first; and
`tupper events --filter` picks events as `ps --filter` picks containers."""

from __future__ import annotations

import pytest

from tupper.cli.main import EVENT_FILTER_KEYS, _event_matches, _filters, main
from tupper.errors import InvalidInput
from tupper.runtime.records import ComponentEntry, Record
from tupper.runtime.runtime import Runtime


@pytest.fixture
def rec(tmp_path) -> Record:
    return Record(name="c", dir=tmp_path / "c", image="img", spec_file="/s.toml", created_at=1.0, stop_timeout=5.0, phase="stopped",
                  components=[ComponentEntry(name="web", version="1", mount="/opt/web", source="/s/web", units=("web.service", "web.socket")),
                              ComponentEntry(name="db", version="1", mount="/opt/db", source="/s/db", units=("db.service",))])


def test_a_stopped_container_is_read_from_its_root_with_the_precise_short_output(rec):
    assert Runtime.logs_argv(rec) == ["journalctl", f"--root={rec.rootfs}", "--no-pager", "--output=short-precise"]


def test_every_option_maps_to_journalctl(rec):
    argv = Runtime.logs_argv(rec, unit="web.service", lines=5, follow=True, since="2024-05-01 10:00", until="1 hour ago",
                             priority="warning", output="json")
    assert argv[2:] == ["--no-pager", "--output=json", "--unit", "web.service", "--since=2024-05-01 10:00", "--until=1 hour ago",
                        "--priority=warning", "--lines", "5", "--follow"]


def test_a_component_means_its_units(rec):
    argv = Runtime.logs_argv(rec, component="web")
    assert argv[4:] == ["--unit", "web.service", "--unit", "web.socket"]


def test_an_unknown_component_is_refused_naming_it_and_the_known_ones(rec):
    with pytest.raises(InvalidInput) as exc:
        Runtime.logs_argv(rec, component="api")
    assert "--component api" in exc.value.message and "'api'" in exc.value.message
    assert exc.value.hint == "its components: web, db"


@pytest.mark.parametrize("text", ["now", "today", "yesterday", "tomorrow", "-1h", "+5min", "-1h 30min", "10 min ago", "2 days ago",
                                  "@1714550400", "@1714550400.5", "2024-05-01", "2024-05-01 10:00", "2024-05-01 10:00:30",
                                  "2024-05-01T10:00:30.123", "2024-05-01 10:00 UTC", "10:00", "Wed 2024-05-01 10:00:00",
                                  "2024-05-01 10:00:00 Europe/Berlin", "2024-05-01 10:00:00+02:00"])
def test_journalctls_time_syntax_passes_through(rec, text):
    assert Runtime.logs_argv(rec, since=text)[-1] == f"--since={text}"


@pytest.mark.parametrize("text", ["", "last tuesday", "1 hour", "-1x", "2024-13-01", "2024-05-01 25:00", "soon", "1h ago ago",
                                  "2024-05-01; rm -rf /"])
def test_a_time_journalctl_would_refuse_is_refused_naming_the_option(rec, text):
    with pytest.raises(InvalidInput) as exc:
        Runtime.logs_argv(rec, until=text)
    assert exc.value.message.startswith("--until ")


@pytest.mark.parametrize("text,ok", [("err", True), ("3", True), ("warning..emerg", True), ("0..7", True),
                                     ("error", False), ("8", False), ("err..", False), ("a..b..c", False)])
def test_priorities(rec, text, ok):
    if ok:
        assert Runtime.logs_argv(rec, priority=text)[-1] == f"--priority={text}"
    else:
        with pytest.raises(InvalidInput, match="--priority"):
            Runtime.logs_argv(rec, priority=text)


def test_the_cli_refuses_an_unknown_output_mode_and_unit_with_component(capsys):
    for argv in (["logs", "c", "-o", "yaml"], ["logs", "c", "-u", "x.service", "--component", "web"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'yaml'" in err and "not allowed with argument" in err


def test_events_filters():
    unit = {"type": "unit", "name": "web-1", "unit": "nginx.service", "active_state": "failed", "sub_state": "failed"}
    container = {"type": "container", "name": "db", "state": "running"}
    health = {"type": "health", "name": "web-1", "component": "api", "health": "unhealthy", "detail": ""}

    def picked(*items):
        fs = _filters(list(items), EVENT_FILTER_KEYS)
        return [e for e in (unit, container, health) if all(_event_matches(e, f) for f in fs)]

    assert picked("name=web") == [unit, health]
    assert picked("type=container") == [container]
    assert picked("state=failed") == [unit]
    assert picked("state=running", "name=db") == [container]
    assert picked("component=api") == [health]
    with pytest.raises(InvalidInput, match="--filter label=x"):
        _filters(["label=x"], EVENT_FILTER_KEYS)


def test_events_refuses_an_unknown_type_before_connecting(capsys):
    assert main(["events", "--filter", "type=volcano"]) == 2
    assert capsys.readouterr().err.startswith("tupper: --filter type=volcano: expected one of container, unit, health, oom")
