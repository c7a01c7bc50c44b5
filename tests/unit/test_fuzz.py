"""Fuzzing (hypothesis): whatever tupper reads from outside gives a value or tupper's own invalid-input
error (a TupperError with exit code 2: InvalidInput, NotFound, Exists), never another exception, and
writes nothing outside its place.

Covered: specs (spec.from_text, spec.load), component manifests (components.load and the SDK's checker),
image definitions, packages (random archives and mutated real ones: inspect and install), names
(containers, secrets, images, components, D-Bus object path labels), and every string argument of the
D-Bus API, through the real interface methods on a daemon whose runtime is a stand-in.

Budget: the "ci" profile (the default) runs a few thousand examples in all, in well under a minute.
`make fuzz` (TUPPER_FUZZ=1) selects the "fuzz" profile: 50 000 examples per test. HYPOTHESIS_PROFILE
picks a profile by name. Every bug these tests found has a plain regression test at the end.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import math
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import threading
import types
from pathlib import Path

import pytest
from dbus_next import Variant
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface
from dbus_next.validators import is_object_path_valid
from helpers import PlainStore
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tupper import busnames
from tupper.container import nspawn
from tupper.daemon import api
from tupper.daemon.tupperd import Daemon, Watched
from tupper.errors import InvalidInput, NotFound, TupperError
from tupper.model import components as comp
from tupper.model import sdk, spec
from tupper.model.resources import KEYS as RESOURCE_KEYS
from tupper.runtime.records import ComponentEntry, Record
from tupper.runtime.runtime import Runtime
from tupper.store import images, packages
from tupper.store.secrets import SecretStore

REPO = Path(__file__).resolve().parents[2]

# ---- budget ----------------------------------------------------------------------------------------

_COMMON = dict(
    deadline=None,
    print_blob=True,  # failing examples are also kept in .hypothesis/ (ignored by git) and replayed first
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("fuzz", max_examples=50_000, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("fuzz" if os.environ.get("TUPPER_FUZZ") else "ci")
settings.load_profile(PROFILE)


def budget(examples: int) -> settings:
    """`examples` in the CI profile; in any other profile, the profile's own count."""
    return settings(max_examples=examples) if PROFILE == "ci" else settings()


# A hang (a FIFO read, a loop in an archive) fails the CI run instead of stalling it; long runs have no limit.
pytestmark = pytest.mark.timeout(180 if PROFILE == "ci" else 0)


# ---- the one accepted failure ------------------------------------------------------------------------


def parsed_or_refused(fn, *args, **kwargs):
    """fn's value, or None when fn refused the input with tupper's own invalid-input error.
    Any other exception propagates: hypothesis reports it, shrunk to a minimal example."""
    try:
        value = fn(*args, **kwargs)
    except TupperError as exc:
        assert exc.exit_code == 2, f"{type(exc).__name__} (exit code {exc.exit_code}) for invalid input: {exc}"
        assert exc.message.strip(), "an error without a message"
        event(f"refused: {type(exc).__name__}")
        return None
    event("parsed")
    return value


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path below root (symlinks not followed) with its type, size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            out[os.path.relpath(path, root)] = (stat.S_IFMT(st_.st_mode), st_.st_size if not stat.S_ISDIR(st_.st_mode) else 0,
                                                st_.st_mtime_ns if stat.S_ISREG(st_.st_mode) else 0)
    return out


def changes(before: dict, after: dict) -> list[str]:
    return sorted({p for p in before.keys() | after.keys() if before.get(p) != after.get(p)})


# ---- TOML documents --------------------------------------------------------------------------------


class Raw(str):
    """A TOML literal written as it is: dates and times, deep nesting, huge integers."""


_ESCAPES = {'"': '\\"', "\\": "\\\\"}


def toml_str(s: str) -> str:
    return '"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in s) + '"'


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_str(key)


def toml_value(v) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_doc(doc: dict) -> str:
    """Top-level values first, then every table as a [section] (nested tables inline)."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{toml_key(k)}]")
            lines += [f"{toml_key(k2)} = {toml_value(v2)}" for k2, v2 in v.items()]
    return "\n".join(lines) + "\n"


TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)  # what a UTF-8 file or a D-Bus string can hold
KEYS = st.one_of(st.sampled_from(["name", "path", "units", "timeout", "x", ""]), TEXT)
DATES = st.sampled_from(["1979-05-27T07:32:00Z", "1979-05-27T00:32:00.999999-07:00", "1979-05-27", "07:32:00", "1979-05-27T07:32:00"]).map(Raw)
# Well-formed TOML that strains a parser: deep nesting, integers past Python's int/str digit limit.
ADVERSARIAL = st.one_of(
    st.integers(1, 3000).map(lambda n: Raw("[" * n + "]" * n)),
    st.integers(1, 3000).map(lambda n: Raw("{a = " * n + "1" + "}" * n)),
    st.integers(4000, 5000).map(lambda n: Raw("9" * n)),
)
SCALARS = st.one_of(TEXT, st.integers(), st.floats(), st.booleans(), DATES, ADVERSARIAL)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=8)


def either(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a well-shaped value; sometimes anything at all (the wrong type, the wrong shape)."""
    return st.one_of(valid, valid, VALUES)


def with_unknown_keys(docs: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(docs, st.dictionaries(KEYS, VALUES, max_size=1)).map(lambda t: {**t[1], **t[0]})


def mutated_text(data, text: str) -> str:
    """text with a few random insertions and deletions."""
    for at, cut, insert in data.draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 8), TEXT), max_size=3)):
        at %= len(text) + 1
        text = text[:at] + insert + text[at + cut:]
    return text


# ---- specs -------------------------------------------------------------------------------------------

CONTAINER_NAMES = st.one_of(
    st.from_regex(spec.NAME_RE, fullmatch=True),
    st.sampled_from(["web", "web_1", "1.2.3", "a" * 64, "a" * 65, "-x", "x-", "a..b", "a.-b", "é", "x\n", "", " ", "."]),
    TEXT,
)
SECRET_NAMES = st.one_of(st.from_regex(spec.SECRET_NAME_RE, fullmatch=True), st.sampled_from(["db_password", "audit.log", ".", "..", "a/b", ""]), TEXT)
IMAGE_NAMES = st.one_of(st.from_regex(images.NAME_RE, fullmatch=True), st.sampled_from(["debian-bookworm", "-rf", "a\n", ""]), TEXT)
COMPONENT_NAMES = st.one_of(st.from_regex(comp.NAME_RE, fullmatch=True), st.sampled_from(["hello", "web", "db", "nope", ".", "..", "../hello", "Hello"]), TEXT)
VERSIONS = st.one_of(st.from_regex(comp.VERSION_RE, fullmatch=True), st.sampled_from(["1.0.0", "2", "", "..", "1/2", "-1"]), TEXT)
TIMEOUTS = st.one_of(st.integers(-5, 100_000), st.floats(allow_nan=True, allow_infinity=True))

