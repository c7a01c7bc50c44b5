"""Spec parsing: files written into tmp_path, parsed, compared; every bad input names the file and the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import write_component

from tupper.errors import InvalidInput
from tupper.model import spec as specmod

HELLO_UNIT = "[Service]\nExecStart=/opt/hello/bin/hello\n"


def component(tmp_path: Path, name: str, units: list[str] | None = None, **kwargs) -> Path:
    units = units if units is not None else [f"{name}.service"]
    return write_component(tmp_path / name, name, {u: HELLO_UNIT for u in units}, **kwargs)


def spec_file(tmp_path: Path, text: str, file_name: str = "spec.toml") -> Path:
    path = tmp_path / file_name
    path.write_text(text)
    return path


def load_error(path: Path, name: str | None = None) -> str:
    with pytest.raises(InvalidInput) as info:
        specmod.load(path, name=name)
    return info.value.message


# ---- good specs ------------------------------------------------------------------------------------


def test_name_defaults_to_file_stem_and_image_to_debian_bookworm(tmp_path):
    component(tmp_path, "hello")
    s = specmod.load(spec_file(tmp_path, '[[components]]\npath = "hello"\n', "web-1.toml"))
    assert s.name == "web-1"
    assert s.image == specmod.DEFAULT_IMAGE == "debian-bookworm"
    assert s.stop_timeout == 10.0
    assert s.start_timeout == 60.0
    assert s.file == str(tmp_path / "web-1.toml")
    assert s.base_dir == tmp_path


def test_name_key_overrides_file_stem(tmp_path):
    s = specmod.load(spec_file(tmp_path, 'name = "from-key"\n'))
    assert s.name == "from-key"


def test_name_option_overrides_name_key(tmp_path):
    s = specmod.load(spec_file(tmp_path, 'name = "from-key"\n'), name="from-option")
    assert s.name == "from-option"


def test_spec_without_components_has_no_units(tmp_path):
    s = specmod.load(spec_file(tmp_path, 'image = "my-image"\n'))
    assert s.image == "my-image"
    assert s.components == ()
    assert s.units == []


def test_components_are_resolved_relative_to_the_spec_and_keep_their_env(tmp_path):
    root_a = component(tmp_path / "services", "alpha")
    component(tmp_path / "services", "beta", requires=["alpha"])
    text = """
[[components]]
path = "services/alpha"
[components.env]
GREETING = "hi there"
_X1 = ""

