"""Commands and logins inside a running container: the checks `exec -e/-u/-w` and `shell` share, and
interactive sessions on a pseudo-terminal of the container (`tupper shell`, `exec -it`, D-Bus OpenShell).

A session is a transient unit of the container's systemd on a terminal allocated in the container
(container/terminal.py); nothing runs in the container that its systemd did not start. The caller gets
the terminal's master and relays it; a thread of this process holds the unit until it ends and keeps its
exit code in `Session.exit`. When the caller goes away the master closes, the shell gets SIGHUP and
ends, and systemd collects the unit.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import attrs

from tupper.container import systemd, terminal
from tupper.container.inroot import Root, find_command
from tupper.errors import Failed, InvalidInput
from tupper.model.spec import ENV_KEY_RE


@attrs.frozen
class Account:
    """A user of the container, from its /etc/passwd."""

    name: str
    uid: int
    home: str
    shell: str


def accounts(root: str) -> list[Account]:
    with Root(root) as r:
        passwd = r.read_text("etc/passwd") or ""
    out = []
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) < 7 or line.startswith("#") or not fields[2].isdigit():
            continue
        out.append(Account(fields[0], int(fields[2]), fields[5] or "/", fields[6]))
    return out


def check_options(root: str, container: str, verb: str, *, env: dict[str, str] | None, user: str | None,
                  workdir: str | None) -> Account | None:
    """`-e`, `-u` and `-w` checked against the container (its root at `root`); the account of `user`
    (None where `user` is a uid the container does not list: systemd runs it as that uid)."""
    for key in env or {}:
        if not ENV_KEY_RE.fullmatch(key):
            raise InvalidInput(f"{verb}: -e {key}=…: not a variable name (a letter or '_', then letters, digits, '_')")
    account = None
    if user is not None:
        users = accounts(root)
        found = [a for a in users if (a.uid == int(user) if user.isdigit() else a.name == user)]
        if not found and not user.isdigit():
            what = f"-u {user}" if verb == "exec" else f"user {user}"
            raise InvalidInput(f"{verb}: {what}: no such user in container {container!r} (its /etc/passwd)")
        account = found[0] if found else None
    if workdir is not None:
        if not workdir.startswith("/"):
            raise InvalidInput(f"{verb}: -w {workdir}: not an absolute path")
        try:
            with Root(root) as r:
                os.close(r.open_dir(workdir))
        except OSError:
            raise InvalidInput(f"{verb}: -w {workdir}: no such directory in container {container!r}") from None
    return account


def command_path(root: str, container: str, command: str) -> str:
    """The absolute path systemd needs for `command` (searched on the default PATH), or a clear refusal."""
    path = find_command(root, command) if command else None
    if path is None:
        raise InvalidInput(f"{command or '(empty)'}: command not found in container {container!r}")
    return path


@attrs.frozen
class Session:
    """An interactive session: the terminal's master (the caller's to relay and close), the unit's
    name (its id on D-Bus), and its exit code once it ends."""

    master: int
    unit: str
    tty: str
    exit: concurrent.futures.Future[int]


def open_session(leader: int, container: str, *, argv: list[str] | None, user: str | None, env: dict[str, str] | None,
                 workdir: str | None, term: str, rows: int, cols: int) -> Session:
    """A login shell of `user` (default root; its shell from /etc/passwd, as a login shell), or `argv`,
    on a new terminal of the container, started and running when this returns."""
    root = f"/proc/{leader}/root"
    account = check_options(root, container, "shell", env=env, user=user or "root", workdir=workdir)
    if argv:
        path, words = command_path(root, container, argv[0]), list(argv)
    else:
        shell = account.shell if account and account.shell.startswith("/") else "/bin/sh"
        if find_command(root, shell) is None:
            shell = "/bin/sh"
        path, words = shell, ["-" + shell.rsplit("/", 1)[-1]]  # argv[0] "-bash": a login shell
    master, tty = terminal.open_pty(root, rows, cols)
    unit = f"tupper-shell-{tty.rsplit('/', 1)[-1]}-{os.urandom(4).hex()}.service"
    props = systemd.shell_properties(path, words, tty=tty, term=term, env=env, user=user or "root", workdir=workdir)
    exit_code: concurrent.futures.Future[int] = concurrent.futures.Future()
    started: concurrent.futures.Future[None] = concurrent.futures.Future()

    def on_started(error: Exception | None) -> None:
        if error is None:
            started.set_result(None)
        else:
            started.set_exception(error)

    def follow() -> None:
        try:
            exit_code.set_result(systemd.run_shell(leader, unit, props, on_started))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the exit code
            if not started.done():
                started.set_exception(exc if isinstance(exc, Exception) else Failed(str(exc)))
            exit_code.set_exception(exc)

    threading.Thread(target=follow, name=unit, daemon=True).start()
    try:
        started.result()
    except BaseException:
        os.close(master)
        raise
    return Session(master, unit, tty, exit_code)
