"""Durable, atomic file writes: readers see the old file or the new one, never half of one, also after
a crash or a power cut. Records, image and package metadata and secrets' metadata are written so."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, data: dict, mode: int = 0o644, *, sync: bool = True) -> None:
    """Durable atomic write: readers see the old file or the new one, never half of one, also after a
    power cut (the data is on disk before the rename, the rename before we return). sync=False: atomic
    for readers and after a crash of the writer, durable only once the caller has called `sync(path,
    path.parent)` (a caller that has something else to do while the disk works)."""
    write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode(), mode, sync=sync)


def write_bytes(path: Path, data: bytes, mode: int = 0o644, *, sync: bool = True) -> None:
    """write_json's atomic, durable write, of any bytes."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)


def sync(*paths: Path) -> None:
    """fsync each of `paths` (files and directories), in order: what writes with sync=False and renames
    left to the page cache is on disk when this returns."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
