"""The user's side of an interactive session (`tupper shell`, `tupper exec -it`): the user's terminal in
raw mode relayed to the session's pseudo-terminal master, its size followed (SIGWINCH), and the terminal
restored however the relay ends (the session ended, the user's input ended, SIGTERM or SIGHUP)."""

from __future__ import annotations

import errno
import os
import select
import signal
import termios
import tty

from tupper.container.terminal import get_size, set_size

CHUNK = 65536
EOF_CHAR = b"\x04"  # where our input is not a terminal, its end is sent on as the terminal's EOF (^D)


class _HungUp(Exception):
    """SIGTERM or SIGHUP: end the relay; closing the master hangs the session up."""


def size_of_user_terminal() -> tuple[int, int]:
    for fd in (0, 1, 2):
        if os.isatty(fd):
            rows, cols = get_size(fd)
            if rows and cols:
                return rows, cols
    return 0, 0


def relay(master: int, stdin: int = 0, stdout: int = 1) -> None:
    """Copy stdin to the master and the master to stdout until the session's side of the terminal is
    closed by every process in it (the master reads EIO). Closes `master`."""
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None

    def resize(_signum=None, _frame=None) -> None:
        rows, cols = size_of_user_terminal()
        if rows and cols:
            try:
                set_size(master, rows, cols)  # the kernel sends the session SIGWINCH
            except OSError:
                pass

    def hang_up(_signum, _frame) -> None:
        raise _HungUp

    previous = {s: signal.signal(s, h) for s, h in ((signal.SIGWINCH, resize), (signal.SIGTERM, hang_up), (signal.SIGHUP, hang_up))}
    try:
        if saved is not None:
            tty.setraw(stdin, termios.TCSANOW)
        resize()
        _copy(master, stdin, stdout, input_is_terminal=saved is not None)
    except _HungUp:
        pass
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        for s, h in previous.items():
            signal.signal(s, h)
        os.close(master)


def _copy(master: int, stdin: int, stdout: int, *, input_is_terminal: bool) -> None:
    os.set_blocking(master, False)
    to_master, to_user = bytearray(), bytearray()
    reading_input = True
    while True:
        readers = [master] if len(to_user) < CHUNK else []
        if reading_input and len(to_master) < CHUNK:
            readers.append(stdin)
        writers = ([master] if to_master else []) + ([stdout] if to_user else [])
        readable, writable, _ = select.select(readers, writers, [])
        if master in readable:
            try:
                data = os.read(master, CHUNK)
            except BlockingIOError:
                data = None
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO: no process has the terminal open any more
                    raise
                data = b""
            if data == b"":
                break
            if data:
                to_user += data
        if stdin in readable:
            data = os.read(stdin, CHUNK)
            if data:
                to_master += data
            else:
                reading_input = False
                if not input_is_terminal:
                    to_master += EOF_CHAR
        if master in writable:
            try:
                del to_master[: os.write(master, to_master)]
            except BlockingIOError:
                pass
        if stdout in writable:
            del to_user[: os.write(stdout, to_user)]
    while to_user:  # what the session wrote last
        del to_user[: os.write(stdout, to_user)]
