"""The unit files written into a container: plan() as a value, write() into a directory."""

from __future__ import annotations

import os
from pathlib import Path

from helpers import write_component

from tupper.container import unitfiles
from tupper.model import spec as specmod

D = "etc/systemd/system"


def make_spec(tmp_path: Path, text: str) -> specmod.Spec:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return specmod.load(path)


def test_plan_copies_units_adds_drop_ins_and_a_target_wanting_every_unit(tmp_path):
    write_component(tmp_path / "db", "db", {"db.service": "[Service]\nExecStart=/opt/db/run\n"})
    write_component(
        tmp_path / "web", "web",
        {"web.service": "[Service]\nExecStart=/opt/web/run\n", "web.socket": "[Socket]\nListenStream=80\n"},
        requires=["db"],
    )  # fmt: skip
    spec = make_spec(tmp_path, 'name = "site"\n[[components]]\npath = "web"\n[[components]]\npath = "db"\n')
    assert unitfiles.plan(spec) == {
        f"{D}/web.service": "[Service]\nExecStart=/opt/web/run\n",
        f"{D}/web.service.d/50-tupper.conf": (
            "# written by tupper for component web 1.0.0\n[Unit]\nPartOf=tupper.target\n"
            "After=db.service\nRequires=db.service\n"
        ),
        f"{D}/web.socket": "[Socket]\nListenStream=80\n",
        f"{D}/web.socket.d/50-tupper.conf": (
            "# written by tupper for component web 1.0.0\n[Unit]\nPartOf=tupper.target\n"
            "After=db.service\nRequires=db.service\n"
        ),
        f"{D}/db.service": "[Service]\nExecStart=/opt/db/run\n",
        f"{D}/db.service.d/50-tupper.conf": "# written by tupper for component db 1.0.0\n[Unit]\nPartOf=tupper.target\n",
        f"{D}/tupper.target": "[Unit]\nDescription=tupper components of site\nWants=web.service web.socket db.service\n",
    }


def test_requires_lists_every_unit_of_every_required_component(tmp_path):
    write_component(tmp_path / "a", "a", {"a1.service": "", "a2.socket": ""})
    write_component(tmp_path / "b", "b", {"b.service": ""})
    write_component(tmp_path / "c", "c", {"c.service": ""}, requires=["a", "b"])
    spec = make_spec(tmp_path, "".join(f'[[components]]\npath = "{n}"\n' for n in "abc"))
    dropin = unitfiles.plan(spec)[f"{D}/c.service.d/50-tupper.conf"]
    assert "After=a1.service a2.socket b.service\n" in dropin
    assert "Requires=a1.service a2.socket b.service\n" in dropin


def test_env_goes_into_service_drop_ins_only(tmp_path):
    write_component(tmp_path / "web", "web", {"web.service": "", "web.socket": ""})
    spec = make_spec(tmp_path, '[[components]]\npath = "web"\n[components.env]\nPORT = "80"\nMODE = "prod"\n')
    files = unitfiles.plan(spec)
    assert files[f"{D}/web.service.d/50-tupper.conf"].endswith(
        '\n\n[Service]\nEnvironment="PORT=80"\nEnvironment="MODE=prod"\n'
    )
    assert "Environment" not in files[f"{D}/web.socket.d/50-tupper.conf"]


def test_env_values_are_quoted_for_systemd():
    cases = {
        "plain": '"K=plain"',
        "two words": '"K=two words"',
        'say "hi"': '"K=say \\"hi\\""',
        "C:\\dir\\": '"K=C:\\\\dir\\\\"',
        "100%": '"K=100%%"',
        "%n %%": '"K=%%n %%%%"',
        "line1\nline2": '"K=line1\\nline2"',
        "cr\r\ntab\t": '"K=cr\\r\\ntab\\t"',
        "bell\x07del\x7f": '"K=bell\\x07del\\x7f"',
        "it's $HOME": "\"K=it's $HOME\"",
        "ünï": '"K=ünï"',
        "": '"K="',
    }
    for value, expected in cases.items():
        assert unitfiles._quote_env("K", value) == expected, value


def test_quoted_env_never_breaks_the_line():
    quoted = unitfiles._quote_env("K", "a\nb\rc\x00d\x0be")
    assert not any(ord(ch) < 0x20 for ch in quoted)


def test_write_creates_files_and_enables_tupper_target(tmp_path):
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    files = {f"{D}/x.service": "[Service]\n", f"{D}/x.service.d/50-tupper.conf": "[Unit]\n", f"{D}/tupper.target": "[Unit]\n"}
    unitfiles.write(rootfs, files)
    for rel, text in files.items():
        assert (rootfs / rel).read_text() == text
        assert (rootfs / rel).stat().st_mode & 0o777 == 0o644
    link = rootfs / D / "multi-user.target.wants" / "tupper.target"
    assert link.is_symlink()
    assert os.readlink(link) == "/etc/systemd/system/tupper.target"
    # Writing again (an existing link) is fine.
    unitfiles.write(rootfs, files)
    assert os.readlink(link) == "/etc/systemd/system/tupper.target"


def test_write_replaces_a_symlink_in_the_image_instead_of_writing_through_it(tmp_path):
    """A masked unit (UNIT -> /dev/null) or an alias in the image must not redirect the write to the host."""
    victim = tmp_path / "host-file"
    victim.write_text("host content\n")
    rootfs = tmp_path / "rootfs"
    (rootfs / D).mkdir(parents=True)
    (rootfs / D / "x.service").symlink_to(victim)
    unitfiles.write(rootfs, {f"{D}/x.service": "[Service]\n"})
    assert victim.read_text() == "host content\n"
    assert not (rootfs / D / "x.service").is_symlink()
    assert (rootfs / D / "x.service").read_text() == "[Service]\n"
