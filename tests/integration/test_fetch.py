"""`tupper fetch SPEC --source DIR` (issue 15: images and components reach every node): a store that has
neither the spec's image nor its component takes them from a directory of streams and packages (the
layer's parent first), each checked by digest; a second fetch finds them present; a store holding another
component of the same version, a tampered package or a source lacking the image is refused with exit 2
naming what, and leaves nothing behind. Runs once, on the first backend (a node store of its own)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import BACKENDS, IMAGE, REPO, DirectStore, _clean_env, write_component

FIRST_BACKEND = (os.environ.get("TUPPER_TEST_BACKENDS") or ",".join(BACKENDS)).split(",")[0].strip()


def pack(here: DirectStore, directory: Path, out: Path) -> Path:
    p = here("sdk", "build", directory, "-o", out, check=True)
    return Path(p.stdout.decode().split()[0])


@pytest.fixture(scope="module")
def source(store_root, backend, tmp_path_factory):
    """A source directory: the base image's full stream, a layer's incremental stream on it, and a
    component package; the spec that needs all three."""
    if backend != FIRST_BACKEND:
        pytest.skip("fetch runs on one backend")
    here = DirectStore(store_root)
    tag = uuid.uuid4().hex[:6]
    layer, component = f"t-fetch-{tag}", f"fetch{tag}"
    work = tmp_path_factory.mktemp("fetch")
    directory = work / "source"
    directory.mkdir()
    definition = work / "layer.toml"
    definition.write_text(f'name = "{layer}"\nfrom = "{IMAGE}"\n[build]\nsteps = ["echo {tag} > /etc/tupper-fetch"]\n')
    here("image", "build", definition, check=True)
    try:
        here("image", "export", IMAGE, "-o", directory / f"{IMAGE}.timg", check=True)
        here("image", "export", layer, "--parent", IMAGE, "-o", directory / f"{layer}.timg", check=True)
        comp = write_component(work / component, component, {f"{component}.service": "[Service]\nExecStart=/bin/sleep infinity\n"})
        pkg = pack(here, comp, directory)
        assert pkg.name == f"{component}-1.0.0.tupper"
        spec = work / "svc.toml"
        spec.write_text(f'name = "svc"\nimage = "{layer}"\n[[components]]\nname = "{component}"\n')
        yield {"dir": directory, "spec": spec, "layer": layer, "component": component, "pkg": pkg, "work": work,
               "digests": {i: here.images()[i]["tree_digest"] for i in (IMAGE, layer)}}
    finally:
        here("image", "rm", layer)


@pytest.fixture
def node(store_root, backend):
    """An empty store of its own, as a new cluster node's."""
    store = DirectStore(Path(f"{store_root}-node-{uuid.uuid4().hex[:4]}"), backend)
    yield store
    store.destroy()


def fetch(node: DirectStore, source: dict, *extra) -> tuple[int, list[dict] | None, str]:
    p = node("fetch", source["spec"], "--source", source["dir"], "--json", *extra)
    out = json.loads(p.stdout) if p.returncode == 0 else None
    return p.returncode, out, p.stderr.decode()


def test_fetch_brings_the_image_chain_and_the_component_checked_by_digest(node, source):
    layer, component = source["layer"], source["component"]
    rc, planned, err = fetch(node, source, "--dry-run")
    assert rc == 0, err
    assert [(b["kind"], b["name"], b["action"]) for b in planned] == [
        ("component", component, "to install"), ("image", IMAGE, "to import"), ("image", layer, "to import")]
    assert node.images() == {} and json.loads(node("component", "ls", "--json", check=True).stdout) == []  # a dry run writes nothing

    rc, brought, err = fetch(node, source)
    assert rc == 0, err
    assert [(b["kind"], b["name"], b["action"]) for b in brought] == [
        ("component", component, "installed"), ("image", IMAGE, "imported"), ("image", layer, "imported")]
    images = node.images()
    assert {i: images[i]["tree_digest"] for i in (IMAGE, layer)} == source["digests"]  # the same trees as the source store's
    assert images[layer]["parent"] == IMAGE
    installed = json.loads(node("component", "ls", "--json", check=True).stdout)
    assert [(c["name"], c["version"]) for c in installed] == [(component, "1.0.0")]

    rc, again, err = fetch(node, source)  # everything is here: compared, nothing written
    assert rc == 0, err
    assert [(b["name"], b["action"]) for b in again] == [(component, "present"), (layer, "present")]
    assert [b["digest"] for b in again] == [installed[0]["digest"], source["digests"][layer]]


def test_what_differs_from_the_source_or_is_missing_is_refused_and_leaves_nothing(node, source, tmp_path):
    component = source["component"]
    # Another component of the same name and version, installed here: the node would run other bytes.
    other = write_component(tmp_path / "other", component, {f"{component}.service": "[Service]\nExecStart=/bin/true\n"})
    pkg = pack(node, other, tmp_path)
    node("component", "install", pkg, check=True)
    rc, _, err = fetch(node, source)
    assert rc == 2 and f"component {component} 1.0.0 in this store" in err and f"is not the one in {source['pkg']}" in err, err
    assert node.images() == {}
    node("component", "rm", component, "1.0.0", check=True)

    # A tampered package: install checks its content against its digest; nothing is installed.
    bad = tmp_path / "bad-source"
    shutil.copytree(source["dir"], bad)
    data = bytearray((bad / source["pkg"].name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / source["pkg"].name).write_bytes(bytes(data))
    rc, _, err = fetch(node, {**source, "dir": bad})
    assert rc == 2 and source["pkg"].name in err, err
    assert json.loads(node("component", "ls", "--json", check=True).stdout) == []

    # A source without the layer's parent: the layer cannot be had, so nothing is imported.
    (bad / source["pkg"].name).write_bytes(source["pkg"].read_bytes())
    (bad / f"{IMAGE}.timg").unlink()
    rc, _, err = fetch(node, {**source, "dir": bad})
    assert rc == 2 and f"image {IMAGE} (the parent of {source['layer']}) is not in this store" in err, err
    assert node.images() == {} and node.leftovers() == []

    # No such directory on this host.
    rc, _, err = fetch(node, {**source, "dir": tmp_path / "absent"})
    assert rc == 2 and "no such directory on this host" in err, err


def test_two_fetches_at_once_import_once(node, source):
    """Two services starting on one node at once: the fetch lock makes the second find what the first brought."""
    argv = [sys.executable, "-m", "tupper", "--direct", "--root", str(node.root), "fetch", str(source["spec"]), "--source",
            str(source["dir"]), "--json"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=_clean_env()) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err.decode() for _, err in outs]
    actions = sorted(tuple(b["action"] for b in json.loads(out)) for out, _ in outs)
    assert actions == [("installed", "imported", "imported"), ("present", "present")]
    assert set(node.images()) == {IMAGE, source["layer"]} and node.leftovers() == []
