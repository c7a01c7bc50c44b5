"""Named volumes: btrfs subvolumes at `<store>/volumes/NAME`, made by `tupper volume create` or by the
first `run` of a spec that names one, bound read-write into containers, and kept when they are removed.

Which containers use a volume is read from their records (the runtime passes them in): a volume is
removed only under the store's lock, after checking that no record names it, and `run` makes a missing
volume under the same lock just before its record appears, so no container is ever left without one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import attrs

from tupper.errors import Busy, Exists, NotFound
from tupper.model.volumes import check_volume_name
from tupper.store.store import Store


@attrs.frozen
class Volume:
    name: str
    path: Path
    created: float
    used_by: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"name": self.name, "path": str(self.path), "created": self.created, "used_by": list(self.used_by)}


class Volumes:
    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def dir(self) -> Path:
        return self.store.root / "volumes"

    def path(self, name: str) -> Path:
        return self.dir / name

    def exists(self, name: str) -> bool:
        return self.store.is_subvolume(self.path(name))

    def get(self, name: str, users: Iterable[str] = ()) -> Volume:
        check_volume_name(name, "volume name")
        path = self.path(name)
        if not self.exists(name):
            raise NotFound(f"no volume {name!r}", hint="see `tupper volume ls`")
        return Volume(name, path, self.store.subvolume_created(path), tuple(users))

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        directory = self.store.listable(self.dir, "volumes")
        return sorted(d.name for d in directory.iterdir() if not d.name.startswith(".") and self.store.is_subvolume(d))

    def create(self, name: str, *, exist_ok: bool = False) -> bool:
        """Make the volume (the caller holds the store's lock); False where it existed and `exist_ok`."""
        check_volume_name(name, "volume name")
        if self.exists(name):
            if exist_ok:
                return False
            raise Exists(f"volume {name!r} already exists", hint="see `tupper volume inspect " + name + "`")
        self.dir.mkdir(mode=0o700, exist_ok=True)
        path = self.path(name)
        if os.path.lexists(path):  # not a subvolume: nothing tupper made; do not bind it anywhere
            raise Exists(f"{path} exists and is not a volume", hint="move it away")
        self.store.create_subvolume(path)
        return True

    def remove(self, name: str, users: list[str]) -> None:
        """Delete the volume and its data; refused while a container record names it (caller holds the lock)."""
        self.get(name)
        if users:
            raise Busy(f"volume {name!r} is used by container(s) {', '.join(users)}",
                       hint="remove them first (`tupper rm NAME`); stopped containers count too")
        self.store.delete_subvolume(self.path(name))

    @staticmethod
    def size(path: Path) -> int:
        """Bytes allocated to the files in the volume (a walk of it: `inspect` only, never `ls`)."""
        total = 0
        for dirpath, dirnames, filenames in os.walk(path):
            for entry in dirnames + filenames:
                try:
                    total += os.lstat(os.path.join(dirpath, entry)).st_blocks * 512
                except OSError:
                    pass
        return total
