"""What `tupper logs` may hand journalctl: time specifications, priorities and output modes, checked
here so that a bad one is an InvalidInput naming the option, not journalctl's complaint after the fact."""

from __future__ import annotations

import re

from tupper.errors import InvalidInput

PRIORITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
OUTPUTS = ("short", "short-precise", "short-iso", "short-iso-precise", "short-full", "short-monotonic", "short-unix",
           "with-unit", "cat", "verbose", "export", "json", "json-pretty", "json-sse", "json-seq")

# systemd.time(7): the time spans and timestamps journalctl's --since/--until parse (parse_timestamp()).
_UNIT = r"(?:usec|us|µs|nsec|ns|msec|ms|seconds|second|sec|s|minutes|minute|min|m|hours|hour|hr|h|days|day|d|weeks|week|w|months|month|M|years|year|y)"
_SPAN = rf"(?:\d+(?:\.\d+)?\s*{_UNIT}?\s*)+"
_WEEKDAY = r"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)[a-z]*,?\s+)?"
_DATE = r"\d{2,4}-\d{1,2}-\d{1,2}"
_TIME = r"\d{1,2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?"
_ZONE = r"(?:\s*(?:Z|UTC|[+-]\d{2}:?\d{2})|\s+[A-Za-z_]+(?:/[A-Za-z_+-]+)*)?"
_TIMESTAMP = re.compile(
    rf"(?:now|today|yesterday|tomorrow"
    rf"|@\d+(?:\.\d+)?"
    rf"|[+-]\s*{_SPAN}"
    rf"|{_SPAN}\s*(?:ago|left)"
    rf"|{_WEEKDAY}(?:{_DATE}(?:[ T]{_TIME})?|{_TIME}){_ZONE})"
)
_PRIORITY = re.compile(rf"(?:[0-7]|{'|'.join(PRIORITIES)})")


def timestamp(text: str, option: str) -> str:
    """`text` if journalctl's time syntax accepts it (well enough to catch typos), else InvalidInput."""
    spec = text.strip()
    if not _TIMESTAMP.fullmatch(spec) or not _plausible(spec):
        raise InvalidInput(f"{option} {text!r}: not a time journalctl understands",
                           hint="e.g. '2024-05-01 10:00', today, yesterday, '1 hour ago', -1h (as --since=-1h), @1714550400")
    return spec


def _plausible(spec: str) -> bool:
    """Month, day and clock within range, where the text has them."""
    if m := re.search(r"(\d{2,4})-(\d{1,2})-(\d{1,2})", spec):
        if not (1 <= int(m[2]) <= 12 and 1 <= int(m[3]) <= 31):
            return False
    if m := re.search(r"(?<![\d-])(\d{1,2}):(\d{2})(?::(\d{2}))?", spec):
        if not (int(m[1]) <= 23 and int(m[2]) <= 59 and int(m[3] or 0) <= 60):
            return False
    return True


def priority(text: str) -> str:
    """A priority (name or 0-7) or a range FROM..TO, as journalctl's -p takes it."""
    parts = text.strip().split("..")
    if len(parts) > 2 or not all(_PRIORITY.fullmatch(p) for p in parts):
        raise InvalidInput(f"--priority {text!r}: expected one of {', '.join(PRIORITIES)}, 0-7, or a range FROM..TO")
    return "..".join(parts)


def output(text: str) -> str:
    if text not in OUTPUTS:
        raise InvalidInput(f"--output {text!r}: expected one of {', '.join(OUTPUTS)}")
    return text