[[components]]
path = "services/beta"
"""
    s = specmod.load(spec_file(tmp_path, text))
    assert [u.component.name for u in s.components] == ["alpha", "beta"]
    assert s.components[0].env == (("GREETING", "hi there"), ("_X1", ""))
    assert s.components[1].env == ()
    assert s.components[0].component.root == root_a.resolve()
    assert s.components[1].component.requires == ("alpha",)
    assert s.units == ["alpha.service", "beta.service"]
    assert s.component("beta").name == "beta"


def test_absolute_component_path_is_used_as_is(tmp_path):
    root = component(tmp_path / "elsewhere", "hello")
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    s = specmod.load(spec_file(spec_dir, f'[[components]]\npath = "{root}"\n'))
    assert s.components[0].component.root == root.resolve()


def test_stop_and_start_timeouts_are_read_as_seconds(tmp_path):
    s = specmod.load(spec_file(tmp_path, "[stop]\ntimeout = 3\n[start]\ntimeout = 2.5\n"))
    assert s.stop_timeout == 3.0
    assert s.start_timeout == 2.5
    assert isinstance(s.stop_timeout, float)


def test_order_by_requires_puts_required_components_first(tmp_path):
    component(tmp_path, "db")
    component(tmp_path, "app", requires=["db", "cache"])
    component(tmp_path, "cache", requires=["db"])
    text = "".join(f'[[components]]\npath = "{n}"\n' for n in ("app", "cache", "db"))
    s = specmod.load(spec_file(tmp_path, text))
    ordered = specmod.order_by_requires([u.component for u in s.components], s.file)
    assert [c.name for c in ordered] == ["db", "cache", "app"]


def test_from_text_needs_a_name_key_or_option(tmp_path):
    assert specmod.from_text('name = "x"\n', tmp_path).name == "x"
    assert specmod.from_text("", tmp_path, name="y").name == "y"
    with pytest.raises(InvalidInput, match=r"^<spec>: name: missing"):
        specmod.from_text("", tmp_path)


# ---- bad specs: each error names the file and the key path ------------------------------------------


def test_malformed_toml_names_the_file(tmp_path):
    msg = load_error(spec_file(tmp_path, 'name = "x\n'))
    assert msg.startswith(f"{tmp_path / 'spec.toml'}: malformed TOML:")
    assert "line 1" in msg


def test_missing_spec_file_is_invalid_input(tmp_path):
    assert load_error(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: no such spec file"


def test_spec_that_is_not_utf8_is_invalid_input(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_bytes(b'name = "\xff"\n')
    assert load_error(path).endswith("spec.toml: not valid UTF-8")


def test_unknown_top_level_key_suggests_near_match(tmp_path):
    msg = load_error(spec_file(tmp_path, 'imgae = "debian-bookworm"\n'))
    assert re.search(r"spec\.toml: imgae: unknown key \(did you mean 'image'\?\)", msg)


def test_unknown_key_in_component_entry_names_the_entry(tmp_path):
    component(tmp_path, "hello")
    msg = load_error(spec_file(tmp_path, '[[components]]\npath = "hello"\n\n[[components]]\npath = "hello"\nevn = {}\n'))
    assert "spec.toml: components[1].evn: unknown key (did you mean 'env'?)" in msg


def test_misspelt_required_key_is_reported_with_the_near_miss(tmp_path):
    msg = load_error(spec_file(tmp_path, '[[components]]\npaht = "hello"\n'))
    assert msg == f"{tmp_path / 'spec.toml'}: components[0].path: missing (required); there is an unknown key 'paht' (did you mean 'path'?)"


def test_unknown_key_in_stop_table_names_the_table(tmp_path):
    msg = load_error(spec_file(tmp_path, "[stop]\ntimout = 3\n"))
    assert "spec.toml: stop.timout: unknown key (did you mean 'timeout'?)" in msg


def test_unknown_key_far_from_any_known_key_has_no_suggestion(tmp_path):
    msg = load_error(spec_file(tmp_path, "zzzzzz = 1\n"))
    assert "spec.toml: zzzzzz: unknown key;" in msg
    assert "did you mean" not in msg


@pytest.mark.parametrize(
    ("text", "where", "expected"),
    [
        ("name = 5\n", "name", "expected a string, got an integer (5)"),
        ('image = ["x"]\n', "image", "expected a string, got a list"),
        ('[stop]\ntimeout = "10"\n', "stop.timeout", "expected an integer or a number, got a string ('10')"),
        ("[stop]\ntimeout = true\n", "stop.timeout", "expected an integer or a number, got a boolean (True)"),
        ("[start]\ntimeout = false\n", "start.timeout", "expected an integer or a number, got a boolean (False)"),
        ("stop = 3\n", "stop", "expected a table, got an integer (3)"),
        ('components = "hello"\n', "components", "expected a list, got a string ('hello')"),
        ("components = [1]\n", "components[0]", "expected a table, got an integer (1)"),
        ("[[components]]\npath = 7\n", "components[0].path", "expected a string, got an integer (7)"),
        ("[[components]]\n", "components[0].path", "missing (required)"),
    ],
)
def test_wrong_type_names_key_and_both_types(tmp_path, text, where, expected):
    msg = load_error(spec_file(tmp_path, text))
    assert msg == f"{tmp_path / 'spec.toml'}: {where}: {expected}"


def test_missing_component_dir_names_the_entry(tmp_path):
    component(tmp_path, "hello")
    msg = load_error(spec_file(tmp_path, '[[components]]\npath = "hello"\n[[components]]\npath = "gone"\n'))
    assert msg == f"{tmp_path / 'spec.toml'}: components[1].path: no such directory: {tmp_path / 'gone'}"


def test_component_dir_without_manifest_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    msg = load_error(spec_file(tmp_path, '[[components]]\npath = "empty"\n'))
    assert msg == f"{tmp_path / 'spec.toml'}: components[0].path: {tmp_path / 'empty'} has no component.toml"


def test_missing_unit_file_names_manifest_and_unit_key(tmp_path):
    root = component(tmp_path, "hello", units=["hello.service", "other.service"])
    (root / "units" / "other.service").unlink()
    msg = load_error(spec_file(tmp_path, '[[components]]\npath = "hello"\n'))
    assert msg == f"{root / 'component.toml'}: units[1]: missing unit file units/other.service"


def test_two_components_providing_the_same_unit_are_refused(tmp_path):
    component(tmp_path, "one", units=["shared.service"])
    component(tmp_path, "two", units=["own.service", "shared.service"])
    msg = load_error(spec_file(tmp_path, '[[components]]\npath = "one"\n[[components]]\npath = "two"\n'))
    assert msg.endswith("spec.toml: components[1]: unit shared.service is provided by both 'one' and 'two'")


def test_component_listed_twice_is_refused(tmp_path):
    component(tmp_path, "hello")
    (tmp_path / "copy").symlink_to(tmp_path / "hello")
    msg = load_error(spec_file(tmp_path, '[[components]]\npath = "hello"\n[[components]]\npath = "copy"\n'))
    assert msg.endswith("spec.toml: components[1]: component 'hello' is already listed as components[0]")


def test_two_component_dirs_with_the_same_name_are_refused(tmp_path):
    write_component(tmp_path / "a", "same", {"a.service": HELLO_UNIT})
    write_component(tmp_path / "b", "same", {"b.service": HELLO_UNIT})
    msg = load_error(spec_file(tmp_path, '[[components]]\npath = "a"\n[[components]]\npath = "b"\n'))
    assert msg.endswith("spec.toml: components[1]: component 'same' is already listed as components[0]")


def test_tupper_target_is_a_reserved_unit_name(tmp_path):
    component(tmp_path, "hello", units=["tupper.target"])
    msg = load_error(spec_file(tmp_path, '[[components]]\npath = "hello"\n'))
    assert msg.endswith("spec.toml: components[0]: unit name tupper.target is reserved")


def test_two_components_with_the_same_mount_are_refused(tmp_path):
    component(tmp_path, "one", extra='mount = "/srv/app"\n')
    component(tmp_path, "two", extra='mount = "/srv/app/"\n')
    msg = load_error(spec_file(tmp_path, '[[components]]\npath = "one"\n[[components]]\npath = "two"\n'))
    assert msg.endswith("spec.toml: components[1]: mount /srv/app is also used by 'one'")


@pytest.mark.parametrize(("first", "second"), [("/srv/app", "/srv/app/plugins"), ("/srv/app/plugins", "/srv/app")])
def test_mount_inside_another_components_mount_is_refused(tmp_path, first, second):
    component(tmp_path, "one", extra=f'mount = "{first}"\n')
    component(tmp_path, "two", extra=f'mount = "{second}"\n')
    msg = load_error(spec_file(tmp_path, '[[components]]\npath = "one"\n[[components]]\npath = "two"\n'))
    assert msg.endswith(f"spec.toml: components[1]: mount {second} overlaps mount {first} of 'one'")


def test_sibling_mounts_with_a_common_prefix_are_fine(tmp_path):
    component(tmp_path, "one", extra='mount = "/srv/app"\n')
    component(tmp_path, "two", extra='mount = "/srv/app2"\n')
    s = specmod.load(spec_file(tmp_path, '[[components]]\npath = "one"\n[[components]]\npath = "two"\n'))
    assert [u.component.mount for u in s.components] == ["/srv/app", "/srv/app2"]


def test_requires_naming_a_component_not_in_the_spec_names_the_manifest(tmp_path):
    root = component(tmp_path, "app", requires=["db"])
    msg = load_error(spec_file(tmp_path, '[[components]]\npath = "app"\n'))
    assert msg == f"{root / 'component.toml'}: requires[0]: no component 'db' in {tmp_path / 'spec.toml'}"


def test_requires_cycle_is_refused_and_shown(tmp_path):
    component(tmp_path, "a", requires=["b"])
    component(tmp_path, "b", requires=["c"])
    component(tmp_path, "c", requires=["a"])
    msg = load_error(spec_file(tmp_path, "".join(f'[[components]]\npath = "{n}"\n' for n in "abc")))
    assert msg == f"{tmp_path / 'spec.toml'}: components: requires cycle: a -> b -> c -> a"


def test_requires_cycle_not_through_the_first_component_shows_only_the_cycle(tmp_path):
    component(tmp_path, "top", requires=["x"])
    component(tmp_path, "x", requires=["y"])
    component(tmp_path, "y", requires=["x"])
    msg = load_error(spec_file(tmp_path, "".join(f'[[components]]\npath = "{n}"\n' for n in ("top", "x", "y"))))
    assert msg.endswith("spec.toml: components: requires cycle: x -> y -> x")


@pytest.mark.parametrize(
    "bad",
    ["has space", "semi;colon", "slash/name", "_leading", "trailing_", "-leading", "trailing-", ".dot", "a..b", "a.-b", "a-.b",
     "ünïcode", "x" * 65, "line\n"],
)
def test_invalid_container_name_in_spec_is_refused(tmp_path, bad):
    path = spec_file(tmp_path, f"name = {_toml_str(bad)}\n")
    msg = load_error(path)
    assert msg.startswith(f"{path}: name: invalid container name {bad!r}")


@pytest.mark.parametrize("good", ["a", "A1", "web-1", "web.example", "t--x", "9", "x" * 64, "my_app", "a_b.c_d"])
def test_valid_container_names_are_accepted(tmp_path, good):
    assert specmod.load(spec_file(tmp_path, f'name = "{good}"\n')).name == good


def test_invalid_name_option_is_blamed_on_the_option(tmp_path):
    msg = load_error(spec_file(tmp_path, 'name = "ok"\n'), name="bad name")
    assert msg.startswith("--name: invalid container name 'bad name'")


def test_invalid_name_from_the_file_stem_says_where_it_came_from(tmp_path):
    path = spec_file(tmp_path, "", "my spec.toml")
    with pytest.raises(InvalidInput) as info:
        specmod.load(path)
    assert info.value.message.startswith(f"{path}: name (from the file name): invalid container name 'my spec'")
    assert "--name" in info.value.hint
    # ... and --name makes such a file usable.
    assert specmod.load(path, name="my-spec").name == "my-spec"


def test_underscore_file_stem_is_a_valid_name(tmp_path):
    assert specmod.load(spec_file(tmp_path, "", "my_spec.toml")).name == "my_spec"


@pytest.mark.parametrize(("bad", "shown"), [('"has space"', "'has space'"), ('"-x"', "'-x'"), ('"a/b"', "'a/b'")])
def test_invalid_image_name_is_refused(tmp_path, bad, shown):
    msg = load_error(spec_file(tmp_path, f"image = {bad}\n"))
    assert msg.endswith(f"spec.toml: image: invalid image name {shown}")


@pytest.mark.parametrize(
    ("env", "where", "expected"),
    [
        ("N = 5", "N", "expected a string, got an integer (5)"),
        ("B = true", "B", "expected a string, got a boolean (True)"),
        ('L = ["a"]', "L", "expected a string, got a list"),
        ('"1BAD" = "x"', "1BAD", "invalid environment variable name"),
        ('"A-B" = "x"', "A-B", "invalid environment variable name"),
        ('"A\\n" = "x"', "A\n", "invalid environment variable name"),
        ('NUL = "a\\u0000b"', "NUL", "an environment value cannot contain a NUL character"),
    ],
)
def test_bad_env_entry_names_the_variable(tmp_path, env, where, expected):
    component(tmp_path, "hello")
    msg = load_error(spec_file(tmp_path, f'[[components]]\npath = "hello"\n[components.env]\n{env}\n'))
    assert msg == f"{tmp_path / 'spec.toml'}: components[0].env.{where}: {expected}"


@pytest.mark.parametrize("value", ["-1", "0", "0.0", "nan", "inf", "86401", "1e400"])
@pytest.mark.parametrize("table", ["stop", "start"])
def test_timeout_must_be_positive_and_finite(tmp_path, table, value):
    msg = load_error(spec_file(tmp_path, f"[{table}]\ntimeout = {value}\n"))
    assert re.search(rf"spec\.toml: {table}\.timeout: must be a positive number of seconds \(at most 86400\), got ", msg)


def test_component_error_inside_manifest_names_the_manifest_file(tmp_path):
    root = write_component(tmp_path / "hello", "hello", {"hello.service": HELLO_UNIT}, extra="colour = 1\n")
    msg = load_error(spec_file(tmp_path, '[[components]]\npath = "hello"\n'))
    assert msg.startswith(f"{root / 'component.toml'}: colour: unknown key")


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def test_labels_are_kept_in_order_and_bad_keys_and_values_name_the_key(tmp_path):
    component(tmp_path, "hello")
    s = specmod.load(spec_file(tmp_path, 'name = "w"\n[labels]\nteam = "payments"\n"app.kubernetes.io/part-of" = "shop"\n'
                                         '[[components]]\npath = "hello"\n'))
    assert s.labels == (("team", "payments"), ("app.kubernetes.io/part-of", "shop"))
    for body, key in (('Team = "x"', "labels.Team"), ('"-x" = "y"', "labels.-x"), ('team = 3', "labels.team"),
                      ('team = "a\\nb"', "labels.team")):
        message = load_error(spec_file(tmp_path, f'name = "w"\n[labels]\n{body}\n[[components]]\npath = "hello"\n'))
        assert f"spec.toml: {key}:" in message, message


# ---- what a spec needs in the store (tupper fetch) -------------------------------------------------


def test_needs_names_the_image_and_the_installed_components_only(tmp_path):
    c = component(tmp_path, "local")
    path = spec_file(tmp_path, f'image = "web-layer"\n[[components]]\npath = "{c}"\n[[components]]\nname = "db"\nversion = "1.2.0"\n'
                               '[[components]]\nname = "cache"\n')
    image, needed = specmod.needs(path)
    assert image == "web-layer"
    assert [(n.name, n.version) for n in needed] == [("db", "1.2.0"), ("cache", None)]
    assert needed[0].where == f"{path}: components[1].name"
    assert specmod.needs(spec_file(tmp_path, "", "bare.toml")) == (specmod.DEFAULT_IMAGE, [])


@pytest.mark.parametrize(("text", "where"), [
    ('image = "../x"\n', "spec.toml: image: invalid image name"),
    ('[[components]]\nname = "Db!"\n', "spec.toml: components[0].name: invalid component name"),
    ('[[components]]\nname = "db"\nversion = "1 2"\n', "spec.toml: components[0].version: invalid version"),
])
def test_needs_refuses_what_load_would(tmp_path, text, where):
    with pytest.raises(InvalidInput) as info:
        specmod.needs(spec_file(tmp_path, text))
    assert where in info.value.message


def test_a_component_set_is_the_spec_of_installed_components_on_an_image(tmp_path):
    text = specmod.component_set("web-layer", ["web=1.2.0", "db"], "image", "components")
    dirs = {"web": component(tmp_path, "web"), "db": component(tmp_path, "db")}
    asked = []

    def resolve(name, version, where):
        asked.append((name, version))
        return dirs[name]

    spec = specmod.from_text(text, tmp_path, "<set>", name="svc", resolve=resolve)
    assert spec.image == "web-layer" and [u.component.name for u in spec.components] == ["web", "db"]
    assert asked == [("web", "1.2.0"), ("db", None)]
    for tokens, message in ((["web="], "'web=' is not NAME or NAME=VERSION"), (["db", "db"], "db is named twice"), ([], "no component named")):
        with pytest.raises(InvalidInput, match=message):
            specmod.component_set("debian-bookworm", tokens, "image", "components")
