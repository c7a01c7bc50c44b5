"""The pure parts of shells: the shell unit's properties, the container's accounts, and the checks
`exec -e/-u/-w` and `shell` share (against a directory standing in for a container's root)."""

from __future__ import annotations

import pytest

from tupper.container.systemd import shell_properties
from tupper.errors import InvalidInput
from tupper.runtime.shells import Account, accounts, check_options

PASSWD = """root:x:0:0:root:/root:/bin/bash
# a comment
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
broken line
app:x:1000:1000::/home/app:/bin/sh
"""


@pytest.fixture
def root(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(PASSWD)
    (tmp_path / "srv").mkdir()
    return str(tmp_path)


def test_accounts_are_read_from_the_containers_passwd(root):
    assert accounts(root) == [Account("root", 0, "/root", "/bin/bash"), Account("nobody", 65534, "/nonexistent", "/usr/sbin/nologin"),
                              Account("app", 1000, "/home/app", "/bin/sh")]


def test_options_are_checked_against_the_container(root):
    assert check_options(root, "web", "shell", env={"A_1": "x"}, user="app", workdir="/srv") == Account("app", 1000, "/home/app", "/bin/sh")
    assert check_options(root, "web", "shell", env=None, user="1000", workdir=None).name == "app"
    assert check_options(root, "web", "shell", env=None, user="4242", workdir=None) is None  # a uid systemd can run as
    with pytest.raises(InvalidInput, match="shell: user ghost: no such user in container 'web'"):
        check_options(root, "web", "shell", env=None, user="ghost", workdir=None)
    with pytest.raises(InvalidInput, match="not a variable name"):
        check_options(root, "web", "exec", env={"1X": ""}, user=None, workdir=None)
    with pytest.raises(InvalidInput, match="-w srv: not an absolute path"):
        check_options(root, "web", "exec", env=None, user=None, workdir="srv")
    with pytest.raises(InvalidInput, match="-w /etc/passwd: no such directory"):
        check_options(root, "web", "exec", env=None, user=None, workdir="/etc/passwd")


def test_a_shell_unit_runs_on_the_terminal_and_is_collected():
    props = shell_properties("/bin/bash", ["-bash"], tty="/dev/pts/3", term="xterm", env={"A": "$x"}, user="app")
    assert props[b"ExecStart"] == [(b"/bin/bash", [b"-bash"], False)]  # argv[0] "-bash": a login shell
    assert props[b"TTYPath"] == b"/dev/pts/3"
    assert props[b"StandardInput"] == props[b"StandardOutput"] == props[b"StandardError"] == b"tty"
    assert props[b"User"] == b"app" and props[b"WorkingDirectory"] == b"-~"
    assert props[b"CollectMode"] == b"inactive-or-failed" and props[b"SendSIGHUP"] is True
    assert props[b"Environment"] == [b"TERM=xterm", b"A=$x"]
    assert shell_properties("/bin/sh", ["sh"], tty="/dev/pts/0", term="", workdir="/srv")[b"WorkingDirectory"] == b"/srv"
