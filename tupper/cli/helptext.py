"""Help text: argparse's formatters sized to the terminal without importing shutil, and the examples
epilog every command's --help ends with (`**examples("tupper run spec.toml", ...)` in add_parser)."""

from __future__ import annotations

import argparse
import os
import sys


def _columns() -> int:
    """shutil.get_terminal_size().columns, without importing shutil (and with it bz2, lzma and zlib)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 0
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class Formatter(argparse.HelpFormatter):
    """argparse's own, except that it sizes help to the terminal without importing shutil: argparse makes a
    formatter for every argument it adds, and that import alone cost each command 2-3 ms."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None) -> None:
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


class RawFormatter(Formatter, argparse.RawDescriptionHelpFormatter):
    pass


def examples(*lines: str) -> dict:
    """add_parser keywords for an epilog of examples, kept as written."""
    return {"epilog": "examples:\n" + "\n".join(f"  {line}" for line in lines), "formatter_class": RawFormatter}
