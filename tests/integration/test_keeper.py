"""The store's keeper (tupper.runtime.keeper), the one process that parents every container's nspawn:
started on first use, shared by every client, outliving them, ending once it has neither containers
nor clients; and monitor.Gate, work done while the keeper is asked to start a process, which is
started only once the work is done and never where it fails (the container's network is wired this way).

Real processes (`sh`, `sleep` standing for nspawn), a keeper per test in a run directory of its own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tupper.errors import Failed
from tupper.runtime import keeper as keepermod
from tupper.runtime import monitor
from tupper.runtime.keeper import Keeper


@pytest.fixture
def run_dir():
    d = Path(tempfile.mkdtemp(prefix="tk-", dir="/run"))  # a short path: a socket's is at most 107 bytes
    yield d
    pid = keeper_pid(d)
    if pid:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cdir(tmp_path):
    d = tmp_path / "containers" / "c1"
    d.mkdir(parents=True)
    return d


def keeper_pid(run_dir: Path) -> int:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if cmd == f"{keepermod.TITLE} {run_dir}/store":
                return int(p.name)
    return 0


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := check()):
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def exit_of(cdir: Path) -> dict:
    return json.loads((cdir / "exit.json").read_text())


def client(run_dir: Path) -> Keeper:
    return Keeper(run_dir / "store", run_dir, None)


def test_the_process_runs_only_after_the_work(run_dir, cdir):
    marker = cdir / "wired"

    def work() -> None:
        time.sleep(0.3)  # longer than asking the keeper takes
        marker.write_text("yes")

    k = client(run_dir)
    with monitor.Gate(work) as gate:
        _, child = k.spawn("gate-test", cdir, ["test", "-e", str(marker)], cdir / "console.log", None, gate=gate.fd)
    assert k.wait(child, 10)
    assert exit_of(cdir)["returncode"] == 0  # `test -e` found the marker: started after the work


def test_failed_work_means_the_process_never_runs_and_its_error_is_the_one_raised(run_dir, cdir):
    ran = cdir / "ran"

    def work() -> None:
        raise Failed("the network could not be wired")

    k = client(run_dir)
    with pytest.raises(Failed, match="could not be wired"):
        with monitor.Gate(work) as gate:
            k.spawn("gate-test", cdir, ["touch", str(ran)], cdir / "console.log", None, gate=gate.fd)
    time.sleep(0.2)
    assert not ran.exists()


def test_the_keeper_parents_the_process_records_its_exit_and_ends_when_idle(run_dir, cdir):
    k = client(run_dir)
    pid, child = k.spawn("c1", cdir, ["sh", "-c", "sleep 0.5; exit 3"], cdir / "console.log", None)
    assert pid == keeper_pid(run_dir) and parent_of(child) == pid  # the keeper's child: it sees the exit status
    assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"tupper-keeper "), "ps says what it is"
    assert k.parents(pid) and not k.parents(os.getpid())
    assert not (cdir / "exit.json").exists()
    assert k.wait(child, 10)  # answered once the exit is recorded
    assert exit_of(cdir)["returncode"] == 3
    wait_for(lambda: not alive(pid), 5, "the keeper to end with no container and no client left")
    assert not (run_dir / keepermod.SOCKET).exists()


def test_a_wait_times_out_while_the_process_runs(run_dir, cdir):
    k = client(run_dir)
    _, child = k.spawn("c1", cdir, ["sleep", "30"], cdir / "console.log", None)
    assert not k.wait(child, 0.3)
    os.kill(child, signal.SIGKILL)
    assert k.wait(child, 10)
    assert exit_of(cdir)["returncode"] == -signal.SIGKILL


def test_a_refused_start_says_why_and_the_keeper_serves_on(run_dir, cdir):
    k = client(run_dir)
    with pytest.raises(Failed, match="could not start systemd-nspawn"):
        k.spawn("c1", cdir, ["/nonexistent/program"], cdir / "console.log", None)
    pid, child = k.spawn("c1", cdir, ["true"], cdir / "console.log", None)
    assert pid > 0 and k.wait(child, 10)


def test_one_keeper_for_every_client_and_many_starts_at_once(run_dir, tmp_path):
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def start(i: int) -> None:
        d = tmp_path / "containers" / f"c{i}"
        d.mkdir(parents=True)
        try:
            results.append(client(run_dir).spawn(f"c{i}", d, ["sleep", "2"], d / "console.log", None))
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({pid for pid, _ in results}) == 1  # twelve clients, one keeper
    keeper = results[0][0]
    assert all(parent_of(child) == keeper for _, child in results)
    for _, child in results:
        assert client(run_dir).wait(child, 10)
    assert sorted(exit_of(tmp_path / "containers" / f"c{i}")["returncode"] for i in range(12)) == [0] * 12


def test_a_held_connection_keeps_the_keeper_up_between_containers(run_dir):
    k = client(run_dir)
    k.hold()
    pid = k.pid
    time.sleep(keepermod.IDLE_GRACE + 0.5)
    assert alive(pid)  # no container, but a client
    k.release()
    wait_for(lambda: not alive(pid), 5, "the keeper to end once released")


def test_the_keeper_outlives_the_process_that_started_it(run_dir, cdir):
    """tupperd or the CLI ends; the container's process stays the keeper's child, and its exit is
    recorded without them."""
    code = ("import sys; from pathlib import Path; from tupper.runtime.keeper import Keeper; "
            "d = Path(sys.argv[1]); k = Keeper(d / 'store', d, None); "
            "print(k.spawn('c1', Path(sys.argv[2]), ['sh', '-c', 'sleep 1; exit 7'], Path(sys.argv[2]) / 'console.log', None)[1])")
    out = subprocess.run([sys.executable, "-c", code, str(run_dir), str(cdir)], capture_output=True, text=True, timeout=30, check=True)
    child = int(out.stdout)
    keeper = keeper_pid(run_dir)
    assert alive(child) and parent_of(child) == keeper
    wait_for(lambda: (cdir / "exit.json").exists(), 10, "the exit to be recorded")
    assert exit_of(cdir)["returncode"] == 7
    wait_for(lambda: not alive(keeper), 5, "the keeper to end")


def test_a_killed_keeper_is_replaced_and_its_process_runs_on(run_dir, tmp_path):
    first = tmp_path / "containers" / "c1"
    second = tmp_path / "containers" / "c2"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    k = client(run_dir)
    old, child = k.spawn("c1", first, ["sleep", "30"], first / "console.log", None)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old), 5, "the keeper to die")
    assert alive(child)  # reparented, not killed
    new, other = k.spawn("c2", second, ["true"], second / "console.log", None)
    assert new != old and parent_of(other) == new
    assert k.wait(other, 10)
    assert k.wait(child, 1)  # the new keeper does not know it: nothing to wait for
    os.kill(child, signal.SIGKILL)
