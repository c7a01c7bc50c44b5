"""Images travel between stores (issue 13): export to a stream, import into a second store (its own
--root: a loopback pool on the btrfs backend, a directory on the overlay one), run there; between the
two backends in both directions (a btrfs send stream applied without btrfs, a tar received into btrfs); a layer's incremental stream carries only what changed; a
stream that is altered, truncated, forged, needs a missing parent or is signed by an untrusted key is
refused with exit 2 and leaves nothing in the store."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from helpers import REPO
from helpers import DirectStore as Store

IMAGE = "debian-bookworm"


OTHER = {"btrfs": "overlay", "overlay": "btrfs"}


@pytest.fixture(scope="module")
def stores(store_root, backend):
    """Stores of this module's own: B (gets the base image by import) and C (stays empty) of the suite
    store's backend, D of the other backend."""
    made = []
    try:
        for x, kind in (("b", backend), ("c", backend), ("d", OTHER[backend])):
            made.append(Store(Path(f"{store_root}-{x}-{uuid.uuid4().hex[:4]}"), kind))
        yield made
    finally:
        for s in made:
            s.destroy()


@pytest.fixture(scope="module")
def exported(store_root, stores, tmp_path_factory):
    """The base image's full stream, and B with it imported."""
    here = Store(store_root)
    out = tmp_path_factory.mktemp("streams") / "base.timg"
    here("image", "export", IMAGE, "-o", out, check=True)
    stores[0]("image", "import", out, check=True)
    return out


def test_an_image_travels_to_another_store_and_runs_there(store_root, stores, exported):
    b = stores[0]
    original = Store(store_root).images()[IMAGE]
    imported = b.images()[IMAGE]
    assert imported["tree_digest"] == original["tree_digest"] and imported["tree_digest"].startswith("sha256:")
    assert imported["digest"] == original["digest"] and imported["imported_at"]
    again = b("image", "import", exported)  # the same image again: nothing to do
    assert again.returncode == 0, again.stderr
    name = f"t-travel-{uuid.uuid4().hex[:6]}"
    run = b("run", REPO / "examples/hello.toml", "--name", name, "--json")
    assert run.returncode == 0, run.stderr
    assert [u["active_state"] for u in json.loads(run.stdout)["units"]] == ["active"]
    b("rm", "-f", name, check=True)


def test_an_image_travels_to_a_store_of_the_other_backend_and_back(store_root, backend, stores, exported, tmp_path):
    """btrfs → overlay applies a btrfs send stream without btrfs; overlay → btrfs extracts a tar into a
    subvolume. Same tree digest everywhere, and the container runs on the other backend."""
    here, d = Store(store_root), stores[2]
    d("image", "import", exported, check=True)
    assert d.images()[IMAGE]["tree_digest"] == here.images()[IMAGE]["tree_digest"]
    name = f"t-other-{uuid.uuid4().hex[:6]}"
    run = d("run", REPO / "examples/hello.toml", "--name", name, "--json")
    assert run.returncode == 0, run.stderr
    assert [u["active_state"] for u in json.loads(run.stdout)["units"]] == ["active"]
    d("rm", "-f", name, check=True)
    back = tmp_path / "back.timg"
    d("image", "export", IMAGE, "-o", back, check=True)
    header = json.loads(back.read_bytes().split(b"\n", 2)[1])
    assert header["payload"] == ("tar+zstd" if OTHER[backend] == "overlay" else "btrfs-send+zstd")
    c = stores[1]
    c("image", "import", back, check=True)
    assert c.images()[IMAGE]["tree_digest"] == here.images()[IMAGE]["tree_digest"]
    c("image", "rm", IMAGE, check=True)
    info = json.loads(d("store", "info", "--json", check=True).stdout)
    assert info["backend"] == OTHER[backend]


