"""The config file, /etc/tupper/tupper.toml (or $TUPPER_CONFIG): the store root, tupperd's admin group and
defaults, for the CLI and tupperd. Each setting comes from the first of: a command-line flag, an environment
variable, this file, the built-in default. The file is read only where it exists (one stat otherwise), and
only by the commands that need a setting from it: container verbs sent to tupperd never read it."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import attrs

from tupper.errors import InvalidInput

DEFAULT_PATH = Path("/etc/tupper/tupper.toml")
DEFAULT_ROOT = Path("/var/lib/tupper")
DEFAULT_ADMIN_GROUP = "tupper"
DEFAULT_POOL_SIZE = "20G"
MAX_TIMEOUT = 86400.0
_SIZE = re.compile(r"[1-9][0-9]*[KMGTPE]?")  # what truncate -s takes for the pool file, in whole units


@attrs.frozen
class Defaults:
    """[defaults]: what a spec or a new store gets where it says nothing itself."""

    pool_size: str = DEFAULT_POOL_SIZE  # the sparse loopback pool made where the root is not on btrfs
    stop_timeout: float = 10.0  # a spec without [stop] timeout
    start_timeout: float = 60.0  # a spec without [start] timeout


BUILTIN = Defaults()


@attrs.frozen
class Config:
    path: Path | None = None  # the file these came from; None: no file, built-in defaults
    root: Path | None = None
    admin_group: str | None = None
    defaults: Defaults = BUILTIN


def config_path() -> Path:
    return Path(os.environ.get("TUPPER_CONFIG") or DEFAULT_PATH)


def load(path: Path | None = None) -> Config:
    """The config at `path` (default: config_path()). A missing default file is no config; a missing
    $TUPPER_CONFIG, a bad value or an unknown key is an InvalidInput naming the file and the key."""
    explicit = path is not None or bool(os.environ.get("TUPPER_CONFIG"))
    path = path or config_path()
    try:
        os.stat(path)
    except FileNotFoundError:
        if explicit:
            raise InvalidInput(f"{path}: no such config file", hint="unset TUPPER_CONFIG, or point it at a file") from None
        return Config()
    except OSError:
        pass  # tomlfile.load says what is wrong with it
    from tupper import tomlfile

    doc, display = tomlfile.load(path, "config file")
    return parse(doc, display, path)


def parse(doc: dict, display: str, path: Path | None = None) -> Config:
    from tupper import tomlfile

    t = tomlfile.Table(doc, display)
    root = t.get("root", str)
    if root is not None and not root.startswith("/"):
        raise t.error("root", f"must be an absolute path, got {root!r}")
    group = t.get("admin_group", str)
    if group is not None and not re.fullmatch(r"[a-z_][a-z0-9_-]*\$?", group):
        raise t.error("admin_group", f"not a group name: {group!r}")
    d = t.table("defaults")
    pool_size = d.get("pool_size", str, DEFAULT_POOL_SIZE)
    if not _SIZE.fullmatch(pool_size):
        raise d.error("pool_size", f"expected a size such as 512M, 20G or 1T, got {pool_size!r}")
    timeouts = {}
    for key, default in (("stop_timeout", 10.0), ("start_timeout", 60.0)):
        value = d.get(key, (int, float), default)
        if not 0 < value <= MAX_TIMEOUT:  # nan fails too
            raise d.error(key, f"must be a positive number of seconds (at most {MAX_TIMEOUT:g}), got {value}")
        timeouts[key] = float(value)
    d.check_unknown()
    t.check_unknown()
    return Config(path=path, root=Path(root) if root else None, admin_group=group,
                  defaults=Defaults(pool_size=pool_size, stop_timeout=timeouts["stop_timeout"], start_timeout=timeouts["start_timeout"]))


@functools.cache
def current() -> Config:
    """This process's config, read once (tupperd reads it when it starts)."""
    return load()


def root() -> Path:
    """The store root where no --root is given: $TUPPER_ROOT, the file's `root`, /var/lib/tupper."""
    if env := os.environ.get("TUPPER_ROOT"):
        return Path(env)
    return current().root or DEFAULT_ROOT


def admin_group() -> str:
    """tupperd's admin group where no --admin-group is given: $TUPPER_ADMIN_GROUP, the file's, tupper."""
    return os.environ.get("TUPPER_ADMIN_GROUP") or current().admin_group or DEFAULT_ADMIN_GROUP


def pool_size() -> str:
    """The size of a new loopback pool: $TUPPER_POOL_SIZE, the file's [defaults] pool_size, 20G."""
    return os.environ.get("TUPPER_POOL_SIZE") or current().defaults.pool_size
