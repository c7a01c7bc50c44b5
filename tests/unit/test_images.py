"""Image definitions (ImageDef.from_file) and the host's apt mirror (host_mirror)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tupper.errors import InvalidInput
from tupper.store import images

REPO = Path(__file__).resolve().parent.parent.parent
GOOD = """\
description = "test image"

[debootstrap]
suite = "bookworm"
variant = "minbase"
packages = ["systemd", "systemd-sysv", "dbus", "python3-minimal"]
mirror = "http://mirror.example/debian"

[build]
steps = ["echo one", "echo two"]
"""


def definition(tmp_path: Path, text: str, name: str = "my-image.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def from_file_error(path: Path) -> str:
    with pytest.raises(InvalidInput) as info:
        images.ImageDef.from_file(path)
    return info.value.message


# ---- ImageDef ------------------------------------------------------------------------------------


def test_good_definition_parses_into_a_value(tmp_path):
    path = definition(tmp_path, GOOD)
    assert images.ImageDef.from_file(path) == images.ImageDef(
        name="my-image",
        suite="bookworm",
        variant="minbase",
        packages=("systemd", "systemd-sysv", "dbus", "python3-minimal"),
        mirror="http://mirror.example/debian",
        steps=("echo one", "echo two"),
        file=str(path),
    )


def test_name_key_overrides_file_stem_and_defaults_apply(tmp_path):
    d = images.ImageDef.from_file(
        definition(tmp_path, 'name = "base"\n[debootstrap]\nsuite = "stable"\npackages = ["systemd", "systemd-sysv", "dbus"]\n')
    )
    assert (d.name, d.variant, d.mirror, d.steps) == ("base", "minbase", None, ())


def test_the_shipped_debian_bookworm_definition_parses():
    d = images.ImageDef.from_file(REPO / "images" / "debian-bookworm.toml")
    assert d.name == "debian-bookworm"
    assert d.suite == "bookworm"
    assert set(images.REQUIRED_PACKAGES) <= set(d.packages)


def test_missing_suite_names_the_key(tmp_path):
    path = definition(tmp_path, GOOD.replace('suite = "bookworm"\n', ""))
    assert from_file_error(path) == f"{path}: debootstrap.suite: missing (required)"


def test_missing_debootstrap_table_reports_the_missing_suite(tmp_path):
    path = definition(tmp_path, 'description = "x"\n')
    assert from_file_error(path) == f"{path}: debootstrap.suite: missing (required)"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('description = "test image"', 'descrption = "x"', "descrption: unknown key (did you mean 'description'?)"),
        ('variant = "minbase"', 'variants = "minbase"', "debootstrap.variants: unknown key (did you mean 'variant'?)"),
        ('steps = ["echo one", "echo two"]', 'step = ["x"]', "build.step: unknown key (did you mean 'steps'?)"),
    ],
)
def test_unknown_key_names_the_table_and_suggests(tmp_path, old, new, expected):
    path = definition(tmp_path, GOOD.replace(old, new))
    assert from_file_error(path).startswith(f"{path}: {expected}")


@pytest.mark.parametrize("missing", ["systemd", "systemd-sysv", "dbus"])
def test_required_package_missing_is_refused(tmp_path, missing):
    packages = [p for p in ("systemd", "systemd-sysv", "dbus") if p != missing]
    text = f'[debootstrap]\nsuite = "bookworm"\npackages = {packages!r}\n'.replace("'", '"')
    path = definition(tmp_path, text)
    assert from_file_error(path).startswith(f"{path}: debootstrap.packages: must include {missing!r}")


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('variant = "minbase"', 'variant = "huge"', "debootstrap.variant: unknown debootstrap variant 'huge'"),
        ('variant = "minbase"', "variant = 1", "debootstrap.variant: expected a string, got an integer (1)"),
        ('suite = "bookworm"', 'suite = "--foreign"', "debootstrap.suite: invalid suite '--foreign'"),
        ('suite = "bookworm"', 'suite = "book worm"', "debootstrap.suite: invalid suite 'book worm'"),
        ('mirror = "http://mirror.example/debian"', 'mirror = "--keyring=/tmp/k"', "debootstrap.mirror: invalid mirror '--keyring=/tmp/k'"),
        ('mirror = "http://mirror.example/debian"', 'mirror = "mirror.example/debian"', "debootstrap.mirror: invalid mirror"),
        ('"python3-minimal"]', '"Bad_Pkg"]', "debootstrap.packages[3]: invalid package name 'Bad_Pkg'"),
        ('"python3-minimal"]', '"a,b"]', "debootstrap.packages[3]: invalid package name 'a,b'"),
        ('"python3-minimal"]', '"vim\\n"]', "debootstrap.packages[3]: invalid package name 'vim\\n'"),
        ('"python3-minimal"]', "3]", "debootstrap.packages[3]: expected a string, got an integer (3)"),
        ('steps = ["echo one", "echo two"]', 'steps = "echo"', "build.steps: expected a list, got a string ('echo')"),
    ],
)
def test_bad_value_names_the_key(tmp_path, old, new, expected):
    path = definition(tmp_path, GOOD.replace(old, new))
    assert from_file_error(path).startswith(f"{path}: {expected}")


@pytest.mark.parametrize("name", ["-x", "a b", "x\n", "x" * 65])
def test_invalid_image_name_is_refused(tmp_path, name):
    quoted = '"' + name.replace("\n", "\\n") + '"'
    path = definition(tmp_path, f"name = {quoted}\n" + GOOD)
    assert from_file_error(path).startswith(f"{path}: name: invalid image name")


def test_missing_definition_file_is_invalid_input(tmp_path):
    assert from_file_error(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: no such image definition"


def test_find_definition_searches_extra_dirs_first(tmp_path, monkeypatch):
    monkeypatch.delenv("TUPPER_IMAGES", raising=False)
    (tmp_path / "debian-bookworm.toml").write_text(GOOD)
    assert images.find_definition("debian-bookworm", [tmp_path]) == tmp_path / "debian-bookworm.toml"
    assert images.find_definition("no-such-image", [tmp_path]) is None


# ---- host_mirror ---------------------------------------------------------------------------------

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://ftp.example.org/debian/
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://ftp.example.org/debian-security
Suites: bookworm-security
Components: main
"""


