"""Component manifests: parsing into a frozen value, and refusing anything that leaves the component directory."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import attrs
import pytest
from helpers import write_component

from tupper.errors import InvalidInput
from tupper.model import components

UNIT = "[Service]\nExecStart=/opt/hello/bin/hello\n"
WHERE = "spec.toml: components[0].path"


def manifest(directory: Path, text: str, units: dict[str, str] | None = None) -> Path:
    """A component directory with exactly this manifest text."""
    (directory / "units").mkdir(parents=True, exist_ok=True)
    (directory / "component.toml").write_text(text)
    for unit, body in (units or {}).items():
        (directory / "units" / unit).write_text(body)
    return directory


def hello(tmp_path: Path, **kwargs) -> Path:
    return write_component(tmp_path / "hello", "hello", {"hello.service": UNIT}, files={"bin/hello": "#!/bin/sh\n"}, **kwargs)


def load_error(directory: Path) -> str:
    with pytest.raises(InvalidInput) as info:
        components.load(directory, WHERE)
    return info.value.message


# ---- a good component ------------------------------------------------------------------------------


def test_good_component_loads_into_a_frozen_value(tmp_path):
    root = manifest(
        tmp_path / "web",
        'name = "web"\nversion = "2.1.0+deb1"\ndescription = "a web server"\n'
        'units = ["web.service", "web.socket"]\nrequires = ["db"]\nmount = "/srv/web/"\n',
        {"web.service": UNIT, "web.socket": "[Socket]\nListenStream=80\n"},
    )
    c = components.load(root, WHERE)
    assert c == components.Component(
        name="web",
        version="2.1.0+deb1",
        description="a web server",
        units=("web.service", "web.socket"),
        requires=("db",),
        mount="/srv/web",
        root=root.resolve(),
        manifest_file=str(root / "component.toml"),
    )
    assert c.service_units == ("web.service",)
    assert c.unit_path("web.socket") == root.resolve() / "units" / "web.socket"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        c.name = "other"  # type: ignore[misc]


def test_mount_defaults_to_opt_name_and_description_to_empty(tmp_path):
    c = components.load(hello(tmp_path), WHERE)
    assert c.mount == "/opt/hello"
    assert c.description == ""
    assert c.requires == ()


def test_component_reached_through_a_symlinked_dir_resolves_its_root(tmp_path):
    root = hello(tmp_path)
    (tmp_path / "link").symlink_to(root)
    assert components.load(tmp_path / "link", WHERE).root == root.resolve()


def test_symlinks_inside_the_component_are_allowed(tmp_path):
    root = hello(tmp_path)
    (root / "share").mkdir()
    (root / "share" / "hello").symlink_to("../bin/hello")
    (root / "self").symlink_to(".")
    (root / "units" / "alias.service").symlink_to("hello.service")
    (root / "component.toml").write_text('name = "hello"\nversion = "1"\nunits = ["hello.service", "alias.service"]\n')
    assert components.load(root, WHERE).units == ("hello.service", "alias.service")


# ---- the directory itself --------------------------------------------------------------------------


def test_missing_directory_names_the_referring_key(tmp_path):
    assert load_error(tmp_path / "nope") == f"{WHERE}: no such directory: {tmp_path / 'nope'}"


def test_directory_without_manifest_names_the_referring_key(tmp_path):
    (tmp_path / "empty").mkdir()
    assert load_error(tmp_path / "empty") == f"{WHERE}: {tmp_path / 'empty'} has no component.toml"


def test_malformed_manifest_names_the_manifest(tmp_path):
    root = manifest(tmp_path / "c", 'name = "c\n')
    assert load_error(root).startswith(f"{root / 'component.toml'}: malformed TOML:")


# ---- manifest keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('version = "1"\nunits = ["a.service"]\n', "name: missing (required)"),
        ('name = "c"\nunits = ["a.service"]\n', "version: missing (required)"),
        ('name = "c"\nversion = "1"\n', "units: a component needs at least one unit"),
        ('name = "c"\nversion = "1"\nunits = []\n', "units: a component needs at least one unit"),
        ('name = "c"\nversion = 1\nunits = ["a.service"]\n', "version: expected a string, got an integer (1)"),
        ('name = "c"\nversion = "1"\nunits = "a.service"\n', "units: expected a list, got a string ('a.service')"),
        ('name = "c"\nversion = "1"\nunits = ["a.service", 2]\n', "units[1]: expected a string, got an integer (2)"),
        ('name = "c"\nversion = "1"\nunits = ["a.service"]\nrequires = [true]\n', "requires[0]: expected a string, got a boolean (True)"),
        ('name = "C"\nversion = "1"\nunits = ["a.service"]\n', "name: invalid component name 'C'"),
        ('name = "c\\n"\nversion = "1"\nunits = ["a.service"]\n', "name: invalid component name 'c\\n'"),
        ('name = "c"\nversion = "1 0"\nunits = ["a.service"]\n', "version: invalid version '1 0'"),
        ('name = "c"\nversion = "1"\nunits = ["a.service"]\nrequires = ["c"]\n', "requires[0]: a component cannot require itself"),
        ('name = "c"\nversion = "1"\nunits = ["a.service"]\nrequires = ["d", "d"]\n', "requires[1]: d is listed twice"),
        ('name = "c"\nversion = "1"\nunits = ["a.service", "a.service"]\n', "units[1]: a.service is listed twice"),
        ('name = "c"\nversion = "1"\nunits = ["a.service"]\nunit = "b"\n', "unit: unknown key (did you mean 'units'?)"),
    ],
)
def test_bad_manifest_key_names_manifest_and_key(tmp_path, text, expected):
    root = manifest(tmp_path / "c", text, {"a.service": UNIT})
    assert load_error(root).startswith(f"{root / 'component.toml'}: {expected}")


# ---- unit names: file names in units/, never paths ---------------------------------------------------


@pytest.mark.parametrize(
    "unit",
    ["../evil.service", "sub/x.service", "/etc/passwd", "/etc/systemd/system/x.service", "..", ".", "x.conf", "x.service\n", "x y.service"],
)
def test_unit_that_is_not_a_plain_file_name_is_refused(tmp_path, unit):
    root = manifest(tmp_path / "c", f'name = "c"\nversion = "1"\nunits = [{_toml_str(unit)}]\n')
    assert load_error(root).startswith(f"{root / 'component.toml'}: units[0]: {unit!r} is not a unit file name")


def test_unit_file_symlinked_outside_the_component_is_refused(tmp_path):
    outside = tmp_path / "outside.service"
    outside.write_text(UNIT)
    root = manifest(tmp_path / "c", 'name = "c"\nversion = "1"\nunits = ["x.service"]\n')
    (root / "units" / "x.service").symlink_to(os.path.relpath(outside, root / "units"))
    assert load_error(root) == f"{root / 'component.toml'}: units/x.service: symlink to ../../outside.service leaves the component directory"


def test_unit_path_check_refuses_a_path_resolving_outside(tmp_path):
    """The unit-file guard on its own (check_tree normally fires first)."""
    (tmp_path / "outside.service").write_text(UNIT)
    (tmp_path / "c" / "units").mkdir(parents=True)
    (tmp_path / "c" / "units" / "x.service").symlink_to("../../outside.service")
    with pytest.raises(InvalidInput, match=r"^m\.toml: units\[0\]: units/x\.service leaves the component directory$"):
        components.inside(tmp_path / "c", tmp_path / "c" / "units" / "x.service", "m.toml: units[0]")
    assert components.inside(tmp_path / "c", tmp_path / "c" / "units", "w") == tmp_path / "c" / "units"


def test_units_dir_symlinked_outside_the_component_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.service").write_text(UNIT)
    root = tmp_path / "c"
    root.mkdir()
    (root / "component.toml").write_text('name = "c"\nversion = "1"\nunits = ["x.service"]\n')
    (root / "units").symlink_to(elsewhere)
    msg = load_error(root)
    assert msg.startswith(f"{root / 'component.toml'}: units")
    assert "leaves the component directory" in msg or "absolute symlink" in msg


def test_template_unit_is_refused_with_the_instance_to_list_instead(tmp_path):
    root = manifest(tmp_path / "c", 'name = "c"\nversion = "1"\nunits = ["worker@.service"]\n', {"worker@.service": UNIT})
    assert load_error(root) == (
        f"{root / 'component.toml'}: units[0]: worker@.service is a template unit; "
        "list an instance instead (a unit file named like worker@main.service)"
    )


def test_instance_unit_is_accepted(tmp_path):
    root = manifest(tmp_path / "c", 'name = "c"\nversion = "1"\nunits = ["worker@main.service"]\n', {"worker@main.service": UNIT})
    assert components.load(root, WHERE).units == ("worker@main.service",)


def test_unit_file_that_is_not_utf8_is_refused(tmp_path):
    root = manifest(tmp_path / "c", 'name = "c"\nversion = "1"\nunits = ["x.service"]\n')
    (root / "units" / "x.service").write_bytes(b"[Service]\nExecStart=/bin/\xff\n")
    assert load_error(root) == f"{root / 'component.toml'}: units[0]: units/x.service is not valid UTF-8"


def test_unit_that_is_a_directory_is_missing(tmp_path):
    root = manifest(tmp_path / "c", 'name = "c"\nversion = "1"\nunits = ["x.service"]\n')
    (root / "units" / "x.service").mkdir()
    assert load_error(root) == f"{root / 'component.toml'}: units[0]: missing unit file units/x.service"


# ---- symlinks anywhere in the tree -----------------------------------------------------------------


@pytest.mark.parametrize("where", ["link", "bin/link", "deep/er/link"])
def test_absolute_symlink_anywhere_in_the_tree_is_refused(tmp_path, where):
    root = hello(tmp_path)
    (root / where).parent.mkdir(parents=True, exist_ok=True)
    (root / where).symlink_to("/etc/shadow")
    assert load_error(root) == (
        f"{root / 'component.toml'}: {where}: absolute symlink to /etc/shadow (symlinks must stay inside the component)"
    )


def test_absolute_symlink_into_the_component_itself_is_refused(tmp_path):
    """Absolute targets mean something else inside the container, so even 'inside' ones are refused."""
    root = hello(tmp_path)
    (root / "link").symlink_to(root / "bin" / "hello")
    assert "link: absolute symlink to" in load_error(root)


@pytest.mark.parametrize(("where", "target"), [("up", ".."), ("bin/up", "../../x"), ("a/b/c", "../../../etc"), ("dangling", "../nope/x")])
def test_relative_symlink_climbing_out_is_refused(tmp_path, where, target):
    root = hello(tmp_path)
    (root / where).parent.mkdir(parents=True, exist_ok=True)
    (root / where).symlink_to(target)
    assert load_error(root) == f"{root / 'component.toml'}: {where}: symlink to {target} leaves the component directory"


def test_relative_symlink_climbing_out_through_another_symlink_is_refused(tmp_path):
    """`a/up -> ..` is the root (inside); `x -> a/up/..` is lexically `a` but really the root's parent."""
    root = hello(tmp_path)
    (root / "a").mkdir()
    (root / "a" / "up").symlink_to("..")
    (root / "x").symlink_to("a/up/..")
    assert load_error(root) == f"{root / 'component.toml'}: x: symlink to a/up/.. leaves the component directory"


