"""systemd-analyze verify's lines, placed on the component's unit files (tupper.container.verify.locate)."""

from __future__ import annotations

from pathlib import Path

from tupper.container.verify import NOT_EXECUTABLE, locate

BASE = Path("/src/web")
UNITS = [BASE / "units/web.service", BASE / "units/web.socket"]


def test_a_line_with_a_file_and_a_line_number():
    line = "/src/web/units/web.service:6: Unknown key 'MemoryMaxx' in section [Service], ignoring."
    assert locate(line, UNITS, BASE) == ("units/web.service:6", "Unknown key 'MemoryMaxx' in section [Service], ignoring.")


def test_a_line_naming_the_unit():
    assert locate("web.socket: Socket has no ListenStream=", UNITS, BASE) == ("units/web.socket", "Socket has no ListenStream=")


def test_anything_else_is_kept_whole():
    assert locate("Failed to create a manager: Permission denied", UNITS, BASE) == ("units", "Failed to create a manager: Permission denied")


def test_missing_programs_are_left_to_tuppers_own_check():
    assert NOT_EXECUTABLE.search("web.service: Command /opt/web/bin/web is not executable: No such file or directory")
    assert not NOT_EXECUTABLE.search("/src/web/units/web.service:5: Failed to parse service restart specifier, ignoring: on-falure")
