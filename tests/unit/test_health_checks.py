"""Health checks as values: the [health] table, durations, ${VAR} expansion, and the state machine that
turns check results into starting/healthy/unhealthy and restarts (driven with a clock of our own)."""

from __future__ import annotations

import pytest

from tupper.cli.main import health_summary
from tupper.errors import InvalidInput
from tupper.model import health
from tupper.model.health import HealthCheck, Tracker
from tupper.runtime.status import ComponentHealth, container_state
from tupper.tomlfile import Table


def parse(**table) -> HealthCheck:
    check = health.parse(Table(table, "c/component.toml", "health"))
    assert check is not None
    return check


@pytest.mark.parametrize("text, seconds", [(2, 2.0), (0.5, 0.5), ("500ms", 0.5), ("2s", 2.0), ("1m30s", 90.0), ("1h", 3600.0)])
def test_durations(text, seconds):
    assert health.parse_duration(text, "k") == seconds


@pytest.mark.parametrize("text", ["soon", "", "2 s", "-1s", 0, -3, "0s", True, "2d", float("nan"), 10**9])
def test_bad_durations(text):
    with pytest.raises(InvalidInput, match="^k: "):
        health.parse_duration(text, "k")


def test_http_check_defaults_and_round_trip():
    check = parse(http="http://localhost:${PORT:-8080}/health")
    assert (check.kind, check.target) == ("http", health.Target("127.0.0.1", 8080, "/health"))
    assert (check.interval, check.timeout, check.retries, check.start_period, check.restarts) == (10.0, 5.0, 3, 0.0, 3)
    assert HealthCheck.from_json(check.to_json()) == check
    assert check.to_json()["http"] == "http://localhost:${PORT:-8080}/health"  # the record keeps what the manifest says
    assert check.resolve({"PORT": "9000"}).describe() == "http://127.0.0.1:9000/health"


def test_tcp_checks():
    assert parse(tcp=5432).describe() == "tcp 127.0.0.1:5432"
    assert parse(tcp="[::1]:53").target == health.Target("::1", 53)
    assert parse(tcp="10.0.0.2:80").describe() == "tcp 10.0.0.2:80"
    assert parse(http="http://[::1]:81").describe() == "http://[::1]:81/"


def test_exec_check_expands_env_in_its_arguments():
    check = parse(exec=["/opt/db/bin/ping", "--port=${PORT:-5432}"], interval="2s", timeout="500ms", retries=5, restarts=0)
    assert check.resolve({"PORT": "6000"}).argv == ("/opt/db/bin/ping", "--port=6000")
    assert check.resolve({}).argv == ("/opt/db/bin/ping", "--port=5432")
    assert (check.interval, check.timeout, check.retries, check.restarts) == (2.0, 0.5, 5, 0)


@pytest.mark.parametrize("table, message", [
    ({}, "health: give one check"),
    ({"tcp": 80, "exec": ["/bin/true"]}, "health: give one check, not exec and tcp"),
    ({"exec": []}, "health.exec: an empty command"),
    ({"exec": "/bin/true"}, "health.exec: expected a list"),
    ({"http": "ftp://127.0.0.1/"}, "health.http: 'ftp://127.0.0.1/' is not an http:// URL"),
    ({"http": "http://127.0.0.1:0/"}, "health.http: port 0 is out of range"),
    ({"tcp": "example.org:80"}, "health.tcp: 'example.org' is not an IP address"),
    ({"tcp": 70000}, "health.tcp: port 70000 is out of range"),
    ({"tcp": "${PORT}"}, "health.tcp: ${PORT} is not set: give it a default"),
    ({"tcp": 80, "interval": "1s", "timeout": "2s"}, "health.timeout: 2s is longer than the interval (1s)"),
    ({"tcp": 80, "retries": 0}, "health.retries: 0 is out of range"),
    ({"tcp": 80, "restarts": -1}, "health.restarts: -1 is out of range"),
    ({"tcp": 80, "intervall": 3}, "health.intervall: unknown key (did you mean 'interval'?)"),
    ({"tcp": 80, "start_period": "later"}, "health.start_period: not a duration"),
])  # fmt: skip
def test_bad_checks_name_the_file_and_key(table, message):
    with pytest.raises(InvalidInput) as err:
        parse(**table)
    assert str(err.value).startswith(f"c/component.toml: {message}"), str(err.value)


