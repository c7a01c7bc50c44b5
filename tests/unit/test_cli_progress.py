"""Progress where stderr is no terminal (a log, a CI job): a line per finished step, and a long step is
never silent: a line once it has run a while, then one now and then with its latest update."""

from __future__ import annotations

import io
import time

from tupper.cli import ui


def test_a_long_step_says_it_runs_with_its_latest_update(monkeypatch):
    monkeypatch.setattr(ui, "SLOW_STEP", 0.1)
    monkeypatch.setattr(ui, "STEP_HEARTBEAT", 0.2)
    out = io.StringIO()
    progress = ui.TerminalProgress(stream=out)
    with progress.step("Building image x"):
        time.sleep(0.15)
        progress.update("debootstrap: unpacking")
        time.sleep(0.25)
    with progress.step("Quick"):
        pass
    time.sleep(0.3)  # no ticker outlives its step
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("… Building image x (")
    assert lines[1].startswith("… Building image x: debootstrap: unpacking (")
    assert lines[2].startswith("✓ Building image x (") and lines[3].startswith("✓ Quick (")
    assert len(lines) == 4


def test_a_quick_step_is_one_line_and_a_failed_one_says_so():
    out = io.StringIO()
    progress = ui.TerminalProgress(stream=out)
    with progress.step("Quick"):
        pass
    try:
        with progress.step("Broken"):
            raise RuntimeError("no")
    except RuntimeError:
        pass
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("✓ Quick (") and lines[1] == "✗ Broken" and len(lines) == 2
