"""Symlinks a container plants in its own root, and races against start-up and removal, through tupperd.

1. A container's root is its own to change: while it runs, its processes can turn `/opt` or
   `/etc/systemd/system` into a symlink out of the root (to `/`, a host path, a `../..` chain), and
   leave it so for the next start. tupper writes unit files into that root from the host during a live
   upgrade, and makes the component mount points before nspawn starts: neither may follow such a link
   onto the host, neither when the link sits there (a restart) nor when the container swaps it back
   and forth while the upgrade writes (the race). No container process exists while nspawn sets a
   container up (the previous boot's PID namespace died with its PID 1), so the swaps during an
   upgrade are the race a container can actually run.
   Also the start-up race only host root could run: `<rootfs>/opt` and the mount point swapped for links
   out of the root (~16 000 swaps over 60 starts) while nspawn sets containers up: nothing mounted onto
   the host, nothing created there, a container that starts has its component inside only.
2. `tupper rm --force` racing `tupper run`, and racing `tupper stop`, of the same name: whatever wins,
   the end state is consistent (listed with a real state and removable, or gone with its directory)
   and nothing of the container is left (subvolume, cgroup, nspawn process, nspawn runtime dir, a
   `store check` finding).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

from helpers import REPO, system_snapshot, write_component, write_spec

HELLO = REPO / "examples/hello.toml"


def _listing(path: str) -> set[str]:
    try:
        return set(os.listdir(path))
    except FileNotFoundError:
        return set()


def _component(tmp_path: Path, name: str, version: str) -> Path:
    d = tmp_path / f"{name}-{version}"
    (d / "units").mkdir(parents=True)
    (d / "bin").mkdir()
    (d / "component.toml").write_text(f'name = "{name}"\nversion = "{version}"\nunits = ["{name}.service"]\n')
    (d / "VERSION").write_text(version + "\n")
    (d / "units" / f"{name}.service").write_text(f"[Service]\nType=exec\nExecStart=/opt/{name}/bin/run\n")
    (d / "bin" / "run").write_text("#!/bin/sh\nexec sleep infinity\n")
    (d / "bin" / "run").chmod(0o755)
    return d


def _install(tupper, tmp_path: Path, name: str, versions: tuple[str, ...]) -> None:
    for version in versions:
        p = tupper("sdk", "build", _component(tmp_path, name, version), "-o", tmp_path)
        assert p.returncode == 0, p.stderr
        tupper("component", "install", tmp_path / f"{name}-{version}.tupper", check=True)


def _uninstall(tupper, name: str) -> None:
    for c in tupper.json("component", "ls"):
        if c["name"] == name:
            for container in c["used_by"]:
                tupper("rm", "--force", container)
            tupper("component", "rm", name, c["version"])


# ---- 1. symlinks out of the root, planted and swapped by the container ------------------------------


def test_a_restart_with_opt_turned_into_a_symlink_out_of_the_root_creates_nothing_on_the_host(tupper, names, tmp_path):
    tag = uuid.uuid4().hex[:8]
    comp = f"race{tag}"
    host_dir = Path(f"/tmp/tupper-race-{tag}")  # exists on the host only: a link to it dangles inside
    host_dir.mkdir()
    _install(tupper, tmp_path, comp, ("1.0.0",))
    watched = {d: _listing(d) for d in ("/", "/opt", "/tmp")}
    try:
        for target, starts in (("/", True), (str(host_dir), False), ("../../../../../../.." + str(host_dir), False)):
            name = names()
            spec = tmp_path / f"{name}.toml"
            spec.write_text(f'name = "{name}"\n[[components]]\nname = "{comp}"\n')
            tupper("run", spec, check=True)
            # The container plants the link (the mount point inside /opt moves along with /opt).
            plant = tupper("exec", name, "--", "sh", "-c", f"mv /opt /opt.old && ln -s {target} /opt")
            assert plant.returncode == 0, plant.stderr
            tupper("stop", name, check=True)
            p = tupper("start", name)
            if starts:
                assert p.returncode == 0, f"/opt -> {target}: {p.stderr}"
                # Inside, /opt/<comp> is /<comp> now: the component is there and its service runs.
                assert tupper("exec", name, "--", "cat", f"/{comp}/VERSION").stdout == "1.0.0\n"
                units = {u["name"]: u for u in tupper.json("status", name)["units"]}
                assert units[f"{comp}.service"]["active_state"] == "active"
            else:
                assert p.returncode == 1, f"/opt -> {target}: {p.returncode} {p.stderr}"
                assert "cannot make the mount point" in p.stderr and "Traceback" not in p.stderr, p.stderr
            assert tupper("rm", "--force", name).returncode == 0
            for d, before in watched.items():
                assert _listing(d) - before == set(), f"/opt -> {target}: new on the host in {d}: {_listing(d) - before}"
            assert _listing(str(host_dir)) == set(), f"/opt -> {target}: the host directory got {_listing(str(host_dir))}"
    finally:
        _uninstall(tupper, comp)
        os.rmdir(host_dir)


UPGRADES = 3  # per target; an upgrade takes ~10 s while the container's swap loop keeps both cores busy
SWAP_LOOP = """
mkdir -p /etc/systemd/spare.d
while [ ! -e /run/race-stop ]; do
  mv -T /etc/systemd/system /etc/systemd/real && ln -sfn {target} /etc/systemd/system
  rm -f /etc/systemd/system
  mv -T /etc/systemd/real /etc/systemd/system
  n=$((n + 1))
