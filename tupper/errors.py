"""Typed errors: library code raises these; only the CLI and the D-Bus API turn them into messages."""

from __future__ import annotations


class TupperError(Exception):
    """Base class. `exit_code` is what the CLI exits with; `hint` says what to do."""

    exit_code = 1
    dbus_name = "org.tupper1.Error.Failed"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class InvalidInput(TupperError):
    """Bad input from the user: a spec, a manifest, an image definition, a name."""

    exit_code = 2
    dbus_name = "org.tupper1.Error.InvalidSpec"


class NotFound(TupperError):
    exit_code = 2
    dbus_name = "org.tupper1.Error.NotFound"


class Exists(InvalidInput):
    dbus_name = "org.tupper1.Error.Exists"


class Busy(TupperError):
    """The object is in use (an image used by a container, a running container)."""

    exit_code = 1
    dbus_name = "org.tupper1.Error.Busy"


class Failed(TupperError):
    """Something went wrong at run time (a unit failed, a command failed)."""


class CommandFailed(Failed):
    def __init__(self, argv: list[str], returncode: int, stderr: str = "") -> None:
        tail = stderr.strip().splitlines()[-3:] if stderr else []
        detail = f": {' / '.join(tail)}" if tail else ""
        super().__init__(f"{argv[0]} exited with status {returncode}{detail}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