# Component directories made by the `components_dir` fixture, each good or bad in its own way.
COMPONENT_DIRS = ["hello", "web", "db", "cyca", "cycb", "nested", "clash", "hello-again", "reserved", "broken", "loop", "escape"]
COMPONENT_PATHS = st.one_of(
    st.sampled_from(COMPONENT_DIRS),
    st.sampled_from(COMPONENT_DIRS).map(lambda d: f"./{d}/"),
    st.sampled_from(["", ".", "..", "missing", "hello/units", "hello/component.toml", "/nonexistent", "~/hello", "x" * 300, "a/" * 2100, "x\0y"]),
    TEXT,
)
ENTRIES = st.fixed_dictionaries({}, optional={
    "path": either(COMPONENT_PATHS),
    "name": either(COMPONENT_NAMES),
    "version": either(VERSIONS),
    "env": either(st.dictionaries(st.one_of(st.from_regex(spec.ENV_KEY_RE, fullmatch=True), TEXT), either(TEXT), max_size=3)),
    "mount": VALUES,
})
SPEC_DOCS = with_unknown_keys(st.fixed_dictionaries({}, optional={
    "name": either(CONTAINER_NAMES),
    "image": either(IMAGE_NAMES),
    "components": either(st.lists(ENTRIES, max_size=4)),
    "stop": either(st.fixed_dictionaries({}, optional={"timeout": either(TIMEOUTS)})),
    "start": either(st.fixed_dictionaries({}, optional={"timeout": either(TIMEOUTS)})),
    "restart": either(st.fixed_dictionaries({}, optional={
        "policy": either(st.one_of(st.sampled_from(spec.RESTART_POLICIES), TEXT)),
        "delay": either(TIMEOUTS),
        "limit": either(st.integers(-10, 2000)),
    })),
    "secrets": either(st.dictionaries(st.one_of(st.sampled_from(["db_password", "api_token"]), TEXT), either(SECRET_NAMES), max_size=3)),
}))

UNIT = "[Service]\nExecStart=/opt/{name}/bin/run\n"


def write_component(d: Path, manifest: str, units: list[str]) -> Path:
    (d / "units").mkdir(parents=True)
    (d / "component.toml").write_text(manifest)
    for unit in units:
        (d / "units" / unit).write_text(UNIT.format(name=d.name))
    return d


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def components_dir(sandbox) -> Path:
    """Components (good ones and each kind of bad one) and spec files, side by side."""
    base = sandbox / "components"
    base.mkdir()
    shutil.copytree(REPO / "services" / "hello", base / "hello", symlinks=True)
    shutil.copytree(REPO / "services" / "hello", base / "hello-again", symlinks=True)  # a second "hello"
    write_component(base / "web", 'name = "web"\nversion = "1"\nunits = ["web.service"]\nrequires = ["hello"]\nmount = "/srv/web"\n', ["web.service"])
    write_component(base / "db", 'name = "db"\nversion = "1"\nunits = ["db.service"]\nsecrets = ["db_password"]\n', ["db.service"])
    write_component(base / "cyca", 'name = "cyca"\nversion = "1"\nunits = ["a.service"]\nrequires = ["cycb"]\n', ["a.service"])
    write_component(base / "cycb", 'name = "cycb"\nversion = "1"\nunits = ["b.service"]\nrequires = ["cyca"]\n', ["b.service"])
    write_component(base / "nested", 'name = "nested"\nversion = "1"\nunits = ["n.service"]\nmount = "/opt/hello/inner"\n', ["n.service"])
    write_component(base / "clash", 'name = "clash"\nversion = "1"\nunits = ["hello.service"]\n', ["hello.service"])
    write_component(base / "reserved", 'name = "reserved"\nversion = "1"\nunits = ["tupper.target"]\n', ["tupper.target"])
    write_component(base / "broken", 'name = 3\n', [])
    write_component(base / "loop", 'name = "loop"\nversion = "1"\nunits = ["loop.service"]\n', [])
    os.symlink("loop.service", base / "loop" / "units" / "loop.service")  # a symlink to itself
    write_component(base / "escape", 'name = "escape"\nversion = "1"\nunits = ["e.service"]\n', [])
    os.symlink("../../outside.service", base / "escape" / "units" / "e.service")
    (base / "outside.service").write_text(UNIT.format(name="x"))
    # Spec files for the D-Bus Run method.
    (base / "good.toml").write_text('name = "good"\n[[components]]\npath = "hello"\n')
    (base / "bad.toml").write_text('name = 3\n')
    (base / "binary.toml").write_bytes(b'name = "\xff"\n')
    (base / "dir.toml").mkdir()
    os.symlink("loop.toml", base / "loop.toml")
    return base


def resolver(base: Path):
    """spec.Resolver for installed components: the directories above stand in for the store's."""
    def resolve(name: str, version: str | None, where: str) -> Path:
        if (base / name).is_dir():
            return base / name
        raise InvalidInput(f"{where}: no installed component {name!r}")
    return resolve


def check_spec(s: spec.Spec) -> None:
    assert spec.check_name(s.name, "name") == s.name
    assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}", s.image)
    assert all(0 < t <= spec.MAX_TIMEOUT for t in (s.stop_timeout, s.start_timeout, s.restart_delay))
    assert s.restart_policy in spec.RESTART_POLICIES and 1 <= s.restart_limit <= 1000
    assert len(set(s.units)) == len(s.units) and "tupper.target" not in s.units
    for use in s.components:
        assert all(spec.ENV_KEY_RE.fullmatch(k) and "\0" not in v for k, v in use.env)
        for cred in use.component.secrets:
            assert cred in dict(s.grants)
    spec.order_by_requires([u.component for u in s.components], s.file)


def names_the_file(exc_message: str, *files: str) -> bool:
    return exc_message.startswith(tuple(files) + ("--name",))


@given(doc=SPEC_DOCS, name=st.one_of(st.none(), CONTAINER_NAMES))
def test_a_random_spec_document_parses_or_is_refused_naming_the_file(components_dir, doc, name):
    try:
        s = spec.from_text(toml_doc(doc), components_dir, "spec.toml", name=name, resolve=resolver(components_dir))
    except TupperError as exc:
        assert exc.exit_code == 2 and names_the_file(exc.message, "spec.toml", str(components_dir)), exc.message
        event(f"refused: {type(exc).__name__}")
    else:
        event("parsed")
        check_spec(s)


@given(data=st.data())
def test_random_and_mutated_spec_text_parses_or_is_refused(components_dir, data):
    text = data.draw(st.one_of(st.text(), st.builds(toml_doc, SPEC_DOCS)))
    text = mutated_text(data, text)
    try:
        s = spec.from_text(text, components_dir, "spec.toml", resolve=resolver(components_dir))
    except TupperError as exc:
        assert exc.exit_code == 2 and names_the_file(exc.message, "spec.toml", str(components_dir)), exc.message
    else:
        check_spec(s)


FILE_STEMS = st.one_of(st.from_regex(spec.NAME_RE, fullmatch=True), TEXT).filter(
    lambda s: s and "/" not in s and "\0" not in s and s not in (".", "..") and len(s.encode()) < 200)


@budget(150)
@given(stem=FILE_STEMS, content=st.one_of(st.builds(lambda d: toml_doc(d).encode(), SPEC_DOCS), st.binary(max_size=64)),
       name=st.one_of(st.none(), CONTAINER_NAMES))
def test_a_spec_file_loads_or_is_refused_naming_the_file(components_dir, stem, content, name):
    path = components_dir / f"{stem}.toml"
    if os.path.lexists(path):  # one of the fixture's spec files
        path = components_dir / f"x{stem}.toml"
    path.write_bytes(content)
    try:
        s = spec.load(path, name=name, resolve=resolver(components_dir))
    except TupperError as exc:
        assert exc.exit_code == 2 and names_the_file(exc.message, str(path), str(components_dir)), exc.message
    else:
        check_spec(s)
    finally:
        path.unlink()