done
echo "$n"
"""


def test_live_upgrades_while_the_container_swaps_its_unit_dir_for_a_link_out_write_nothing_on_the_host(tupper, names, tmp_path):
    """The container swaps /etc/systemd/system for a symlink to a host directory, thousands of times, while
    tupper writes the component's unit files into it from the host for upgrade after upgrade: every
    file lands inside the root (or the upgrade is refused and rolled back); none on the host."""
    tag = uuid.uuid4().hex[:8]
    comp = f"race{tag}"
    host_dir = Path(f"/tmp/tupper-race-{tag}")
    host_dir.mkdir()
    _install(tupper, tmp_path, comp, ("1.0.0", "2.0.0"))
    try:
        for target in (str(host_dir), "../../../../.." + str(host_dir)):
            name = names()
            spec = tmp_path / f"{name}.toml"
            spec.write_text(f'name = "{name}"\n[[components]]\nname = "{comp}"\nversion = "1.0.0"\n')
            tupper("run", spec, check=True)
            swapper = subprocess.Popen([*tupper.argv, "exec", name, "--", "sh", "-c", SWAP_LOOP.format(target=target)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tupper.env)
            results: dict[str, int] = {}
            try:
                time.sleep(0.3)
                for i in range(UPGRADES):
                    version = ("2.0.0", "1.0.0")[i % 2]
                    up = tupper("component", "upgrade", name, comp, version)
                    assert up.returncode == 0 or (up.returncode == 1 and ("rolled back" in up.stderr or "the rollback" in up.stderr)), up.stderr
                    assert "Traceback" not in up.stderr and "File \"" not in up.stderr, up.stderr
                    key = "upgraded" if up.returncode == 0 else "rolled back" if "rolled back" in up.stderr else "rollback failed"
                    results[key] = results.get(key, 0) + 1
                    assert _listing(str(host_dir)) == set(), f"/etc/systemd/system -> {target}: a unit file landed on the host: {_listing(str(host_dir))}"
            finally:
                tupper("exec", name, "--", "touch", "/run/race-stop")
                out, err = swapper.communicate(timeout=60)
            swaps = int(out.strip() or 0)
            print(f"\n/etc/systemd/system -> {target}: {swaps} swaps during {UPGRADES} upgrades: {results}")
            assert swaps > 100, f"the container swapped only {swaps} times: the race did not happen ({err})"
            if "rollback failed" not in results:
                units = {u["name"]: u for u in tupper.json("status", name)["units"]}
                assert units[f"{comp}.service"]["active_state"] == "active", f"upgraded or rolled back, the component runs: {results}"
            assert tupper("rm", "--force", name).returncode == 0
        assert _listing(str(host_dir)) == set()
    finally:
        _uninstall(tupper, comp)
        for f in _listing(str(host_dir)):
            os.unlink(host_dir / f)
        os.rmdir(host_dir)


# ---- 1b. mount points swapped for symlinks while nspawn sets containers up ----------------------------
#
# No container process can do this (none exists during start-up); host root can. The bar: at
# least 500 swaps during starts, and nothing is ever mounted onto the host.

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _exchange(dirfd: int, a: str, b: str) -> None:
    """Atomically swap two names in one directory (renameat2 RENAME_EXCHANGE)."""
    if _libc.renameat2(dirfd, a.encode(), dirfd, b.encode(), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _kind(dirfd: int, name: str) -> str:
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return "absent"
    if stat.S_ISLNK(st.st_mode):
        return "link"
    return "dir" if stat.S_ISDIR(st.st_mode) else "other"


class Swapper(threading.Thread):
    """Swaps `<rootfs>/opt/<component>` and `<rootfs>/opt` for symlinks out of the root while nspawn sets
    the container up: from the moment its monitor creates console.log (just before it starts nspawn)
    until the container's PID 1 is recorded (every bind mount is made before PID 1 runs).

    Every operation goes through directory fds opened with O_NOFOLLOW inside the container's root, so
    the swapper itself can never follow one of its symlinks onto the host; `restore()` puts the real
    directories back."""

    def __init__(self, containers: Path, name: str, component: str, targets: list[str], seed: int) -> None:
        super().__init__(daemon=True)
        self.containers, self.name, self.component, self.targets = containers, name, component, targets
        self.rng = random.Random(seed)
        # Per start: "opt" toggles <rootfs>/opt only, as fast as it can; "mixed" swaps <rootfs>/opt and the
        # component's mount point; "gentle" swaps now and then (mixed), so that some starts get through
        # and show where the component ends up.
        self.mode = self.rng.choice(("opt", "opt", "mixed", "mixed", "gentle"))
        self.duty = 0.05 if self.mode == "gentle" else 1.0
        self.p_opt = 1.0 if self.mode == "opt" else 0.5
        self.done = threading.Event()
        self.swaps = 0  # symlinks put in place while nspawn set the container up
        self.kinds: dict[str, int] = {}
        self.window = 0.0  # seconds from console.log to PID 1 recorded
        self.reached = False  # nspawn was started while we watched
        self.error: BaseException | None = None
        self.fds: list[int] = []
        self.dfd = self.rootfd = self.optfd = -1

    # The swap links live beside what they replace, named so nothing of tupper's or nspawn's matches them.
    OPT_LINK = ".race-opt"
    COMP_LINK = ".race-comp"

    def _open(self) -> bool:
        try:
            cfd = os.open(self.containers, O_DIR)
            self.fds.append(cfd)
            dfd = os.open(self.name, O_DIR, dir_fd=cfd)
            self.fds.append(dfd)
            self.dfd = dfd
            self.rootfd = os.open("rootfs", O_DIR, dir_fd=dfd)
            self.fds.append(self.rootfd)
            self.optfd = os.open("opt", O_DIR, dir_fd=self.rootfd)
            self.fds.append(self.optfd)
            return True
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            for fd in self.fds:
                os.close(fd)
            self.fds.clear()
            self.dfd = self.rootfd = self.optfd = -1
            return False

    def _leader_recorded(self) -> bool:
        try:
            fd = os.open("record.json", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.dfd)
        except FileNotFoundError:
            return True  # the container is gone (its start failed and it was removed)
        try:
            data = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
        try:
            return bool(json.loads(data).get("leader_pid"))
        except ValueError:
            return False

    def _link(self, dirfd: int, name: str) -> None:
        target = self.rng.choice(self.targets)
        try:
            os.unlink(name, dir_fd=dirfd)  # only ever a symlink of ours (unlink refuses directories)
        except FileNotFoundError:
            pass
        os.symlink(target, name, dir_fd=dirfd)

    def run(self) -> None:
        try:
            while not self.done.is_set() and not self._open():
                time.sleep(0.0005)
            if self.done.is_set():
                return
            self._link(self.rootfd, self.OPT_LINK)
            while not self.done.is_set() and _kind(self.dfd, "console.log") == "absent":
                time.sleep(0.0002)
            if self.done.is_set():
                return
            self.reached = True
            t0 = time.monotonic()
            checked = 0.0
            while not self.done.is_set():
                now = time.monotonic()
                if now - checked > 0.002:
                    checked = now
                    if self._leader_recorded():
                        break
                if self.rng.random() < self.duty:
                    self._swap_once()
                else:
                    time.sleep(0.0002)
            self.window = time.monotonic() - t0
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            try:
                self.restore()
            except OSError as exc:
                self.error = self.error or exc

    def _count(self, kind: str) -> None:
        self.swaps += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def _pause(self) -> None:
        if self.mode == "opt":
            return
        # Mostly flip straight back (the state changes as often as Python can make it, so a check and a
        # use in nspawn a few microseconds apart can meet different states); now and then hold a while.
        if self.rng.random() < 0.2:
            until = time.perf_counter() + self.rng.random() * 0.0001
            while time.perf_counter() < until:
                pass

    def _swap_once(self) -> None:
        try:
            if self.rng.random() < self.p_opt:
                # <rootfs>/opt becomes a symlink, then the real directory again.
                if self.rng.random() < 0.2:
                    self._link(self.rootfd, self.OPT_LINK)  # another target
                _exchange(self.rootfd, "opt", self.OPT_LINK)
                self._count("opt")
                self._pause()
                _exchange(self.rootfd, "opt", self.OPT_LINK)
            else:
                kind = _kind(self.optfd, self.component)
                if kind == "absent":
                    # The mount point does not exist yet: a symlink appears where nspawn will create it.
                    self._link(self.optfd, self.component)
                    self._count("opt/component (new)")
                    self._pause()
                    os.unlink(self.component, dir_fd=self.optfd)
                elif kind == "dir":
                    # The mount point (made by tupper before nspawn): swap it for a symlink and back.
                    self._link(self.optfd, self.COMP_LINK)
                    _exchange(self.optfd, self.component, self.COMP_LINK)
                    self._count("opt/component (exchanged)")
                    self._pause()
                    _exchange(self.optfd, self.component, self.COMP_LINK)
                    os.unlink(self.COMP_LINK, dir_fd=self.optfd)
        except OSError as exc:
            # ENOENT: the container was removed under us (a failed start); EEXIST: the mount point was
            # made between our look and our symlink. Both end this iteration only.
            if exc.errno not in (errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                raise

    def restore(self) -> None:
        """The real directories back in place, our symlinks gone; the fds closed."""
        if self.rootfd >= 0:
            if _kind(self.rootfd, "opt") == "link" and _kind(self.rootfd, self.OPT_LINK) == "dir":
                _exchange(self.rootfd, "opt", self.OPT_LINK)
            if _kind(self.rootfd, self.OPT_LINK) == "link":
                os.unlink(self.OPT_LINK, dir_fd=self.rootfd)
        if self.optfd >= 0:
            if _kind(self.optfd, self.component) == "link":
                if _kind(self.optfd, self.COMP_LINK) == "dir":
                    _exchange(self.optfd, self.component, self.COMP_LINK)
                else:
                    os.unlink(self.component, dir_fd=self.optfd)
            if _kind(self.optfd, self.COMP_LINK) == "link":
                os.unlink(self.COMP_LINK, dir_fd=self.optfd)
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.dfd = self.rootfd = self.optfd = -1


def _mounts() -> set[tuple[str, str, str]]:
    """(mount point, root within its file system, source) of every mount the host's namespace has."""
    out = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            out.add((fields[4], fields[3], right.split()[1]))
    return out


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def _new_mounts(before: set, store_root: Path, own_tmp: Path) -> list[tuple[str, str, str]]:
    """Mounts that appeared, leaving out the store's and nspawn's own and what other work on the
    machine mounts meanwhile: other tupper stores (/var/lib/tupper*: pools, image builds mounting
    /proc) and other pytest sessions' scratch stores (/tmp/pytest-of-*, except this test's own)."""
    new = []
    for m in sorted(_mounts() - before):
        point = m[0]
        if _under(point, str(store_root)) or _under(point, "/run/systemd/nspawn"):
            continue
        if point.startswith("/var/lib/tupper") or (point.startswith("/tmp/pytest-of-") and not _under(point, str(own_tmp))):
            continue
        new.append(m)
    return new


