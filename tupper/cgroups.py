"""Per-container cgroups: each container gets `tupper/<name>` in every hierarchy systemd inside it uses.

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


def paths(name: str, root: Path = CGROUP_ROOT) -> list[Path]:
    return [h / PARENT / name for h in hierarchies(root)]


def create(name: str, root: Path = CGROUP_ROOT) -> list[Path]:
    made = paths(name, root)
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


def join(name: str, root: Path = CGROUP_ROOT) -> None:
    """Move the calling process into the container's cgroups (used between fork and exec)."""
    for p in paths(name, root):
        with open(p / "cgroup.procs", "w") as f:
            f.write("0")


def procs(name: str, root: Path = CGROUP_ROOT) -> set[int]:
    found: set[int] = set()
    for p in paths(name, root):
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


def remove(name: str, root: Path = CGROUP_ROOT, *, kill: bool = True, timeout: float = 2.0) -> bool:
    """Remove the container's cgroups bottom-up; with `kill`, SIGKILL what is still inside first.

    Returns True when every directory is gone.
    """
    deadline = time.monotonic() + timeout
    while kill and (left := procs(name, root)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    ok = True
    for p in paths(name, root):
        if not p.exists():
            continue
        for dirpath, dirnames, _ in sorted(os.walk(p, topdown=False), key=lambda w: -len(w[0])):
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