def test_a_spec_env_that_makes_the_address_invalid_is_refused():
    check = parse(tcp="${PORT:-80}")
    with pytest.raises(InvalidInput, match="spec.toml: components\\[0\\].env: port 0 is out of range"):
        check.resolve({"PORT": "0"}, key="spec.toml: components[0].env")


def clocked(**kw) -> tuple[Tracker, HealthCheck]:
    check = HealthCheck("tcp", address="80", target=health.Target("127.0.0.1", 80), **kw)
    return Tracker(check, since=0.0), check


def test_starting_until_the_first_pass_then_healthy():
    t, _ = clocked(interval=1.0, retries=3)
    assert t.feed(False, "refused", 0.5) is None and t.state == "starting"  # inside the start deadline (3 s)
    assert t.feed(True, "HTTP 200", 0.6) is None and t.state == "healthy"


def test_retries_failures_in_a_row_restart_then_unhealthy_past_the_limit():
    t, _ = clocked(interval=1.0, retries=2, restarts=1)
    t.feed(True, "ok", 0.1)
    assert t.feed(False, "HTTP 500", 1.1) is None and t.state == "healthy"  # 1 of 2
    assert t.feed(False, "HTTP 500", 2.1) == "restart"  # 2 of 2: restart
    assert (t.state, t.restarts, t.streak, t.since) == ("starting", 1, 1, 2.1)
    assert t.feed(False, "refused", 3.0) is None and t.state == "starting"  # its new start deadline: 2.1 + 2 s
    assert t.feed(False, "refused", 4.2) is None and t.state == "unhealthy"  # past it, and no restart left
    assert t.feed(False, "refused", 5.2) is None and t.state == "unhealthy" and t.restarts == 1  # no more restarts
    assert t.feed(True, "HTTP 200", 6.2) is None and (t.state, t.streak, t.restarts) == ("healthy", 0, 1)


def test_a_pass_in_between_resets_the_count():
    t, _ = clocked(interval=1.0, retries=2)
    t.feed(True, "ok", 0)
    t.feed(False, "bad", 1)
    t.feed(True, "ok", 2)
    assert t.feed(False, "bad", 3) is None and t.state == "healthy"


def test_start_period_failures_do_not_count():
    t, check = clocked(interval=1.0, retries=1, start_period=10.0)
    assert check.start_deadline == 11.0
    assert t.feed(False, "no", 10.9) is None and t.state == "starting"
    assert t.feed(False, "no", 11.0) == "restart"


def test_readiness_gives_up_without_restarting():
    t, _ = clocked(interval=0.2, retries=2)
    t.restart_limit = 0  # `tupper run`
    assert t.feed(False, "refused", 0.39) is None
    assert t.feed(False, "refused", 0.41) is None and t.state == "unhealthy"


def test_checks_are_often_while_starting_then_at_the_interval():
    t, _ = clocked(interval=5.0)
    delays = [t.next_delay(None)]
    for _ in range(6):
        delays.append(t.next_delay(delays[-1]))
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    t.feed(True, "ok", 0)
    assert t.next_delay(1.0) == 5.0


def test_degraded_only_for_a_running_container():
    sick = (ComponentHealth("web", "unhealthy"),)
    assert container_state("running", False, ()) == "running"
    assert container_state("running", True, ()) == "degraded"
    assert container_state("running", False, sick) == "degraded"
    assert container_state("running", False, (ComponentHealth("web", "starting"),)) == "running"
    assert container_state("stopped", True, sick) == "stopped"


def test_the_health_column():
    def rec(state: str, *health: tuple[str, str]) -> dict:
        return {"state": state, "components": [{"name": n, "health": {"state": h}} for n, h in health] + [{"name": "plain"}]}

    assert health_summary(rec("running")) == "-"
    assert health_summary(rec("running", ("a", "healthy"), ("b", "healthy"))) == "healthy"
    assert health_summary(rec("running", ("a", "healthy"), ("b", "starting"))) == "starting"
    assert health_summary(rec("degraded", ("a", "unhealthy"), ("b", "starting"), ("c", "unhealthy"))) == "unhealthy (a,c)"
    assert health_summary(rec("stopped", ("a", "unhealthy"))) == "-"