def test_a_layers_incremental_stream_carries_only_what_changed(store_root, backend, stores, exported, tmp_path):
    here, b = Store(store_root), stores[0]
    layer = f"t-layer-{uuid.uuid4().hex[:6]}"
    definition = tmp_path / "layer.toml"
    definition.write_text(f'name = "{layer}"\nfrom = "{IMAGE}"\n[build]\npackages = ["tree"]\nsteps = ["tree --version"]\n')
    here("image", "build", definition, check=True)
    try:
        assert here.images()[layer]["parent"] == IMAGE
        # sizes: on btrfs a layer holds only what it adds (the rest it shares with its parent); on the
        # overlay backend trees are copies and share nothing
        images = here.images()
        print(f"\nimage ls: {IMAGE} {[images[IMAGE][k] for k in ('size', 'exclusive', 'shared')]}, "
              f"{layer} {[images[layer][k] for k in ('size', 'exclusive', 'shared')]}")
        if backend == "btrfs":
            assert 0 < images[layer]["exclusive"] < images[layer]["size"] / 4 and images[layer]["shared"] > images[layer]["size"] / 2
            assert images[IMAGE]["shared"] > 0
        else:
            assert images[layer]["exclusive"] == images[layer]["size"] > images[IMAGE]["size"] and images[layer]["shared"] == 0
        assert "EXCLUSIVE" in here("image", "ls", check=True).stdout.decode()
        refused = here("image", "rm", IMAGE)
        assert refused.returncode == 1 and f"parent of image(s): {layer}" in refused.stderr.decode()
        incremental, full = tmp_path / "layer.timg", tmp_path / "layer-full.timg"
        here("image", "export", layer, "--parent", IMAGE, "-o", incremental, check=True)
        here("image", "export", layer, "-o", full, check=True)
        sizes = incremental.stat().st_size, full.stat().st_size
        print(f"\nlayer with one package: incremental stream {sizes[0]} bytes, full stream {sizes[1]} bytes ({sizes[0] / sizes[1]:.1%})")
        assert sizes[0] <= sizes[1] / 10
        # an incremental stream needs its parent: refused where it is missing, received where it is there
        c = stores[1]
        p = c("image", "import", incremental)
        assert p.returncode == 2 and f"needs image {IMAGE!r}, which is not in the store" in p.stderr.decode()
        assert c.leftovers() == [] and c.images() == {}
        b("image", "import", incremental, check=True)
        assert b.images()[layer]["tree_digest"] == here.images()[layer]["tree_digest"]
        assert b.images()[layer]["parent"] == IMAGE
        # prune: the unused layer goes, the base a container uses stays (and a pinned image stays too)
        user = f"t-user-{uuid.uuid4().hex[:6]}"
        b("run", REPO / "examples/hello.toml", "--name", user, check=True)
        try:
            p = b("image", "prune")
            assert p.returncode == 2 and "no terminal to confirm on" in p.stderr.decode()
            b("image", "pin", layer, check=True)
            assert json.loads(b("image", "prune", "--force", "--json", check=True).stdout) == []
            b("image", "unpin", layer, check=True)
            pruned = json.loads(b("image", "prune", "--force", "--json", check=True).stdout)
            assert [(d["name"], d["state"]) for d in pruned] == [(layer, "removed")] and pruned[0]["bytes"] > 0
            assert set(b.images()) == {IMAGE}
        finally:
            b("rm", "-f", user)
    finally:
        here("image", "rm", layer)


def _altered(source: Path, dest: Path, change) -> Path:
    data = bytearray(source.read_bytes())
    dest.write_bytes(change(data))
    return dest