# ---- component manifests (components.load and the SDK's checker) ------------------------------------

UNIT_NAMES = st.one_of(
    st.from_regex(comp.UNIT_RE, fullmatch=True),
    st.sampled_from(["hello.service", "a.socket", "x@.service", "x@main.service", "tupper.target", "../x.service", "x/y.service",
                     ".", "..", "", "x.service\n", "units.service"]),
    TEXT,
)
MOUNTS = st.one_of(
    st.sampled_from(["/opt/x", "/srv/web/", "/", "/etc", "/etc/systemd/x", "/var/run/x", "/run/x", "/opt//x", "/opt/../etc", "opt/x",
                     "/opt/x\n", "/proc/self", ""]),
    TEXT.map(lambda t: "/" + t),
    TEXT,
)
UNIT_TEXTS = st.lists(st.one_of(
    st.sampled_from(["[Service]", "[Unit]", "[Socket]", "[Install]", "[", "ExecStart=", "Type=exec", "LoadCredential=db_password",
                     "SetCredential=x:y", "  # comment", "KEY", "line \\"]),
    st.builds(lambda key, path: f"{key}={path}", st.sampled_from(sdk.EXEC_KEYS + sdk.CREDENTIAL_KEYS),
              st.one_of(st.sampled_from(["/opt/x/bin/run", "/opt/x/" + "a" * 300, "/opt/x/../../etc/passwd", "-/bin/true", "'unbalanced",
                                         "/opt/x/a\0b", "$X", "@", ""]), TEXT)),
    TEXT,
), max_size=6).map("\n".join)
MANIFEST_DOCS = with_unknown_keys(st.fixed_dictionaries({}, optional={
    "name": either(COMPONENT_NAMES),
    "version": either(VERSIONS),
    "description": either(TEXT),
    "units": either(st.lists(UNIT_NAMES, max_size=4)),
    "requires": either(st.lists(COMPONENT_NAMES, max_size=3)),
    "mount": either(MOUNTS),
    "secrets": either(st.lists(st.one_of(st.sampled_from(["db_password", "x"]), TEXT), max_size=3)),
    "on_rotate": either(st.one_of(st.sampled_from(["restart", "reload"]), TEXT)),
}))
MANIFEST_KINDS = ["text", "text", "text", "text", "bytes", "symlink-inside", "symlink-absolute", "symlink-outside", "dir", "fifo", "missing", "loop"]
UNIT_KINDS = ["text", "text", "text", "bytes", "dir", "symlink-inside", "symlink-manifest", "loop", "symlink-outside", "symlink-absolute",
              "dangling", "fifo", "missing"]
UNITS_DIR_KINDS = ["dir", "dir", "dir", "dir", "symlink-outside", "loop", "file", "missing"]


def fs_name(name) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\0" not in name and name not in (".", "..") \
        and len(name.encode()) <= 200


GOOD_MANIFEST = {"name": "web", "version": "1.0.0", "units": ["web.service"]}


@st.composite
def component_plans(draw):
    """Half of them a good component with one or two things changed, half anything at all."""
    doc = draw(MANIFEST_DOCS)
    good = draw(st.booleans())
    if good:
        doc = {**GOOD_MANIFEST, **{k: v for k, v in doc.items() if draw(st.integers(0, 3)) == 0}}
    listed = doc.get("units") if isinstance(doc.get("units"), list) else []
    on_disk = list(dict.fromkeys(u for u in listed + draw(st.lists(UNIT_NAMES, max_size=2)) if fs_name(u)))
    return {
        "manifest": "text" if good else draw(st.sampled_from(MANIFEST_KINDS)),
        "text": toml_doc(doc).encode() if good or draw(st.integers(0, 9)) else draw(st.binary(max_size=40)),
        "units_dir": "dir" if good else draw(st.sampled_from(UNITS_DIR_KINDS)),
        "units": [(u, draw(st.sampled_from(["text"] * 30 + UNIT_KINDS if good else UNIT_KINDS)), draw(UNIT_TEXTS)) for u in on_disk],
        "payload": draw(st.sampled_from(["none", "program"] * (4 if good else 1) + ["setuid", "hardlink", "fifo", "absolute-symlink"])),
    }


def make_component(d: Path, plan: dict) -> None:
    """The component directory `plan` describes; its outside neighbours are d/../outside*."""
    d.mkdir()
    (d.parent / "outside.toml").write_bytes(plan["text"])
    (d.parent / "outside-units").mkdir(exist_ok=True)
    manifest, kind = d / comp.MANIFEST, plan["manifest"]
    if kind in ("text", "bytes"):
        manifest.write_bytes(plan["text"])
    elif kind == "symlink-inside":
        (d / "real.toml").write_bytes(plan["text"])
        os.symlink("real.toml", manifest)
    elif kind == "symlink-absolute":
        os.symlink("/dev/null", manifest)
    elif kind == "symlink-outside":
        os.symlink("../outside.toml", manifest)
    elif kind == "dir":
        manifest.mkdir()
    elif kind == "fifo":
        os.mkfifo(manifest)
    elif kind == "loop":
        os.symlink(comp.MANIFEST, manifest)
    units = d / "units"
    if plan["units_dir"] == "dir":
        units.mkdir()
    elif plan["units_dir"] == "symlink-outside":
        os.symlink("../outside-units", units)
        return
    elif plan["units_dir"] == "loop":
        os.symlink("units", units)
        return
    elif plan["units_dir"] == "file":
        units.write_text("not a directory\n")
        return
    else:
        return
    for name, kind, text in plan["units"]:
        path = units / name
        if kind == "text":
            path.write_text(text)
        elif kind == "bytes":
            path.write_bytes(b"[Service]\nExecStart=/\xff\xfe\n")
        elif kind == "dir":
            path.mkdir()
        elif kind == "symlink-inside":
            (d / "payload.service").write_text(text)
            os.symlink("../payload.service", path)
        elif kind == "symlink-manifest":
            os.symlink(f"../{comp.MANIFEST}", path)
        elif kind == "loop":
            os.symlink(name, path)
        elif kind == "symlink-outside":
            os.symlink("../../outside.toml", path)
        elif kind == "symlink-absolute":
            os.symlink("/dev/null", path)
        elif kind == "dangling":
            os.symlink("nowhere", path)
        elif kind == "fifo":
            os.mkfifo(path)
    if plan["payload"] != "none":
        (d / "bin").mkdir()
        run = d / "bin" / "run"
        run.write_text("#!/bin/sh\n")
        run.chmod(0o4755 if plan["payload"] == "setuid" else 0o755)
        if plan["payload"] == "hardlink":
            os.link(run, d / "bin" / "again")
        elif plan["payload"] == "fifo":
            os.mkfifo(d / "bin" / "pipe")
        elif plan["payload"] == "absolute-symlink":
            os.symlink("/etc/passwd", d / "bin" / "passwd")


