"""A spec's `[[volumes]]`: a named volume of the store, or a host path, bound read-write (or read-only)
into the container. Parsed into frozen values here; what needs the store (is the host path inside
it? does the named volume exist?) is checked by the runtime."""

from __future__ import annotations

import os
import re
import stat
from pathlib import PurePosixPath

import attrs

from tupper import tomlfile
from tupper.errors import InvalidInput
from tupper.model import components as comp

# A named volume is a subvolume `<store>/volumes/NAME`: the name is one path component.
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")


@attrs.frozen
class VolumeUse:
    """One `[[volumes]]` entry. `source` is a volume name (`named`) or an absolute, resolved host path."""

    source: str
    target: str
    read_only: bool = False
    named: bool = False

    def describe(self) -> str:
        return f"{'volume ' if self.named else ''}{self.source}:{self.target}{' (read-only)' if self.read_only else ''}"


def check_volume_name(name: str, where: str) -> str:
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidInput(f"{where}: invalid volume name {name!r}: letters, digits, '_', '.' and '-' (at most 64, "
                           "starting with a letter or digit)")
    return name


def check_host_path(source: str, where: str) -> str:
    """An absolute host path with no '..' that exists and is a directory or a regular file; returns it resolved."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in source):
        raise InvalidInput(f"{where}: {source!r} is not a clean path (no control characters)")
    if not source.startswith("/"):
        raise InvalidInput(f"{where}: {source!r} is neither an absolute host path nor a volume name "
                           "(a host path starts with '/'; a volume name has no '/')")
    if ".." in PurePosixPath(source).parts:
        raise InvalidInput(f"{where}: {source!r} must not contain '..'")
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise InvalidInput(f"{where}: {source}: no such file or directory on the host") from None
    except OSError as exc:
        raise InvalidInput(f"{where}: {source}: {exc.strerror or exc}") from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise InvalidInput(f"{where}: {source}: not a directory or a regular file")
    return os.path.realpath(source)


def parse(entries: list[tomlfile.Table]) -> tuple[VolumeUse, ...]:
    """The `[[volumes]]` tables of a spec, each checked on its own and against the others."""
    out: list[VolumeUse] = []
    for entry in entries:
        source = entry.get("source", str, required=True)
        target = entry.get("target", str, required=True)
        read_only = entry.get("read_only", bool, False)
        entry.check_unknown()
        if "/" not in source and source not in ("", ".", ".."):
            named = True
            check_volume_name(source, entry.where("source"))
        else:
            named = False
            source = check_host_path(source, entry.where("source"))
        comp.check_mount(target, entry.where("target"))
        target = str(PurePosixPath(target))
        for j, other in enumerate(out):
            mine, theirs = PurePosixPath(target), PurePosixPath(other.target)
            if mine == theirs:
                raise entry.error("target", f"{target} is also the target of volumes[{j}]")
            if theirs in mine.parents or mine in theirs.parents:
                raise entry.error("target", f"{target} overlaps {other.target}, the target of volumes[{j}]")
        out.append(VolumeUse(source=source, target=target, read_only=read_only, named=named))
    return tuple(out)


def check_against_components(volumes: tuple[VolumeUse, ...], mounts: dict[str, str], display: str) -> None:
    """No volume target is a component's mount point, inside one, or above one. `mounts`: mount -> component."""
    for i, v in enumerate(volumes):
        mine = PurePosixPath(v.target)
        for mount, owner in mounts.items():
            theirs = PurePosixPath(mount)
            if mine == theirs or theirs in mine.parents or mine in theirs.parents:
                raise InvalidInput(f"{display}: volumes[{i}].target: {v.target} overlaps the mount {mount} of component {owner!r}")
