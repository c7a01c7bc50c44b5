"""A spec's [components.env] reaches the service byte for byte through the Environment= quoting tupper writes."""

from __future__ import annotations

from pathlib import Path

from helpers import write_component, write_spec

VALUES = {
    "QUOTES": 'say "hi"',
    "BACKSLASH": "C:\\dir\\",
    "PERCENT": "100% %n %%",
    "NEWLINE": "a\nb",
    "CR": "c\rd",
    "TAB": "e\tf",
    "BELL": "g\x07h",
    "DOLLAR": "it's $HOME ${X}",
    "UNICODE": "ünï ☃",
    "EMPTY": "",
}


def _toml(value: str) -> str:
    return '"' + "".join(
        {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch) or (f"\\u{ord(ch):04x}" if ord(ch) < 0x20 else ch)
        for ch in value
    ) + '"'


def test_env_values_with_quotes_backslashes_percent_and_control_characters_reach_the_service(tupper, names, tmp_path):
    c = write_component(tmp_path / "envc", "envc", {"envc.service": (
        '[Service]\nType=exec\nExecStart=/bin/sh -c "cat /proc/self/environ > /run/env.bin; exec sleep infinity"\n')})
    name = names()
    env = "[components.env]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in VALUES.items())
    spec = write_spec(tmp_path / "spec.toml", [c], name=name)
    spec.write_text(spec.read_text() + env)
    tupper("run", spec, check=True)
    leader = tupper.json("status", name)["leader_pid"]
    raw = Path(f"/proc/{leader}/root/run/env.bin").read_bytes()
    got = dict(entry.decode().split("=", 1) for entry in raw.split(b"\0") if entry)
    assert {k: got.get(k) for k in VALUES} == VALUES
