"""Terminal output for the CLI: step progress, tables, sizes. rich is imported only when something is drawn."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from tupper.progress import Progress

# typing only for checkers: importing it costs every CLI call ~5 ms here (as in cli/backends.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SLOW_STEP = 2.0  # seconds: a step still running then gets a line of its own where there is no terminal
STEP_HEARTBEAT = 10.0  # ... and another, with its latest update, this often while it runs


class TerminalProgress(Progress):
    """A spinner with the current step on a terminal. Elsewhere (a log, a CI job) one line per finished
    step, and for a step that takes long, a line when it has run SLOW_STEP seconds and every
    STEP_HEARTBEAT seconds after, with its latest update: a long image build is never silent."""

    def __init__(self, stream=None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self._status: Any = None  # rich's Status while a step shows a spinner
        self._text = ""
        self._latest = ""
        self._ticker: Any = None  # a threading.Timer while a step runs without a terminal
        self._lock: Any = None  # threading is imported by the first step without a terminal (not at every start)

    def _tick(self, t0: float, delay: float) -> None:
        """Say that the step runs, and schedule the next line (a daemon timer thread)."""
        import threading

        if self._lock is None:
            self._lock = threading.Lock()

        def say() -> None:
            with self._lock:
                if self._ticker is None:
                    return
                latest = f": {self._latest}" if self._latest else ""
                print(f"… {self._text}{latest} ({time.monotonic() - t0:.0f}s)", file=self.stream, flush=True)
                self._ticker = None
            self._tick(t0, STEP_HEARTBEAT)

        with self._lock:
            self._ticker = threading.Timer(delay, say)
            self._ticker.daemon = True
            self._ticker.start()

    def _stop_ticking(self) -> None:
        if self._lock is None:
            return
        with self._lock:
            if self._ticker is not None:
                self._ticker.cancel()
                self._ticker = None

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        if self.quiet:
            yield
            return
        t0 = time.monotonic()
        self._text = text
        if self.tty:
            from rich.console import Console

            console = Console(file=self.stream)
            with console.status(text) as status:
                self._status = status
                try:
                    yield
                finally:
                    self._status = None
            ok = sys.exc_info()[0] is None
        else:
            self._latest = ""
            self._tick(t0, SLOW_STEP)
            try:
                yield
            except BaseException:
                self._stop_ticking()
                self._line(f"✗ {text}")
                raise
            self._stop_ticking()
            ok = True
        if ok:
            self._line(f"✓ {text} ({time.monotonic() - t0:.2f}s)")

    def update(self, text: str) -> None:
        self._latest = text
        if self._status is not None:
            self._status.update(f"{self._text}: {text}")

    def note(self, text: str) -> None:
        # Notes go to stderr even with --json: they say something changed on the host.
        self._line(f"note: {text}")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def size(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0, time.time() - ts)
    if s < 60:
        return f"{s:.0f}s ago"
    if s < 3600:
        return f"{s / 60:.0f}m ago"
    if s < 86400:
        return f"{s / 3600:.1f}h ago"
    return f"{s / 86400:.1f}d ago"


def table(headers: list[str], rows: list[list[str]], stream=None) -> None:
    """A plain aligned table (no rich import: listing commands stay fast)."""
    stream = stream or sys.stdout
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(str(c))) for w, c in zip(widths, row, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*headers).rstrip(), file=stream)
    for row in rows:
        print(fmt.format(*[str(c) for c in row]).rstrip(), file=stream)


class RemoteProgress:
    """Renders progress signals from tupperd (kind, text) with a local Progress."""

    def __init__(self, local: Progress) -> None:
        self.local = local
        self._open: contextlib.ExitStack | None = None

    def handle(self, kind: str, text: str) -> None:
        if kind == "step":
            self.close()
            self._open = contextlib.ExitStack()
            self._open.enter_context(self.local.step(text))
        elif kind in ("done", "failed"):
            if self._open is not None:
                stack, self._open = self._open, None
                if kind == "done":
                    stack.close()
                else:
                    stack.__exit__(RuntimeError, RuntimeError(text), None)
        elif kind == "update":
            self.local.update(text)
        elif kind == "note":
            self.local.note(text)

    def close(self) -> None:
        if self._open is not None:
            stack, self._open = self._open, None
            stack.close()
