"""How library code reports long steps without printing: a Progress is passed in; the CLI or the daemon renders it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Progress:
    """Silent by default; subclasses render. `step` brackets a long step, `update` refines its text."""

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        yield

    def update(self, text: str) -> None:
        pass

    def note(self, text: str) -> None:
        """A one-off message worth telling the user (e.g. 'created a loopback pool')."""


SILENT = Progress()
