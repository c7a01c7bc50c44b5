"""Resource limits: a spec's `[resources]` (the whole container) and `[components.resources]` (one
component's units), and `tupper update`'s options. Parsed and checked here, as values;
tupper.container.cgroups maps them to the files of cgroup v2 or v1 (docs/resources.md).

Sizes are bytes, or a number with a 1024-based suffix as systemd reads them ("512M", "1.5G"), or
"infinity". CPU limits are a share of one CPU in percent ("150%" = one and a half CPUs).
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any, Final

import attrs

from tupper.errors import InvalidInput

UNLIMITED: Final = 2**63 - 1  # "infinity" for sizes and pids: what the kernel shows as "max" (or -1 in v1)
SUFFIXES: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:i?B)?", re.IGNORECASE)
_PERCENT_RE = re.compile(r"(\d+(?:\.\d+)?)%")
MEMORY_KEYS: Final = ("memory_min", "memory_low", "memory_high", "memory_max", "memory_swap_max")
WEIGHT_KEYS: Final = ("cpu_weight", "io_weight")
KEYS: Final = (*MEMORY_KEYS, *WEIGHT_KEYS, "cpu_max", "pids_max")
CPU_PERIOD_US: Final = 100_000  # cpu.max's period; a quota below 1 ms (1 %) is refused by the kernel


@attrs.frozen
class Resources:
    """Limits; None = not set (the kernel's default, or the parent's for update)."""

    memory_min: int | None = None
    memory_low: int | None = None
    memory_high: int | None = None
    memory_max: int | None = None
    memory_swap_max: int | None = None
    cpu_weight: int | None = None
    cpu_max: float | None = None  # percent of one CPU; math.inf = no limit
    io_weight: int | None = None
    pids_max: int | None = None

    def __bool__(self) -> bool:
        return any(getattr(self, k) is not None for k in KEYS)

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in KEYS if getattr(self, k) is not None]

    def merged(self, change: Resources) -> Resources:
        """These limits with the ones `change` sets replaced (tupper update)."""
        return attrs.evolve(self, **dict(change.items()))

    def to_json(self) -> dict[str, Any]:
        """As a user would write them (so the record reads back through the same parser)."""
        return {k: format_value(k, v) for k, v in self.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, where: str = "record") -> Resources:
        return parse_mapping(data or {}, where)


def format_value(key: str, value: Any) -> Any:
    if key == "cpu_max":
        return "infinity" if math.isinf(value) else f"{value:g}%"
    if value == UNLIMITED and (key in MEMORY_KEYS or key == "pids_max"):
        return "infinity"
    return value


def human(key: str, value: Any) -> str:
    """For tables: 512M, 1.5G, 150%, infinity."""
    if key in MEMORY_KEYS and value != UNLIMITED:
        for suffix in ("E", "P", "T", "G", "M", "K"):
            unit = SUFFIXES[suffix]
            if value >= unit and (value * 10) % unit == 0:
                return f"{value / unit:g}{suffix}"
        return str(value)
    return str(format_value(key, value))


def parse_size(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidInput(f"{where}: expected a size (bytes, \"512M\", \"2G\" or \"infinity\"), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidInput(f"{where}: a size cannot be negative, got {value}")
        return min(value, UNLIMITED)
    text = value.strip()
    if text.lower() in ("infinity", "max"):
        return UNLIMITED
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise InvalidInput(f"{where}: not a size: {value!r} (bytes, or a number with K, M, G or T: \"512M\", \"1.5G\"; or \"infinity\")")
    size = float(m.group(1)) * SUFFIXES[m.group(2).upper()]
    if size >= UNLIMITED:
        raise InvalidInput(f"{where}: {value!r} is too large (say \"infinity\" for no limit)")
    return int(size)


def parse_weight(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{where}: expected an integer between 1 and 10000, got {value!r}")
    if not 1 <= value <= 10000:
        raise InvalidInput(f"{where}: must be between 1 and 10000 (100 is the default share), got {value}")
    return value


def parse_cpu(value: Any, where: str) -> float:
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: expected a percentage of one CPU such as \"150%\" (or \"infinity\"), got {value!r}")
    text = value.strip()
    if text.lower() in ("infinity", "max"):
        return math.inf
    m = _PERCENT_RE.fullmatch(text)
    if not m:
        raise InvalidInput(f"{where}: not a CPU share: {value!r} (a percentage of one CPU: \"50%\", \"150%\"; or \"infinity\")")
    percent = float(m.group(1))
    if not 1 <= percent <= 100 * 1024:
        raise InvalidInput(f"{where}: must be between 1% and {100 * 1024}% (1024 CPUs), got {value!r}")
    return percent


def parse_pids(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().lower() in ("infinity", "max"):
        return UNLIMITED
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{where}: expected a number of tasks (or \"infinity\"), got {value!r}")
    if not 1 <= value < UNLIMITED:
        raise InvalidInput(f"{where}: must be at least 1, got {value}")
    return value


def parse_value(key: str, value: Any, where: str) -> Any:
    if key in MEMORY_KEYS:
        return parse_size(value, where)
    if key in WEIGHT_KEYS:
        return parse_weight(value, where)
    if key == "cpu_max":
        return parse_cpu(value, where)
    if key == "pids_max":
        return parse_pids(value, where)
    raise InvalidInput(f"{where}: unknown resource {key!r} (known: {', '.join(KEYS)})")


def from_text(text: str) -> Any:
    """A value given as text (a command line, D-Bus a{ss}) as TOML would give it: digits are a number."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else text  # '¹' is a digit to isdigit(), not to int()


def parse_mapping(data: dict[str, Any], where: str, *, base: Resources | None = None) -> Resources:
    """`data`: {key: value} from TOML, a record or the CLI; `where(key)` names a key in errors as
    "<where>.<key>". With `base`, the result is `base` changed by `data` (checked as a whole)."""
    import difflib

    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise InvalidInput(f"{where}.{key}: unknown key{hint}; known keys: {', '.join(KEYS)}")
        values[key] = parse_value(key, value, f"{where}.{key}")
    res = (base or Resources()).merged(Resources(**values))
    check(res, where)
    return res


def check(res: Resources, where: str) -> None:
    """The memory protections and limits are ordered: min ≤ low ≤ high ≤ max."""
    order = [(k, getattr(res, k)) for k in ("memory_min", "memory_low", "memory_high", "memory_max")]
    given = [(k, v) for k, v in order if v is not None and v != UNLIMITED]  # "infinity" is no bound, in any place
    for (k1, v1), (k2, v2) in itertools.pairwise(given):
        if v1 > v2:
            raise InvalidInput(f"{where}.{k1}: {human(k1, v1)} is above {k2} ({human(k2, v2)}); "
                               "they must be ordered memory_min ≤ memory_low ≤ memory_high ≤ memory_max")
    if res.memory_max == 0 or res.memory_high == 0:
        key = "memory_max" if res.memory_max == 0 else "memory_high"
        raise InvalidInput(f"{where}.{key}: 0 bytes leaves nothing to run in (say \"infinity\" for no limit)")
