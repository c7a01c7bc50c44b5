"""`tupper store check`: what a crash or a manual intervention left inconsistent in a store, and the repair.

Each finding names the thing, why it is wrong, and what `--repair` does about it. Nothing that an
operation still under way owns (a live owner pid) is ever reported: that is work in progress.
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from tupper import proc
from tupper.container import cgroups, nspawn
from tupper.errors import NotFound, TupperError
from tupper.runtime import records
from tupper.runtime.records import Record
from tupper.runtime.runtime import Runtime


@attrs.frozen
class Finding:
    kind: str  # interrupted, orphan-root, record-without-root, corrupt-record, scratch, cgroup, nspawn-dir, agent-dir, image, component, network
    path: str
    detail: str
    repair: str  # what --repair does

    def to_json(self) -> dict:
        return attrs.asdict(self)


@attrs.frozen
class Repaired:
    finding: Finding
    result: str  # what was done, or why it could not be

    def to_json(self) -> dict:
        return {**self.finding.to_json(), "result": self.result}


def check(runtime: Runtime) -> list[Finding]:
    store = runtime.store
    found: list[Finding] = []
    names: set[str] = set()
    busy: set[str] = set()  # containers some live process is working on
    for d in sorted(store.containers_dir.iterdir()):
        names.add(d.name)
        try:
            rec = Record.load(d)
        except NotFound:
            found.append(Finding("orphan-root", str(d), "a container directory without a record (nothing lists it)",
                                 "remove it (its root subvolume included)"))
            continue
        except (ValueError, KeyError, TypeError) as exc:
            found.append(Finding("corrupt-record", str(d / records.RECORD), f"unreadable record ({exc})",
                                 "remove the container (processes in its cgroup are killed)"))
            continue
        names.add(rec.boot_name)
        if rec.owner_alive():
            busy.update((rec.name, rec.boot_name))
        if rec.interrupted():
            what = rec.phase if rec.phase in records.TRANSITIONAL else "upgrade"
            found.append(Finding("interrupted", str(d), f"{rec.name}: its {what} was interrupted (pid {rec.owner_pid} is gone)",
                                 "finish or undo it (creating: remove; starting: stop; stopping: stop; removing: remove; "
                                 "upgrade: roll back)"))
        elif not rec.rootfs.is_dir() and not rec.alive():
            found.append(Finding("record-without-root", str(d), f"{rec.name}: the record has no root subvolume", "remove the record"))
    for entry in store.stale_scratch():
        found.append(Finding("scratch", str(entry), "work in progress of a process that is gone", "remove it"))
    for entry in stale_temps(store.root):
        found.append(Finding("temp-file", str(entry), "a file half-written by a process that is gone (killed during an atomic write)",
                             "remove it"))
    alive = {r.boot_name for r in runtime.records() if r.alive()}  # the names their cgroups and nspawn's dirs have
    if not runtime.host.systemd:
        for name in sorted(cgroups.names(parent=store.cgroup_parent)):
            if name not in alive and name not in busy and not name.startswith(".build-"):
                found.append(Finding("cgroup", f"{store.cgroup_parent}/{name}", "the cgroup of a container that does not run",
                                     "kill what is left in it and remove it"))
    for name in sorted(names - alive - busy):
        for d in nspawn.runtime_dirs(name):
            if d.is_dir():
                found.append(Finding("nspawn-dir", str(d), f"nspawn's runtime directory for {name}, which does not run", "remove it"))
    agents = store.agents_dir
    if agents.is_dir():
        granted = {r.name for r in runtime.records() if r.grants}
        for d in sorted(agents.iterdir()):
            if d.name not in granted and d.name not in busy:
                found.append(Finding("agent-dir", str(d), "a secrets agent directory for no container with secrets", "remove it"))
    try:
        found += [Finding("network", what, why, "rebuild the store's network state (docs/network.md)")
                  for what, why in runtime.net.leftovers()]
    except (TupperError, OSError) as exc:
        found.append(Finding("network", "networks.json", f"cannot read the store's networks: {exc}", "none: fix or remove the file"))
    found += _published(store.images_dir, "*", "image", runtime)
    components = store.root / "components"
    if components.is_dir():
        found += _published(components, "*/*", "component", runtime)
    return found


# Where durable.write_json writes (".NAME.PID.tmp" beside the file, renamed over it when complete): the
# store's root, records, image and package metadata, secrets' metadata. Never inside a root file system.
TEMP_PLACES = (".*.tmp", "containers/*/.*.tmp", "images/.*.tmp", "components/*/.*.tmp", "components/*/*/.*.tmp",
               "secrets/*/.*.tmp", "volumes/.*.tmp")
_TEMP = re.compile(r"^\..+\.(\d+)\.tmp$")


def stale_temps(root: Path) -> list[Path]:
    """Temporary files of atomic writes whose writer no longer runs."""
    out = []
    for pattern in TEMP_PLACES:
        for path in sorted(root.glob(pattern)):
            m = _TEMP.match(path.name)
            # A zombie writer is gone too: a SIGKILLed tupperd is one until dbus-daemon reaps it, and its
            # successor may be recovering by then.
            if m and path.is_file() and not path.is_symlink() and not proc.pid_alive(int(m.group(1))):
                out.append(path)
    return out


def _published(base: Path, pattern: str, kind: str, runtime: Runtime) -> list[Finding]:
    """Images and installed components: a subvolume and its `.json` appear together, or not at all."""
    out = []
    for meta in sorted(base.glob(f"{pattern}.json")):
        subvolume = meta.with_suffix("")
        if not subvolume.is_dir():
            out.append(Finding(kind, str(meta), f"metadata of a {kind} whose files are missing", "remove the metadata"))
    for subvolume in sorted(p for p in base.glob(pattern) if p.is_dir() and not p.name.startswith(".")):
        if not subvolume.with_name(subvolume.name + ".json").is_file() and runtime.store.is_subvolume(subvolume):
            out.append(Finding(kind, str(subvolume), f"a half-{'built' if kind == 'image' else 'installed'} {kind} (no metadata)",
                               "remove it"))
    return out


def repair(runtime: Runtime, findings: list[Finding]) -> list[Repaired]:
    store = runtime.store
    done = []
    for f in findings:
        path = Path(f.path)
        try:
            if f.kind == "interrupted":
                result = runtime.recover(Record.load(path)) or "nothing left to do"
            elif f.kind in ("orphan-root", "corrupt-record", "record-without-root"):
                with store.lock():
                    runtime.discard_broken(path.parent if f.kind == "corrupt-record" else path)
                result = "removed"
            elif f.kind in ("scratch", "temp-file", "image", "component", "nspawn-dir", "agent-dir"):
                store.remove_tree(path)
                result = "removed"
            elif f.kind == "network":
                runtime.net.sync()
                result = "rebuilt"
            elif f.kind == "cgroup":
                name = f.path.split("/", 1)[1]
                result = "removed" if cgroups.remove(name, parent=store.cgroup_parent) else "could not remove it (busy)"
            else:
                result = "no repair known"
        except (TupperError, OSError) as exc:
            result = f"failed: {exc.message if isinstance(exc, TupperError) else exc}"
        done.append(Repaired(f, result))
    return done
