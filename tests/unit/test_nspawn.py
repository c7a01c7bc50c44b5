"""The systemd-nspawn command line, tested as a value."""

from __future__ import annotations

from pathlib import Path

from tupper.container import nspawn

NO_SYSTEMD = nspawn.Host(systemd=False)
SYSTEMD = nspawn.Host(systemd=True)
ROOTFS = Path("/var/lib/tupper/containers/web/rootfs")


def test_boot_argv_on_a_host_without_systemd_neither_registers_nor_makes_a_scope():
    assert nspawn.boot_argv("web", ROOTFS, [], NO_SYSTEMD) == [
        "systemd-nspawn",
        "--quiet",
        "--directory", str(ROOTFS),
        "--machine", "web",
        "--boot",
        "--console", "pipe",
        "--link-journal", "no",
        "--settings", "no",
        "--register", "no",
        "--keep-unit",
    ]  # fmt: skip


def test_boot_argv_on_a_systemd_host_registers_with_machined_and_lets_it_make_a_scope():
    argv = nspawn.boot_argv("web", ROOTFS, [], SYSTEMD)
    assert argv[-2:] == ["--register", "yes"]
    assert "--keep-unit" not in argv
    assert argv.count("--register") == 1


def test_boot_argv_renders_binds_in_order_read_only_by_default():
    binds = [
        nspawn.Bind(Path("/srv/components/hello"), "/opt/hello"),
        nspawn.Bind(Path("/srv/data"), "/var/lib/data", read_only=False),
    ]
    argv = nspawn.boot_argv("web", ROOTFS, binds, NO_SYSTEMD)
    assert argv[-4:] == ["--bind-ro", "/srv/components/hello:/opt/hello", "--bind", "/srv/data:/var/lib/data"]


def test_bind_paths_escape_colons_and_backslashes():
    """nspawn splits a bind at ':' and takes '\\x' as x (checked with systemd-nspawn 252)."""
    argv = nspawn.boot_argv("web", ROOTFS, [nspawn.Bind(Path("/srv/a:b\\c"), "/opt/x:y")], NO_SYSTEMD)
    assert argv[-2:] == ["--bind-ro", "/srv/a\\:b\\\\c:/opt/x\\:y"]


def test_boot_argv_is_a_list_of_strings():
    argv = nspawn.boot_argv("web", ROOTFS, [nspawn.Bind(Path("/a"), "/b")], SYSTEMD)
    assert all(isinstance(a, str) for a in argv)


def test_command_argv_runs_the_command_after_a_double_dash_without_booting():
    argv = nspawn.command_argv(ROOTFS, ["/bin/sh", "-c", "echo --boot"], NO_SYSTEMD)
    assert argv == [
        "systemd-nspawn", "--quiet", "--directory", str(ROOTFS), "--pipe", "--link-journal", "no", "--settings", "no",
        "--register", "no", "--keep-unit",
        "--", "/bin/sh", "-c", "echo --boot",
    ]  # fmt: skip
    assert "--boot" not in argv[: argv.index("--")]


def test_command_argv_on_a_systemd_host_keeps_nspawn_defaults():
    argv = nspawn.command_argv(ROOTFS, ["true"], SYSTEMD)
    assert argv == ["systemd-nspawn", "--quiet", "--directory", str(ROOTFS), "--pipe", "--link-journal", "no", "--settings", "no", "--", "true"]


def test_host_detect_needs_both_systemd_and_a_system_bus(monkeypatch):
    present: set[str] = set()
    monkeypatch.setattr(nspawn.os.path, "isdir", lambda p: p in present)
    monkeypatch.setattr(nspawn.os.path, "exists", lambda p: p in present)
    assert nspawn.Host.detect() == NO_SYSTEMD
    present.add("/run/systemd/system")
    assert nspawn.Host.detect() == NO_SYSTEMD
    present.add("/run/dbus/system_bus_socket")
    assert nspawn.Host.detect() == SYSTEMD


def test_the_read_write_bind_sources_of_an_argv_are_what_stays_writable_for_nspawn():
    from tupper.container.nspawn import _escape, writable_sources

    argv = ["systemd-nspawn", "--bind", _escape("/srv/a:b") + ":/data", "--bind-ro", "/opt/c:/opt/c", "--bind", "/var/v:/v"]
    assert writable_sources(argv) == ["/srv/a:b", "/var/v"]
