"""tupper.inroot: writes, reads and removals inside a container's root never leave it, whatever symlinks
the root holds (absolute, relative with "..", at the last component or on the way, dangling)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from tupper.container import unitfiles
from tupper.container.inroot import Root, find_command


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A directory standing for the host's file system: nothing may appear in it or change."""
    d = tmp_path / "host"
    d.mkdir()
    (d / "passwd").write_text("root:x:0:0\n")
    return d


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    d = tmp_path / "rootfs"
    (d / "etc").mkdir(parents=True)
    return d


def _snapshot(d: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for top, dirs, files in os.walk(d):
        for n in dirs + files:
            p = Path(top, n)
            out[str(p.relative_to(d))] = "dir" if p.is_dir() and not p.is_symlink() else (os.readlink(p) if p.is_symlink() else p.read_bytes())
    return out


@pytest.mark.parametrize("link", ["{host}", "../../../../../../{hostname}", "/../../{hostrel}"])
def test_a_directory_on_the_way_that_points_out_of_the_root_resolves_inside_it(rootfs, host, link):
    before = _snapshot(host)
    target = link.format(host=host, hostname=os.path.relpath(host, "/"), hostrel=os.path.relpath(host, "/"))
    (rootfs / "etc/systemd").mkdir()
    os.symlink(target, rootfs / "etc/systemd/system")
    # Inside the root the link means <rootfs>/<host path>: make it exist there, as a container would.
    inside = rootfs / os.path.relpath(host, "/")
    inside.mkdir(parents=True)
    with Root(rootfs) as root:
        root.write_text("etc/systemd/system/x.service", "[Service]\n")
        root.write_text("etc/systemd/system/passwd", "owned\n")
        root.symlink("etc/systemd/system/multi-user.target.wants/t.target", "/etc/systemd/system/t.target")
        assert root.read_text("etc/systemd/system/x.service") == "[Service]\n"
        root.unlink("etc/systemd/system/passwd")
    assert _snapshot(host) == before
    assert (inside / "x.service").read_text() == "[Service]\n"
    assert (inside / "multi-user.target.wants/t.target").is_symlink()
    assert not (inside / "passwd").exists()


def test_a_dangling_symlink_where_a_directory_is_needed_is_refused_and_nothing_is_made(rootfs, host):
    os.symlink(str(host / "missing"), rootfs / "etc/systemd")
    with Root(rootfs) as root, pytest.raises(NotADirectoryError, match="/etc/systemd"):
        root.write_text("etc/systemd/system/x.service", "x")
    assert not (host / "missing").exists()


def test_the_last_component_is_replaced_never_followed(rootfs, host):
    victim = host / "passwd"
    os.symlink(str(victim), rootfs / "etc/machine-id")
    os.mkfifo(rootfs / "etc/fifo")
    with Root(rootfs) as root:
        root.write_text("etc/machine-id", "abc\n", 0o444)
        root.write_text("etc/fifo", "not blocked\n")
        assert root.read_text("etc/machine-id") == "abc\n"
    assert victim.read_text() == "root:x:0:0\n"
    st = os.lstat(rootfs / "etc/machine-id")
    assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o777 == 0o444
    assert (rootfs / "etc/fifo").read_text() == "not blocked\n"


def test_read_gives_none_for_links_out_devices_and_absent_files(rootfs, host):
    os.symlink(str(host / "passwd"), rootfs / "etc/out")
    os.symlink("/dev/zero", rootfs / "etc/zero")
    with Root(rootfs) as root:
        assert root.read_text("etc/out") is None
        assert root.read_text("etc/zero") is None
        assert root.read_text("etc/none") is None
        assert root.read_text("no/such/dir/file") is None


def test_unlink_removes_the_link_itself_and_leaves_directories(rootfs, host):
    os.symlink(str(host / "passwd"), rootfs / "etc/link")
    (rootfs / "etc/dir").mkdir()
    with Root(rootfs) as root:
        root.unlink("etc/link")
        root.unlink("etc/dir")
        root.unlink("etc/absent")
    assert not os.path.lexists(rootfs / "etc/link")
    assert (host / "passwd").exists() and (rootfs / "etc/dir").is_dir()


def test_makedirs_follows_links_as_the_container_would(rootfs, host):
    os.symlink("/srv", rootfs / "opt")  # /opt -> /srv inside the container
    (rootfs / "srv").mkdir()
    host_had = os.path.lexists("/srv/comp")
    with Root(rootfs) as root:
        os.close(root.makedirs("/opt/comp"))
        os.close(root.makedirs("/opt/comp"))  # again: already there
    assert (rootfs / "srv/comp").is_dir()
    assert os.path.lexists("/srv/comp") == host_had


def test_paths_are_never_allowed_to_name_the_root_itself_or_its_parent(rootfs):
    with Root(rootfs) as root:
        for bad in ("", "/", ".", "..", "etc/.."):
            with pytest.raises(ValueError):
                root.write_text(bad, "x")


def test_writes_stay_inside_while_a_directory_on_the_way_is_swapped_for_a_link_out(rootfs, host):
    """A running container can swap /etc/systemd/system for a symlink at any moment (the live-upgrade
    case): thousands of writes racing thousands of swaps put nothing on the host."""
    before = _snapshot(host)
    unit_dir = rootfs / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    spare = rootfs / "etc/systemd/spare"
    os.symlink(str(host), spare)
    stop = threading.Event()
    swaps = [0]

    def swapper() -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        while not stop.is_set():
            if libc.renameat2(-100, str(unit_dir).encode(), -100, str(spare).encode(), 2) == 0:  # RENAME_EXCHANGE
                swaps[0] += 1

    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    written = refused = 0
    try:
        with Root(rootfs) as root:
            for i in range(3000):
                try:
                    root.write_text(f"etc/systemd/system/u{i % 7}.service", f"{i}\n")
                    written += 1
                except OSError:
                    refused += 1  # the link's target does not exist inside the root at that moment
    finally:
        stop.set()
        t.join()
    assert swaps[0] > 100, f"only {swaps[0]} swaps: the race did not happen"
    assert written > 0
    assert _snapshot(host) == before, "a write left the root"


def test_find_command_searches_path_inside_the_root(rootfs, host):
    (rootfs / "usr/bin").mkdir(parents=True)
    tool = rootfs / "usr/bin/tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    (rootfs / "usr/bin/data").write_text("not executable\n")
    os.symlink("/usr/bin/tool", rootfs / "usr/bin/alias")
    host_tool = host / "only-on-host"
    host_tool.write_text("#!/bin/sh\n")
    host_tool.chmod(0o755)
    os.symlink(str(host_tool), rootfs / "usr/bin/escape")
    assert find_command(rootfs, "tool") == "/usr/bin/tool"
    assert find_command(rootfs, "/usr/bin/tool") == "/usr/bin/tool"
    assert find_command(rootfs, "alias") == "/usr/bin/alias"
    assert find_command(rootfs, "data") is None
    assert find_command(rootfs, "/usr/bin/missing") is None
    assert find_command(rootfs, "escape") is None, "a link to a host file is not a command inside the container"
    assert find_command(rootfs, "./tool") is None


def test_unit_files_go_inside_the_root_when_the_unit_dir_is_a_link_to_the_host(rootfs, host):
    before = _snapshot(host)
    (rootfs / "etc/systemd").mkdir()
    os.symlink(str(host), rootfs / "etc/systemd/system")
    (rootfs / os.path.relpath(host, "/")).mkdir(parents=True)
    unitfiles.write(rootfs, {"etc/systemd/system/x.service": "[Service]\n"})
    with Root(rootfs) as root:
        assert root.read_text("etc/systemd/system/x.service") == "[Service]\n"
    unitfiles.remove(rootfs, ["etc/systemd/system/x.service"])
    assert _snapshot(host) == before
