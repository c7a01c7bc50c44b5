"""Where the CLI's container verbs go: to tupperd over D-Bus (the default), or, with --direct, to the
runtime in this process. Both expose the same verbs with the same results; neither orders operations
itself: that is the runtime's job, which tupperd calls too."""

from __future__ import annotations

import builtins
import math
import os
import re
import sys

# The CLI imports this module for every daemon command: types only for checkers (as typing.TYPE_CHECKING,
# without importing typing, which alone costs milliseconds).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

    from tupper.progress import Progress


class DaemonBackend:
    def __init__(self) -> None:
        from tupper.cli.client import Client

        self.client = Client()

    def run(self, spec_path: str, name: str | None, keep_failed: bool, progress: Progress, wait: bool = True, cold: bool = False) -> dict:
        from tupper.cli.ui import RemoteProgress

        target = name or _spec_name(spec_path)
        remote = RemoteProgress(progress)
        rule = "type='signal',sender='org.tupper1',interface='org.tupper1.Manager',member='Progress'"
        if target:
            rule += f",arg0='{target}'"
        self.client.subscribe(rule, lambda m: remote.handle(*m.body[1:]) if m.member == "Progress" else None)
        try:
            # tupperd reads and checks the spec; while the container starts, this process imports what
            # printing the result takes (json: 3 ms that no longer follow the answer)
            return self.client.run(os.path.realpath(spec_path), name, keep_failed, wait, cold, meanwhile=_import_json)
        finally:
            remote.close()

    def __getattr__(self, verb):
        return getattr(self.client, verb)


class DirectBackend:
    """The runtime in this process: for hosts without a system bus, and for debugging."""

    def __init__(self, root: Path | None, progress: Progress) -> None:
        from tupper.runtime.runtime import Runtime
        from tupper.store.store import Store

        self.runtime = Runtime(Store.open(root, progress=progress))
        self.progress = progress

    def _not_served(self) -> None:
        """One truth per store: where a tupperd serves the store, container verbs that change anything
        go through it (it supervises what runs); --direct would act behind its back."""
        from tupper.errors import Busy

        pid = self.runtime.store.daemon_pid()
        if pid:
            raise Busy(f"tupperd (pid {pid}) serves the store {self.runtime.store.root}: --direct would act behind its back",
                       hint="drop --direct (and --root): the command then goes through tupperd")

    def run(self, spec_path: str, name: str | None, keep_failed: bool, progress: Progress, wait: bool = True, cold: bool = False) -> dict:
        from pathlib import Path

        from tupper.model import spec as specmod

        self._not_served()
        spec = specmod.load(Path(spec_path), name=name, resolve=self.runtime.resolve_component)
        return self.runtime.run(spec, keep_failed=keep_failed, progress=progress, cold=cold).to_json()

    def pool_set(self, image: str, size: int) -> dict:
        """Without tupperd nobody refills in the background: the pool is filled (or drained) here, now."""
        self._not_served()
        self.runtime.set_pool(image, size)
        self.runtime.drain_pool(image)
        while image in self.runtime.pool_wants():
            rec = self.runtime.fill_pool(image, self.progress)
            self.progress.note(f"pool {image}: {rec.name} ready")
        return next(v.to_json() for v in self.runtime.list_pools() if v.image == image)

    def pool_list(self) -> builtins.list[dict]:
        return [v.to_json() for v in self.runtime.list_pools()]

    def pool_remove(self, image: str) -> builtins.list[str]:
        self._not_served()
        return self.runtime.remove_pool(image)

    def list(self) -> builtins.list[dict]:
        return [r.to_json() for r in self.runtime.records() if not r.pool]  # a warm pool's: `pool ls`, `ps --all`

    def status(self, name: str) -> dict:
        return self.runtime.status(name).to_json()

    def inspect(self, name: str) -> dict:
        return self.runtime.inspect(name)

    def start(self, name: str, wait: bool = True) -> str:
        self._not_served()
        self.runtime.start(self.runtime.record(name))
        return self.runtime.record(name).state()

    def stop(self, name: str, timeout: float | None, wait: bool = True) -> str:
        self._not_served()
        return self.runtime.stop(name, timeout).state()

    def restart(self, name: str, timeout: float | None, wait: bool = True) -> str:
        self._not_served()
        return self.runtime.restart(name, timeout).state()

    def kill(self, name: str, signal_number: int) -> str:
        self._not_served()
        self.runtime.kill(name, signal_number)
        return self.runtime.record(name).state()

    def remove(self, name: str, force: bool) -> None:
        self._not_served()
        self.runtime.remove(name, force=force)

    def shutdown_all(self) -> builtins.list[str]:
        self._not_served()
        running = [r for r in self.runtime.shutdown_order() if not r.pool]
        for rec in running:
            self.runtime.stop(rec.name)
        return [r.name for r in running]

    def upgrade(self, name: str, component: str, version: str) -> dict:
        self._not_served()
        return self.runtime.upgrade(name, component, version)

    def stats(self, names: builtins.list[str]) -> builtins.list[dict]:
        return [s.to_json() for s in self.runtime.stats(names or None)]

    def update(self, name: str, component: str | None, changes: dict[str, str]) -> dict:
        self._not_served()
        return self.runtime.update(name, component, changes).to_json()

    def network_create(self, name: str, subnet: str | None, ipv6: str | None) -> dict:
        self._not_served()
        return self.runtime.create_network(name, subnet, ipv6)

    def network_list(self) -> builtins.list[dict]:
        return self.runtime.list_networks()

    def network_remove(self, name: str) -> None:
        self._not_served()
        self.runtime.remove_network(name)

    def exec(self, name: str, argv: builtins.list[str], *, env: dict[str, str] | None = None, user: str | None = None,
             workdir: str | None = None) -> int:
        return self.runtime.exec_fds(name, argv, sys.stdin.fileno(), sys.stdout.fileno(), sys.stderr.fileno(), env=env, user=user,
                                     workdir=workdir)

    def open_shell(self, name: str, **options) -> tuple[int, object]:
        """(the terminal's master, the session: what shell_exit takes), as DaemonBackend gives them."""
        session = self.runtime.open_shell(name, **options)
        return session.master, session

    def shell_exit(self, session) -> int:
        return session.exit.result()

    def close(self) -> None:
        pass