def sources(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_host_mirror_reads_deb822_sources(tmp_path):
    assert images.host_mirror([sources(tmp_path, "debian.sources", DEB822)]) == "http://ftp.example.org/debian"


def test_host_mirror_skips_security_uris(tmp_path):
    text = "Types: deb\nURIs: http://security.example.org/debian\nSuites: bookworm-security\n\n" + DEB822
    assert images.host_mirror([sources(tmp_path, "debian.sources", text)]) == "http://ftp.example.org/debian"


def test_host_mirror_skips_disabled_and_source_only_deb822_paragraphs(tmp_path):
    text = (
        "Enabled: no\nTypes: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\n\n"
        "Types: deb-src\nURIs: http://src-only.example/debian\nSuites: bookworm\n\n"
        "types: deb deb-src\nuris: http://lower.example/debian\nsuites: bookworm\n"
    )
    assert images.host_mirror([sources(tmp_path, "debian.sources", text)]) == "http://lower.example/debian"


def test_host_mirror_reads_one_line_sources(tmp_path):
    text = (
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb http://security.debian.org/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] https://one.example/debian bookworm main\n"
    )
    assert images.host_mirror([sources(tmp_path, "sources.list", text)]) == "https://one.example/debian"


def test_host_mirror_skips_repositories_that_are_not_debian_mirrors(tmp_path):
    files = [
        sources(tmp_path, "nodesource.sources", "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n"),
        sources(tmp_path, "sdk.list", "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n"),
        sources(tmp_path, "debian.sources", DEB822),
    ]
    assert images.host_mirror(files) == "http://ftp.example.org/debian"


def test_host_mirror_takes_the_first_file_that_names_a_mirror(tmp_path):
    files = [
        sources(tmp_path, "sources.list", "deb http://first.example/debian bookworm main\n"),
        sources(tmp_path, "debian.sources", DEB822),
    ]
    assert images.host_mirror(files) == "http://first.example/debian"


def test_host_mirror_falls_back_to_deb_debian_org(tmp_path):
    files = [tmp_path / "missing.list", sources(tmp_path, "empty.sources", "")]
    assert images.host_mirror(files) == images.DEFAULT_MIRROR == "http://deb.debian.org/debian"


def test_host_mirror_default_search_ignores_backup_files(tmp_path, monkeypatch):
    """apt reads only *.list and *.sources in sources.list.d; neither do we read *.save or *.disabled."""
    etc = tmp_path / "etc/apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "a-old.list.save").write_text("deb http://stale.example/debian bookworm main\n")
    (etc / "sources.list.d" / "b.sources.disabled").write_text("Types: deb\nURIs: http://off.example/debian\n")
    (etc / "sources.list.d" / "c.sources").write_text(DEB822)
    real_path = images.Path
    monkeypatch.setattr(images, "Path", lambda p: real_path(str(tmp_path) + p) if str(p).startswith("/etc/apt") else real_path(p))
    assert images.host_mirror() == "http://ftp.example.org/debian"