def _tree(path: str) -> list[str]:
    """Every path below `path` (symlinks not followed), deepest first."""
    out = []
    for top, dirs, files in os.walk(path, topdown=False):
        out += [os.path.join(top, n) for n in files + dirs]
    return out


def _remove_empty_tree(path: str) -> None:
    """Remove `path` if it holds nothing but (nested) empty directories; leave anything else alone."""
    for p in [*_tree(path), path]:
        try:
            os.rmdir(p)  # refuses files, symlinks, mount points and directories that are not empty
        except OSError:
            pass


STARTS = 60  # container starts; each meets a few hundred swaps while nspawn sets it up
MIN_SWAPS = 500


def test_mount_point_swapped_for_a_symlink_during_start_mounts_and_creates_nothing_on_the_host(tupper, names, store_root, tmp_path):
    tag = uuid.uuid4().hex[:8]
    component = f"race{tag}"
    marker = f"tupper-race-payload-{tag}"
    comp = write_component(tmp_path / "component", component,
                           {f"{component}.service": f"[Service]\nType=exec\nExecStart=/opt/{component}/bin/run\n"},
                           files={"bin/run": "#!/bin/sh\nexec sleep infinity\n", marker: "payload\n"})
    spec = write_spec(tmp_path / "race.toml", [comp])
    # A directory on the host a symlink may point at: it must stay empty.
    host_dir = Path(f"/tmp/tupper-race-{tag}")
    host_dir.mkdir()
    targets = ["/", "/opt", str(host_dir), "../../../../../../../../..", f"/opt/{component}"]
    watched = {"/": _listing("/"), "/opt": _listing("/opt")}
    created_on_host: list[str] = []
    problems: list[str] = []
    stats: dict = {"swaps": 0, "ok": 0, "failed": 0, "kinds": {}, "window": 0.0, "reasons": {}}
    containers = store_root / "containers"
    try:
        for i in range(STARTS):
            name = names(f"s{i}")
            before = _mounts()
            swapper = Swapper(containers, name, component, targets, seed=i)
            swapper.start()
            try:
                p = tupper("run", spec, "--name", name, timeout=120)
            finally:
                swapper.done.set()
                swapper.join(10)
            assert not swapper.is_alive(), f"start {i}: the swapper did not stop"
            assert swapper.error is None, f"start {i}: the swapper failed: {swapper.error!r}"
            assert swapper.reached or p.returncode != 0, f"start {i}: the swapper never saw nspawn start"
            stats["swaps"] += swapper.swaps
            stats["window"] += swapper.window
            for k, v in swapper.kinds.items():
                stats["kinds"][k] = stats["kinds"].get(k, 0) + v

            # The host: no new mount, nothing new in / or /opt, the symlink target directory empty.
            leaked = _new_mounts(before, store_root, tmp_path)
            assert not leaked, f"start {i} (seed {i}): mounted onto the host: {leaked}"
            about = (f"start {i} (Swapper seed {i}, mode {swapper.mode}, {swapper.swaps} swaps {swapper.kinds}; "
                     f"`tupper run` exit {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:200]!r})")
            for d, entries in watched.items():
                for extra in sorted(_listing(d) - entries):
                    path = os.path.join(d, extra)
                    created_on_host.append(path)
                    problems.append(f"{about}: {path} appeared on the host {_tree(path)[::-1][:3]}")
            for extra in sorted(_listing(str(host_dir))):
                path = str(host_dir / extra)
                created_on_host.append(path)
                problems.append(f"{about}: {path} appeared on the host (a symlink's target) {_tree(path)[::-1][:3]}")
            for where in (f"/{marker}", f"/opt/{marker}", f"/opt/{component}/{marker}", f"/{component}/{marker}"):
                if os.path.lexists(where):
                    problems.append(f"{about}: the host sees the component's payload at {where}")
            # Undo what a start created on the host, so the next start is judged on its own (only the
            # names this test made up, only empty directories).
            for path in created_on_host:
                if Path(path).name in (component, marker) or _under(path, str(host_dir)):
                    _remove_empty_tree(path)
            created_on_host.clear()

            if p.returncode == 0:
                stats["ok"] += 1
                # Started: the component is mounted inside the container, at its mount point only.
                inside = tupper("exec", name, "--", "test", "-f", f"/opt/{component}/{marker}")
                assert inside.returncode == 0, f"start {i}: started, but /opt/{component} in the container lacks the payload: {inside.stderr}"
                for elsewhere in (f"/{marker}", f"/opt/{marker}"):
                    q = tupper("exec", name, "--", "test", "!", "-e", elsewhere)
                    assert q.returncode == 0, f"start {i}: the container sees the payload at {elsewhere}"
            else:
                stats["failed"] += 1
                reason = (p.stderr.strip().splitlines() or ["(no message)"])[-1][:160]
                stats["reasons"][reason] = stats["reasons"].get(reason, 0) + 1
                assert "Traceback" not in p.stderr, f"start {i}: tupper crashed:\n{p.stderr}"
            rm = tupper("rm", "--force", name)
            assert rm.returncode == 0 or not (containers / name).exists(), f"start {i}: rm --force failed: {rm.stderr}"
            assert not (containers / name).exists(), f"start {i}: the container's directory is left after rm"
    finally:
        for path in created_on_host:
            if Path(path).name in (component, marker):
                _remove_empty_tree(path)
        _remove_empty_tree(str(host_dir))
    print(f"\nsymlink swaps: {stats['swaps']} during {STARTS} starts ({stats['ok']} started, {stats['failed']} failed), "
          f"{stats['window']:.2f}s of nspawn set-up in all; by kind: {stats['kinds']}; failures: {stats['reasons']}")
    assert stats["swaps"] >= MIN_SWAPS, f"only {stats['swaps']} swaps while nspawn set containers up (want {MIN_SWAPS}): {stats}"
    assert not problems, ("a symlink swapped in for <rootfs>/opt or its component mount point while nspawn set the "
                          f"container up made something appear on the host ({stats['swaps']} swaps in {STARTS} starts):\n"
                          + "\n".join(problems))