_TOP_NAME = re.compile(r"""name\s*=\s*(?:"([^"\\]*)"|'([^']*)')\s*(?:#.*)?""")


def _import_json() -> None:
    import json  # noqa: F401 - imported for later: `import json` there then costs nothing


def _spec_name(path: str) -> str | None:
    """The container name a spec file will get, to follow its progress (tupperd reads and checks the
    spec itself). A top-level `name = "..."` is found by a scan of the lines before the first table,
    without tomllib (17 ms of imports for every `tupper run`); anything the scan cannot be sure of
    (a multi-line string, an escape, dotted keys) goes to the TOML parser."""
    import stat

    stem = os.path.splitext(os.path.basename(path))[0]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block the open
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return stem  # tupperd refuses it
            text = f.read(1 << 20).decode("utf-8")
    except (OSError, ValueError):
        return stem  # tupperd says what is wrong with it
    name: str | None = stem
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            break
        if '"""' in line or "'''" in line or line.startswith(("'", '"')):  # multi-line strings, quoted keys
            return _parsed_name(path, stem)
        if line.startswith("name") and line[4:].lstrip().startswith(("=", ".")):
            m = _TOP_NAME.fullmatch(line)
            if m is None:
                return _parsed_name(path, stem)
            name = m.group(1) if m.group(1) is not None else m.group(2)
    return name if name is not None and "'" not in name else None


def _parsed_name(path: str, stem: str) -> str | None:
    from pathlib import Path

    from tupper import tomlfile

    name = tomlfile.load_loose(Path(path)).get("name", stem)
    return name if isinstance(name, str) and "'" not in name else None


def finite_seconds(text: str) -> float:
    """argparse type: a finite number of seconds ≥ 0 (nan or inf would make a wait endless)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds ≥ 0, got {text!r}")
    return value
