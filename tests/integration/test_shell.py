"""`tupper shell` and `tupper exec -it` driven through a real pseudo-terminal (the pty module), as a
user at a terminal drives them: a prompt, a command, the terminal size the user's terminal has, the
shell's exit code; and nothing left in the container afterwards, even when the user's side is killed."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time

from helpers import REPO

ROWS, COLS = 33, 101


class Terminal:
    """A command on a new pseudo-terminal of ours, sized ROWS x COLS, read as a user reads it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the command, with the terminal as its stdin, stdout and stderr
            try:
                os.chdir(REPO)
                os.execve(argv[0], argv, {**env, "TERM": "xterm"})
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        self.seen = b""

    def expect(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} on the terminal within {timeout}s; it shows: {self.seen.decode(errors='replace')!r}"
            if select.select([self.fd], [], [], min(left, 0.5))[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # EIO: the command ended and closed the terminal
                    chunk = b""
                assert chunk, f"the terminal closed before {text!r}; it showed: {self.seen.decode(errors='replace')!r}"
                self.seen += chunk
        return self.seen.decode(errors="replace")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def exit_code(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:
                    pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        raise AssertionError(f"still running after {timeout}s: {self.seen.decode(errors='replace')!r}")

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)


def _sessions_left(tupper, name: str) -> list[str]:
    p = tupper("exec", name, "--", "systemctl", "list-units", "--all", "--plain", "--no-legend", "tupper-shell-*")
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def test_shell_gives_a_login_on_a_terminal_inside_with_the_users_size_and_the_shells_exit_code(tupper, names):
    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    t = Terminal([sys.executable, "-m", "tupper", "shell", name], tupper.env)
    t.expect("# ")  # root's prompt: a login shell
    t.send("tty; stty size; echo \"home=$HOME user=$USER\"; exit 7\r")
    shown = t.expect("user=root")
    assert t.exit_code() == 7
    assert "/dev/pts/" in shown and "not a tty" not in shown
    assert f"{ROWS} {COLS}" in shown
    assert "home=/root user=root" in shown
    # the session's unit is gone; failed or not, the container's systemd stays `running`
    assert _sessions_left(tupper, name) == []
    assert tupper("exec", name, "--", "systemctl", "is-system-running").stdout.strip() == "running"


def test_exec_it_runs_a_command_on_a_terminal_as_a_user(tupper, names):
    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    t = Terminal([sys.executable, "-m", "tupper", "exec", "-it", "-u", "nobody", "-e", "GREETING=hi", name, "--",
                  "sh", "-c", "test -t 0 && echo \"terminal $(stty size) $(id -un) $GREETING\"; exit 3"], tupper.env)
    shown = t.expect(f"terminal {ROWS} {COLS} nobody hi")
    assert t.exit_code() == 3, shown
    # USER@NAME, and a command in place of the login shell
    t = Terminal([sys.executable, "-m", "tupper", "shell", f"nobody@{name}", "--", "/bin/sh", "-c", "echo \"as $(id -un)\""], tupper.env)
    t.expect("as nobody")
    assert t.exit_code() == 0
    p = tupper("shell", name, "no-such-user")
    assert p.returncode == 2 and "user no-such-user: no such user in container" in p.stderr
    assert _sessions_left(tupper, name) == []


def test_a_shell_whose_user_side_is_killed_is_hung_up_and_collected(tupper, names):
    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    t = Terminal([sys.executable, "-m", "tupper", "shell", name], tupper.env)
    t.expect("# ")
    assert len(_sessions_left(tupper, name)) > 0  # the session's unit runs while the shell does
    t.kill()  # the client dies: its end of the terminal closes, the shell gets SIGHUP
    deadline = time.monotonic() + 20
    while _sessions_left(tupper, name):
        assert time.monotonic() < deadline, "the shell's unit outlived its user by 20s"
        time.sleep(0.5)
    assert tupper("exec", name, "--", "systemctl", "is-system-running").stdout.strip() == "running"


def test_shell_in_process_with_direct(tupper, names):
    """--direct: the CLI opens the terminal and follows the unit itself (hosts without a bus)."""
    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    t = Terminal([sys.executable, "-m", "tupper", "--direct", "--root", str(tupper.root), "shell", name, "--",
                  "/bin/sh", "-c", "stty size; exit 5"], tupper.env)
    t.expect(f"{ROWS} {COLS}")
    assert t.exit_code() == 5


def test_exec_of_a_missing_program_names_it(tupper, names):
    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    p = tupper("exec", name, "--", "/nonexistent")
    assert p.returncode == 2 and "/nonexistent: command not found in container" in p.stderr
    p = subprocess.run([sys.executable, "-m", "tupper", "exec", "-it", name, "--", "no-such-program"], capture_output=True, text=True,
                       env=tupper.env, cwd=REPO, timeout=60)
    assert p.returncode == 2 and "no-such-program: command not found in container" in p.stderr
