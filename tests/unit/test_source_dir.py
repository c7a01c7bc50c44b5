"""A source directory's packages as tupper.store.source reads them: which files are a component's, which
version is the newest; a source that is not an absolute path or not there. (Fetching into a real store:
tests/integration/test_fetch.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_component

from tupper.errors import InvalidInput, NotFound
from tupper.model import components as comp
from tupper.store import packages
from tupper.store.source import Missing, Source


def package(tmp_path: Path, out: Path, name: str, version: str) -> Path:
    d = write_component(tmp_path / f"{name}-{version}-src", name, {f"{name}.service": "[Service]\nExecStart=/bin/true\n"})
    manifest = d / "component.toml"
    manifest.write_text(manifest.read_text().replace('version = "1.0.0"', f'version = "{version}"'))
    pkg, _ = packages.build(d, comp.load(d, str(d)), out)
    return pkg


def test_a_components_packages_are_told_from_another_whose_name_starts_alike(tmp_path):
    out = tmp_path / "source"
    out.mkdir()
    for name, version in (("web", "1.9.0"), ("web", "1.10.0"), ("web", "1.2.0"), ("web-cache", "2.0.0")):
        package(tmp_path, out, name, version)
    (out / "web-notes.txt").write_text("not a package")
    source = Source(store=None, directory=out)  # type: ignore[arg-type]  # packages_of reads the directory only
    offered = source.packages_of("web")
    assert sorted(offered) == ["1.10.0", "1.2.0", "1.9.0"]  # web-cache-2.0.0.tupper is web-cache's
    assert max(offered, key=packages.version_key) == "1.10.0"
    assert sorted(source.packages_of("web-cache")) == ["2.0.0"]
    assert source.packages_of("db") == {}


def test_a_source_must_be_an_absolute_path_that_is_there(tmp_path):
    with pytest.raises(InvalidInput, match="not an absolute path"):
        Source(store=None, directory=Path("srv/tupper"))  # type: ignore[arg-type]
    with pytest.raises(Missing, match="no such directory on this host") as info:
        Source(store=None, directory=tmp_path / "absent")  # type: ignore[arg-type]
    assert isinstance(info.value, NotFound) and info.value.exit_code == 2  # the agent: not installed on this node
