"""Volumes, `tupper cp` and `tupper prune` on real containers (through tupperd on the test bus; `volume` and `cp`
run in the CLI's process on the test store): a named volume outlives `rm`, a read-only host path is read-only
inside, a used volume cannot be removed, bad sources exit 2 naming the key and leave nothing, cp works both
ways and never reaches the host through a symlink, prune takes stopped containers and leaves running ones."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from helpers import REPO, write_spec

HELLO = REPO / "services" / "hello"


@pytest.fixture
def volumes(tupper):
    """Unique volume names for one test; afterwards the containers using them and the volumes are removed."""
    made: list[str] = []

    def new(label: str = "v") -> str:
        name = f"t-{label}-{uuid.uuid4().hex[:6]}"
        made.append(name)
        return name

    yield new
    for name in made:
        p = tupper("volume", "inspect", name, "--json")
        if p.returncode == 0:
            for user in json.loads(p.stdout)["used_by"]:
                tupper("rm", "--force", user)
            tupper("volume", "rm", name, check=True)


def spec(tmp_path: Path, name: str, volumes: str) -> Path:
    return write_spec(tmp_path / f"{name}.toml", [HELLO], name=name, extra=volumes)


def test_a_named_volume_keeps_a_file_across_rm_and_a_new_run(tupper, names, volumes, tmp_path):
    vol, first, second = volumes(), names("a"), names("b")
    volume = f'[[volumes]]\nsource = "{vol}"\ntarget = "/data"\n'
    tupper("run", spec(tmp_path, first, volume), check=True)  # the volume does not exist yet: run makes it
    assert tupper("exec", first, "--", "sh", "-c", "echo kept > /data/f").returncode == 0
    [listed] = [v for v in tupper.json("volume", "ls") if v["name"] == vol]
    assert listed["used_by"] == [first]
    tupper("rm", "--force", first, check=True)
    assert tupper.json("volume", "inspect", vol)["used_by"] == []
    tupper("run", spec(tmp_path, second, volume), check=True)
    p = tupper("exec", second, "--", "cat", "/data/f")
    assert (p.returncode, p.stdout) == (0, "kept\n"), p.stderr
    assert [m for m in tupper.json("inspect", second)["mounts"] if m["target"] == "/data"][0]["volume"] == vol


def test_a_volume_in_use_cannot_be_removed_even_by_a_stopped_container(tupper, names, volumes, tmp_path):
    vol, name = volumes(), names()
    assert tupper.json("volume", "create", vol)["name"] == vol
    tupper("run", spec(tmp_path, name, f'[[volumes]]\nsource = "{vol}"\ntarget = "/data"\n'), check=True)
    tupper("stop", name, check=True)
    p = tupper("volume", "rm", vol)
    assert p.returncode == 1
    assert p.stderr.splitlines()[0] == f"tupper: volume '{vol}' is used by container(s) {name}"
    tupper("rm", name, check=True)
    assert tupper.json("volume", "rm", vol) == [{"name": vol, "state": "removed"}]
    assert vol not in [v["name"] for v in tupper.json("volume", "ls")]


def test_volumes_are_bound_again_by_start_and_kept_by_a_restarted_tupperd(tupper, bus, names, volumes, tmp_path):
    vol, name = volumes(), names()
    tupper("run", spec(tmp_path, name, f'[[volumes]]\nsource = "{vol}"\ntarget = "/var/lib/app"\n'), check=True)
    tupper("exec", name, "--", "sh", "-c", "echo 1 > /var/lib/app/n", check=True)
    tupper("stop", name, check=True)
    tupper("start", name, check=True)
    assert tupper("exec", name, "--", "cat", "/var/lib/app/n").stdout == "1\n"
    bus.stop_tupperd()  # the next call activates a new tupperd, which adopts the running container
    assert tupper("exec", name, "--", "cat", "/var/lib/app/n").stdout == "1\n"
    assert tupper.json("ps", "--filter", f"name={name}")[0]["volumes"][0]["volume"] == vol


def test_a_read_only_host_path_is_read_only_inside(tupper, names, tmp_path):
    host = tmp_path / "shared"
    host.mkdir()
    (host / "conf").write_text("from the host\n")
    name = names()
    tupper("run", spec(tmp_path, name, f'[[volumes]]\nsource = "{host}"\ntarget = "/srv/shared"\nread_only = true\n'), check=True)
    assert tupper("exec", name, "--", "cat", "/srv/shared/conf").stdout == "from the host\n"
    p = tupper("exec", name, "--", "sh", "-c", "echo x > /srv/shared/new")
    assert p.returncode != 0
    assert sorted(x.name for x in host.iterdir()) == ["conf"]
    p = tupper("cp", host / "conf", f"{name}:/srv/shared/copy")
    assert p.returncode == 2 and "/srv/shared is a read-only volume" in p.stderr


@pytest.mark.parametrize("source,says", [
    ("relative/dir", "neither an absolute host path nor a volume name"),
    ("/no/such/dir/anywhere", "no such file or directory on the host"),
    ("{store}/containers", "is inside tupper's store"),
    ("{store}", "is inside tupper's store"),
    ("{store_parent}", "contains tupper's store"),
])
def test_a_bad_source_exits_2_naming_the_key_and_leaves_nothing(tupper, names, tmp_path, store_root, source, says):
    name = names()
    source = source.format(store=store_root, store_parent=store_root.parent)
    volumes_before = tupper.json("volume", "ls")
    p = tupper("run", spec(tmp_path, name, f'[[volumes]]\nsource = "{source}"\ntarget = "/data"\n'))
    assert p.returncode == 2, p.stderr
    line = p.stderr.splitlines()[0]
    assert line.startswith(f"tupper: {tmp_path / name}.toml: volumes[0].source: ") and says in line, line
    assert "Traceback" not in p.stderr
    assert name not in [c["name"] for c in tupper.json("ps")]
    assert not (store_root / "containers" / name).exists()
    assert tupper.json("volume", "ls") == volumes_before


def test_cp_copies_a_file_and_a_directory_both_ways_running_and_stopped(tupper, names, volumes, tmp_path):
    vol, name = volumes(), names()
    tupper("run", spec(tmp_path, name, f'[[volumes]]\nsource = "{vol}"\ntarget = "/data"\n'), check=True)
    site = tmp_path / "site"
    (site / "css").mkdir(parents=True)
    (site / "index.html").write_text("<h1>hi</h1>\n")
    (site / "css" / "a.css").write_text("body{}\n")
    (site / "latest").symlink_to("index.html")
    one = tmp_path / "one.txt"
    one.write_text("one\n")
    assert tupper.json("cp", one, f"{name}:/root/one.txt")["files"] == 1
    assert tupper.json("cp", site, f"{name}:/data")["files"] == 2  # into the volume, through the container's mounts
    assert tupper("exec", name, "--", "cat", "/root/one.txt", "/data/site/css/a.css").stdout == "one\nbody{}\n"
    assert tupper("exec", name, "--", "readlink", "/data/site/latest").stdout == "index.html\n"
    out = tmp_path / "out"
    out.mkdir()
    tupper("cp", f"{name}:/root/one.txt", out / "back.txt", check=True)
    tupper("cp", f"{name}:/data/site", out, check=True)
    assert (out / "back.txt").read_text() == "one\n"
    assert (out / "site" / "index.html").read_text() == "<h1>hi</h1>\n" and (out / "site" / "latest").readlink() == Path("index.html")
    tupper("stop", name, check=True)
    # stopped: the snapshot, and the volume for what lies below its mount point
    tupper("cp", one, f"{name}:/data/while-stopped", check=True)
    tupper("cp", f"{name}:/etc/os-release", out, check=True)  # a symlink (to ../usr/lib/os-release): copied as one
    assert (out / "os-release").readlink() == Path("../usr/lib/os-release")
    tupper("cp", f"{name}:/usr/lib/os-release", out / "release", check=True)
    assert "Debian" in (out / "release").read_text()
    tupper("start", name, check=True)
    assert tupper("exec", name, "--", "cat", "/data/while-stopped").stdout == "one\n"
    # refusals: exit 2, one line
    for args, says in (((f"{name}:/no/such", out), f"{name}:/no/such: no such file or directory in the container"),
                       ((site, f"{name}:/root/one.txt"), "exists as a file"),
                       ((one, f"{name}:relative"), "must be absolute"),
                       ((one, out), "neither SRC nor DEST is in a container")):
        p = tupper("cp", *args)
        assert p.returncode == 2 and says in p.stderr.splitlines()[0], (args, p.stderr)


def test_cp_never_follows_a_symlink_out_of_the_root(tupper, names, tmp_path):
    name = names()
    tupper("run", spec(tmp_path, name, ""), check=True)
    probe = Path("/tmp") / f"tupper-cp-probe-{uuid.uuid4().hex[:8]}"
    probe.write_text("host only\n")
    planted = f"tupper-cp-planted-{uuid.uuid4().hex[:8]}"
    try:
        tupper("exec", name, "--", "ln", "-s", "../../../../../../../../tmp", "/escape", check=True)
        tupper("exec", name, "--", "ln", "-s", "/tmp", "/abs", check=True)
        local = tmp_path / "local.txt"
        local.write_text("from cp\n")
        for link in ("escape", "abs"):
            # read: the host's file is not there for the container, so there is nothing to copy
            p = tupper("cp", f"{name}:/{link}/{probe.name}", tmp_path / "stolen")
            assert p.returncode == 2 and "no such file or directory in the container" in p.stderr, p.stderr
            assert not (tmp_path / "stolen").exists()
            # write: lands in the container's /tmp, never in the host's
            tupper("cp", local, f"{name}:/{link}/{planted}-{link}", check=True)
            assert not (Path("/tmp") / f"{planted}-{link}").exists()
            assert tupper("exec", name, "--", "cat", f"/tmp/{planted}-{link}").stdout == "from cp\n"
        # the link itself is copied as a link, not followed
        tupper("cp", f"{name}:/escape", tmp_path / "link", check=True)
        assert (tmp_path / "link").is_symlink()
        tupper("stop", name, check=True)  # the same holds on the snapshot of a stopped container
        p = tupper("cp", f"{name}:/escape/{probe.name}", tmp_path / "stolen")
        assert p.returncode == 2 and not (tmp_path / "stolen").exists()
        tupper("cp", local, f"{name}:/escape/{planted}-stopped", check=True)
        assert not (Path("/tmp") / f"{planted}-stopped").exists()
        assert probe.read_text() == "host only\n"
    finally:
        probe.unlink()
        for leftover in Path("/tmp").glob(f"{planted}*"):
            leftover.unlink()


def test_prune_removes_a_stopped_container_and_keeps_a_running_one(tupper, names, volumes, tmp_path):
    stopped, running, vol = names("stopped"), names("running"), volumes()
    tupper("run", spec(tmp_path, stopped, f'[[volumes]]\nsource = "{vol}"\ntarget = "/data"\n'), check=True)
    tupper("run", spec(tmp_path, running, ""), check=True)
    tupper("stop", stopped, check=True)
    p = tupper("prune")  # no terminal, no --force: refused, nothing removed
    assert p.returncode == 2 and "no terminal to confirm on" in p.stderr and "--force" in p.stderr
    assert stopped in [c["name"] for c in tupper.json("ps")]
    result = json.loads(tupper("prune", "--force", "--json", check=True).stdout)
    assert stopped in result["removed"] and running not in result["removed"]
    states = {c["name"]: c["state"] for c in tupper.json("ps")}
    assert stopped not in states and states[running] == "running"
    assert tupper.json("volume", "inspect", vol)["used_by"] == []  # volumes are kept