# ---- 2. rm racing run, rm racing stop -----------------------------------------------------------------

ROUNDS = 50
STATES = ("running", "stopped", "failed")


def _in_thread(results: dict, key: str, tupper, *args: str) -> threading.Thread:
    """`tupper *args` in a thread of its own; its CompletedProcess (or what it raised) lands in results[key]."""

    def work() -> None:
        try:
            results[key] = tupper(*args, timeout=120)
        except Exception as exc:  # noqa: BLE001 - a timeout, reported by the test
            results[key] = exc

    t = threading.Thread(target=work)
    t.start()
    return t


def _leftovers(store_root: Path, name: str) -> dict:
    snap = system_snapshot(store_root, only=name)
    return {k: v for k, v in snap.items() if k not in ("mounts", "loops") and v}


def test_rm_racing_run_or_stop_of_the_same_name_ends_consistent_and_leaves_nothing(tupper, names, store_root):
    outcomes: dict[str, int] = {}
    t0 = time.monotonic()
    for i in range(ROUNDS):
        rng = random.Random(i)
        name = names(f"r{i}")
        results: dict[str, object] = {}
        if i % 2 == 0:
            what = "rm racing run"
            runner = _in_thread(results, "run", tupper, "run", HELLO, "--name", name)
            time.sleep(rng.uniform(0, 0.9))  # `tupper run` takes ~0.6 s; rm lands before, during and after it
            results["rm"] = tupper("rm", "--force", name, timeout=120)
            runner.join(180)
            assert not runner.is_alive(), f"round {i}: `tupper run` did not return"
            first = results["run"]
        else:
            what = "rm racing stop"
            tupper("run", HELLO, "--name", name, check=True, timeout=120)
            rm_first = rng.random() < 0.3
            delay = rng.uniform(0, 0.6)
            if rm_first:
                rmer = _in_thread(results, "rm", tupper, "rm", "--force", name)
                time.sleep(delay)
                stopper = _in_thread(results, "stop", tupper, "stop", name)
                rmer.join(180)
            else:
                stopper = _in_thread(results, "stop", tupper, "stop", name)
                time.sleep(delay)
                results["rm"] = tupper("rm", "--force", name, timeout=120)
            stopper.join(180)
            assert not stopper.is_alive(), f"round {i}: `tupper stop` did not return"
            first = results["stop"]
        rm = results["rm"]
        for p in (first, rm):
            assert not isinstance(p, Exception), f"round {i} ({what}): a tupper call failed: {p!r}"
            assert "Traceback" not in p.stderr, f"round {i} ({what}): a tupper call crashed:\n{p.stderr}"
        key = f"{what}: {'run' if i % 2 == 0 else 'stop'} exit {first.returncode}, rm exit {rm.returncode}"
        outcomes[key] = outcomes.get(key, 0) + 1
        context = (f"round {i} ({what}, seed {i}): first call exit {first.returncode} {first.stderr.strip()!r}; "
                   f"rm --force exit {rm.returncode} {rm.stderr.strip()!r}")

        # Consistent: listed with a real state (then removable), or gone together with its directory.
        listed = {c["name"]: c for c in tupper.json("ps")}
        cdir = store_root / "containers" / name
        if name in listed:
            state = listed[name]["state"]
            assert state in STATES, f"{context}: left in state {state!r}: {listed[name]}"
            again = tupper("rm", "--force", name)
            assert again.returncode == 0, f"{context}: left {state}, and then `rm --force` failed: {again.stderr}"
            assert name not in {c["name"] for c in tupper.json("ps")}, f"{context}: still listed after a second rm"
        assert not cdir.exists(), (f"{context}: not listed by `tupper ps`, but its directory is still there: "
                                   f"{sorted(p.name for p in cdir.iterdir()) if cdir.is_dir() else cdir}")

        # Nothing of it left: subvolume, cgroup, nspawn process, nspawn runtime dir (a moment for the kernel).
        deadline = time.monotonic() + 3
        while (left := _leftovers(store_root, name)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"{context}: left behind: {left}"
        check = tupper("store", "check", "--json")
        findings = [f for f in json.loads(check.stdout or "[]") if name in f["path"] or name in f["detail"]]
        assert not findings, f"{context}: `tupper store check` reports: {findings}"
    print(f"\n{ROUNDS} rounds in {time.monotonic() - t0:.0f}s; outcomes: {json.dumps(outcomes, indent=1)}")
