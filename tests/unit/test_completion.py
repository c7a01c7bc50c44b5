"""Shell completion and the man page, generated from the parser (tupper.cli.completion, `make completion`,
`make man`): bash completes the verbs, their options, and container and image names read from the store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, bash_complete

from tupper.cli.main import _COMMANDS

pytest.importorskip("shtab")


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory):
    from tupper.cli.completion import script

    path = tmp_path_factory.mktemp("completion") / "tupper.bash"
    path.write_text(script("bash"))
    return path


@pytest.fixture
def store(tmp_path):
    """A store's directories as the completion reads them: containers/NAME/record.json, images/NAME.json."""
    for name in ("web", "db"):
        (tmp_path / "containers" / name).mkdir(parents=True)
        (tmp_path / "containers" / name / "record.json").write_text("{}")
    (tmp_path / "containers" / "half-made").mkdir()  # no record: not a container (yet)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "debian-bookworm.json").write_text("{}")
    (tmp_path / "images" / "debian-bookworm").mkdir()
    return tmp_path


def test_bash_lists_every_verb(bash_script):
    offered = bash_complete(bash_script, "tupper ")
    assert set(_COMMANDS) <= set(offered)
    assert {"ls", "poweroff", "remove"} <= set(offered)  # the other names too
    assert bash_complete(bash_script, "tupper sta") == ["status", "stats", "start"]


def test_bash_completes_actions_and_options(bash_script):
    assert bash_complete(bash_script, "tupper image ") == ["build", "ls", "rm", "prune", "pin", "unpin", "export", "import", "key"]
    assert {"--since", "--until", "--priority", "--output", "--component"} <= set(bash_complete(bash_script, "tupper logs web --"))
    assert bash_complete(bash_script, "tupper logs web -o js") == ["json", "json-pretty", "json-sse", "json-seq"]


def test_bash_completes_container_and_image_names_from_the_store(bash_script, store):
    assert sorted(bash_complete(bash_script, "tupper stop ", store)) == ["db", "web"]
    assert bash_complete(bash_script, "tupper logs w", store) == ["web"]
    assert sorted(bash_complete(bash_script, "tupper rm web ", store)) == ["db", "web"]
    assert bash_complete(bash_script, "tupper image rm ", store) == ["debian-bookworm"]


def test_the_root_comes_from_root_on_the_line_then_the_environment_then_the_config(bash_script, store, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    (other / "containers" / "elsewhere").mkdir(parents=True)
    (other / "containers" / "elsewhere" / "record.json").write_text("{}")
    assert bash_complete(bash_script, f"tupper --root {other} --direct stop ", store) == ["elsewhere"]
    conf = other / "tupper.toml"
    conf.write_text(f'root = "{other}"\n')
    assert bash_complete(bash_script, "tupper stop ", env={"TUPPER_CONFIG": str(conf)}) == ["elsewhere"]
    assert sorted(bash_complete(bash_script, "tupper stop ", store, env={"TUPPER_CONFIG": str(conf)})) == ["db", "web"]


def test_the_zsh_script_is_valid_zsh(tmp_path):
    from tupper.cli.completion import script

    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed")
    path = tmp_path / "_tupper"
    path.write_text(script("zsh"))
    p = subprocess.run(["zsh", "-n", str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_the_man_page_builds_renders_and_names_every_verb(tmp_path):
    pytest.importorskip("argparse_manpage")
    from tupper.cli.completion import man_include

    include = tmp_path / "tupper.1.include"
    include.write_text(man_include((REPO / "docs/tupper.1.include").read_text()))
    page = tmp_path / "tupper.1"
    tool = Path(sys.executable).parent / "argparse-manpage"  # as `make man` runs it
    subprocess.run([str(tool), "--module", "tupper.cli.main", "--function", "build_parser",
                    "--prog", "tupper", "--project-name", "tupper", "--include", str(include), "--output", str(page)],
                   check=True, cwd=REPO, capture_output=True)
    groff = shutil.which("groff")
    if groff:
        p = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True)
        assert p.returncode == 0 and not p.stderr, p.stderr
    if shutil.which("man"):
        text = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True, check=True,
                              env={**os.environ, "MANWIDTH": "200"}).stdout
    else:
        text = page.read_text()
    for verb in _COMMANDS:
        assert f"tupper {verb}" in text, verb
    for section in ("EXAMPLES", "CONFIGURATION", "ENVIRONMENT", "FILES", "COMMAND EXAMPLES"):
        assert section in text
    assert "tupper logs demo --component web" in text
