"""Putting a new mount into a running container: open_tree() on the host, move_mount() inside.

nspawn's own /run/host/incoming propagation needs a shared host root (systemd hosts); this works on any
host: the tree is cloned here, and a short-lived thread of this process enters the container's mount
namespace, detaches what is mounted at the target and moves the clone there. setns() into a mount
namespace is refused to a thread that shares its filesystem attributes (root, cwd) with others, so the
thread first takes its own (unshare(CLONE_FS)); the namespaces it enters die with it. (A helper
process did this before: 35 ms of Python start-up per mount, where a thread takes well under 1 ms.)
The same thread sets a container's hostname in its UTS namespace (a warm pool's claim).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable

from tupper import proc
from tupper.errors import Failed

# x86-64 syscall numbers (the same on aarch64 for these new-mount-API calls).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MNT_DETACH = 0x2
CLONE_NEWNS = 0x00020000
CLONE_FS = 0x00000200
CLONE_NEWUTS = 0x04000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def clone_tree(path: str, read_only: bool = True) -> int:
    """A detached copy of the mount tree at `path` (a bind mount not yet attached anywhere)."""
    fd = _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE), f"open_tree({path})")
    if read_only:
        attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY)
        try:
            _check(_libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH | AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)),
                   "mount_setattr(read-only)")
        except OSError:
            os.close(fd)
            raise
    return fd


def in_namespaces(leader: int, kinds: tuple[str, ...], work: Callable[[], None]) -> None:
    """Run `work` in a thread of its own that has entered the namespaces `kinds` ("mnt", "uts") of the
    process `leader`; its exceptions are raised here. Paths in `work` are the container's."""
    flags = {"mnt": CLONE_NEWNS, "uts": CLONE_NEWUTS}
    fds = [(os.open(f"/proc/{leader}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC), kind) for kind in kinds]
    failed: list[BaseException] = []

    def body() -> None:
        try:
            _check(_libc.unshare(CLONE_FS), "unshare(CLONE_FS)")
            for fd, kind in fds:
                _check(_libc.setns(fd, flags[kind]), f"setns({kind})")
            if "mnt" in kinds:
                os.chdir("/")
            work()
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            failed.append(exc)

    try:
        thread = threading.Thread(target=body, name=f"in-container-{leader}")
        thread.start()
        thread.join()
    finally:
        for fd, _ in fds:
            os.close(fd)
    if failed:
        raise failed[0]


def replace_mount(leader: int, source: str, target: str, read_only: bool = True) -> None:
    """Mount `source` (a host path) at `target` inside the container whose PID 1 is `leader`,
    replacing what is mounted there (read-only unless said otherwise)."""
    fd = clone_tree(source, read_only)
    try:
        in_namespaces(leader, ("mnt",), lambda: _move(fd, target))
    except OSError as exc:
        raise Failed(f"cannot mount {source} at {target} in the container: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def set_hostname(leader: int, hostname: str) -> None:
    """The kernel hostname of the container whose PID 1 is `leader` (its UTS namespace)."""
    raw = hostname.encode()

    def work() -> None:
        _check(_libc.sethostname(raw, len(raw)), "sethostname")

    try:
        in_namespaces(leader, ("uts",), work)
    except OSError as exc:
        raise Failed(f"cannot set the container's hostname to {hostname}: {exc.strerror or exc}") from None


def refresh_credential(leader: int, unit: str, credential: str, value: bytes) -> None:
    """Replace a running unit's credential in the container's /run/credentials/UNIT (a ramfs that
    systemd made read-only): systemd 252 loads credentials only when a unit starts, so a `reload`
    rotation puts the new value there itself. The value travels on a pipe, never on a command line."""
    p = proc.run([sys.executable, "-m", "tupper.container.mountns", "credential", str(leader), unit, credential],
                 check=False, input=value, binary=True, timeout=30)
    if p.returncode != 0:
        raise Failed(f"cannot refresh credential {credential} of {unit}: {p.stderr.decode(errors='replace').strip() or p.returncode}")


MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000


def _enter(leader: int) -> None:
    ns = os.open(f"/proc/{leader}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    _check(_libc.setns(ns, CLONE_NEWNS), "setns(mnt)")
    os.close(ns)
    os.chdir("/")


def _write_credential(leader: int, unit: str, credential: str, value: bytes) -> None:
    if "/" in unit or "/" in credential or unit.startswith(".") or credential.startswith("."):
        raise OSError(22, "bad unit or credential name")
    _enter(leader)
    d = f"/run/credentials/{unit}"
    flags = MS_REMOUNT | MS_BIND
    _check(_libc.mount(None, d.encode(), None, flags, None), f"remount {d} rw")
    try:
        tmp = f"{d}/.{credential}.new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(value)
        os.rename(tmp, f"{d}/{credential}")
    finally:
        _check(_libc.mount(None, d.encode(), None, flags | MS_RDONLY, None), f"remount {d} ro")


def _move(tree_fd: int, target: str) -> None:
    """In the container's mount namespace: swap the mount at `target` for the tree at `tree_fd`."""
    # The old mount goes lazily: processes still holding files in it keep them until they exit.
    if os.path.ismount(target):
        _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount2({target})")
    else:
        os.makedirs(target, exist_ok=True)
    _check(_libc.syscall(SYS_MOVE_MOUNT, tree_fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH), f"move_mount({target})")


if __name__ == "__main__":
    try:
        if sys.argv[1] == "credential":
            _write_credential(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.stdin.buffer.read())
        else:
            raise OSError(22, f"unknown action {sys.argv[1]!r}")
    except OSError as exc:
        print(exc.strerror or str(exc), file=sys.stderr)
        sys.exit(1)


MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_RELATIME = 0x200000
MS_REC = 0x4000
MS_SLAVE = 1 << 19


def confine(writable: list[str], *, private_under: str | None = None, keep: str | None = None) -> None:
    """In the calling process (nspawn's, before exec): a mount namespace of its own in which the host's
    root file system is read-only, except `writable` (each bound onto itself, so it keeps its own
    flags). Nothing mounted here reaches the host (slave propagation). Other mounts (a tmpfs /tmp, /dev,
    the store's pool) keep their flags.

    Why: systemd-nspawn 252 makes a bind mount's missing parent directories by path after resolving the
    target inside the container's root; a root rewritten at that moment (a mount point swapped for a
    symlink out of it) would have it create directories on the host. Here such a mkdir fails (EROFS),
    nspawn refuses to start, and the host stays as it was.

    Mounts below `private_under` other than those below `keep` (other containers' overlayfs roots) are
    detached here: this namespace lives as long as the container, and must not hold theirs after they
    are removed."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(mnt)")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None), "make / a slave")
    for path in writable:
        if os.path.exists(path):
            _check(_libc.mount(path.encode(), path.encode(), None, MS_BIND | MS_REC, None), f"bind {path}")
    # A bind remount must repeat the flags the mount has (locked ones above all): statvfs names them.
    have = os.statvfs("/").f_flag
    kept = 0
    for st_flag, ms_flag in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                             (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)):
        if have & st_flag:
            kept |= ms_flag
    _check(_libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept, None), "remount / read-only")
    if private_under:
        for point in _mounts_below(private_under, keep):
            _libc.umount2(point.encode(), MNT_DETACH)


def _mounts_below(top: str, keep: str | None) -> list[str]:
    """Mount points strictly below `top` and not at or below `keep`, deepest first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(top.rstrip("/") + "/") and not (keep and (point == keep or point.startswith(keep.rstrip("/") + "/"))):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)