@budget(250)
@given(plan=component_plans())
def test_a_random_component_directory_loads_or_is_refused_and_the_sdk_checker_reports_without_raising(sandbox, plan):
    with tempfile.TemporaryDirectory(dir=sandbox) as box:
        d = Path(box) / "comp"
        make_component(d, plan)
        before = snapshot(Path(box))
        c = parsed_or_refused(comp.load, d, "spec.toml: components[0].path")
        found, problems = sdk.check(d)
        assert all(isinstance(p, sdk.Problem) and p.message for p in problems)
        assert changes(before, snapshot(Path(box))) == [], "reading a component wrote to disk"
        if c is not None:
            assert found == c, "the SDK's checker loads what components.load loads"
            assert comp.NAME_RE.fullmatch(c.name) and comp.VERSION_RE.fullmatch(c.version) and c.units
            for unit in c.units:
                real = c.unit_path(unit).resolve()
                assert real.is_file() and c.root in real.parents
            comp.check_mount(c.mount, "mount")


# ---- image definitions ---------------------------------------------------------------------------------

IMAGE_DOCS = with_unknown_keys(st.fixed_dictionaries({}, optional={
    "name": either(IMAGE_NAMES),
    "description": either(TEXT),
    "debootstrap": either(st.fixed_dictionaries({}, optional={
        "suite": either(st.one_of(st.sampled_from(["bookworm", "stable", "-x", "../x"]), TEXT)),
        "variant": either(st.one_of(st.sampled_from(["minbase", "buildd", "fakechroot", "-", "--foo"]), TEXT)),
        "packages": either(st.lists(st.one_of(st.sampled_from(images.REQUIRED_PACKAGES + ("curl", "-x", "a")), TEXT), max_size=5)),
        "mirror": either(st.one_of(st.sampled_from(["http://deb.debian.org/debian", "file:///srv", "ftp://x y", "gopher://x"]), TEXT)),
    })),
    "build": either(st.fixed_dictionaries({}, optional={"steps": either(st.lists(TEXT, max_size=3))})),
}))


@budget(200)
@given(stem=FILE_STEMS, content=st.one_of(st.builds(lambda d: toml_doc(d).encode(), IMAGE_DOCS), st.binary(max_size=40)))
def test_a_random_image_definition_parses_or_is_refused(sandbox, stem, content):
    with tempfile.TemporaryDirectory(dir=sandbox) as box:
        path = Path(box) / f"{stem}.toml"
        path.write_bytes(content)
        d = parsed_or_refused(images.ImageDef.from_file, path)
    if d is not None:
        assert images.NAME_RE.fullmatch(d.name) and not d.suite.startswith("-")
        assert set(images.REQUIRED_PACKAGES) <= set(d.packages)


# ---- names ------------------------------------------------------------------------------------------------

HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")


@budget(300)
@given(name=CONTAINER_NAMES)
def test_a_container_name_is_accepted_only_when_it_makes_a_valid_hostname(name):
    from tupper.container.nspawn import machine_name

    if parsed_or_refused(spec.check_name, name, "name") is not None:
        host = machine_name(name)
        assert name.isascii() and len(host) <= 64
        assert all(HOSTNAME_LABEL.fullmatch(label) for label in host.split(".")), host


def safe_path_component(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name and name.isascii() \
        and name.isprintable() and not name.startswith("-") and len(name) <= 64


@budget(300)
@given(name=st.one_of(SECRET_NAMES, IMAGE_NAMES, COMPONENT_NAMES, VERSIONS))
def test_secret_image_component_names_and_versions_are_accepted_only_as_safe_file_names(name):
    accepted = {
        "secret": parsed_or_refused(SecretStore.check_name, name) is not None,
        "image": images.NAME_RE.fullmatch(name) is not None,
        "component": comp.NAME_RE.fullmatch(name) is not None,
        "version": comp.VERSION_RE.fullmatch(name) is not None,
    }
    for kind, ok in accepted.items():
        assert not ok or safe_path_component(name), f"{kind} name {name!r} is not a safe file name"
    # The spec checks image names with its own pattern: the same set.
    in_spec = re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}", name) is not None
    assert in_spec == accepted["image"]


LABEL = re.compile(r"[A-Za-z0-9_]+")


@budget(300)
@given(name=st.one_of(CONTAINER_NAMES.filter(lambda n: spec.NAME_RE.fullmatch(n) and len(n) <= 64),
                      st.text(st.characters(max_codepoint=0xFF), min_size=1)))
def test_an_object_path_label_round_trips_for_every_container_name_and_latin1_text(name):
    label = busnames.escape_label(name)
    assert LABEL.fullmatch(label)
    assert busnames.unescape_label(label) == name
    assert is_object_path_valid(busnames.container_path(name))


@budget(300)
@given(name=st.text())
def test_an_object_path_label_round_trips_for_any_text(name):
    label = busnames.escape_label(name)
    assert LABEL.fullmatch(label)
    assert busnames.unescape_label(label) == name


def test_label_escapes_each_utf8_byte_as_systemd_does():
    """Regression: 'Ā' was written '_100', which did not read back."""
    assert busnames.escape_label("Ā") == "_c4_80" and busnames.unescape_label("_c4_80") == "Ā"
    assert busnames.escape_label("") == "_" and busnames.unescape_label("_") == ""
    assert busnames.escape_label("_") == "_5f"


# ---- packages ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hello_package(sandbox) -> bytes:
    """The bytes of a real package: services/hello, built by packages.build."""
    src = sandbox / "pkgsrc" / "hello"
    shutil.copytree(REPO / "services" / "hello", src, symlinks=True)
    out = sandbox / "pkgsrc" / "dist"
    out.mkdir()
    pkg, _ = packages.build(src, comp.load(src, "hello"), out)
    return pkg.read_bytes()


def install_checked(sandbox: Path, pkg_bytes: bytes) -> None:
    """inspect() and install() of a package made of pkg_bytes: each gives a value or invalid input; inspect
    writes nothing; install writes only below the store's components/NAME/, and nothing when it refuses."""
    with tempfile.TemporaryDirectory(dir=sandbox) as box:
        box = Path(box)
        pkg = box / "x.tupper"
        pkg.write_bytes(pkg_bytes)
        # Deep enough that the '..' of the generated member names stays inside the sandbox, where we look.
        root = box / "deep" / "er" / "store"
        installer = packages.Installer(PlainStore(root))
        before = snapshot(sandbox)
        info = parsed_or_refused(packages.inspect, pkg)
        assert changes(before, snapshot(sandbox)) == [], "inspect wrote to disk"
        installed = parsed_or_refused(installer.install, pkg)
        changed = changes(before, snapshot(sandbox))
        if installed is None:
            assert changed == [], f"a refused package left files: {changed}"
            return
        event("installed")
        mine = os.path.relpath(installer.dir / installed.name, sandbox)
        assert all(p == mine or p.startswith(mine + os.sep) for p in changed), f"written outside {mine}: {changed}"
        assert info is not None and info["digest_ok"] and installed.digest == info["computed_digest"]
        c = comp.load(installed.path, "installed")
        assert (c.name, c.version) == (installed.name, installed.version)


MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "truncate", "append", "insert", "delete", "overwrite"]),
                               st.integers(0, 2**32), st.binary(min_size=1, max_size=16)), min_size=1, max_size=4)


def mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op, at, blob in ops:
        pos = at % (len(buf) + 1)
        if op == "flip" and pos < len(buf):
            buf[pos] ^= blob[0] or 1
        elif op == "truncate":
            del buf[pos:]
        elif op == "append":
            buf += blob
        elif op == "insert":
            buf[pos:pos] = blob
        elif op == "delete":
            del buf[pos:pos + len(blob)]
        elif op == "overwrite":
            buf[pos:pos + len(blob)] = blob
    return bytes(buf)


@budget(150)
@given(ops=MUTATIONS)
def test_a_mutated_package_file_is_inspected_and_installed_or_refused(sandbox, hello_package, ops):
    install_checked(sandbox, mutate(hello_package, ops))


# Header fields of a tar block: (offset, length).
HEADER_FIELDS = {"name": (0, 100), "mode": (100, 8), "size": (124, 12), "type": (156, 1), "linkname": (157, 100), "magic": (257, 8),
                 "prefix": (345, 155)}
FIELD_VALUES = st.one_of(
    st.sampled_from([b"../../x", b"/abs", b"x\0", b"0000777\0", b"0004755\0", b"77777777777\0", b"-1", b"\x80" + b"\0" * 10 + b"\x10",
                     b"\xff" * 12, b"2", b"1", b"3", b"5", b"6", b"7", b"L", b"K", b"x", b"g", b"S", b"ustar  \0", b"ustar\x0000",
                     b"units/hello.service", b"component.toml"]),
    st.binary(max_size=16),
)


def set_field(buf: bytearray, header: int, field: str, value: bytes) -> None:
    """Write `value` into a header field and fix the header's checksum, so that the parser reads on."""
    start, length = HEADER_FIELDS[field]
    buf[header + start:header + start + length] = value[:length].ljust(length, b"\0")
    buf[header + 148:header + 156] = b" " * 8
    buf[header + 148:header + 156] = b"%06o\0 " % sum(buf[header:header + 512])


@budget(150)
@given(data=st.data())
def test_a_package_with_mutated_tar_headers_and_content_is_inspected_and_installed_or_refused(sandbox, hello_package, data):
    tar = bytearray(gzip.decompress(hello_package))
    headers = [m.offset for m in tarfile.open(fileobj=io.BytesIO(bytes(tar)))]
    for index, field, value in data.draw(st.lists(st.tuples(st.integers(0, len(headers) - 1), st.sampled_from(sorted(HEADER_FIELDS)),
                                                            FIELD_VALUES), max_size=3)):
        set_field(tar, headers[index], field, value)
    tar = mutate(bytes(tar), data.draw(st.one_of(st.just([]), MUTATIONS)))
    install_checked(sandbox, gzip.compress(tar, mtime=0))


# Member names and link targets: every trick; "@ROOT@" becomes the sandbox (absolute paths we can watch).
MEMBER_NAMES = st.one_of(
    st.sampled_from(["component.toml", "units", "units/", "units/hello.service", "units/x.service", "bin", "bin/hello", "x", "../x",
                     "../../../../x", "a/../../x", "./x", "a//b", ".", "./", "", "/", "/x", "a/", "units/../../x", "\\..\\x", "x\n",
                     "x\0y", "tupper-package.json", "@ROOT@/escaped", "@ROOT@/escaped/x", "l/x", "l", "x" * 120 + "/y", "é/ü"]),
    st.lists(st.sampled_from(["a", "..", ".", "units", "l", "x" * 60, ""]), min_size=1, max_size=6).map("/".join),
    TEXT,
)
LINK_TARGETS = st.one_of(
    st.sampled_from(["units", ".", "..", "units/..", "a/../..", "l/..", "@ROOT@/escaped", "/etc/shadow", "", "x\0y", "x\n", "component.toml",
                     "../" * 8 + "tmp"]),
    MEMBER_NAMES,
)
MEMBER_TYPES = st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                                tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE, tarfile.XHDTYPE,
                                tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, b"Z", b"\xff"])
MODES = st.one_of(st.sampled_from([0o644, 0o755, 0o4755, 0o2755, 0o1777, 0o777, 0]), st.integers(0, 0o7777))
SIZES = st.one_of(st.none(), st.none(), st.integers(-(2**20), -1), st.integers(0, 2048), st.sampled_from([2**33, 2**62]))
def pax_record(key: str, value: bytes) -> bytes:
    """One pax extended header record, `LENGTH key=value\n`, its length counting its own digits."""
    body = b" " + key.encode() + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


PAX_KEYS = ["path", "linkpath", "size", "uid", "mtime", "GNU.sparse.size", "GNU.sparse.realsize", "GNU.sparse.map", "GNU.sparse.major",
            "GNU.sparse.minor", "GNU.sparse.name", "GNU.sparse.numblocks", "GNU.sparse.offset", "GNU.sparse.numbytes", "hdrcharset"]
PAX_VALUES = st.one_of(st.sampled_from([b"../../x", b"/abs", b"x\0/y", b"-1000000", b"99999999999999999999", b"", b"\xff\xfe", b"0,10,20",
                                        b"0,4611686018427387904", b"1", b"0", b"BINARY", b"x,y"]), st.binary(max_size=12))
# The data of a pax header member (type x or g): well-formed records with crafted values, or junk.
PAX_RECORDS = st.one_of(
    st.lists(st.tuples(st.sampled_from(PAX_KEYS), PAX_VALUES), min_size=1, max_size=4).map(lambda rs: b"".join(pax_record(k, v) for k, v in rs)),
    st.binary(max_size=40),
)
MEMBER_DATA = st.one_of(st.binary(max_size=40), PAX_RECORDS)
MEMBERS = st.tuples(MEMBER_NAMES, MEMBER_TYPES, MODES, LINK_TARGETS, MEMBER_DATA, SIZES)

HELLO_MANIFEST = b'name = "hello"\nversion = "1.0.0"\nunits = ["hello.service"]\n'
HELLO_MEMBERS = [
    ("bin", tarfile.DIRTYPE, 0o755, "", b"", None),
    ("bin/hello", tarfile.REGTYPE, 0o755, "", b"#!/bin/sh\n", None),
    ("component.toml", tarfile.REGTYPE, 0o644, "", HELLO_MANIFEST, None),
    ("units", tarfile.DIRTYPE, 0o755, "", b"", None),
    ("units/hello.service", tarfile.REGTYPE, 0o644, "", b"[Service]\nExecStart=/opt/hello/bin/hello\n", None),
]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)
METAS = st.one_of(
    st.fixed_dictionaries({"format": st.just(1), "name": st.one_of(st.just("hello"), COMPONENT_NAMES),
                           "version": st.one_of(st.just("1.0.0"), VERSIONS), "digest": st.just("sha256:0")},
                          optional={"description": JSON, "files": JSON}),
    JSON,
    st.integers(1, 40_000).map(lambda n: b"[" * n + b"]" * n),  # deep JSON, within the 64 KiB the reader accepts
    st.binary(max_size=40),
)


# Members a real component could have: install may succeed with them, and must keep them inside.
PLAUSIBLE_MEMBERS = st.tuples(
    st.sampled_from(["doc", "doc/README", "share", "share/x", "bin/tool", "units/extra.service", "lib", "lib/link", "bin/up"]),
    st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE]),
    st.sampled_from([0o644, 0o755]),
    st.sampled_from(["hello", "../bin/hello", "..", "../..", "../units", ".", "tool", "up/.."]),
    st.binary(max_size=20),
    st.none(),
)
HELLO_META = {"format": 1, "name": "hello", "version": "1.0.0", "digest": "sha256:0"}
FORMATS = st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])


