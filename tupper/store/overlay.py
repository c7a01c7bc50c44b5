"""The overlay backend: a store on any filesystem that can hold an overlayfs upper layer (ext4, xfs, tmpfs).

Images and components are plain directory trees (read-only by contract: nothing but tupper's build
and import write there, and a container never does: they are its lower layer). A container's directory
holds, beside its record:

    rootfs/          the overlayfs mount: what nspawn boots, what `tupper cp` and the runtime see
    upper/, work/    the container's own changes, and overlayfs's work directory
    .overlay-lower   the image tree the root is made of (one line), to mount it again after a reboot

The mount lives as long as the container: made by make_root, taken down by remove_tree (`rm`) and by
`store unmount`, made again by mount_roots whenever the store is opened and finds it missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import attrs

from tupper import proc
from tupper.errors import Failed, InvalidInput
from tupper.progress import SILENT, Progress
from tupper.store.store import BACKEND_FILE, Store, mount_of

LOWER_FILE = ".overlay-lower"
# overlayfs mount options are separated by "," and lower layers by ":"; a path with either cannot be named.
_UNSAFE_IN_OPTIONS = (",", ":", "\\", "\n")


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape")


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` (this mount namespace), deepest first."""
    top = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == top or point.startswith(top.rstrip("/") + "/"):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def is_mount_point(path: Path) -> bool:
    return os.path.realpath(path) in mounts_under(path)


def _probe(root: Path) -> None:
    """Mount a tiny overlay in `root` and take it down: the filesystem must take an upper layer (not
    every one does: overlayfs itself, some network filesystems). Nothing of it remains."""
    probe = root / f".probe.{os.getpid()}"
    try:
        for d in ("lower", "upper", "work", "merged"):
            (probe / d).mkdir(parents=True)
        proc.run(["mount", "-t", "overlay", "overlay", "-o",
                  f"lowerdir={probe / 'lower'},upperdir={probe / 'upper'},workdir={probe / 'work'}", str(probe / "merged")])
        proc.run(["umount", str(probe / "merged")])
    except (Failed, OSError) as exc:
        raise Failed(f"{root} ({mount_of(root)[1]}) cannot hold overlayfs layers: {str(exc).strip().splitlines()[-1]}",
                     hint="pick a --root on ext4, xfs or tmpfs") from None
    finally:
        shutil.rmtree(probe, ignore_errors=True)


