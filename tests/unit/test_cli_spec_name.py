"""The CLI's look at a spec file's name (tupper.cli.backends._spec_name): what `tupper run` follows the
progress of, found without tomllib where a line scan can be sure, and always what TOML says."""

from __future__ import annotations

import os
import threading
import tomllib

import pytest

from tupper.cli.backends import _spec_name

CASES = [
    'image = "x"\nname = "web"\n',
    "name = 'lit'  # a comment\n",
    'name="tight"\n[[components]]\nname = "not-this"\n',
    '[network]\nname = "inside-a-table"\n',
    'image = "x"\n',
    'name = "esc\\u0061ped"\n',
    'description = """\n[not a table]\nname = "fake"\n"""\nname = "real"\n',
    '"name" = "quoted-key"\n',
    "name = 'it''s'\n",
    'name.first = "dotted"\n',
    "# name = 'commented'\nname = 'after'\n",
]


@pytest.mark.parametrize("text", CASES)
def test_the_scan_agrees_with_toml(tmp_path, text):
    path = tmp_path / "my-spec.toml"
    path.write_text(text)
    try:
        name = tomllib.loads(text).get("name", "my-spec")
    except tomllib.TOMLDecodeError:
        name = "my-spec"
    expected = name if isinstance(name, str) and "'" not in name else None
    assert _spec_name(str(path)) == expected


def test_a_missing_file_or_a_fifo_gives_the_stem_without_blocking(tmp_path):
    assert _spec_name(str(tmp_path / "gone.toml")) == "gone"
    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    result: list = []
    t = threading.Thread(target=lambda: result.append(_spec_name(str(fifo))), daemon=True)
    t.start()
    t.join(5)
    assert result == ["pipe"]
