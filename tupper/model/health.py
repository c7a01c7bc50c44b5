"""Health checks: a component manifest's `[health]`, and the state a component's health is in.

A check is one of
  exec = ["/opt/web/bin/check", "--quick"]   run inside the container (a transient unit of its systemd)
  http = "http://127.0.0.1:8080/health"       GET in the container's network namespace; 2xx and 3xx pass
  tcp  = 8080  (or "127.0.0.1:8080", "[::1]:8080")  a connection in the container's network namespace
with `interval`, `timeout`, `start_period` (seconds, or "500ms", "2s", "1m30s"), `retries` and `restarts`.
The address and the command may use the component's environment as the spec sets it, with a default
for when it does not: `http = "http://127.0.0.1:${PORT:-8080}/"`.

The states follow Docker's: `starting` until a check first passes (failures inside `start_period` do
not count; a component that has not passed by start_period + retries × interval has failed to
start), then `healthy`; `retries` failures in a row and tupperd restarts the component's units (at
most `restarts` times in a row without a pass in between), after which it is `unhealthy`, still
checked: one pass makes it healthy again. All of it is a pure function of the check's results and
their times (Tracker), so the daemon and `tupper run` share it and unit tests drive it with a clock.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Final

import attrs

from tupper.errors import InvalidInput
from tupper.tomlfile import Table

STATES: Final = ("starting", "healthy", "unhealthy")
NONE: Final = "-"  # a component without a check, in tables
DEFAULT_INTERVAL: Final = 10.0
DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_RETRIES: Final = 3
DEFAULT_RESTARTS: Final = 3
MAX_SECONDS: Final = 86_400.0
# While a component is starting it is checked often (from FIRST_PROBE, doubling up to the interval or
# one second): a web server that binds after 80 ms is found ready at ~100 ms, not after an interval.
FIRST_PROBE: Final = 0.05
_DURATION_RE = re.compile(r"(?:(\d+(?:\.\d+)?)(ms|s|m|h))")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(text: str, env: dict[str, str], where: str) -> str:
    """`${NAME}` and `${NAME:-default}` from `env`."""

    def value(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise InvalidInput(f"{where}: ${{{name}}} is not set: give it a default (${{{name}:-VALUE}}) or set {name} in the spec's [components.env]")

    return _VAR_RE.sub(value, text)


def parse_duration(value: Any, where: str) -> float:
    """Seconds from a number or a string like "500ms", "2s", "1m30s"."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidInput(f"{where}: expected seconds (a number, or a string like \"2s\" or \"500ms\"), got {type(value).__name__}")
    if isinstance(value, str):
        text = value.strip()
        parts = _DURATION_RE.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise InvalidInput(f"{where}: not a duration: {value!r} (write seconds, or like \"500ms\", \"2s\", \"1m30s\")")
        seconds = sum(float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u] for n, u in parts)
    else:
        seconds = float(value)
    if not seconds > 0 or seconds > MAX_SECONDS:  # also NaN
        raise InvalidInput(f"{where}: {value!r} is out of range (more than 0, at most one day)")
    return seconds


def _format_duration(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


@attrs.frozen
class Target:
    """Where an http or tcp check connects, in the container's network namespace."""

    host: str  # an IP address literal
    port: int
    path: str = "/"  # http only

    @property
    def family_v6(self) -> bool:
        return ":" in self.host


def _host(text: str, where: str) -> str:
    if text == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(text.strip("[]") if text.startswith("[") else text))
    except ValueError:
        raise InvalidInput(f"{where}: {text!r} is not an IP address (checks connect inside the container, "
                           "without name resolution: write 127.0.0.1, ::1 or localhost)") from None


def _port(text: str | int, where: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise InvalidInput(f"{where}: not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise InvalidInput(f"{where}: port {port} is out of range (1-65535)")
    return port


_URL_RE = re.compile(r"http://(\[[0-9A-Fa-f:.]+\]|[^/:\[\]]+)(?::([0-9]+))?(/[^\s]*)?")


def parse_http(url: str, where: str) -> Target:
    m = _URL_RE.fullmatch(url)
    if not m:
        raise InvalidInput(f"{where}: {url!r} is not an http:// URL like \"http://127.0.0.1:8080/health\" (https is not checked)")
    host, port, path = m.groups()
    return Target(_host(host, where), _port(port, where) if port else 80, path or "/")


def parse_tcp(value: str | int, where: str) -> Target:
    if isinstance(value, int) or value.isdigit():
        return Target("127.0.0.1", _port(value, where))
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):([0-9]+)", value)
    if not m:
        raise InvalidInput(f"{where}: {value!r}: write a port (8080) or an address and port (\"127.0.0.1:8080\", \"[::1]:8080\")")
    return Target(_host(m.group(1), where), _port(m.group(2), where))


@attrs.frozen
class HealthCheck:
    kind: str  # "exec", "http" or "tcp"
    command: tuple[str, ...] = ()  # exec, as the manifest writes it (${VAR} unexpanded)
    argv: tuple[str, ...] = ()  # exec: the command with the environment's values (resolve), else the defaults
    address: str = ""  # http, tcp: as the manifest writes it
    target: Target | None = None  # http, tcp: the address with the environment's values (resolve), else the defaults
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    start_period: float = 0.0
    restarts: int = DEFAULT_RESTARTS

    def resolve(self, env: dict[str, str], where: str = "health", key: str | None = None) -> HealthCheck:
        """This check with `env` (the component's environment from the spec) in its address or command;
        errors name `key` (default: `where`, then the check's kind)."""
        at = key or f"{where}: {self.kind}"
        if self.kind == "exec":
            return attrs.evolve(self, argv=tuple(expand(a, env, at) for a in self.command))
        text = expand(self.address, env, at)
        return attrs.evolve(self, target=parse_http(text, at) if self.kind == "http" else parse_tcp(text, at))

    def describe(self) -> str:
        if self.kind == "exec":
            return " ".join(self.argv or self.command)
        assert self.target is not None
        host = f"[{self.target.host}]" if self.target.family_v6 else self.target.host
        return f"http://{host}:{self.target.port}{self.target.path}" if self.kind == "http" else f"tcp {host}:{self.target.port}"

    @property
    def start_deadline(self) -> float:
        """Seconds after its units became active by which a starting component must have passed once."""
        return self.start_period + self.retries * self.interval

    def to_json(self) -> dict[str, Any]:
        """As a manifest writes it (the record reads it back through the same parser)."""
        out: dict[str, Any] = {"exec": list(self.command)} if self.kind == "exec" else {self.kind: self.address}
        return {**out, "interval": self.interval, "timeout": self.timeout, "retries": self.retries,
                "start_period": self.start_period, "restarts": self.restarts}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, where: str = "record") -> HealthCheck | None:
        return parse(Table(data, where, "health"), present=bool(data)) if data else None


