"""Shared fixtures: a store and a bus of the suite's own, a CLI runner, unique container names, and a
guard that fails the run if the user's containers were touched. Helpers live in tests/helpers.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import BACKENDS, REPO, TEST_ROOT, PrivateBus, UserStateGuard, backend_root, ensure_image, mounted, own_root


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def user_state():
    """Around every integration test: the user's containers in the default store keep running, with the
    same leader PID, and a canary container of ours there survives the suite (see helpers.UserStateGuard)."""
    guard = UserStateGuard()
    guard.begin()
    yield guard
    problems = guard.end()
    if problems:
        pytest.fail("the test suite touched the user's state: " + "; ".join(problems), pytrace=False)


def _backends() -> list[str]:
    """The store backends the integration suite runs on: both, unless $TUPPER_TEST_BACKENDS names some."""
    wanted = [b.strip() for b in os.environ.get("TUPPER_TEST_BACKENDS", ",".join(BACKENDS)).split(",") if b.strip()]
    unknown = set(wanted) - set(BACKENDS)
    if unknown or not wanted:
        raise pytest.UsageError(f"TUPPER_TEST_BACKENDS: {sorted(unknown) or 'empty'}: pick from {', '.join(BACKENDS)}")
    return wanted


@pytest.fixture(scope="session", params=_backends())
def store_root(user_state, request) -> Path:
    """The suite's own store: $TUPPER_TEST_ROOT, else /var/lib/tupper-test (never the default store), on
    the btrfs backend; the same root with "-overlay" appended on the overlay backend. Every test that
    uses it runs on both (`[btrfs]`, `[overlay]` in its id)."""
    if os.geteuid() != 0:
        pytest.skip("integration tests need root")
    root = backend_root(own_root("TUPPER_TEST_ROOT", TEST_ROOT), request.param)
    was_mounted = mounted(root)
    ensure_image(root, log=lambda text: print(f"\n{text}", file=sys.stderr), backend=request.param)
    yield root
    _check_network_leftovers(root)
    # Leave the machine as we found it: a pool the suite mounted is unmounted again (the file stays,
    # so the next run mounts it in a moment instead of copying the image again).
    running = [c for c in _ps(root) if c["state"] in ("running", "starting", "stopping", "failed")]
    if not was_mounted and mounted(root) and not running:
        subprocess.run([sys.executable, "-m", "tupper", "--root", str(root), "store", "unmount"], check=False)
    if request.param == "overlay" and not running:
        subprocess.run([sys.executable, "-m", "tupper", "--root", str(root), "store", "unmount"], check=False)


@pytest.fixture(scope="session")
def backend(store_root: Path) -> str:
    """The store backend the test runs on: "btrfs" or "overlay"."""
    return "overlay" if (store_root / ".backend").is_file() else "btrfs"


def _check_network_leftovers(root: Path) -> None:
    """After the suite: with none of its containers running, nothing of the store's networking is
    left on the host (veths, bridges, the nftables table) or in its allocation file."""
    import hashlib

    if any(c["state"] in ("running", "starting", "stopping", "failed", "degraded") for c in _ps(root)):
        return
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:2]
    # The store's networks are the suite's own: removing them takes their bridges.
    for net in json.loads(subprocess.run([sys.executable, "-m", "tupper", "--direct", "--root", str(root), "network", "ls", "--json"],
                                         capture_output=True, text=True).stdout or "[]"):
        subprocess.run([sys.executable, "-m", "tupper", "--direct", "--root", str(root), "network", "rm", net["name"]], capture_output=True)
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout)
    left = [link["ifname"] for link in links if link["ifname"].startswith((f"tv{tag}-", f"tp{tag}-"))]
    if subprocess.run(["nft", "list", "table", "inet", f"tupper{tag}"], capture_output=True).returncode == 0:
        left.append(f"nftables table inet tupper{tag}")
    allocations = json.loads((root / "networks.json").read_text()).get("allocations", {}) if (root / "networks.json").exists() else {}
    left += [f"address of {c} on {n}" for n, a in allocations.items() for c in a]
    assert not left, f"the suite left networking behind: {left}"


def _ps(root: Path) -> list[dict]:
    p = subprocess.run([sys.executable, "-m", "tupper", "--direct", "--root", str(root), "ps", "--json"], capture_output=True, text=True)
    return json.loads(p.stdout) if p.returncode == 0 else []


@pytest.fixture(scope="session")
def bus(store_root: Path):
    b = PrivateBus(store_root)
    yield b
    b.close()


class Tupper:
    """Runs the real CLI as a subprocess: container verbs through tupperd on the test bus, store and
    image commands on the test store."""

    def __init__(self, root: Path, bus: PrivateBus) -> None:
        self.root = root
        self.bus = bus
        self.env = bus.env(root)
        self.argv = [sys.executable, "-m", "tupper"]

    def __call__(self, *args: str, check: bool = False, timeout: float = 600, input: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run(
            [*self.argv, *map(str, args)],
            capture_output=True, text=True, timeout=timeout, input=input, cwd=cwd or REPO, env=self.env,
        )
        if check and p.returncode != 0:
            raise AssertionError(f"tupper {' '.join(map(str, args))} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
        return p

    def json(self, *args: str):
        return json.loads(self(*args, "--json", check=True).stdout)


@pytest.fixture(scope="session")
def tupper_session(store_root: Path, bus: PrivateBus) -> Tupper:
    return Tupper(store_root, bus)


@pytest.fixture
def tupper(tupper_session: Tupper, request) -> Tupper:
    yield tupper_session


@pytest.fixture
def names(tupper_session: Tupper, request):
    """Unique container names for one test; whatever the test leaves is force-removed afterwards."""
    made: list[str] = []
    base = re.sub(r"[^a-zA-Z0-9]", "-", request.node.name)[:30].strip("-")

    def new(label: str = "") -> str:
        name = f"t-{base}-{label + '-' if label else ''}{uuid.uuid4().hex[:6]}"
        made.append(name)
        return name

    yield new
    for name in made:
        tupper_session("rm", "--force", name)
