"""Components: a directory with `component.toml`, unit files in `units/`, and a payload bound read-only into the container."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

import attrs

from tupper import tomlfile
from tupper.errors import InvalidInput

MANIFEST = "component.toml"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")
UNIT_RE = re.compile(r"^[A-Za-z0-9:_.\\@-]+\.(service|socket|timer|path|target|mount)$")
# Mount points a component may not take over: the container would not boot, or would lose its own files.
RESERVED_MOUNTS = {"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys", "/tmp", "/usr", "/var"}


@attrs.frozen
class Component:
    name: str
    version: str
    description: str
    units: tuple[str, ...]
    requires: tuple[str, ...]
    mount: str
    root: Path  # the component directory on the host (resolved)
    manifest_file: str  # for messages

    def unit_path(self, unit: str) -> Path:
        return self.root / "units" / unit

    @property
    def service_units(self) -> tuple[str, ...]:
        return tuple(u for u in self.units if u.endswith(".service"))


def load(directory: Path, where: str) -> Component:
    """Read and validate the component at `directory`; `where` names the referring key in errors."""
    if not directory.is_dir():
        raise InvalidInput(f"{where}: no such directory: {directory}")
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise InvalidInput(f"{where}: {directory} has no {MANIFEST}")
    root = directory.resolve()
    doc, display = tomlfile.load(manifest, "component manifest")
    t = tomlfile.Table(doc, display)
    name = t.get("name", str, required=True)
    if not NAME_RE.match(name):
        raise t.error("name", f"invalid component name {name!r}: use lowercase letters, digits, '_', '.', '-' (at most 64)")
    version = t.get("version", str, required=True)
    if not VERSION_RE.match(version):
        raise t.error("version", f"invalid version {version!r}")
    description = t.get("description", str, "")
    units = t.str_list("units")
    if not units:
        raise t.error("units", "a component needs at least one unit")
    requires = t.str_list("requires")
    mount = t.get("mount", str, f"/opt/{name}")
    t.check_unknown()

    for i, unit in enumerate(units):
        key = f"units[{i}]"
        if "/" in unit or unit in (".", "..") or not UNIT_RE.match(unit):
            raise t.error(key, f"{unit!r} is not a unit file name (like 'hello.service'); paths are not allowed")
        if units.index(unit) != i:
            raise t.error(key, f"{unit} is listed twice")
        path = root / "units" / unit
        inside(root, path, t.where(key))
        if not path.is_file():
            raise t.error(key, f"missing unit file units/{unit}")
    for i, req in enumerate(requires):
        if req == name:
            raise t.error(f"requires[{i}]", "a component cannot require itself")
    check_mount(mount, t.where("mount"))
    check_tree(root, display)
    return Component(
        name=name,
        version=version,
        description=description,
        units=tuple(units),
        requires=tuple(requires),
        mount=str(PurePosixPath(mount)),
        root=root,
        manifest_file=display,
    )


def inside(root: Path, path: Path, where: str) -> Path:
    """Resolve `path` (following symlinks) and refuse it if it leaves `root`."""
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise InvalidInput(f"{where}: {path.relative_to(root) if path.is_relative_to(root) else path} leaves the component directory")
    return resolved


def check_mount(mount: str, where: str) -> None:
    p = PurePosixPath(mount)
    if not p.is_absolute():
        raise InvalidInput(f"{where}: {mount!r} must be an absolute path in the container")
    if ".." in p.parts or "//" in mount:
        raise InvalidInput(f"{where}: {mount!r} must not contain '..'")
    if str(p) in RESERVED_MOUNTS:
        raise InvalidInput(f"{where}: {mount!r} is a system directory; use a path such as /opt/NAME")


def check_tree(root: Path, display: str) -> None:
    """Refuse symlinks that point outside the component (absolute ones, or relative ones climbing out)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in dirnames + filenames:
            path = Path(dirpath) / entry
            if not path.is_symlink():
                continue
            target = os.readlink(path)
            rel = path.relative_to(root)
            if os.path.isabs(target):
                raise InvalidInput(f"{display}: {rel}: absolute symlink to {target} (symlinks must stay inside the component)")
            lexical = os.path.normpath(os.path.join(os.path.dirname(str(rel)), target))
            if lexical == ".." or lexical.startswith("../"):
                raise InvalidInput(f"{display}: {rel}: symlink to {target} leaves the component directory")