def _flip(data: bytearray) -> bytearray:
    data[len(data) // 2] ^= 0x40
    return data


def _forge(data: bytearray, key: str, value) -> bytearray:
    head, _, rest = bytes(data).partition(b"\n")
    header, _, payload = rest.partition(b"\n")
    fields = json.loads(header)
    fields[key] = value
    return bytearray(head + b"\n" + json.dumps(fields, sort_keys=True).encode() + b"\n" + payload)


def _reforge(data: bytearray, key: str, value) -> bytearray:
    """A header changed by someone who also recomputes the trailer's digest (as a deliberate forger
    would): only a signature can tell."""
    import hashlib
    import struct

    raw = bytes(data)
    magic, _, rest = raw.partition(b"\n")
    header_line, _, rest = rest.partition(b"\n")
    fields = json.loads(header_line)
    fields[key] = value
    new_header = json.dumps(fields, sort_keys=True).encode() + b"\n"
    sha, at, frames = hashlib.sha256(new_header), 0, b""
    while True:
        (n,) = struct.unpack(">I", rest[at:at + 4])
        frames += rest[at:at + 4 + n]
        sha.update(rest[at + 4:at + 4 + n])
        at += 4 + n
        if n == 0:
            break
    trailer = json.loads(rest[at:])
    trailer["payload_sha256"] = sha.hexdigest()
    return bytearray(magic + b"\n" + new_header + frames + json.dumps(trailer, sort_keys=True).encode() + b"\n")


@pytest.mark.parametrize("case", ["flipped byte", "truncated", "forged tree digest", "forged name", "not a stream", "garbage after the end"])
def test_an_altered_stream_is_refused_and_leaves_nothing(stores, exported, tmp_path, case):
    c = stores[1]
    changes = {
        "flipped byte": _flip,
        "truncated": lambda d: d[: len(d) * 2 // 3],
        "forged tree digest": lambda d: _forge(d, "tree_digest", "sha256:" + "0" * 64),
        "forged name": lambda d: _forge(d, "name", "t-other"),
        "not a stream": lambda d: bytearray(b"hello\n") + d[100:],
        "garbage after the end": lambda d: d + b"x",
    }
    stream = _altered(exported, tmp_path / "altered.timg", changes[case])
    p = c("image", "import", stream)
    assert p.returncode == 2, (case, p.returncode, p.stderr)
    errors = [line for line in p.stderr.decode().splitlines() if line.startswith("tupper: ")]  # after the progress lines
    assert len(errors) == 1 and errors[0].startswith(f"tupper: {stream}: ") and "Traceback" not in p.stderr.decode(), p.stderr
    assert c.leftovers() == [] and c.images() == {}, case
    via_stdin = c("image", "import", "-", input=stream.read_bytes())
    assert via_stdin.returncode == 2 and "\ntupper: stdin: " in "\n" + via_stdin.stderr.decode()
    assert c.leftovers() == [] and c.images() == {}, case


def test_signed_streams_are_checked_against_the_stores_trusted_keys(store_root, stores, exported, tmp_path):
    here, b, c = Store(store_root), stores[0], stores[1]
    key = f"t{uuid.uuid4().hex[:6]}"
    here("image", "key", "generate", key, check=True)
    try:
        signed = tmp_path / "signed.timg"
        here("image", "export", IMAGE, "-o", signed, "--sign", key, check=True)
        # an unsigned stream, where signatures are required
        p = c("image", "import", exported, "--require-signature")
        assert p.returncode == 2 and "is not signed" in p.stderr.decode()
        # signed, but by a key C does not trust (C trusts another key of the same name)
        c("image", "key", "generate", key, check=True)
        p = c("image", "import", signed, "--require-signature")
        assert p.returncode == 2 and "a key this store does not trust" in p.stderr.decode()
        assert c.leftovers() == [] and c.images() == {}
        # trusted, but the signature altered
        c("image", "key", "rm", key, check=True)
        public = here("image", "key", "show", key, check=True).stdout
        c("image", "key", "trust", key, "-", input=public, check=True)
        altered = _altered(signed, tmp_path / "altered.timg", lambda d: _forge(d, "exported_at", 1.0))
        p = c("image", "import", altered, "--require-signature")
        assert p.returncode == 2 and "the digest of the header and payload is not the one" in p.stderr.decode(), p.stderr
        forged = _altered(signed, tmp_path / "forged.timg", lambda d: _reforge(d, "exported_at", 1.0))
        p = c("image", "import", forged, "--require-signature")
        assert p.returncode == 2 and "does not match the stream" in p.stderr.decode(), p.stderr
        assert c.leftovers() == [] and c.images() == {}
        # the store's policy requires signatures too; the genuine stream passes it
        c("image", "key", "policy", "--require", check=True)
        assert c("image", "import", exported).returncode == 2
        imported = json.loads(c("image", "import", signed, "--json", check=True).stdout)
        assert imported["signed_by"].startswith("ed25519:") and imported["tree_digest"] == here.images()[IMAGE]["tree_digest"]
        keys = {k["name"]: k for k in json.loads(c("image", "key", "ls", "--json", check=True).stdout)}
        assert keys[key]["trusted"] and not keys[key]["private"]
        c("image", "rm", IMAGE, check=True)
        c("image", "key", "policy", "--no-require", check=True)
    finally:
        here("image", "key", "rm", key)
    assert b.images()[IMAGE]  # B untouched by all this
