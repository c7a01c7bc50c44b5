"""The store: images, container roots, components and records under the tupper root, on one of two backends.

btrfs (the default): images and components are read-only subvolumes, a container's root a writable
snapshot of its image. All subvolume operations go through btrfsutil. Where the root is not on btrfs,
the store is a sparse loopback pool file beside it (`<root>.img`), created once and mounted at the root
on first use.

overlay (tupper.store.overlay): any filesystem that can hold an overlayfs upper layer (ext4, xfs,
tmpfs). Images and components are plain directory trees; a container's root is an overlayfs mount
(the image as its lower layer, the container's `upper/` and `work/` beside it). Chosen where no loop
pool can be made (inside another container, on a runner without loop devices), or by `tupper store
init --backend overlay`; the root's `.backend` file says so from then on.

Callers use the same verbs on both: create_subvolume, make_root, publish, copy_tree, delete_subvolume,
remove_tree, is_subvolume ("is one of the store's trees").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import attrs
import btrfsutil

from tupper import proc
from tupper.errors import Busy, Failed, InvalidInput
from tupper.progress import SILENT, Progress

DEFAULT_ROOT = Path("/var/lib/tupper")
# Room a new container needs at least (its journal, the services' state) and a new image (debootstrap).
FREE_FOR_CONTAINER = 64 << 20
FREE_FOR_IMAGE = 512 << 20
BTRFS_MAGIC_NAME = "btrfs"
BACKENDS = ("btrfs", "overlay")
BACKEND_FILE = ".backend"


def default_root() -> Path:
    """--root's default: $TUPPER_ROOT, the config file's `root`, /var/lib/tupper (tupper.config)."""
    from tupper import config

    return config.root()


def mount_of(path: Path) -> tuple[str, str, str]:
    """(mount point, fs type, source) of the mount holding `path`, from /proc/self/mountinfo."""
    path = Path(os.path.realpath(path))
    best = ("/", "", "")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            mnt = fields[4].encode().decode("unicode_escape")
            fstype, source = right.split()[:2]
            if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype, source)
    return best


def pool_file_for(root: Path) -> Path:
    return root.parent / f"{root.name}.img"


def backend_of(root: Path) -> str | None:
    """The backend a store at `root` was made with: "overlay" when its `.backend` file says so, "btrfs"
    when it is on btrfs, None when there is no store there yet."""
    try:
        text = (root / BACKEND_FILE).read_text().strip()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise Failed(f"cannot read {root / BACKEND_FILE}: {exc.strerror}") from None
    if text:
        if text not in BACKENDS:
            raise Failed(f"{root / BACKEND_FILE}: unknown store backend {text!r}", hint=f"one of: {', '.join(BACKENDS)}")
        return text
    if root.is_dir() and mount_of(root)[1] == BTRFS_MAGIC_NAME:
        return "btrfs"
    return None


class PoolUnavailable(Exception):
    """A loopback btrfs pool cannot be made here (no loop devices, no mkfs.btrfs)."""


@attrs.define
class Store:
    root: Path
    backing: str  # "btrfs" (a btrfs mount given to us), "loopback" (our pool file), "directory" (overlay backend)
    pool_file: Path | None = None

    backend: ClassVar[str] = "btrfs"

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: Path | None = None, *, create: bool = True, progress: Progress = SILENT,
             backend: str | None = None) -> Store:
        """Open the store at `root`, creating or mounting the loopback pool when `create`. A new store
        gets `backend` (None: btrfs, else overlay where no loop pool can be made); an existing one keeps its own."""
        from tupper.store.overlay import OverlayStore

        root = Path(os.path.abspath(root or default_root()))
        pool = pool_file_for(root)
        existing = next(p for p in (root, *root.parents) if p.exists())
        mnt, fstype, _ = mount_of(existing)
        have = backend_of(root) if root.is_dir() else None
        if backend is not None and have is not None and have != backend and any(root.iterdir()):
            raise InvalidInput(f"{root}: the store there uses the {have} backend, not {backend}",
                               hint="a store keeps its backend: pick another --root for the other one")
        if backend == "overlay" and have is None and pool.exists():
            raise InvalidInput(f"{root}: a btrfs pool {pool} exists for this root", hint="a store keeps its backend: pick another --root")
        if have == "overlay" or (backend == "overlay" and have is None):
            return OverlayStore.open_at(root, create=create, progress=progress)
        store: Store
        if fstype == BTRFS_MAGIC_NAME:
            backing = "loopback" if mnt == str(root) and pool.exists() else "btrfs"
            root.mkdir(parents=True, exist_ok=True)
            store = cls(root, backing, pool if backing == "loopback" else None)
        elif not create:
            raise Failed(f"no tupper store at {root}", hint="run any tupper command as root to create it")
        else:
            try:
                store = cls._mount_pool(root, pool, progress)
            except PoolUnavailable as exc:
                if backend == "btrfs":
                    raise Failed(f"cannot make a btrfs store at {root}: {exc}",
                                 hint="use a btrfs mount, a host with loop devices, or `tupper store init --backend overlay`") from None
                progress.note(f"{root} is not on btrfs and no loopback pool can be made here ({exc}): "
                              "using the overlay backend (directory trees, overlayfs container roots)")
                return OverlayStore.open_at(root, create=True, progress=progress)
        store._ensure_layout()
        return store

    @classmethod
    def _mount_pool(cls, root: Path, pool: Path, progress: Progress) -> Store:
        if not proc.is_root():
            raise Failed("creating or mounting the store needs root", hint="run tupper as root")
        root.parent.mkdir(parents=True, exist_ok=True)
        # The pool file doubles as the lock that keeps two tuppers from creating or mounting it at once.
        fd = os.open(pool, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if root.exists() and mount_of(root)[1] == BTRFS_MAGIC_NAME:
                return cls(root, "loopback", pool)
            root.mkdir(parents=True, exist_ok=True)
            if any(root.iterdir()):
                raise Failed(
                    f"{root} is not on btrfs and is not empty",
                    hint="empty it, mount btrfs there, or pick another root with --root / TUPPER_ROOT",
                )
            fresh = os.fstat(fd).st_size == 0
            try:
                if fresh:
                    from tupper import config

                    size = config.pool_size()
                    with progress.step(f"Creating loopback btrfs pool {pool} ({size}, sparse)"):
                        proc.run(["truncate", "-s", size, str(pool)])
                        proc.run(["mkfs.btrfs", "-q", "-L", "tupper", str(pool)])
                proc.run(["mount", "-o", "loop", str(pool), str(root)])
            except (Failed, OSError) as exc:
                if fresh:
                    pool.unlink(missing_ok=True)
                    # A pool that could not be made (no loop devices, no mkfs.btrfs): the caller may fall back.
                    raise PoolUnavailable(str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__) from None
                raise
            if fresh:
                progress.note(f"{root} is not on btrfs: created a loopback btrfs pool {pool} and mounted it there")
            else:
                progress.note(f"mounted the loopback btrfs pool {pool} at {root}")
            return cls(root, "loopback", pool)
        finally:
            os.close(fd)

    def _ensure_layout(self) -> None:
        for d in (self.images_dir, self.containers_dir, self.tmp_dir, self.root / "components"):
            d.mkdir(mode=0o700, exist_ok=True)

    # ---- layout --------------------------------------------------------------------------------

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def listable(self, directory: Path, what: str) -> Path:
        """`directory`, after making sure this process may list it: a listing it may not read would
        look empty (pathlib's glob says nothing), and an empty table with exit 0 is a lie."""
        if directory.is_dir() and not os.access(directory, os.R_OK | os.X_OK):
            raise Failed(f"cannot read the store's {what} ({directory}): permission denied",
                         hint="run it as root (tupperd answers container verbs for the admin group; see docs/api.md)")
        return directory

    @property
    def containers_dir(self) -> Path:
        return self.root / "containers"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def is_default(self) -> bool:
        return self.root == DEFAULT_ROOT

    @property
    def ident(self) -> str:
        """A short name for this store in places shared by every store on the host (cgroups, /run)."""
        import hashlib

        return "default" if self.is_default else hashlib.sha256(str(self.root).encode()).hexdigest()[:8]

    @property
    def cgroup_parent(self) -> str:
        return "tupper" if self.is_default else f"tupper-{self.ident}"

    @property
    def run_dir(self) -> Path:
        """Runtime files of this store's containers (agent sockets): tmpfs, gone at reboot."""
        return Path("/run/tupper") if self.is_default else Path(f"/run/tupper/store-{self.ident}")

    @property
    def agents_dir(self) -> Path:
        return self.run_dir / "agents"

    def agent_dir(self, name: str) -> Path:
        """The directory holding container `name`'s secrets-agent socket, bind-mounted into that container only."""
        return self.agents_dir / name

    # ---- scratch space: work in progress, owned by one process ------------------------------------

    def scratch(self, kind: str, label: str) -> Path:
        """A path in tmp/ for work in progress (a new image, an import, a container being removed).
        Its name carries the owner (pid and start time): once the owner is gone, it is garbage that
        `stale_scratch` finds, whatever moment the owner died at."""
        return self.tmp_dir / f"{kind}.{os.getpid()}.{proc.pid_starttime(os.getpid()) or 0}.{label}"

    def stale_scratch(self) -> list[Path]:
        """Entries of tmp/ whose owner no longer runs (or that tupper did not name)."""
        stale = []
        for entry in sorted(self.tmp_dir.iterdir()):
            parts = entry.name.split(".", 3)
            if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit():
                if proc.pid_alive(int(parts[1]), int(parts[2])):
                    continue
            stale.append(entry)
        return stale

    def remove_tree(self, path: Path) -> None:
        """Remove `path` whatever it is: a subvolume (with nested ones), a directory, a file."""
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif self.is_subvolume(path):
            self.delete_subvolume(path)
        elif path.is_dir():
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink() and self.is_subvolume(child):
                    self.delete_subvolume(child)
            shutil.rmtree(path, ignore_errors=True)

    # ---- tupperd's claim on the store -----------------------------------------------------------

    @property
    def daemon_lock_file(self) -> Path:
        return self.root / ".tupperd.lock"

    def claim_for_daemon(self) -> int:
        """Taken by tupperd for its whole life (an flock, released by the kernel when it dies): one
        tupperd per store, and `--direct` knows not to act behind its back. Returns the fd to keep."""
        fd = os.open(self.daemon_lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = self.daemon_pid()
            os.close(fd)
            raise Busy(f"another tupperd{f' (pid {other})' if other else ''} already serves the store {self.root}",
                       hint="one tupperd per store: stop that one, or give this one another --root") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def daemon_pid(self) -> int | None:
        """The pid of the tupperd serving this store, None when none does."""
        try:
            fd = os.open(self.daemon_lock_file, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            return None  # nobody holds it
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise name allocation and removal across tupper processes."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ---- trees: subvolumes here (btrfsutil only), directories and overlayfs in OverlayStore ----------

    def make_root(self, image: Path, rootfs: Path) -> None:
        """A container's root at `rootfs`: a writable snapshot of `image`."""
        self.snapshot(image, rootfs)

    def publish(self, tmp: Path, final: Path) -> None:
        """Make the tree built at `tmp` the read-only `final` (an image, a component). `tmp` may remain:
        the caller deletes it."""
        self.snapshot(tmp, final, read_only=True)

    def copy_tree(self, source: Path, dest: Path) -> None:
        """A writable copy of `source` at `dest` (a layer is built on its parent's copy)."""
        self.snapshot(source, dest)

    def settle(self) -> None:
        """Wait (a little) for btrfs to clean the subvolumes deleted so far: until then their extents
        count as shared with what they were snapshots of."""
        with contextlib.suppress(Failed):  # not done in a minute: the sizes settle later by themselves
            proc.run(["btrfs", "subvolume", "sync", str(self.root)], check=False, timeout=60)

    def mount_roots(self) -> None:
        """Bring every container root back after a reboot: nothing to do where roots are subvolumes."""

    def ensure_root(self, rootfs: Path) -> None:
        """Make sure the container root at `rootfs` is there to use (see mount_roots)."""

    def create_subvolume(self, path: Path) -> None:
        self._call(btrfsutil.create_subvolume, path)

    def snapshot(self, source: Path, dest: Path, *, read_only: bool = False) -> None:
        self._call(btrfsutil.create_snapshot, source, dest, read_only=read_only)

    def set_read_only(self, path: Path, read_only: bool = True) -> None:
        self._call(btrfsutil.set_subvolume_read_only, path, read_only)

    def is_subvolume(self, path: Path) -> bool:
        try:
            return btrfsutil.is_subvolume(str(path))
        except btrfsutil.BtrfsUtilError:
            return False

    def subvolume_created(self, path: Path) -> float:
        """When the subvolume at `path` was made (its otime), as a Unix time."""
        return float(self._call(btrfsutil.subvolume_info, path).otime)

    def delete_subvolume(self, path: Path) -> None:
        """Delete `path` and any subvolumes nested in it (systemd-tmpfiles makes some inside containers)."""
        if not path.exists():
            return
        if not self.is_subvolume(path):
            shutil.rmtree(path)
            return
        if btrfsutil.get_subvolume_read_only(str(path)):
            self.set_read_only(path, False)
        for nested, _ in list(btrfsutil.SubvolumeIterator(str(path), post_order=True)):
            nested_path = path / nested
            if btrfsutil.get_subvolume_read_only(str(nested_path)):
                self.set_read_only(nested_path, False)
        self._call(btrfsutil.delete_subvolume, path, recursive=True)

    @staticmethod
    def _call(fn, path: Path, *args, **kwargs):
        try:
            return fn(str(path), *args, **kwargs)
        except btrfsutil.BtrfsUtilError as exc:
            full = getattr(exc, "errno", None) == errno.ENOSPC
            raise Failed(f"btrfs: {fn.__name__}({path}): {exc}",
                         hint="the store is full: see `tupper store info`; remove what you no longer need, or grow the pool" if full else None) from None

    # ---- space ---------------------------------------------------------------------------------

    def tree_usage(self, paths: list[Path]) -> dict[Path, tuple[int, int, int]]:
        """(total, exclusive, shared) bytes of each tree: `btrfs filesystem du`, which asks the kernel
        which extents are shared (FIEMAP): a layer's exclusive bytes are what it adds to its parent, an
        image's shared ones what its layers and the containers made from it share with it. What removing
        a tree frees is at most its exclusive bytes."""
        if not paths:
            return {}
        out = proc.run(["btrfs", "filesystem", "du", "-s", "--raw", *map(str, paths)], check=False).stdout
        usage: dict[Path, tuple[int, int, int]] = {}
        for line in out.splitlines()[1:]:
            fields = line.split(None, 3)
            if len(fields) == 4 and all(f.isdigit() for f in fields[:3]):
                usage[Path(fields[3])] = (int(fields[0]), int(fields[1]), int(fields[2]))
        return usage

    def require_free(self, needed: int, what: str) -> None:
        """Refuse to start `what` on a store without room for it, before anything is made: a store
        filled half-way through an operation leaves it to the undo path on a full disk."""
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if free < needed:
            raise Failed(f"{what}: the store {self.root} is full ({free >> 20} MiB free, {needed >> 20} MiB needed)",
                         hint="see `tupper store info`; remove containers, images or components you no longer need "
                              "(stop and rm work on a full store), or grow the pool")

    # ---- reporting -----------------------------------------------------------------------------

    def info(self) -> dict:
        st = os.statvfs(self.root)
        size = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        info = {
            "path": str(self.root),
            "backend": self.backend,
            "backing": self.backing,
            "size": size,
            "free": free,
            "used": size - st.f_bfree * st.f_frsize,
            "pool_file": str(self.pool_file) if self.pool_file else None,
            "device": mount_of(self.root)[2],
        }
        if self.pool_file:
            info["pool_file_allocated"] = os.stat(self.pool_file).st_blocks * 512
        return info

    def unmount(self) -> None:
        """Unmount a loopback pool (the loop device is released with it)."""
        if self.backing != "loopback":
            raise InvalidInput(f"{self.root} is a btrfs mount tupper did not create; unmount it yourself")
        device = mount_of(self.root)[2]
        proc.run(["umount", str(self.root)])
        # autoclear releases the loop device only when btrfs lets go of it, which can lag; detach now.
        if device.startswith("/dev/loop"):
            proc.run(["losetup", "--detach", device], check=False)