def tar_archive(members, fmt: int, end_blocks: int) -> bytes:
    """A tar stream written block by block, so that headers may lie (sizes, types) about what follows."""
    out = io.BytesIO()
    for name, kind, mode, link, data, size in members:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.linkname, info.mtime = kind, mode, link, 0
        info.size = len(data) if size is None else size
        try:
            out.write(info.tobuf(fmt, "utf-8", "surrogateescape"))
        except ValueError:
            continue  # this format cannot express it
        out.write(data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
    out.write(b"\0" * tarfile.BLOCKSIZE * end_blocks)
    return out.getvalue()


def package_bytes(meta, members, fmt, end_blocks, compress) -> bytes:
    meta_bytes = json.dumps(meta).encode() if not isinstance(meta, bytes) else meta
    tar = tar_archive([(packages.META, tarfile.REGTYPE, 0o644, "", meta_bytes, None), *members], fmt, end_blocks)
    return gzip.compress(tar, mtime=0) if compress else tar


@budget(300)
@given(data=st.data(), good=st.integers(0, 2).map(lambda n: n == 0))
def test_a_random_archive_is_inspected_and_installed_or_refused_and_writes_nowhere_else(sandbox, data, good):
    """A third of the archives are the hello component with its right digest plus a member or two of
    any kind, so that install gets to extract and load them; the rest are anything at all."""
    if good:
        meta, base, shuffle, fmt, end_blocks, compress, fix_digest = HELLO_META, True, False, data.draw(FORMATS), 2, True, True
        extra = data.draw(st.lists(st.one_of(PLAUSIBLE_MEMBERS, MEMBERS), max_size=2, unique_by=lambda m: m[0]), label="extra")
    else:
        meta, base, shuffle, fmt = data.draw(METAS, label="meta"), data.draw(st.booleans()), data.draw(st.booleans()), data.draw(FORMATS)
        end_blocks, compress = data.draw(st.sampled_from([2, 2, 1, 0])), data.draw(st.sampled_from([True, True, True, False]))
        fix_digest = data.draw(st.booleans())
        extra = data.draw(st.lists(MEMBERS, max_size=4), label="extra")
    root = str(sandbox)
    members = [(n.replace("@ROOT@", root), k, m, t.replace("@ROOT@", root), d, s) for n, k, m, t, d, s in (HELLO_MEMBERS if base else []) + extra]
    if shuffle:
        members = data.draw(st.permutations(members))
    pkg = package_bytes(meta, members, fmt, end_blocks, compress)
    if fix_digest and isinstance(meta, dict):
        # The digest the reader computes, so that install goes on to extract and load the component.
        with tempfile.TemporaryDirectory(dir=sandbox) as box:
            (Path(box) / "x.tupper").write_bytes(pkg)
            info = parsed_or_refused(packages.inspect, Path(box) / "x.tupper")
        if info is not None:
            pkg = package_bytes({**meta, "digest": info["computed_digest"]}, members, fmt, end_blocks, compress)
    install_checked(sandbox, pkg)


# ---- the D-Bus API -----------------------------------------------------------------------------------------


class StandInRuntime:
    """What the daemon asks of its runtime before anything runs: the store, records, installed components."""

    # The real ones, on a PlainStore: what they check before touching a container is what is fuzzed.
    resolve_component = Runtime.resolve_component
    running = Runtime.running
    live = Runtime.live
    unit_job = Runtime.unit_job
    secret_holders = Runtime.secret_holders
    rotate_secret = Runtime.rotate_secret
    update = Runtime.update
    stats = Runtime.stats
    _stats = Runtime._stats
    net = Runtime.net
    create_network = Runtime.create_network
    list_networks = Runtime.list_networks
    remove_network = Runtime.remove_network
    container_of_pid = Runtime.container_of_pid
    inspect_volume = Runtime.inspect_volume
    volumes_in_use = Runtime.volumes_in_use
    open_shell = Runtime.open_shell
    set_pool = Runtime.set_pool
    list_pools = Runtime.list_pools
    remove_pool = Runtime.remove_pool
    pool_members = Runtime.pool_members
    drain_pool = Runtime.drain_pool
    host = nspawn.Host(systemd=False)

    def __init__(self, store: PlainStore, records: dict | None = None) -> None:
        self.store = store
        self.serves_secrets = False
        self._records = records or {}

    def record(self, name: str):
        try:
            return self._records[name]
        except KeyError:
            raise NotFound(f"no container {name!r}") from None

    def records(self, only=None) -> list:
        return [r for name, r in self._records.items() if only is None or only(name)]

    def shutdown_order(self) -> list:
        return []

    def remove(self, name: str, *, force: bool = False) -> None:
        spec.check_name(name, "container name")
        raise NotFound(f"no container {name!r}")  # what Runtime.remove says of a name with no record and no directory


class StandInDaemon(Daemon):
    """The real daemon, stopping where a container would start: the spec it would run is the result."""

    async def _run(self, s: spec.Spec, keep_failed: bool, cold: bool = False) -> dict:
        return {"name": s.name, "state": "running", "leader_pid": 0, "image": s.image}


@pytest.fixture(scope="module")
def daemon_store(sandbox, components_dir, hello_package) -> PlainStore:
    """A store with hello 1.0.0 installed, a secret "db_password" and an audit log."""
    store = PlainStore(sandbox / "store")
    pkg = sandbox / "hello-1.0.0.tupper"
    pkg.write_bytes(hello_package)
    packages.Installer(store).install(pkg)
    secrets = SecretStore(store)
    (secrets.dir / "db_password").mkdir()
    (secrets.dir / "db_password" / "meta.json").write_text('{"version": 1, "created_at": 0, "updated_at": 0}')
    secrets.audit(container="web", unit="web.service", credential="db_password", secret="db_password", version=1, result="delivered")
    return store


# Strings for each D-Bus argument, by its name; "@BASE@" becomes the components directory.
SPEC_PATHS = st.one_of(
    st.sampled_from(["good.toml", "bad.toml", "binary.toml", "dir.toml", "loop.toml", "missing.toml", "good.toml/x", "hello", "x" * 300,
                     "a/" * 2100, "x\0y", ""]).map(lambda p: "@BASE@/" + p),
    st.sampled_from(["/", "/etc/hostname/x", "/nonexistent/spec.toml", "relative.toml", "", "/dev/null"]),
    TEXT.map(lambda t: "@BASE@/" + t),
    TEXT,
)
ARGUMENTS = {
    "name": st.one_of(st.just(""), CONTAINER_NAMES),
    "spec_path": SPEC_PATHS,
    "toml": st.one_of(st.builds(toml_doc, SPEC_DOCS), TEXT),
    "base_dir": st.one_of(st.sampled_from(["@BASE@", "@BASE@/hello", "relative", "", "/nonexistent", "@BASE@/good.toml", "/x\0"]), TEXT),
    "component": COMPONENT_NAMES,
    "version": VERSIONS,
    "secret": SECRET_NAMES,
    "unit": st.one_of(st.just("web.service"), UNIT_NAMES),
    "argv": st.lists(TEXT, max_size=3),
    "image": IMAGE_NAMES,
}
BY_TYPE = {"s": TEXT, "b": st.booleans(), "d": st.floats(), "i": st.integers(-(2**31), 2**31 - 1), "h": st.just(-1), "as": st.lists(TEXT),
           "u": st.integers(0, 2**32 - 1), "q": st.integers(0, 2**16 - 1),
           # resource limits ({"memory_max": "1G"}): the known keys with odd values, and odd keys
           "a{ss}": st.dictionaries(st.one_of(st.sampled_from(RESOURCE_KEYS), TEXT), TEXT, max_size=4),
           # RunWith's options: the known ones as booleans, and odd keys and types
           "a{sv}": st.dictionaries(st.one_of(st.sampled_from(["keep_failed", "cold"]), TEXT),
                                    st.one_of(st.builds(Variant, st.just("b"), st.booleans()), st.builds(Variant, st.just("s"), TEXT)),
                                    max_size=3)}
EXIT_2_ERRORS = {"org.tupper1.Error.InvalidSpec", "org.tupper1.Error.NotFound", "org.tupper1.Error.Exists"}
MANAGER_METHODS = {m.name: m for m in ServiceInterface._get_methods(api.ManagerInterface(None)) if m.in_signature}  # with arguments to fuzz
CONTAINER_METHODS = {m.name: m for m in ServiceInterface._get_methods(api.ContainerInterface(None, "web"))
                     if "s" in m.in_signature}


def call_dbus_method(store: PlainStore, base: Path, interface: str, method, args: list):
    """Call the method as dbus-next would (its undecorated function, awaited), on a fresh daemon."""
    async def go():
        cdir = store.containers_dir / "web"
        cdir.mkdir(exist_ok=True)
        web = Record(name="web", dir=cdir, image="debian-bookworm", spec_file="/web.toml", created_at=1.0, stop_timeout=5.0,
                     phase="stopped", components=[ComponentEntry(name="web", version="1.0.0", mount="/opt/web", source="/s",
                                                                 units=("web.service",))])
        # Jobs go on the bus: a bus that takes objects and does nothing else.
        d = StandInDaemon(StandInRuntime(store, {"web": web}), types.SimpleNamespace(export=lambda *a: None, unexport=lambda *a: None))
        if interface == "container":
            iface = api.ContainerInterface(d, "web")
            d.watched["web"] = Watched("web", iface)
        else:
            iface = d.manager
        result = method.fn(iface, *args)
        return await result if asyncio.iscoroutine(result) else result

    return asyncio.run(go())


@budget(400)
@given(data=st.data(), interface=st.sampled_from(["manager"] * 4 + ["container"]))
def test_every_string_argument_of_the_dbus_api_gives_a_value_or_a_tupper_error(daemon_store, components_dir, data, interface):
    methods = MANAGER_METHODS if interface == "manager" else CONTAINER_METHODS
    method = methods[data.draw(st.sampled_from(sorted(methods)))]
    args = []
    for arg in method.introspection.in_args:
        value = data.draw(ARGUMENTS.get(arg.name, BY_TYPE[arg.signature]), label=arg.name)
        args.append(value.replace("@BASE@", str(components_dir)) if isinstance(value, str) else value)
    before = snapshot(components_dir)
    try:
        result = call_dbus_method(daemon_store, components_dir, interface, method, args)
    except DBusError as exc:
        allowed = EXIT_2_ERRORS | ({"org.tupper1.Error.Failed"} if method.name.endswith("Unit") and args == ["web.service"] else set())
        assert exc.type in allowed, f"{method.name}{tuple(args)}: {exc.type}: {exc.text}"
        event(f"{method.name}: {exc.type}")
    else:
        event(f"{method.name}: returned")
        if method.name in ("Run", "RunText", "RunWith"):  # the container's object and the job booting it
            assert is_object_path_valid(result[0]) and is_object_path_valid(result[1]) and result[1].startswith("/org/tupper1/job/")
    assert changes(before, snapshot(components_dir)) == []


@budget(300)
@given(name=st.one_of(COMPONENT_NAMES, st.sampled_from(["hello"])), version=st.one_of(st.none(), st.just("1.0.0"), VERSIONS))
def test_an_installed_component_is_found_by_any_name_and_version_or_not_found(daemon_store, name, version):
    installer = packages.Installer(daemon_store)
    found = parsed_or_refused(installer.get, name, version)
    if found is not None:
        assert (found.name, found.path.parent.parent) == (name, installer.dir)
    path = parsed_or_refused(StandInRuntime(daemon_store).resolve_component, name, version, "spec.toml: components[0].name")
    assert path is None or path.parent.parent == installer.dir


# ---- regressions: each bug the fuzzer found, as a plain test with the minimal example ------------------------

DEEP = sys.getrecursionlimit()  # levels of nesting: more than a recursive parser gets through


def test_regression_an_integer_of_more_than_4300_digits_is_malformed_toml(tmp_path):
    # Was: ValueError: Exceeds the limit (4300 digits) for integer string conversion (from int() in tomllib).
    with pytest.raises(InvalidInput, match=r"^spec.toml: malformed TOML: Exceeds the limit \(4300 digits\)"):
        spec.from_text("x = " + "1" * 4301, tmp_path, "spec.toml")


def test_regression_toml_nested_too_deeply_is_malformed_toml_in_a_spec_text_a_file_and_an_image_definition(tmp_path):
    # Was: RecursionError from tomllib.
    text = "x = " + "[" * DEEP + "]" * DEEP + "\n"
    with pytest.raises(InvalidInput, match=r"^spec.toml: malformed TOML: arrays or tables nested too deeply$"):
        spec.from_text(text, tmp_path, "spec.toml")
    path = tmp_path / "deep.toml"
    path.write_text(text)
    for load in (spec.load, images.ImageDef.from_file):
        with pytest.raises(InvalidInput, match=rf"^{re.escape(str(path))}: malformed TOML: arrays or tables nested too deeply$"):
            load(path)


def test_regression_a_spec_path_through_a_file_too_long_or_with_a_nul_is_invalid_input(tmp_path):
    # Was: NotADirectoryError, OSError (File name too long), ValueError (embedded null byte): over D-Bus
    # (Manager.Run) a Failed or an internal error instead of org.tupper1.Error.InvalidSpec.
    (tmp_path / "spec.toml").write_text('name = "x"\n')
    for path, message in ((tmp_path / "spec.toml" / "x", "cannot read the spec file: Not a directory"),
                          (tmp_path / ("x" * 300), "cannot read the spec file: File name too long"),
                          (Path(f"{tmp_path}/x\0y"), "not a valid path")):
        with pytest.raises(InvalidInput, match=message):
            spec.load(path)


def test_regression_a_component_path_too_long_is_invalid_input(tmp_path):
    # Was: OSError: [Errno 36] File name too long, from Path.is_dir().
    with pytest.raises(InvalidInput, match=r"^spec.toml: components\[0\].path: cannot read .*: File name too long$"):
        spec.from_text(f'name = "x"\n[[components]]\npath = "{"x" * 300}"\n', tmp_path, "spec.toml")


def test_regression_a_unit_file_that_is_a_symlink_to_itself_is_invalid_input(tmp_path):
    # Was: RuntimeError: Symlink loop, from Path.resolve() (in components.load and so in sdk.check).
    d = write_component(tmp_path / "loop", 'name = "loop"\nversion = "1"\nunits = ["loop.service"]\n', [])
    os.symlink("loop.service", d / "units" / "loop.service")
    with pytest.raises(InvalidInput, match=r"component.toml: units\[0\]: units/loop.service is a symlink loop$"):
        comp.load(d, "spec.toml: components[0].path")
    component, problems = sdk.check(d)
    assert component is None and any("symlink loop" in p.message for p in problems)


def test_regression_sdk_check_reports_units_that_is_not_a_list(tmp_path):
    # Was: TypeError: 'int' object is not iterable.
    d = write_component(tmp_path / "c", 'name = "c"\nversion = "1"\nunits = 5\n', [])
    component, problems = sdk.check(d)
    assert component is None and [p.message for p in problems] == ["units: expected a list, got an integer (5)"]


def test_regression_sdk_check_reports_a_manifest_nested_too_deeply(tmp_path):
    # Was: RecursionError from the checker's second, loose reading of the manifest.
    d = write_component(tmp_path / "c", "x = " + "[" * DEEP + "]" * DEEP + "\n", [])
    component, problems = sdk.check(d)
    assert component is None and any("nested too deeply" in p.message for p in problems)


@pytest.mark.timeout(60)
def test_regression_sdk_check_does_not_block_on_a_manifest_that_is_a_fifo(tmp_path):
    # Was: sdk.check blocked for ever in open() (a symlink to /dev/zero: read without end).
    d = tmp_path / "c"
    (d / "units").mkdir(parents=True)
    os.mkfifo(d / comp.MANIFEST)
    result = []
    reader = threading.Thread(target=lambda: result.append(sdk.check(d)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():
        os.close(os.open(d / comp.MANIFEST, os.O_WRONLY | os.O_NONBLOCK))  # let the blocked reader go
        pytest.fail("sdk.check blocked reading a FIFO")
    component, problems = result[0]
    assert component is None and any(comp.MANIFEST in p.message for p in problems)


def test_regression_a_secret_named_like_the_audit_log_is_not_found(tmp_path):
    # Was: NotADirectoryError (secrets/audit.log/meta.json): Manager.RotateSecret("audit.log") answered
    # org.tupper1.Error.Failed "Not a directory", and `tupper secret rm audit.log` crashed.
    secrets = SecretStore(PlainStore(tmp_path / "store"))
    secrets.audit(container="c", unit="u.service", credential="x", secret="s", version=1, result="delivered")
    with pytest.raises(NotFound, match="^no secret 'audit.log'$"):
        secrets.info("audit.log")


def package_file(tmp_path: Path, data: bytes) -> Path:
    pkg = tmp_path / "x.tupper"
    pkg.write_bytes(data)
    return pkg


def refused(tmp_path: Path, pkg: Path, match: str) -> None:
    """inspect and install both refuse pkg as invalid input, and install leaves nothing."""
    with pytest.raises(InvalidInput, match=match):
        packages.inspect(pkg)
    installer = packages.Installer(PlainStore(tmp_path / "store"))
    with pytest.raises(InvalidInput, match=match):
        installer.install(pkg)
    assert list(installer.dir.iterdir()) == [] and list(installer.store.tmp_dir.iterdir()) == []


def test_regression_a_truncated_package_is_invalid_input(tmp_path, hello_package):
    # Was: EOFError: Compressed file ended before the end-of-stream marker was reached (inspect; install's
    # metadata read). Hypothesis' minimal example: the package cut after 127 bytes.
    refused(tmp_path, package_file(tmp_path, hello_package[:127]), "damaged package")


def test_regression_package_metadata_nested_too_deeply_is_not_valid_json(tmp_path):
    # Was: RecursionError from json.loads.
    pkg = package_file(tmp_path, package_bytes(b"[" * 30000 + b"]" * 30000, HELLO_MEMBERS, tarfile.GNU_FORMAT, 2, True))
    refused(tmp_path, pkg, "tupper-package.json is not valid JSON")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["gnu", "pax"])
def test_regression_a_sparse_member_is_refused_not_read_as_endless_zeros(tmp_path, kind):
    # Was: inspect read 2**62 zero bytes (the holes of a sparse file cost nothing in the archive): no end;
    # install would have written them to the store.
    if kind == "gnu":
        big = [("units/big", tarfile.GNUTYPE_SPARSE, 0o644, "", b"", 2**62)]
    else:
        pax = pax_record("GNU.sparse.map", b"0,0") + pax_record("GNU.sparse.size", str(2**62).encode())
        big = [("pax", tarfile.XHDTYPE, 0o644, "", pax, None), ("units/big", tarfile.REGTYPE, 0o644, "", b"", None)]
    pkg = package_file(tmp_path, package_bytes(HELLO_META, HELLO_MEMBERS + big, tarfile.GNU_FORMAT, 2, True))
    refused(tmp_path, pkg, "member 'units/big': sparse file")


@pytest.mark.parametrize("size", [-1, 2**62])
def test_regression_an_extended_header_with_a_negative_or_huge_size_is_refused(tmp_path, size):
    # Was: ValueError: read length must be non-negative (-1); MemoryError (2**62): tarfile reads a GNU
    # long name or a pax header into memory whole.
    members = HELLO_MEMBERS + [("long", tarfile.GNUTYPE_LONGNAME, 0o644, "", b"x", size), ("x", tarfile.REGTYPE, 0o644, "", b"", None)]
    refused(tmp_path, package_file(tmp_path, package_bytes(HELLO_META, members, tarfile.GNU_FORMAT, 2, True)),
            f"(damaged package|cannot extract): a header with size {size}$")


def test_regression_a_bad_number_in_a_pax_header_is_refused(tmp_path):
    # Was: ValueError: invalid literal for int() with base 10: '' (tarfile applying GNU.sparse.realsize).
    members = HELLO_MEMBERS + [("pax", tarfile.XHDTYPE, 0o644, "", pax_record("GNU.sparse.realsize", b""), None),
                               ("x", tarfile.REGTYPE, 0o644, "", b"", None)]
    refused(tmp_path, package_file(tmp_path, package_bytes(HELLO_META, members, tarfile.GNU_FORMAT, 2, True)),
            r"(damaged package|cannot extract): invalid literal for int\(\)")


def test_regression_a_member_name_that_is_not_utf8_is_refused(tmp_path):
    # Was: UnicodeEncodeError in the digest (tarfile reads such a name with surrogate escapes).
    members = HELLO_MEMBERS + [("x\udc80", tarfile.REGTYPE, 0o644, "", b"", None)]
    refused(tmp_path, package_file(tmp_path, package_bytes(HELLO_META, members, tarfile.GNU_FORMAT, 2, True)),
            r"member 'x\\udc80': not a UTF-8 path")


def test_regression_a_symlink_target_with_a_nul_is_refused(tmp_path):
    # Was: ValueError: embedded null byte, from os.symlink during install (a pax linkpath keeps the NUL).
    members = HELLO_MEMBERS + [("pax", tarfile.XHDTYPE, 0o644, "", pax_record("linkpath", b"x\0/y"), None),
                               ("l", tarfile.SYMTYPE, 0o777, "x", b"", None)]
    refused(tmp_path, package_file(tmp_path, package_bytes(HELLO_META, members, tarfile.GNU_FORMAT, 2, True)),
            r"member 'l': symlink to 'x\\x00/y': not a clean path")