@attrs.define
class OverlayStore(Store):
    backend = "overlay"

    @classmethod
    def open_at(cls, root: Path, *, create: bool, progress: Progress = SILENT) -> OverlayStore:
        """The overlay store at `root`; with `create`, made there (checked: overlayfs must work on it)."""
        marker = root / BACKEND_FILE
        if not marker.is_file():
            if not create:
                raise Failed(f"no tupper store at {root}", hint="run any tupper command as root to create it")
            if not proc.is_root():
                raise Failed("creating the store needs root", hint="run tupper as root")
            if any(c in str(root) for c in _UNSAFE_IN_OPTIONS):
                raise InvalidInput(f"{root}: an overlay store's path may not contain , : or \\ (overlayfs mount options)")
            made = not root.exists()
            root.mkdir(parents=True, exist_ok=True)
            if any(root.iterdir()):
                raise Failed(f"{root} is not empty", hint="empty it, or pick another root with --root / TUPPER_ROOT")
            try:
                _probe(root)
            except Failed:
                if made:
                    root.rmdir()
                raise
            tmp = root / f"{BACKEND_FILE}.tmp"
            tmp.write_text("overlay\n")
            os.replace(tmp, marker)
            progress.note(f"created an overlay store at {root} ({mount_of(root)[1]}): images are directory trees, "
                          "container roots overlayfs mounts")
        store = cls(root, "directory")
        store._ensure_layout()
        store.mount_roots()
        return store

    # ---- trees -----------------------------------------------------------------------------------

    def create_subvolume(self, path: Path) -> None:
        path.mkdir(mode=0o755)

    def snapshot(self, source: Path, dest: Path, *, read_only: bool = False) -> None:
        self.copy_tree(source, dest)

    def copy_tree(self, source: Path, dest: Path) -> None:
        # cp -a keeps owners, modes, times, hard links, xattrs, devices; --reflink shares blocks where the filesystem can (xfs).
        try:
            proc.run(["cp", "-a", "--reflink=auto", "--", str(source), str(dest)])
        except Failed as exc:
            shutil.rmtree(dest, ignore_errors=True)
            raise Failed(f"copying {source} to {dest}: {exc}", hint=self._full_hint()) from None

    def publish(self, tmp: Path, final: Path) -> None:
        os.rename(tmp, final)

    def settle(self) -> None:
        """Nothing is freed in the background here."""

    def set_read_only(self, path: Path, read_only: bool = True) -> None:
        """Directory trees have no read-only flag: images are read-only by contract (see the module)."""

    def is_subvolume(self, path: Path) -> bool:
        return path.is_dir() and not path.is_symlink()

    def subvolume_created(self, path: Path) -> float:
        return os.stat(path).st_ctime

    def delete_subvolume(self, path: Path) -> None:
        if not os.path.lexists(path):
            return
        self.remove_tree(path)

    def remove_tree(self, path: Path) -> None:
        if path.is_symlink() or path.is_file():
            path.unlink()
            return
        for point in mounts_under(path):
            proc.run(["umount", point])
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            shutil.rmtree(path)  # again, to raise what keeps it

    def tree_usage(self, paths: list[Path]) -> dict[Path, tuple[int, int, int]]:
        """(total, exclusive, shared) bytes: trees here are copies of each other, which share nothing
        (reflinked blocks on xfs are counted as each tree's own)."""
        usage: dict[Path, tuple[int, int, int]] = {}
        for path in paths:
            out = proc.run(["du", "-sb", str(path)], check=False).stdout.split()
            if out and out[0].isdigit():
                usage[path] = (int(out[0]), int(out[0]), 0)
        return usage

    # ---- container roots: overlayfs mounts ----------------------------------------------------------

    def make_root(self, image: Path, rootfs: Path) -> None:
        cdir = rootfs.parent
        if any(c in str(image) for c in _UNSAFE_IN_OPTIONS):
            raise InvalidInput(f"{image}: an image path may not contain , : or \\ on the overlay backend")
        upper, work = cdir / "upper", cdir / "work"
        top = os.stat(image)
        upper.mkdir(mode=0o755)
        os.chown(upper, top.st_uid, top.st_gid)
        os.chmod(upper, top.st_mode & 0o7777)  # the merged root shows the upper directory's owner and mode
        work.mkdir(mode=0o700)
        rootfs.mkdir(mode=0o755)
        (cdir / LOWER_FILE).write_text(f"{image}\n")
        self._mount(image, upper, work, rootfs)

    def _mount(self, lower: Path, upper: Path, work: Path, merged: Path) -> None:
        # redirect_dir=on: a directory of the image can be renamed inside the container as on any other
        # filesystem (without it overlayfs answers EXDEV, and `mv` falls back to copying).
        proc.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work},redirect_dir=on",
                  str(merged)])

    def mount_roots(self) -> None:
        """Mount every container root that is not (after a reboot, after `store unmount`)."""
        if not proc.is_root() or not self.containers_dir.is_dir():
            return  # only root may mount; a reader that may not is told so by what it asked for
        mounted = set(mounts_under(self.containers_dir))
        for cdir in self.containers_dir.iterdir():
            rootfs = cdir / "rootfs"
            lower_file = cdir / LOWER_FILE
            if str(rootfs) in mounted or not lower_file.is_file() or not rootfs.is_dir():
                continue
            lower = Path(lower_file.read_text().strip())
            if not lower.is_dir():
                continue  # its image is gone: `store check` reports the container
            self._mount(lower, cdir / "upper", cdir / "work", rootfs)

    def ensure_root(self, rootfs: Path) -> None:
        if is_mount_point(rootfs):
            return
        cdir = rootfs.parent
        lower_file = cdir / LOWER_FILE
        if not lower_file.is_file():
            raise Failed(f"{cdir.name}: its root has no record of its image ({lower_file})", hint=f"`tupper rm {cdir.name}`")
        lower = Path(lower_file.read_text().strip())
        if not lower.is_dir():
            raise Failed(f"{cdir.name}: the image its root is made of is gone ({lower})", hint=f"`tupper rm {cdir.name}`")
        self._mount(lower, cdir / "upper", cdir / "work", rootfs)

    def unmount(self) -> None:
        """Take down every container root's mount (made again when the store is next opened)."""
        for point in mounts_under(self.containers_dir):
            proc.run(["umount", point])

    @staticmethod
    def _full_hint() -> str:
        return "if the store is full: see `tupper store info`; remove what you no longer need"
