"""Every command's --help teaches by example: the whole parser is walked, so a new command (or a new
action of one) cannot forget its `examples:` epilog, and every example still parses."""

from __future__ import annotations

import argparse
import shlex

import pytest

from tupper.cli.main import build_parser


def _parsers(parser: argparse.ArgumentParser, path: str = "tupper"):
    """(command path, parser) for the top level and every subparser below it, aliases once."""
    yield path, parser
    seen: set[int] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield from _parsers(sub, f"{path} {name}")


PARSERS = list(_parsers(build_parser()))


def _examples(parser: argparse.ArgumentParser) -> list[str]:
    epilog = parser.epilog or ""
    _, sep, rest = epilog.partition("examples:\n")
    if not sep:
        return []
    lines = []
    for line in rest.splitlines():
        if not line.startswith("  "):
            break
        lines.append(line.strip())
    return lines


def test_the_walk_finds_every_command():
    paths = {path for path, _ in PARSERS}
    assert {"tupper image build", "tupper store unmount", "tupper network create", "tupper sdk check",
            "tupper component upgrade", "tupper secret audit", "tupper daemon", "tupper logs", "tupper events"} <= paths


@pytest.mark.parametrize("path,parser", PARSERS, ids=[p for p, _ in PARSERS])
def test_every_help_has_an_example(path, parser):
    examples = _examples(parser)
    assert any(e.startswith("tupper ") for e in examples), f"`{path} --help` has no `examples:` epilog with a `tupper ...` line"
    if path != "tupper":
        command = path.split()[1:]
        assert any(shlex.split(e)[1:1 + len(command)] == command for e in examples if e.startswith("tupper ")), \
            f"`{path} --help`: no example runs {path}"


@pytest.mark.parametrize("path,parser", PARSERS, ids=[p for p, _ in PARSERS])
def test_every_example_parses(path, parser, capsys):
    """An example is a command line the parser takes (up to a pipe, a redirection or &&)."""
    for example in _examples(parser):
        if not example.startswith("tupper ") or "$(" in example or "COMMAND" in example:
            continue
        words = []
        for word in shlex.split(example, posix=True)[1:]:
            if word in ("|", "&&", "<", ">"):
                break
            words.append(word)
        if "--" in words:  # exec: its command comes after --, as main() splits it
            words = words[:words.index("--")]
        try:
            build_parser().parse_args(words)
        except SystemExit as exc:
            pytest.fail(f"`{path} --help`: the example `{example}` does not parse: {capsys.readouterr().err.strip()} ({exc})")


def test_only_builds_one_command():
    """build_parser(only=...) stays cheap: the other commands are never built."""
    sub = next(a for a in build_parser("logs")._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"logs"}


@pytest.mark.parametrize("flag", ["--rebuild", "--force"])
def test_image_build_rebuild_and_its_old_name_force_a_build(flag):
    args = build_parser().parse_args(["image", "build", "images/debian-bookworm.toml", flag])
    assert args.force is True
    assert build_parser().parse_args(["image", "build", "images/debian-bookworm.toml"]).force is False


def test_store_init_takes_a_backend():
    assert build_parser().parse_args(["store", "init", "--backend", "overlay"]).backend == "overlay"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["store", "init", "--backend", "zfs"])
