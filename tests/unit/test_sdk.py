"""The SDK: scaffolding, the checker (every problem at once), reproducible packages, package safety."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from tupper.errors import InvalidInput
from tupper.model import sdk
from tupper.store import packages


def scaffold(tmp_path: Path, name: str = "demo") -> Path:
    return sdk.init(name, tmp_path / name)


def messages(problems) -> list[str]:
    return [str(p) for p in problems]


def test_init_scaffolds_a_component_that_passes_the_check(tmp_path):
    d = scaffold(tmp_path)
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) == [
        "README.md", "bin/demo", "component.toml", "units/demo.service"]
    assert os.access(d / "bin/demo", os.X_OK)
    component, problems = sdk.check(d)
    assert problems == []
    assert (component.name, component.version, component.units) == ("demo", "0.1.0", ("demo.service",))


def test_init_refuses_a_non_empty_directory_and_a_bad_name(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(InvalidInput, match="not empty"):
        sdk.init("x", tmp_path / "x")
    with pytest.raises(InvalidInput, match="invalid component name"):
        sdk.init("Bad Name", tmp_path / "y")


def test_check_reports_every_problem_at_once(tmp_path):
    d = scaffold(tmp_path)
    (d / "units/demo.service").write_text(
        "[Service]\nExecStart=/opt/demo/bin/missing\nExecStartPost=/opt/demo/README.md\n"
        "LoadCredential=db_password\nSetCredential=token:plain\nthis line is wrong\n")
    (d / "bin/setuid").write_text("x")
    os.chmod(d / "bin/setuid", 0o4755)
    os.symlink("/etc/passwd", d / "abs-link")
    os.symlink("../../outside", d / "bin/escape")
    os.link(d / "README.md", d / "hardlink")
    os.mkfifo(d / "fifo")
    _, problems = sdk.check(d)
    text = "\n".join(messages(problems))
    for expected in ("bin/missing: no file", "README.md is not executable", "credential 'db_password' is not declared",
                     "SetCredential= puts a secret's value", "not KEY=VALUE", "setuid/setgid bit", "absolute symlink to /etc/passwd",
                     "bin/escape: symlink to ../../outside leaves", "hard link", "named pipe"):
        assert expected in text, f"{expected!r} missing from:\n{text}"


def test_check_reports_manifest_schema_errors_with_the_key(tmp_path):
    d = scaffold(tmp_path)
    (d / "component.toml").write_text('name = "demo"\nversion = "0.1.0"\nunits = ["demo.service", "gone.service"]\nsecret = []\n')
    _, problems = sdk.check(d)
    assert any("secret: unknown key (did you mean 'secrets'?)" in p for p in messages(problems))


def test_check_against_an_image_finds_missing_programs_and_shadowed_units(tmp_path):
    image = tmp_path / "image"
    (image / "usr/bin").mkdir(parents=True)
    (image / "usr/bin/python3").write_text("")
    (image / "lib/systemd/system").mkdir(parents=True)
    (image / "lib/systemd/system/dbus.service").write_text("")
    d = scaffold(tmp_path)
    (d / "component.toml").write_text('name = "demo"\nversion = "1"\nunits = ["demo.service", "dbus.service"]\n')
    (d / "units/demo.service").write_text("[Service]\nExecStart=/usr/bin/python3 -V\nExecStartPre=nosuchprog\nExecStop=/usr/bin/gone\n")
    (d / "units/dbus.service").write_text("[Service]\nExecStart=python3\n")
    _, problems = sdk.check(d, image=image)
    text = "\n".join(messages(problems))
    assert "ExecStartPre=nosuchprog: not found on the image's PATH" in text
    assert "ExecStop=/usr/bin/gone: neither below the component's mount point /opt/demo nor in the image" in text
    assert "shadows the image's own /lib/systemd/system/dbus.service" in text
    assert "python3 -V" not in text and "ExecStart=python3" not in text


def test_declared_credentials_pass(tmp_path):
    d = scaffold(tmp_path)
    (d / "component.toml").write_text('name = "demo"\nversion = "1"\nunits = ["demo.service"]\nsecrets = ["db_password"]\n')
    (d / "units/demo.service").write_text("[Service]\nExecStart=/opt/demo/bin/demo\nLoadCredential=db_password\n")
    assert sdk.check(d)[1] == []


def build(d: Path, out: Path) -> bytes:
    component, problems = sdk.check(d)
    assert problems == []
    path, _ = packages.build(d, component, out)
    return path.read_bytes()


def test_build_is_reproducible_whatever_mtimes_owners_and_directory_order(tmp_path):
    a = scaffold(tmp_path / "a")
    (a / "data").mkdir()
    for i in range(20):
        (a / "data" / f"f{i}").write_text(f"payload {i}\n" * 100)
    b = tmp_path / "b" / "demo"
    # A copy made file by file in reverse order (a different directory order on disk), with other
    # mtimes and owners.
    for src in sorted(a.rglob("*"), reverse=True):
        dst = b / src.relative_to(a)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            shutil.copymode(src, dst)
    for p in b.rglob("*"):
        os.utime(p, (123456789, 123456789))
        if os.geteuid() == 0:
            os.lchown(p, 4242, 4242)
    (tmp_path / "out1").mkdir()
    (tmp_path / "out2").mkdir()
    first, second = build(a, tmp_path / "out1"), build(b, tmp_path / "out2")
    assert first == second
    assert (tmp_path / "out1" / "demo-0.1.0.tupper").exists()


def test_inspect_shows_manifest_units_files_and_a_verified_digest(tmp_path):
    d = scaffold(tmp_path)
    (tmp_path / "out").mkdir()
    path, digest = packages.build(d, sdk.check(d)[0], tmp_path / "out")
    info = packages.inspect(path)
    assert (info["name"], info["version"], info["digest"], info["digest_ok"]) == ("demo", "0.1.0", digest, True)
    assert info["units"] == ["demo.service"]
    assert 'name = "demo"' in info["manifest"]
    files = {f["path"]: f for f in info["files"]}
    assert files["bin/demo"]["mode"] == 0o755 and files["README.md"]["mode"] == 0o644


def evil_package(tmp_path: Path, add) -> Path:
    """A package built by hand: valid metadata, then whatever `add(tar)` puts in."""
    out = tmp_path / "evil-1.tupper"
    meta = json.dumps({"format": 1, "name": "evil", "version": "1", "digest": "sha256:" + "0" * 64}).encode()
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        info = tarfile.TarInfo(packages.META)
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
        add(tar)
    return out


def _file(tar, name, data=b"x", mode=0o644):
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def _special(tar, name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    tar.addfile(info)


@pytest.mark.parametrize("add, expected", [
    (lambda t: _file(t, "../escape"), "'..' in its path"),
    (lambda t: _file(t, "a/../../escape"), "'..' in its path"),
    (lambda t: _file(t, "/etc/cron.d/evil"), "absolute path"),
    (lambda t: _special(t, "link", tarfile.SYMTYPE, "/etc/passwd"), "absolute symlink"),
    (lambda t: _special(t, "link", tarfile.SYMTYPE, "../../etc"), "leaves the package"),
    (lambda t: (_special(t, "d", tarfile.SYMTYPE, "."), _file(t, "d/x")), "goes through a symlink"),
    (lambda t: (_file(t, "a"), _special(t, "b", tarfile.LNKTYPE, "a")), "hard link"),
    (lambda t: _special(t, "dev", tarfile.CHRTYPE), "device node"),
    (lambda t: _special(t, "blk", tarfile.BLKTYPE), "device node"),
    (lambda t: _special(t, "pipe", tarfile.FIFOTYPE), "named pipe"),
    (lambda t: _file(t, "bin/su", mode=0o4755), "setuid/setgid"),
    (lambda t: _file(t, "bin/sg", mode=0o2755), "setuid/setgid"),
    (lambda t: (_file(t, "x"), _file(t, "x")), "appears twice"),
])
def test_malicious_members_are_refused_when_read(tmp_path, add, expected):
    pkg = evil_package(tmp_path, add)
    with pytest.raises(InvalidInput, match=expected.replace("(", r"\(").replace(")", r"\)")):
        list(packages.members(pkg))


def test_a_file_that_is_not_a_package_is_refused(tmp_path):
    junk = tmp_path / "junk.tupper"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(InvalidInput, match="not a tupper package"):
        packages.inspect(junk)
    with pytest.raises(InvalidInput, match="no such package"):
        packages.inspect(tmp_path / "missing.tupper")
