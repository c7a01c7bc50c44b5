"""Shell completion scripts for bash and zsh, generated from the parser at build time (`make completion`,
part of `make setup`) with shtab: `python -m tupper.cli.completion bash|zsh`; and the man page's extra
material (`man-include`, for argparse-manpage). Nothing here runs when tupper does; shtab and
argparse-manpage are build dependencies only.

Container and image names complete from the store's own directories (`containers/NAME/record.json`,
`images/NAME.json`): a directory listing costs nothing, where `tupper ps` would start Python. Where the
store cannot be read (not root), the completion asks `tupper ps` / `tupper image ls` instead."""

from __future__ import annotations

import argparse
import sys

# (command path, argument dest) -> the shell function that lists its candidates.
CONTAINER_ARGS = {
    ("status", "name"), ("inspect", "name"), ("stats", "names"), ("stop", "names"), ("start", "names"), ("restart", "names"),
    ("kill", "names"), ("update", "name"), ("port", "name"), ("rm", "names"), ("exec", "name"), ("shell", "name"), ("logs", "name"),
    ("component upgrade", "container"),
}
IMAGE_ARGS = {("image rm", "name"), ("pool set", "image"), ("pool rm", "image")}
SPEC_ARGS = {("run", "spec"), ("image build", "definition")}

# The root: --root on the command line, $TUPPER_ROOT, `root` in the config file, /var/lib/tupper.
BASH_PREAMBLE = r"""
_tupper_root() {
  local i
  for ((i = 1; i < ${#COMP_WORDS[@]}; i++)); do
    if [[ ${COMP_WORDS[i]} == --root ]]; then echo "${COMP_WORDS[i+1]}"; return; fi
    if [[ ${COMP_WORDS[i]} == --root=* ]]; then echo "${COMP_WORDS[i]#--root=}"; return; fi
  done
  if [[ -n ${TUPPER_ROOT:-} ]]; then echo "$TUPPER_ROOT"; return; fi
  local conf=${TUPPER_CONFIG:-/etc/tupper/tupper.toml} line
  if [[ -r $conf ]]; then
    line=$(sed -n 's/^[[:space:]]*root[[:space:]]*=[[:space:]]*["'"'"']\([^"'"'"']*\)["'"'"'].*/\1/p' "$conf" | head -n 1)
    if [[ -n $line ]]; then echo "$line"; return; fi
  fi
  echo /var/lib/tupper
}
_tupper_names() {
  # $1: containers or images
  local root d
  root=$(_tupper_root)
  if [[ $1 == containers && -r $root/containers && -x $root/containers ]]; then
    for d in "$root"/containers/*/record.json; do [[ -e $d ]] && d=${d%/record.json} && echo "${d##*/}"; done
  elif [[ $1 == images && -r $root/images && -x $root/images ]]; then
    for d in "$root"/images/*.json; do [[ -e $d ]] && d=${d%.json} && echo "${d##*/}"; done
  elif [[ $1 == containers ]]; then
    tupper ps 2>/dev/null | awk 'NR > 1 { print $1 }'
  else
    tupper image ls 2>/dev/null | awk 'NR > 1 { print $1 }'
  fi
}
_tupper_containers() { compgen -W "$(_tupper_names containers)" -- "$1"; }
_tupper_images() { compgen -W "$(_tupper_names images)" -- "$1"; }
"""

ZSH_PREAMBLE = r"""
_tupper_root() {
  local i
  for ((i = 1; i < ${#words[@]}; i++)); do
    if [[ ${words[i]} == --root ]]; then echo "${words[i+1]}"; return; fi
    if [[ ${words[i]} == --root=* ]]; then echo "${words[i]#--root=}"; return; fi
  done
  if [[ -n ${TUPPER_ROOT:-} ]]; then echo "$TUPPER_ROOT"; return; fi
  local conf=${TUPPER_CONFIG:-/etc/tupper/tupper.toml} line
  if [[ -r $conf ]]; then
    line=$(sed -n 's/^[[:space:]]*root[[:space:]]*=[[:space:]]*["'"'"']\([^"'"'"']*\)["'"'"'].*/\1/p' "$conf" | head -n 1)
    if [[ -n $line ]]; then echo "$line"; return; fi
  fi
  echo /var/lib/tupper
}
_tupper_names() {
  local root=$(_tupper_root) d
  if [[ $1 == containers && -r $root/containers && -x $root/containers ]]; then
    for d in $root/containers/*/record.json(N); do d=${d%/record.json}; echo ${d##*/}; done
  elif [[ $1 == images && -r $root/images && -x $root/images ]]; then
    for d in $root/images/*.json(N); do d=${d%.json}; echo ${d##*/}; done
  elif [[ $1 == containers ]]; then
    tupper ps 2>/dev/null | awk 'NR > 1 { print $1 }'
  else
    tupper image ls 2>/dev/null | awk 'NR > 1 { print $1 }'
  fi
}
_tupper_containers() { local -a names; names=(${(f)"$(_tupper_names containers)"}); _describe -t containers 'container' names; }
_tupper_images() { local -a names; names=(${(f)"$(_tupper_names images)"}); _describe -t images 'image' names; }
"""


def _walk(parser: argparse.ArgumentParser, path: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield from _walk(sub, f"{path} {name}".strip())
        else:
            yield path, action


def annotated_parser() -> argparse.ArgumentParser:
    """The whole parser, with each argument that names a container, an image or a file told how to complete."""
    from tupper.cli.main import build_parser

    parser = build_parser()
    for path, action in _walk(parser):
        key = (path, action.dest)
        if key in CONTAINER_ARGS:
            action.complete = {"bash": "_tupper_containers", "zsh": "_tupper_containers"}
        elif key in IMAGE_ARGS:
            action.complete = {"bash": "_tupper_images", "zsh": "_tupper_images"}
        elif key in SPEC_ARGS:
            action.complete = {"bash": "_shtab_compgen_files", "zsh": "_files -g '*.toml'"}
    return parser


def script(shell: str) -> str:
    import shtab

    preamble = {"bash": BASH_PREAMBLE, "zsh": ZSH_PREAMBLE}[shell]
    return shtab.complete(annotated_parser(), shell=shell, preamble=preamble)


def man_include(static: str) -> str:
    """argparse-manpage's --include material: `static` (docs/tupper.1.include), then every command's
    examples (argparse-manpage shows only the top level's epilog)."""
    from tupper.cli.main import build_parser

    def walk(parser: argparse.ArgumentParser, path: str):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                seen: set[int] = set()
                for name, sub in action.choices.items():
                    if id(sub) not in seen:
                        seen.add(id(sub))
                        yield from walk(sub, f"{path} {name}")

    out = [static.rstrip("\n"), "", "[>COMMAND EXAMPLES]"]
    for path, parser in walk(build_parser(), "tupper"):
        _, sep, rest = (parser.epilog or "").partition("examples:\n")
        lines = [line.strip() for line in rest.splitlines() if line.startswith("  ")] if sep and path != "tupper" else []
        if lines:
            out += [".TP", f".B {path}", ".nf", *(line.replace("\\", "\\e").replace("'", "\\(aq") for line in lines), ".fi"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) == 2 and args[0] == "man-include":
        from pathlib import Path

        sys.stdout.write(man_include(Path(args[1]).read_text()))
        return 0
    if len(args) != 1 or args[0] not in ("bash", "zsh"):
        print("usage: python -m tupper.cli.completion bash|zsh|man-include STATIC", file=sys.stderr)
        return 2
    sys.stdout.write(script(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
