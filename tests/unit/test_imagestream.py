"""The parts of image streams that need no btrfs: the header's checks, tree digests, layer definitions,
and signing keys (tupper.store.imagestream, tupper.store.images, tupper.store.trust)."""

from __future__ import annotations

import io
import json
import os
import types

import pytest

from tupper.errors import InvalidInput
from tupper.store.images import ImageDef
from tupper.store.imagestream import MAGIC, _Reader, read_header, signed_bytes, tree_digest
from tupper.store.trust import Keys

HEADER = {"format": 2, "payload": "btrfs-send+zstd", "name": "web", "parent": "debian-bookworm", "parent_tree_digest": "sha256:1",
          "digest": None, "tree_digest": "sha256:2", "suite": "bookworm", "definition": "web.toml", "built_at": 1.0, "exported_at": 2.0}


def _header(**changes) -> dict:
    stream = io.BytesIO(MAGIC + json.dumps({**HEADER, **changes}).encode() + b"\n")
    return read_header(_Reader(stream, "web.timg"))


def test_a_good_header_is_read():
    assert _header() == HEADER


@pytest.mark.parametrize("changes, says", [
    ({"name": "../etc"}, "header.name: invalid image name"),
    ({"parent": "a b"}, "header.parent: invalid image name"),
    ({"format": 1}, "header.format"),
    ({"tree_digest": 5}, "header.tree_digest: missing or of the wrong type"),
    ({"built_at": True}, "header.built_at: missing or of the wrong type"),
    ({"extra": 1}, "header.extra: unknown key"),
    ({"parent": None}, "header.parent_tree_digest"),
])
def test_a_bad_header_is_refused_naming_the_key(changes, says):
    with pytest.raises(InvalidInput, match="^web.timg: " + says.replace(".", r"\.").replace("(", r"\(")):
        _header(**changes)


@pytest.mark.parametrize("data, says", [(b"", "not a tupper image stream"), (b"TUPPER-IMAGE/1\n{\"format\"", "truncated"),
                                        (MAGIC + b"[1]\n", "not an object"), (MAGIC + b"x" * 70000, "too long")])
def test_what_is_not_a_stream_is_refused(data, says):
    with pytest.raises(InvalidInput, match=says):
        read_header(_Reader(io.BytesIO(data), "x.timg"))


def test_the_tree_digest_follows_contents_modes_and_links_not_times(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a/f").write_text("one")
    os.symlink("f", tmp_path / "a/link")
    first = tree_digest(tmp_path)
    os.utime(tmp_path / "a/f", (1, 1))
    assert tree_digest(tmp_path) == first
    (tmp_path / "a/f").chmod(0o600)
    assert tree_digest(tmp_path) != first
    (tmp_path / "a/f").chmod(0o644)
    (tmp_path / "a/f").write_text("two")
    assert tree_digest(tmp_path) != first


def test_a_layer_definition_and_its_digest(tmp_path):
    f = tmp_path / "web.toml"
    f.write_text('from = "debian-bookworm"\n[build]\npackages = ["nginx"]\nsteps = ["true"]\n')
    d = ImageDef.from_file(f)
    assert (d.name, d.parent, d.layer_packages, d.steps) == ("web", "debian-bookworm", ("nginx",), ("true",))
    assert d.digest("sha256:a") != d.digest("sha256:b")  # the parent's digest is part of it
    f.write_text('from = "debian-bookworm"\n[debootstrap]\nsuite = "bookworm"\n')
    with pytest.raises(InvalidInput, match="debootstrap: a layer"):
        ImageDef.from_file(f)
    f.write_text('name = "web"\nfrom = "web"\n')
    with pytest.raises(InvalidInput, match="from: an image cannot be a layer on itself"):
        ImageDef.from_file(f)


def test_keys_sign_and_only_trusted_unaltered_signatures_pass(tmp_path):
    ours, theirs = Keys(types.SimpleNamespace(root=tmp_path / "a")), Keys(types.SimpleNamespace(root=tmp_path / "b"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    made = ours.generate("release")
    assert oct((tmp_path / "a/keys/release.key").stat().st_mode & 0o777) == "0o600"
    data = signed_bytes(HEADER, "abc")
    sig = ours.signer("release")(data)
    assert ours.verify(data, sig, "s", require=True) == made["key"]
    with pytest.raises(InvalidInput, match="does not match"):
        ours.verify(signed_bytes({**HEADER, "name": "x"}, "abc"), sig, "s", require=False)
    with pytest.raises(InvalidInput, match="does not trust"):
        theirs.verify(data, sig, "s", require=True)
    assert theirs.verify(data, sig, "s", require=False) is None  # not required: an unknown signer passes unsigned
    with pytest.raises(InvalidInput, match="not signed"):
        theirs.verify(data, None, "s", require=True)
    theirs.trust("release", ours.show("release")["public"], "release.pub")
    assert theirs.verify(data, sig, "s", require=True) == made["key"]
    theirs.set_policy(True)
    with pytest.raises(InvalidInput, match="not signed"):
        theirs.verify(data, None, "s", require=False)
    with pytest.raises(InvalidInput, match="not a public key"):
        theirs.trust("other", "ssh-rsa AAAA", "other.pub")
