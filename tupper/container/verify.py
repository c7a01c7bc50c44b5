"""`systemd-analyze verify` over a component's unit files (`tupper sdk check`): systemd's own reading
of them, which knows every directive and value systemd has (a misspelt key, `Restart=on-falure`).

It runs on the host, against the unit files where they are (`--recursive-errors=no`: units they refer
to, which live in the image, are not looked for; `--man=no`, `--generators=no`: nothing of the host's
own is checked). Its complaint that a command is not executable is left out: programs live in the
component's payload or the image, which tupper's own check looks in (tupper.model.sdk).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from tupper import proc

NOT_EXECUTABLE = re.compile(r"Command .* is not executable")
TIMEOUT = 60.0


def available() -> bool:
    return shutil.which("systemd-analyze") is not None


def findings(units: list[Path], base: Path) -> list[tuple[str, str]]:
    """(where, what) of everything systemd-analyze verify says about `units` (paths below `base`):
    `where` is "units/NAME.service:LINE" where systemd names a line, else "units/NAME.service"."""
    if not units:
        return []
    argv = ["systemd-analyze", "verify", "--man=no", "--generators=no", "--recursive-errors=no", *map(str, units)]
    out = proc.run(argv, check=False, timeout=TIMEOUT, env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_LOG_LOCATION": "0"})
    found = []
    for line in (out.stderr + out.stdout).splitlines():
        line = line.strip()
        if line and not NOT_EXECUTABLE.search(line):
            found.append(locate(line, units, base))
    return found


def locate(line: str, units: list[Path], base: Path) -> tuple[str, str]:
    """One line of verify's output as (where, what): it starts with a unit file's path and a line
    number ("/…/units/web.service:6: …"), or with a unit's name ("web.service: …")."""
    for unit in units:
        rel = os.path.relpath(unit, base)
        if line.startswith(f"{unit}:"):
            m = re.match(r"(\d+): ?(.*)", line[len(str(unit)) + 1:])
            return (f"{rel}:{m.group(1)}", m.group(2)) if m else (rel, line[len(str(unit)) + 1:].strip())
        if line.startswith(f"{unit.name}: "):
            return rel, line[len(unit.name) + 2:]
    return "units", line