def test_symlinked_directory_pointing_out_is_refused(tmp_path):
    (tmp_path / "secret").mkdir()
    root = hello(tmp_path)
    (root / "data").symlink_to("../secret")
    assert load_error(root) == f"{root / 'component.toml'}: data: symlink to ../secret leaves the component directory"


def test_manifest_symlinked_out_is_refused_before_it_is_read(tmp_path):
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text("this is not toml at all [[[\n")
    root = tmp_path / "c"
    (root / "units").mkdir(parents=True)
    (root / "component.toml").symlink_to("../elsewhere.toml")
    assert load_error(root) == f"{root / 'component.toml'}: component.toml: symlink to ../elsewhere.toml leaves the component directory"


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_device_node_in_the_tree_is_refused(tmp_path):
    root = hello(tmp_path)
    os.mknod(root / "bin" / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    assert load_error(root) == f"{root / 'component.toml'}: bin/null: device node (a component holds files, directories and symlinks)"


# ---- mount -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mount", "problem"),
    [
        ("opt/hello", "must be an absolute path in the container"),
        ("", "must be an absolute path in the container"),
        ("/opt/../etc", "must not contain '..'"),
        ("/opt/x/..", "must not contain '..'"),
        ("//opt/x", "is not a clean path"),
        ("/opt/x\n", "is not a clean path"),
        ("/", "is a system directory"),
        ("/etc", "is a system directory"),
        ("/etc/", "is a system directory"),
        ("/usr", "is a system directory"),
        ("/var", "is a system directory"),
        ("/run", "is a system directory"),
        ("/proc/sys", "is a system directory"),
        ("/sys/fs/cgroup", "is a system directory"),
        ("/dev/shm/x", "is a system directory"),
        ("/etc/systemd/system", "is a system directory"),
        ("/usr/lib/systemd/system", "is a system directory"),
        ("/run/app", "is a system directory"),
        ("/var/run/app", "is a system directory"),
        ("/var/lock/app", "is a system directory"),
    ],
)
def test_bad_mount_is_refused(tmp_path, mount, problem):
    root = hello(tmp_path, extra=f"mount = {_toml_str(mount)}\n")
    msg = load_error(root)
    assert msg.startswith(f"{root / 'component.toml'}: mount: {mount!r} ")
    assert problem in msg


@pytest.mark.parametrize(("mount", "stored"), [("/srv/hello", "/srv/hello"), ("/opt/a/./b/", "/opt/a/b"), ("/usr/local/hello", "/usr/local/hello"), ("/etc/hello", "/etc/hello")])
def test_good_mount_is_normalised(tmp_path, mount, stored):
    assert components.load(hello(tmp_path, extra=f'mount = "{mount}"\n'), WHERE).mount == stored


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
