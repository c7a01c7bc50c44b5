"""Packages end to end: build, install, run by name and version, live upgrade and rollback, malicious packages."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import uuid
from pathlib import Path

import pytest
from helpers import SERVICES, system_snapshot


def make_component(root: Path, name: str, version: str, *, broken: bool = False) -> Path:
    d = root / f"{name}-{version}"
    (d / "units").mkdir(parents=True)
    (d / "bin").mkdir()
    (d / "component.toml").write_text(f'name = "{name}"\nversion = "{version}"\nunits = ["{name}.service"]\n')
    (d / "VERSION").write_text(version + "\n")
    (d / "units" / f"{name}.service").write_text(f"[Service]\nType=exec\nExecStart=/opt/{name}/bin/run\n")
    body = "echo starting; exit 1\n" if broken else f"echo {name} {version} up\nexec sleep infinity\n"
    (d / "bin" / "run").write_text("#!/bin/sh\n" + body)
    (d / "bin" / "run").chmod(0o755)
    return d


@pytest.fixture
def component_name(tupper):
    name = f"svc{uuid.uuid4().hex[:8]}"
    yield name
    # This runs before the `names` fixture removes the test's containers: remove any that still use it.
    for c in tupper.json("component", "ls"):
        if c["name"] == name:
            for container in c["used_by"]:
                tupper("rm", "--force", container)
            tupper("component", "rm", name, c["version"], check=True)


def build_and_install(tupper, d: Path, out: Path) -> Path:
    out.mkdir(exist_ok=True)
    p = tupper("sdk", "build", d, "-o", out)
    assert p.returncode == 0, p.stderr
    pkg = Path(p.stdout.split()[0])
    assert pkg.is_file()
    tupper("component", "install", pkg, check=True)
    return pkg


def test_install_run_upgrade_and_a_broken_upgrade_rolls_back(tupper, names, component_name, tmp_path, store_root):
    name = component_name
    for version, broken in (("1.0.0", False), ("2.0.0", False), ("3.0.0", True)):
        build_and_install(tupper, make_component(tmp_path, name, version, broken=broken), tmp_path / "dist")
    listed = [(c["name"], c["version"]) for c in tupper.json("component", "ls") if c["name"] == name]
    assert listed == [(name, "1.0.0"), (name, "2.0.0"), (name, "3.0.0")]
    again = tupper("component", "install", tmp_path / "dist" / f"{name}-1.0.0.tupper")
    assert again.returncode == 2 and "already installed" in again.stderr

    container = names()
    spec = tmp_path / "spec.toml"
    spec.write_text(f'name = "{container}"\n[[components]]\nname = "{name}"\nversion = "1.0.0"\n'
                    f'[[components]]\npath = "{SERVICES / "hello"}"\n')
    tupper("run", spec, check=True)
    assert tupper("exec", container, "--", "cat", f"/opt/{name}/VERSION").stdout == "1.0.0\n"
    units = {u["name"]: u for u in tupper.json("status", container)["units"]}
    hello_pid = units["hello.service"]["main_pid"]
    assert hello_pid > 0

    up = tupper("component", "upgrade", container, name, "2.0.0")
    assert up.returncode == 0, up.stderr
    assert tupper("exec", container, "--", "cat", f"/opt/{name}/VERSION").stdout == "2.0.0\n"
    units = {u["name"]: u for u in tupper.json("status", container)["units"]}
    assert units[f"{name}.service"]["active_state"] == "active"
    assert units["hello.service"]["main_pid"] == hello_pid, "the other component was not disturbed"
    assert [c["version"] for c in tupper.json("status", container)["components"] if c["name"] == name] == ["2.0.0"]
    ro = tupper("exec", container, "--", "touch", f"/opt/{name}/x")
    assert ro.returncode != 0, "the new version is mounted read-only too"

    broken = tupper("component", "upgrade", container, name, "3.0.0")
    assert broken.returncode == 1
    assert "rolled back to 2.0.0" in broken.stderr
    assert tupper("exec", container, "--", "cat", f"/opt/{name}/VERSION").stdout == "2.0.0\n"
    units = {u["name"]: u for u in tupper.json("status", container)["units"]}
    assert units[f"{name}.service"]["active_state"] == "active"
    assert units["hello.service"]["main_pid"] == hello_pid

    busy = tupper("component", "rm", name, "2.0.0")
    assert busy.returncode == 1 and container in busy.stderr
    assert tupper("component", "rm", name, "3.0.0").returncode == 0
    tupper("rm", "--force", container, check=True)
    assert tupper("component", "rm", name, "2.0.0").returncode == 0


def test_spec_naming_a_component_that_is_not_installed_is_refused(tupper, names, tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(f'name = "{names()}"\n[[components]]\nname = "nosuchcomponent"\nversion = "9.9"\n')
    p = tupper("run", spec)
    assert p.returncode == 2
    assert "components[0].name" in p.stderr and "no installed component" in p.stderr


def test_upgrade_to_a_version_that_is_not_installed_changes_nothing(tupper, names, component_name, tmp_path):
    build_and_install(tupper, make_component(tmp_path, component_name, "1.0.0"), tmp_path / "dist")
    container = names()
    spec = tmp_path / "spec.toml"
    spec.write_text(f'name = "{container}"\n[[components]]\nname = "{component_name}"\n')  # no version: the newest
    tupper("run", spec, check=True)
    p = tupper("component", "upgrade", container, component_name, "7.0.0")
    assert p.returncode == 2 and "no installed component" in p.stderr
    assert tupper("exec", container, "--", "cat", f"/opt/{component_name}/VERSION").stdout == "1.0.0\n"
    tupper("rm", "--force", container, check=True)


# ---- malicious packages: each built here, each refused with a clear message, nothing installed ----


def evil(tmp_path: Path, add) -> Path:
    out = tmp_path / "evil-1.tupper"
    meta = json.dumps({"format": 1, "name": "evil", "version": "1", "digest": "sha256:" + "0" * 64}).encode()
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        info = tarfile.TarInfo("tupper-package.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
        add(tar)
    return out


def put(tar, name, data=b"x", mode=0o644, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


MANIFEST = b'name = "evil"\nversion = "1"\nunits = ["evil.service"]\n'
UNIT = b"[Service]\nExecStart=/opt/evil/run\n"


def valid_tree(tar):
    put(tar, "component.toml", MANIFEST)
    put(tar, "units", kind=tarfile.DIRTYPE, mode=0o755)
    put(tar, "units/evil.service", UNIT)


@pytest.mark.parametrize("kind, add, message", [
    ("dotdot", lambda t: (valid_tree(t), put(t, "../../etc/evil")), "'..' in its path"),
    ("absolute", lambda t: (valid_tree(t), put(t, "/etc/evil")), "absolute path"),
    ("absolute-symlink", lambda t: (valid_tree(t), put(t, "l", kind=tarfile.SYMTYPE, link="/etc/shadow")), "absolute symlink"),
    ("escaping-symlink", lambda t: (valid_tree(t), put(t, "l", kind=tarfile.SYMTYPE, link="../../../etc")), "leaves the package"),
    ("write-through-symlink", lambda t: (valid_tree(t), put(t, "l", kind=tarfile.SYMTYPE, link="units"), put(t, "l/x")),
     "goes through a symlink"),
    ("hard-link", lambda t: (valid_tree(t), put(t, "h", kind=tarfile.LNKTYPE, link="component.toml")), "hard link"),
    ("device", lambda t: (valid_tree(t), put(t, "null", kind=tarfile.CHRTYPE)), "device node"),
    ("setuid", lambda t: (valid_tree(t), put(t, "run", mode=0o4755)), "setuid/setgid"),
    ("digest", lambda t: valid_tree(t), "digest mismatch"),
])
def test_malicious_package_is_refused_and_nothing_is_installed(tupper, store_root, tmp_path, kind, add, message):
    pkg = evil(tmp_path, add)
    before = system_snapshot(store_root, only="evil")
    p = tupper("component", "install", pkg)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and str(pkg) in p.stderr
    assert "Traceback" not in p.stderr
    assert not any(c["name"] == "evil" for c in tupper.json("component", "ls"))
    assert not (store_root / "components" / "evil").exists()
    assert not list((store_root / "tmp").glob("component-evil-*"))
    assert system_snapshot(store_root, only="evil") == before
    assert not Path("/etc/evil").exists()


def test_sdk_cli_init_check_and_every_problem_reported_with_exit_2(tupper, tmp_path):
    d = tmp_path / "demo"
    assert tupper("sdk", "init", "demo", "--dir", d).returncode == 0
    ok = tupper("sdk", "check", d)
    assert ok.returncode == 0, ok.stderr
    assert "demo 0.1.0 is fine" in ok.stdout
    (d / "units/demo.service").write_text("[Service]\nExecStart=/opt/demo/bin/nope\nLoadCredential=token\n")
    (d / "bin/demo").chmod(0o4755)
    bad = tupper("sdk", "check", d)
    assert bad.returncode == 2
    lines = bad.stderr.splitlines()
    assert any("bin/nope: no file" in line for line in lines)
    assert any("credential 'token' is not declared" in line for line in lines)
    assert any("setuid/setgid" in line for line in lines)
    assert lines[-1] == f"tupper: 3 problem(s) in {d}"
    assert tupper("sdk", "build", d, "-o", tmp_path).returncode == 2, "build refuses what check refuses"
    assert not list(tmp_path.glob("*.tupper"))


def test_sdk_check_has_systemd_verify_the_units(tupper, tmp_path):
    """A misspelt directive and a bad value pass tupper's own checks; systemd-analyze verify catches both."""
    d = tmp_path / "demo"
    tupper("sdk", "init", "demo", "--dir", d, check=True)
    unit = d / "units/demo.service"
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nRestart=on-falure\nMemoryMaxx=1G\n"))
    bad = tupper("sdk", "check", d)
    assert bad.returncode == 2
    lines = bad.stderr.splitlines()
    assert any(line.startswith(f"{d}/units/demo.service:") and "on-falure" in line for line in lines), lines
    assert any("Unknown key 'MemoryMaxx'" in line for line in lines), lines
    assert lines[-1] == f"tupper: 2 problem(s) in {d}"


def test_sdk_build_into_a_directory_that_does_not_exist_yet(tupper, tmp_path):
    d = tmp_path / "demo"
    tupper("sdk", "init", "demo", "--dir", d, check=True)
    built = tupper("sdk", "build", d, "-o", f"{tmp_path}/dist/")  # the command the docs and the generated README give
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "dist/demo-0.1.0.tupper").is_file()
    refused = tupper("sdk", "build", d, "-o", tmp_path / "nowhere" / "demo.tupper")
    assert refused.returncode == 2 and "no directory" in refused.stderr and "end it with /" in refused.stderr
    assert not (tmp_path / "nowhere").exists()
