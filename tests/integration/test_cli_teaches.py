"""A CLI that teaches, on a real store: a running container's name completes for `tupper stop <TAB>`,
`logs` filters a real journal, and the config file's `root` is the store the CLI opens."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO, _clean_env, bash_complete


def test_a_running_containers_name_completes_for_stop(tupper, names, tmp_path):
    from tupper.cli.completion import script

    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    path = tmp_path / "tupper.bash"
    path.write_text(script("bash"))
    assert name in bash_complete(path, "tupper stop ", root=tupper.root)
    assert bash_complete(path, f"tupper stop {name[:-3]}", root=tupper.root) == [name]


def test_logs_by_component_priority_and_output_mode(tupper, names):
    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    p = tupper("logs", name, "--component", "hello", "-o", "json", "--since=-1h", "-p", "debug")
    assert p.returncode == 0, p.stderr
    entries = [json.loads(line) for line in p.stdout.splitlines()]
    # the unit's own lines, and systemd's about it (journalctl -u takes both)
    assert entries and all("hello.service" in (e.get("_SYSTEMD_UNIT"), e.get("UNIT")) for e in entries)
    p = tupper("logs", name, "--component", "nope")
    assert p.returncode == 2
    assert p.stderr.splitlines()[0] == f"tupper: --component nope: container {name} has no component 'nope'"
    p = tupper("logs", name, "--until", "last tuesday")
    assert p.returncode == 2 and p.stderr.startswith("tupper: --until 'last tuesday': not a time journalctl understands")
    assert tupper("logs", name, "--until", "2000-01-01", "-o", "cat").stdout == ""


def _store_info(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tupper", "store", "info", "--json"], capture_output=True, text=True, env=env, cwd=REPO)


def test_the_config_files_root_is_the_store_and_the_environment_beats_it(tupper, tmp_path):
    conf = tmp_path / "tupper.toml"
    conf.write_text(f'root = "{tupper.root}"\n')
    p = _store_info(_clean_env(TUPPER_CONFIG=str(conf)))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["path"] == str(tupper.root)
    # a root that cannot be made (its parent is a file): were it used, the command would fail
    (tmp_path / "file").write_text("")
    conf.write_text(f'root = "{tmp_path / "file" / "root"}"\n')
    p = _store_info(_clean_env(TUPPER_CONFIG=str(conf), TUPPER_ROOT=str(tupper.root)))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["path"] == str(tupper.root)
    conf.write_text("[defaults]\nstop_timeout = 0\n")
    p = _store_info(_clean_env(TUPPER_CONFIG=str(conf)))
    assert p.returncode == 2
    assert p.stderr.splitlines() == [f"tupper: {conf}: defaults.stop_timeout: must be a positive number of seconds (at most 86400), got 0"]
