"""The one place TOML is read: parse a file, walk its tables by key path, name the file and key in every error."""

from __future__ import annotations

import difflib
import errno
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from tupper.errors import InvalidInput

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list", dict: "a table"}


def load(path: Path, what: str = "file") -> tuple[dict[str, Any], str]:
    """Parse `path`; return (document, display name). Raises InvalidInput on any problem."""
    display = str(path)
    try:
        data = _read_regular(path, what)
    except FileNotFoundError:
        raise InvalidInput(f"{display}: no such {what}") from None
    except IsADirectoryError:
        raise InvalidInput(f"{display}: is a directory, expected a {what}") from None
    except PermissionError:
        raise InvalidInput(f"{display}: permission denied") from None
    except OSError as exc:  # a path through a file, too long, a symlink loop
        raise InvalidInput(f"{display}: cannot read the {what}: {exc.strerror or exc}") from None
    except ValueError:  # a NUL character in the path
        raise InvalidInput(f"{display!r}: not a valid path (a NUL character)") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{display}: not valid UTF-8") from None
    return parse(text, display), display


MAX_BYTES = 4 << 20  # a spec or manifest is a few kB; /dev/zero is not one


def _read_regular(path: Path, what: str) -> bytes:
    """The bytes of a regular file. A FIFO, a device or a socket is refused without reading from it (a
    FIFO would block `open` until a writer came; /dev/zero would never end)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"{path}: not a regular file (a FIFO, a device or a socket), expected a {what}")
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise InvalidInput(f"{path}: larger than {MAX_BYTES >> 20} MiB, expected a {what}")
    return data


def load_loose(path: Path) -> dict[str, Any]:
    """What TOML `path` holds, or {} where it cannot be read or parsed: for the callers that only peek
    (a spec's name to follow its progress, manifest keys for the SDK's checks). Same reading rules as load()."""
    try:
        return tomllib.loads(_read_regular(path, "file").decode("utf-8"))
    except (OSError, ValueError, RecursionError, InvalidInput):
        return {}


def parse(text: str, display: str) -> dict[str, Any]:
    """Parse TOML text; any problem is an InvalidInput naming `display`."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{display}: malformed TOML: {exc}") from None
    except ValueError as exc:  # an integer of more digits than Python converts (4300)
        raise InvalidInput(f"{display}: malformed TOML: {str(exc).split(';')[0]}") from None
    except RecursionError:  # tomllib recurses once per level of nesting
        raise InvalidInput(f"{display}: malformed TOML: arrays or tables nested too deeply") from None


class Table:
    """A TOML table being read: every key must be claimed, or check_unknown() complains."""

    def __init__(self, data: dict[str, Any], file: str, path: str = "") -> None:
        self.data = data
        self.file = file
        self.path = path
        self._known: set[str] = set()

    def where(self, key: str | None = None) -> str:
        parts = [p for p in (self.path, key) if p]
        return f"{self.file}: {'.'.join(parts)}" if parts else self.file

    def error(self, key: str | None, message: str) -> InvalidInput:
        return InvalidInput(f"{self.where(key)}: {message}")

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = None, *, required: bool = False) -> Any:
        self._known.add(key)
        if key not in self.data:
            if required:
                # A misspelt required key is reported here, before check_unknown() could see the typo.
                close = difflib.get_close_matches(key, sorted(k for k in self.data if k not in self._known), n=1)
                typo = f"; there is an unknown key '{close[0]}' (did you mean '{key}'?)" if close else ""
                raise self.error(key, f"missing (required){typo}")
            return default
        value = self.data[key]
        types = typ if isinstance(typ, tuple) else (typ,)
        # bool is an int in Python; TOML keeps them apart, so do we.
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise self.error(key, f"expected {expected}, got {_describe(value)}")
        return value

    def str_list(self, key: str, default: list[str] | None = None) -> list[str]:
        items = self.get(key, list, default if default is not None else [])
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise self.error(f"{key}[{i}]", f"expected a string, got {_describe(item)}")
        return list(items)

    def table(self, key: str) -> Table:
        value = self.get(key, dict, {})
        return Table(value, self.file, f"{self.path}.{key}" if self.path else key)

    def tables(self, key: str) -> list[Table]:
        items = self.get(key, list, [])
        out = []
        for i, item in enumerate(items):
            sub = f"{self.path}.{key}[{i}]" if self.path else f"{key}[{i}]"
            if not isinstance(item, dict):
                raise InvalidInput(f"{self.file}: {sub}: expected a table, got {_describe(item)}")
            out.append(Table(item, self.file, sub))
        return out

    def check_unknown(self) -> None:
        for key in self.data:
            if key not in self._known:
                close = difflib.get_close_matches(key, sorted(self._known), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                known = ", ".join(sorted(self._known))
                raise self.error(key, f"unknown key{hint}; known keys: {known}")


def _describe(value: Any) -> str:
    for t, name in _TYPE_NAMES.items():
        if type(value) is t:
            return f"{name} ({value!r})" if t in (str, int, float, bool) else name
    return type(value).__name__
