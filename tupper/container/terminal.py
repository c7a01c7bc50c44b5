"""Pseudo-terminals inside a container, the way machined's OpenMachineShell makes them: the master is
opened on the container's own devpts instance (its /dev/pts/ptmx), so the slave is /dev/pts/N *inside*
the container, where its systemd can open it for a shell's unit (TTYPath=). The master stays with the
caller, who relays it to the user's terminal.

The path is resolved inside the container's root (openat2 RESOLVE_IN_ROOT): a container cannot point
tupper at a device of the host with a symlink at /dev/pts."""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import termios

from tupper.container.inroot import Root, openat2
from tupper.errors import Failed

# <asm-generic/ioctls.h>: _IOR('T', 0x30, unsigned int) and _IOW('T', 0x31, int)
TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
PTMX_MAJOR, PTMX_MINOR = 5, 2


def open_pty(root: str, rows: int = 0, cols: int = 0) -> tuple[int, str]:
    """(master fd, the slave's path inside the container) of a new pseudo-terminal on the devpts of the
    container whose root is `root` (/proc/LEADER/root); the terminal's size is set where given."""
    with Root(root) as r:
        try:
            fd = openat2(r.fd, "dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise Failed(f"cannot open a pseudo-terminal in the container (/dev/pts/ptmx): {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (PTMX_MAJOR, PTMX_MINOR):
            raise Failed("the container's /dev/pts/ptmx is not the pseudo-terminal multiplexer")
        fcntl.ioctl(fd, TIOCSPTLCK, struct.pack("i", 0))  # unlock the slave
        (number,) = struct.unpack("I", fcntl.ioctl(fd, TIOCGPTN, struct.pack("I", 0)))
        if rows > 0 and cols > 0:
            set_size(fd, rows, cols)
    except BaseException:
        os.close(fd)
        raise
    return fd, f"/dev/pts/{number}"


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def get_size(fd: int) -> tuple[int, int]:
    """(rows, columns) of the terminal on `fd`; (0, 0) where it is not one."""
    try:
        rows, cols, _x, _y = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return 0, 0
    return rows, cols
