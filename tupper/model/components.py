"""Components: a directory with `component.toml`, unit files in `units/`, and a payload bound read-only into the container."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath

import attrs

from tupper import tomlfile
from tupper.errors import InvalidInput
from tupper.model import health as healthmod
from tupper.model.health import HealthCheck

MANIFEST = "component.toml"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")
UNIT_RE = re.compile(r"^[A-Za-z0-9:_.\\@-]+\.(service|socket|timer|path|target|mount)$")
# Mount points a component may not take over: the container would not boot, or would lose its own files.
RESERVED_MOUNTS = {"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys", "/tmp", "/usr", "/var"}
# ...nor anything below these: kernel API file systems; systemd's configuration (a bind over
# /etc/systemd/system would hide the units tupper writes there); and /run, a tmpfs in the container,
# whose aliases /var/run and /var/lock are absolute symlinks in Debian images (a mount point created
# through them would land on the host).
RESERVED_TREES = tuple(
    PurePosixPath(d)
    for d in ("/dev", "/proc", "/sys", "/etc/systemd", "/lib/systemd", "/usr/lib/systemd", "/run", "/var/run", "/var/lock")
)


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
    secrets: tuple[str, ...] = ()  # credential IDs its units load (LoadCredential=ID:…)
    on_rotate: str = "restart"  # what a new secret value does to its units: "restart" or "reload"
    health: HealthCheck | None = None  # its [health] check, if any

    def unit_path(self, unit: str) -> Path:
        return self.root / "units" / unit

    @property
    def service_units(self) -> tuple[str, ...]:
        return tuple(u for u in self.units if u.endswith(".service"))


CREDENTIAL_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def load(directory: Path, where: str, *, tree: bool = True) -> Component:
    """Read and validate the component at `directory`; `where` names the referring key in errors.
    `tree=False` skips the scan of the whole directory (the SDK's checker does its own, reporting all)."""
    try:
        is_dir = directory.is_dir()
    except OSError as exc:  # a path too long
        raise InvalidInput(f"{where}: cannot read {directory}: {exc.strerror or exc}") from None
    if not is_dir:
        raise InvalidInput(f"{where}: no such directory: {directory}")
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise InvalidInput(f"{where}: {directory} has no {MANIFEST}")
    root = directory.resolve()
    # Before reading anything: the manifest itself may be a symlink out of the component.
    if tree:
        check_tree(root, str(manifest))
    elif manifest.is_symlink():
        raise InvalidInput(f"{manifest}: the manifest must be a regular file, not a symlink")
    doc, display = tomlfile.load(manifest, "component manifest")
    t = tomlfile.Table(doc, display)
    name = t.get("name", str, required=True)
    if not NAME_RE.fullmatch(name):
        raise t.error("name", f"invalid component name {name!r}: use lowercase letters, digits, '_', '.', '-' (at most 64)")
    version = t.get("version", str, required=True)
    if not VERSION_RE.fullmatch(version):
        raise t.error("version", f"invalid version {version!r}")
    description = t.get("description", str, "")
    units = t.str_list("units")
    if not units:
        raise t.error("units", "a component needs at least one unit")
    requires = t.str_list("requires")
    mount = t.get("mount", str, f"/opt/{name}")
    secrets = t.str_list("secrets")
    on_rotate = t.get("on_rotate", str, "restart")
    if on_rotate not in ("restart", "reload"):
        raise t.error("on_rotate", f"must be \"restart\" or \"reload\", got {on_rotate!r}")
    health = healthmod.parse(t.table("health"), present="health" in t.data)
    t.check_unknown()
    for i, cred in enumerate(secrets):
        if not CREDENTIAL_RE.fullmatch(cred):
            raise t.error(f"secrets[{i}]", f"invalid credential ID {cred!r}: letters, digits, '_', '.', '-' (at most 64)")
        if secrets.index(cred) != i:
            raise t.error(f"secrets[{i}]", f"{cred} is listed twice")

    for i, unit in enumerate(units):
        key = f"units[{i}]"
        if "/" in unit or unit in (".", "..") or not UNIT_RE.fullmatch(unit):
            raise t.error(key, f"{unit!r} is not a unit file name (like 'hello.service'); paths are not allowed")
        if units.index(unit) != i:
            raise t.error(key, f"{unit} is listed twice")
        if "@." in unit:
            # tupper starts and waits for every listed unit; a template cannot be started without an instance.
            raise t.error(key, f"{unit} is a template unit; list an instance instead (a unit file named like {unit.replace('@.', '@main.')})")
        path = root / "units" / unit
        inside(root, path, t.where(key))
        if not path.is_file():
            raise t.error(key, f"missing unit file units/{unit}")
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise t.error(key, f"units/{unit} is not valid UTF-8") from None
    for i, req in enumerate(requires):
        if req == name:
            raise t.error(f"requires[{i}]", "a component cannot require itself")
        if requires.index(req) != i:
            raise t.error(f"requires[{i}]", f"{req} is listed twice")
    check_mount(mount, t.where("mount"))
    return Component(
        name=name,
        version=version,
        description=description,
        units=tuple(units),
        requires=tuple(requires),
        mount=str(PurePosixPath(mount)),
        root=root,
        manifest_file=display,
        secrets=tuple(secrets),
        on_rotate=on_rotate,
        health=health,
    )


def inside(root: Path, path: Path, where: str) -> Path:
    """Resolve `path` (following symlinks) and refuse it if it leaves `root`."""
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError):  # a symlink loop: RuntimeError up to Python 3.12
        raise InvalidInput(f"{where}: {path.relative_to(root) if path.is_relative_to(root) else path} is a symlink loop") from None
    if resolved != root and root not in resolved.parents:
        raise InvalidInput(f"{where}: {path.relative_to(root) if path.is_relative_to(root) else path} leaves the component directory")
    return resolved


def check_mount(mount: str, where: str) -> None:
    p = PurePosixPath(mount)
    if not p.is_absolute():
        raise InvalidInput(f"{where}: {mount!r} must be an absolute path in the container")
    if ".." in p.parts:
        raise InvalidInput(f"{where}: {mount!r} must not contain '..'")
    if "//" in mount or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in mount):
        raise InvalidInput(f"{where}: {mount!r} is not a clean path (no '//', no control characters)")
    if str(p) in RESERVED_MOUNTS or any(p == d or d in p.parents for d in RESERVED_TREES):
        raise InvalidInput(f"{where}: {mount!r} is a system directory; use a path such as /opt/NAME")


def check_tree(root: Path, display: str) -> None:
    """Refuse symlinks that point outside the component (absolute ones, or relative ones climbing out), and device nodes."""
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in dirnames + filenames:
            path = Path(dirpath) / entry
            rel = path.relative_to(root)
            mode = path.lstat().st_mode
            if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
                raise InvalidInput(f"{display}: {rel}: device node (a component holds files, directories and symlinks)")
            if not stat.S_ISLNK(mode):
                continue
            target = os.readlink(path)
            if os.path.isabs(target):
                raise InvalidInput(f"{display}: {rel}: absolute symlink to {target} (symlinks must stay inside the component)")
            lexical = os.path.normpath(os.path.join(os.path.dirname(str(rel)), target))
            # The lexical check alone is not enough: '..' after a symlinked component climbs from where
            # that symlink points (`a/up -> ..` plus `x -> a/up/..` is lexically inside, really outside).
            real = Path(os.path.realpath(path))
            if lexical == ".." or lexical.startswith("../") or (real != root and root not in real.parents):
                raise InvalidInput(f"{display}: {rel}: symlink to {target} leaves the component directory")