def parse(t: Table, present: bool = True) -> HealthCheck | None:
    """A `[health]` table (already taken from its manifest); None where there is none."""
    if not present:
        return None
    given = [k for k in ("exec", "http", "tcp") if k in t.data]
    if len(given) != 1:
        raise t.error(None, "give one check: exec = [\"/path/to/check\", …], http = \"http://127.0.0.1:PORT/PATH\" or tcp = PORT"
                      if not given else f"give one check, not {' and '.join(given)}")
    kind = given[0]
    command: tuple[str, ...] = ()
    address = ""
    if kind == "exec":
        command = tuple(t.str_list("exec"))
        if not command or not command[0]:
            raise t.error("exec", "an empty command")
        if any("\0" in a for a in command):
            raise t.error("exec", "a NUL character in the command")
    else:
        raw = t.get(kind, str) if kind == "http" else t.get(kind, (int, str))
        address = str(raw)
    interval = parse_duration(t.get("interval", (int, float, str), DEFAULT_INTERVAL), t.where("interval"))
    timeout = parse_duration(t.get("timeout", (int, float, str), min(DEFAULT_TIMEOUT, interval)), t.where("timeout"))
    start_period = t.get("start_period", (int, float, str), 0)
    start_period = 0.0 if start_period in (0, 0.0, "0", "0s") else parse_duration(start_period, t.where("start_period"))
    retries = t.get("retries", int, DEFAULT_RETRIES)
    if not 1 <= retries <= 100:
        raise t.error("retries", f"{retries} is out of range (1-100)")
    restarts = t.get("restarts", int, DEFAULT_RESTARTS)
    if not 0 <= restarts <= 100:
        raise t.error("restarts", f"{restarts} is out of range (0-100)")
    if timeout > interval:
        raise t.error("timeout", f"{_format_duration(timeout)} is longer than the interval ({_format_duration(interval)})")
    t.check_unknown()
    # Checked with the defaults of its ${VAR:-default}s; the spec's environment is checked by the spec.
    return HealthCheck(kind, command, (), address, None, interval, timeout, retries, start_period, restarts).resolve({}, key=t.where(kind))


@attrs.define
class Tracker:
    """The health of one component, fed with its check's results. `feed` returns "restart" when the
    component's units are to be restarted; the caller does it and the tracker starts over."""

    check: HealthCheck
    since: float  # when its units became active (or were last restarted), on the caller's clock
    state: str = "starting"
    failures: int = 0  # in a row, since the last pass (outside the start period)
    restarts: int = 0  # restarts for failed checks, in all
    streak: int = 0  # restarts since the last pass
    detail: str = ""  # what the last check said
    restart_limit: int | None = None  # None: the check's `restarts`; 0 for `tupper run`'s readiness wait

    @property
    def limit(self) -> int:
        return self.check.restarts if self.restart_limit is None else self.restart_limit

    def feed(self, ok: bool, detail: str, now: float) -> str | None:
        self.detail = detail
        if ok:
            self.state, self.failures, self.streak = "healthy", 0, 0
            return None
        if self.state == "starting":
            if now - self.since < self.check.start_deadline:
                return None
        else:
            self.failures += 1
            if self.failures < self.check.retries or self.state == "unhealthy":
                return None
        if self.streak < self.limit:
            self.streak += 1
            self.restarts += 1
            self.state, self.failures, self.since = "starting", 0, now
            return "restart"
        self.state = "unhealthy"
        return None

    def next_delay(self, previous: float | None) -> float:
        """How long to wait before the next check: often while starting, else the interval."""
        if self.state != "starting":
            return self.check.interval
        ceiling = min(self.check.interval, 1.0)
        return FIRST_PROBE if previous is None else min(previous * 2, ceiling)
