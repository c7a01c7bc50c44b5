"""The container spec (`spec.toml`): parsed into frozen values, with every cross-component rule checked up front."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import attrs

from tupper import config, tomlfile
from tupper.errors import InvalidInput
from tupper.model import components as comp
from tupper.model import network as net
from tupper.model import resources as res
from tupper.model import volumes as vol

# The container name is also nspawn's machine name, which must be a valid hostname (systemd's
# hostname_is_valid()): dot-separated labels of letters, digits and '-', no label starting or ending
# with '-', at most 64 characters. tupper also allows '_' inside a label and gives nspawn '-' instead.
# Each dot-separated part starts and ends with a letter or digit. '_' is allowed in tupper names;
# nspawn's machine name (a hostname) gets '-' in its place, see nspawn.machine_name().
NAME_RE = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9_-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9_-]*[a-zA-Z0-9])?)*$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DEFAULT_IMAGE = "debian-bookworm"
RESTART_POLICIES = ("no", "on-failure", "always")
SECRET_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LABEL_KEY_RE = re.compile(r"[a-z0-9](?:[a-z0-9._/-]{0,61}[a-z0-9])?")
MAX_TIMEOUT = 86400  # a day: larger is a typo, and inf or nan would make waits never end


@attrs.frozen
class ComponentUse:
    """One `[[components]]` entry: a component and the environment the spec gives it."""

    component: comp.Component
    env: tuple[tuple[str, str], ...] = ()
    resources: res.Resources = res.Resources()  # [components.resources]: limits for this component's units


@attrs.frozen
class Spec:
    name: str
    image: str
    components: tuple[ComponentUse, ...]
    stop_timeout: float = 10.0
    start_timeout: float = 60.0
    restart_policy: str = "no"
    restart_delay: float = 1.0
    restart_limit: int = 5
    grants: tuple[tuple[str, str], ...] = ()  # (credential ID, secret name) from the [secrets] table
    resources: res.Resources = res.Resources()  # [resources]: limits for the whole container
    network: net.NetworkSpec = net.NetworkSpec()  # [network]: private (default), host or none
    labels: tuple[tuple[str, str], ...] = ()  # [labels]: key -> value, for people and `ps --filter label=`
    volumes: tuple[vol.VolumeUse, ...] = ()  # [[volumes]]: named volumes and host paths bound into the container
    file: str = "<spec>"
    base_dir: Path = Path(".")

    def component(self, name: str) -> comp.Component:
        for use in self.components:
            if use.component.name == name:
                return use.component
        raise KeyError(name)

    @property
    def units(self) -> list[str]:
        return [u for use in self.components for u in use.component.units]


def check_name(name: str, where: str, hint: str | None = None) -> str:
    if not NAME_RE.fullmatch(name) or len(name) > 64:
        raise InvalidInput(
            f"{where}: invalid container name {name!r}: use letters, digits, '_', '-' and '.' "
            "(at most 64; each dot-separated part starts and ends with a letter or digit)",
            hint=hint,
        )
    return name


# Finds an installed component: (name, version or None for the newest, where) -> its directory.
Resolver = Callable[[str, "str | None", str], Path]


def _no_store(name: str, version: str | None, where: str) -> Path:
    raise InvalidInput(f"{where}: installed components ({name}) need a store")


def load(path: Path, name: str | None = None, resolve: Resolver = _no_store) -> Spec:
    """Parse and validate the spec at `path`. `name` (from --name) overrides the file's; `resolve`
    finds components given by name and version."""
    doc, display = tomlfile.load(path, "spec file")
    return from_document(doc, display, path.resolve().parent, default_name=path.stem, name=name, resolve=resolve,
                         defaults=config.current().defaults)


IMAGE_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")


def _image(t: tomlfile.Table) -> str:
    image = t.get("image", str, DEFAULT_IMAGE)
    # fullmatch, not match: `$` would let a trailing newline through.
    if not IMAGE_RE.fullmatch(image):
        raise t.error("image", f"invalid image name {image!r}")
    return image


@attrs.frozen
class Needed:
    """An installed component a spec names (`name`, and `version` or None for the newest), and where."""

    name: str
    version: str | None
    where: str


def needs(path: Path) -> tuple[str, list[Needed]]:
    """The image and the installed components the spec at `path` names, read from those keys alone
    (what must be in the store before the spec can load; everything else is checked by load())."""
    doc, display = tomlfile.load(path, "spec file")
    t = tomlfile.Table(doc, display)
    out = []
    for entry in t.tables("components"):
        name, version = entry.get("name", str), entry.get("version", str)
        if name is None:
            continue
        if not comp.NAME_RE.fullmatch(name):
            raise entry.error("name", f"invalid component name {name!r}")
        if version is not None and not comp.VERSION_RE.fullmatch(version):
            raise entry.error("version", f"invalid version {version!r}")
        out.append(Needed(name, version, entry.where("name")))
    return _image(t), out


def component_set(image: str, tokens: list[str], image_where: str, where: str) -> str:
    """The spec (TOML) that runs installed components NAME or NAME=VERSION (`tokens`) on `image`, every
    other key at its default: what a Pacemaker resource or a fleet service gives instead of a spec file."""
    if not IMAGE_RE.fullmatch(image):
        raise InvalidInput(f"{image_where}: invalid image name {image!r}")
    lines = [f'image = "{image}"']
    names: list[str] = []
    for token in tokens:
        name, eq, version = token.partition("=")
        if not comp.NAME_RE.fullmatch(name) or (eq and not comp.VERSION_RE.fullmatch(version)):
            raise InvalidInput(f"{where}: {token!r} is not NAME or NAME=VERSION of an installed component")
        if name in names:
            raise InvalidInput(f"{where}: {name} is named twice")
        names.append(name)
        lines += ["[[components]]", f'name = "{name}"'] + ([f'version = "{version}"'] if eq else [])
    if not names:
        raise InvalidInput(f"{where}: no component named")
    return "\n".join(lines) + "\n"


def from_text(text: str, base_dir: Path, display: str = "<spec>", name: str | None = None, resolve: Resolver = _no_store) -> Spec:
    doc = tomlfile.parse(text, display)
    return from_document(doc, display, base_dir, default_name=None, name=name, resolve=resolve, defaults=config.current().defaults)


def from_document(doc: dict, display: str, base_dir: Path, *, default_name: str | None, name: str | None,
                  resolve: Resolver = _no_store, defaults: config.Defaults = config.BUILTIN) -> Spec:
    """The spec a parsed document describes; `defaults` (the config file's [defaults]) fill in what it leaves out."""
    t = tomlfile.Table(doc, display)
    file_name = t.get("name", str, default_name)
    image = _image(t)
    uses: list[ComponentUse] = []
    entries = t.tables("components")
    stop = t.table("stop")
    stop_timeout = _positive(stop, "timeout", defaults.stop_timeout)
    stop.check_unknown()
    start = t.table("start")
    start_timeout = _positive(start, "timeout", defaults.start_timeout)
    start.check_unknown()
    restart = t.table("restart")
    restart_policy = restart.get("policy", str, "no")
    if restart_policy not in RESTART_POLICIES:
        raise restart.error("policy", f"must be one of {', '.join(RESTART_POLICIES)}, got {restart_policy!r}")
    restart_delay = _positive(restart, "delay", 1.0)
    restart_limit = restart.get("limit", int, 5)
    if not 1 <= restart_limit <= 1000:
        raise restart.error("limit", f"must be between 1 and 1000, got {restart_limit}")
    restart.check_unknown()
    grants_table = t.table("secrets")
    grants = []
    for cred, secret in grants_table.data.items():
        grants_table.get(cred, str)
        if not SECRET_NAME_RE.fullmatch(secret):
            raise grants_table.error(cred, f"invalid secret name {secret!r}")
        grants.append((cred, secret))
    resources = _resources(t)
    network = net.parse(t.table("network"))
    labels_table = t.table("labels")
    labels = []
    for key in labels_table.data:
        value = labels_table.get(key, str)
        if not LABEL_KEY_RE.fullmatch(key):
            raise labels_table.error(key, "invalid label key: lowercase letters, digits, '.', '-', '_' and '/', at most 63, "
                                          "starting and ending with a letter or digit")
        if len(value) > 256 or any(ord(ch) < 32 for ch in value):
            raise labels_table.error(key, "invalid label value: at most 256 characters, no control characters")
        labels.append((key, value))
    volumes = vol.parse(t.tables("volumes"))
    t.check_unknown()

    final_name = name if name is not None else file_name
    if final_name is None:
        raise t.error("name", "missing (required when the spec is not a file)")
    if name is not None:
        check_name(final_name, "--name")
    elif "name" in doc:
        check_name(final_name, f"{display}: name")
    else:
        # No `name` key: the name is the file's stem, so say where it came from.
        check_name(final_name, f"{display}: name (from the file name)", hint="set `name = \"...\"` in the spec or pass --name")

    for entry in entries:
        rel = entry.get("path", str)
        installed = entry.get("name", str)
        version = entry.get("version", str)
        if rel is None and installed is None:
            entry.get("path", str, required=True)  # raises "missing", naming a misspelt key if there is one
        if rel is not None and installed is not None:
            raise entry.error(None, "give either `path` (a component directory) or `name` (and `version`) of an installed component, not both")
        if rel is None and version is not None and not comp.VERSION_RE.fullmatch(version):
            raise entry.error("version", f"invalid version {version!r}")
        if rel is not None and version is not None:
            raise entry.error("version", "only with `name`: a component directory carries its own version")
        env_table = entry.table("env")
        env = []
        for key, value in env_table.data.items():
            env_table.get(key, str)
            if not ENV_KEY_RE.fullmatch(key):
                raise env_table.error(key, "invalid environment variable name")
            if "\0" in value:
                raise env_table.error(key, "an environment value cannot contain a NUL character")
            env.append((key, value))
        limits = _resources(entry)
        entry.check_unknown()
        if rel is not None:
            component = comp.load(base_dir / rel, entry.where("path"))
        else:
            if not comp.NAME_RE.fullmatch(installed):
                raise entry.error("name", f"invalid component name {installed!r}")
            component = comp.load(resolve(installed, version, entry.where("name")), entry.where("name"))
        if component.health is not None:  # its ${VAR}s with the values this spec gives
            component.health.resolve(dict(env), f"{env_table.where()} (for {component.manifest_file}: health)")
        uses.append(ComponentUse(component=component, env=tuple(env), resources=limits))

    _check_components(uses, display)
    vol.check_against_components(volumes, {u.component.mount: u.component.name for u in uses}, display)
    _check_grants(uses, dict(grants), display)
    return Spec(
        name=final_name,
        image=image,
        labels=tuple(labels),
        volumes=volumes,
        components=tuple(uses),
        stop_timeout=stop_timeout,
        start_timeout=start_timeout,
        restart_policy=restart_policy,
        restart_delay=restart_delay,
        restart_limit=restart_limit,
        grants=tuple(grants),
        resources=resources,
        network=network,
        file=display,
        base_dir=base_dir,
    )


def _resources(t: tomlfile.Table) -> res.Resources:
    table = t.table("resources")
    return res.parse_mapping(table.data, table.where())


def _positive(t: tomlfile.Table, key: str, default: float) -> float:
    value = t.get(key, (int, float), default)
    # Written as `not (0 < value <= MAX)` so that nan, which compares false with everything, fails too.
    if not 0 < value <= MAX_TIMEOUT:
        raise t.error(key, f"must be a positive number of seconds (at most {MAX_TIMEOUT}), got {value}")
    return float(value)


def _check_components(uses: list[ComponentUse], display: str) -> None:
    names: dict[str, int] = {}
    units: dict[str, str] = {}
    mounts: dict[str, str] = {}
    for i, use in enumerate(uses):
        c = use.component
        where = f"{display}: components[{i}]"
        if c.name in names:
            raise InvalidInput(f"{where}: component {c.name!r} is already listed as components[{names[c.name]}]")
        names[c.name] = i
        for unit in c.units:
            if unit == "tupper.target":
                raise InvalidInput(f"{where}: unit name tupper.target is reserved")
            if unit in units:
                raise InvalidInput(f"{where}: unit {unit} is provided by both {units[unit]!r} and {c.name!r}")
            units[unit] = c.name
        if c.mount in mounts:
            raise InvalidInput(f"{where}: mount {c.mount} is also used by {mounts[c.mount]!r}")
        for other, owner in mounts.items():
            # One read-only bind inside another: nspawn cannot create the inner mount point.
            mine, theirs = PurePosixPath(c.mount), PurePosixPath(other)
            if theirs in mine.parents or mine in theirs.parents:
                raise InvalidInput(f"{where}: mount {c.mount} overlaps mount {other} of {owner!r}")
        mounts[c.mount] = c.name
    for use in uses:
        for j, req in enumerate(use.component.requires):
            if req not in names:
                raise InvalidInput(
                    f"{use.component.manifest_file}: requires[{j}]: no component {req!r} in {display}"
                )
    order_by_requires([u.component for u in uses], display)


def _check_grants(uses: list[ComponentUse], grants: dict[str, str], display: str) -> None:
    """Every credential a component declares is granted a secret, and every grant is used."""
    needed: set[str] = set()
    for use in uses:
        for i, cred in enumerate(use.component.secrets):
            needed.add(cred)
            if cred not in grants:
                raise InvalidInput(f"{display}: secrets: component {use.component.name!r} needs credential {cred!r} "
                                   f"({use.component.manifest_file}: secrets[{i}]), and the spec grants it no secret",
                                   hint=f'add  {cred} = "SECRET-NAME"  to the [secrets] table')
    for cred in grants:
        if cred not in needed:
            raise InvalidInput(f"{display}: secrets.{cred}: no component of this spec declares credential {cred!r}")


def order_by_requires(components: list[comp.Component], display: str) -> list[comp.Component]:
    """Topological order (required first); raises on a cycle, naming it."""
    by_name = {c.name: c for c in components}
    done: list[comp.Component] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(c: comp.Component, trail: list[str]) -> None:
        if state.get(c.name) == 2:
            return
        if state.get(c.name) == 1:
            cycle = trail[trail.index(c.name) :] + [c.name]
            raise InvalidInput(f"{display}: components: requires cycle: {' -> '.join(cycle)}")
        state[c.name] = 1
        for req in c.requires:
            visit(by_name[req], trail + [c.name])
        state[c.name] = 2
        done.append(c)

    for c in components:
        visit(c, [])
    return done
