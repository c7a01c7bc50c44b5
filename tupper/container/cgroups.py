"""Per-container cgroups: each container gets `<parent>/<name>` in every hierarchy systemd inside it uses.

The parent is the store's (`tupper` for the default store, `tupper-<id>` for another), so two stores
(the user's and a test suite's) never share, or clean up, each other's cgroups.

systemd-nspawn with --keep-unit makes `payload/` and `supervisor/` below its own cgroup; without a cgroup
of its own, two containers would share them. Layouts: pure cgroup2, hybrid (v1 + unified), legacy v1.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "tupper"


def layout(root: Path = CGROUP_ROOT) -> str:
    if (root / "cgroup.controllers").exists():
        return "v2"
    if (root / "unified" / "cgroup.controllers").exists():
        return "hybrid"
    return "legacy"


def hierarchies(root: Path = CGROUP_ROOT) -> list[Path]:
    """The hierarchies a container's systemd needs its own cgroup in, on this host's layout."""
    kind = layout(root)
    if kind == "v2":
        return [root]
    found = [root / "systemd"]
    if kind == "hybrid":
        found.append(root / "unified")
    return [h for h in found if h.is_dir()]


def paths(name: str, root: Path = CGROUP_ROOT, parent: str = PARENT) -> list[Path]:
    return [h / parent / name for h in hierarchies(root)]


def names(root: Path = CGROUP_ROOT, parent: str = PARENT) -> set[str]:
    """The container cgroups that exist below `parent`, in any hierarchy."""
    found: set[str] = set()
    for h in hierarchies(root):
        d = h / parent
        if d.is_dir():
            found.update(p.name for p in d.iterdir() if p.is_dir())
    return found


def create(name: str, root: Path = CGROUP_ROOT, parent: str = PARENT) -> list[Path]:
    made = paths(name, root, parent)
    for p in made:
        for attempt in range(5):
            try:
                p.mkdir(parents=True, exist_ok=True)
                break
            except FileNotFoundError:
                # remove() of another container took the shared parent away between our two mkdirs.
                if attempt == 4:
                    raise
    return made


def join(name: str, root: Path = CGROUP_ROOT, parent: str = PARENT) -> None:
    """Move the calling process into the container's cgroups (used between fork and exec)."""
    for p in paths(name, root, parent):
        with open(p / "cgroup.procs", "w") as f:
            f.write("0")


def procs(name: str, root: Path = CGROUP_ROOT, parent: str = PARENT) -> set[int]:
    found: set[int] = set()
    for p in paths(name, root, parent):
        if not p.is_dir():
            continue
        for dirpath, _, files in os.walk(p):
            if "cgroup.procs" in files:
                try:
                    with open(os.path.join(dirpath, "cgroup.procs")) as f:
                        found.update(int(x) for x in f.read().split())
                except OSError:
                    pass
    return found


def remove(name: str, root: Path = CGROUP_ROOT, *, parent: str = PARENT, kill: bool = True, timeout: float = 2.0) -> bool:
    """Remove the container's cgroups bottom-up; with `kill`, SIGKILL what is still inside first.

    Returns True when every directory is gone.
    """
    deadline = time.monotonic() + timeout
    while kill and (left := procs(name, root, parent)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    ok = True
    for p in paths(name, root, parent):
        if not p.exists():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(p, topdown=False), key=lambda w: -len(w[0])):
            try:
                os.rmdir(dirpath)
            except FileNotFoundError:
                pass
            except OSError:
                ok = False
        # The shared parent goes too once the last container's cgroup is gone (another may hold it).
        try:
            os.rmdir(p.parent)
        except OSError:
            pass
    return ok
