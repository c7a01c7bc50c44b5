"""`tupper cp`'s copying (tupper.container.rootcopy) on a directory standing in for a container's root:
both directions, files and trees, symlinks copied as symlinks, and nothing ever read or written
through a symlink that points out of the root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tupper.container.inroot import Root
from tupper.container.rootcopy import copy_in, copy_out
from tupper.errors import InvalidInput


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "rootfs"
    (r / "etc").mkdir(parents=True)
    (r / "etc" / "motd").write_text("inside\n")
    (r / "srv" / "site" / "css").mkdir(parents=True)
    (r / "srv" / "site" / "index.html").write_text("<h1>hi</h1>")
    (r / "srv" / "site" / "css" / "a.css").write_text("body{}")
    (r / "srv" / "site" / "up").symlink_to("../..")
    return r


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    o = tmp_path / "host"
    o.mkdir()
    (o / "secret").write_text("host secret\n")
    return o


def test_a_file_comes_out_under_its_name_in_a_directory_or_as_the_given_name(root, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    with Root(root) as r:
        copy_out(r, "/etc/motd", str(dest), "c:/etc/motd")
        copy_out(r, "/etc/motd", str(dest / "renamed"), "c:/etc/motd")
    assert (dest / "motd").read_text() == (dest / "renamed").read_text() == "inside\n"


def test_a_tree_goes_in_and_out_with_its_symlinks_as_symlinks(root, tmp_path):
    with Root(root) as r:
        result = copy_out(r, "/srv/site", str(tmp_path / "site"), "c:/srv/site")
    assert (result.files, result.directories, result.symlinks) == (2, 2, 1)
    assert (tmp_path / "site" / "css" / "a.css").read_text() == "body{}"
    assert os.readlink(tmp_path / "site" / "up") == "../.."
    (tmp_path / "site" / "new.txt").write_text("new")
    os.chmod(tmp_path / "site" / "new.txt", 0o640)
    (root / "opt").mkdir()
    with Root(root) as r:
        copy_in(str(tmp_path / "site"), r, "/opt", "c:/opt")
    assert (root / "opt" / "site" / "new.txt").read_text() == "new"
    assert (root / "opt" / "site" / "new.txt").stat().st_mode & 0o777 == 0o640
    assert os.readlink(root / "opt" / "site" / "up") == "../.."


@pytest.mark.parametrize("link", ["../../host", "../../../../../../../..{outside}", "{outside}"])
def test_a_symlink_out_of_the_root_resolves_inside_it_and_never_reaches_the_host(root, outside, tmp_path, link):
    (root / "escape").symlink_to(link.format(outside=outside))
    with Root(root) as r:
        with pytest.raises(InvalidInput, match="no such file or directory in the container"):
            copy_out(r, "/escape/secret", str(tmp_path / "stolen"), "c:/escape/secret")
        assert not (tmp_path / "stolen").exists()
        planted = tmp_path / "planted"
        planted.write_text("from the host\n")
        try:
            copy_in(str(planted), r, "/escape/secret", "c:/escape/secret")
        except InvalidInput:
            pass  # where the link resolves to nothing inside the root, there is no directory to write into
    assert (outside / "secret").read_text() == "host secret\n"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_a_symlink_at_the_end_is_copied_not_followed_unless_the_path_ends_with_a_slash(root, tmp_path):
    (root / "web").symlink_to("/srv/site")
    with Root(root) as r:
        copy_out(r, "/web", str(tmp_path / "link"), "c:/web")
        copy_out(r, "/web/", str(tmp_path / "dir"), "c:/web/")
    assert os.readlink(tmp_path / "link") == "/srv/site"
    assert (tmp_path / "dir" / "index.html").read_text() == "<h1>hi</h1>"


def test_refusals_name_the_path(root, tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    (root / "etc" / "link").symlink_to("motd")
    with Root(root) as r:
        for call, says in (
            (lambda: copy_out(r, "/nope", str(tmp_path), "c:/nope"), "c:/nope: no such file or directory in the container"),
            (lambda: copy_out(r, "etc/motd", str(tmp_path), "c:etc/motd"), "must be an absolute path"),
            (lambda: copy_in(str(tmp_path / "afile"), r, "/../x", "c:/../x"), "must not contain '..'"),
            (lambda: copy_in(str(tmp_path / "adir"), r, "/etc/motd", "c:/etc/motd"), "c:/etc/motd: exists as a file"),
            (lambda: copy_in(str(tmp_path / "afile"), r, "/etc/link", "c:/etc/link"), "c:/etc/link: exists as a symlink"),
            (lambda: copy_in(str(tmp_path / "missing"), r, "/etc", "c:/etc"), "missing: no such file or directory"),
            (lambda: copy_in(str(tmp_path / "afile"), r, "/no/such/x", "c:/no/such/x"), "no such directory /no/such in the container"),
            (lambda: copy_out(r, "/etc", str(tmp_path / "afile"), "c:/etc"), "exists as a file"),
        ):
            with pytest.raises(InvalidInput) as info:
                call()
            assert says in info.value.message, info.value.message
    assert (root / "etc" / "motd").read_text() == "inside\n"
