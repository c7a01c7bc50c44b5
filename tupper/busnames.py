"""tupper's D-Bus names, object paths and error names: one place for the service (tupper.api) and the
client (tupper.client). Plain Python, no D-Bus library: the CLI imports it on every call.
"""

from __future__ import annotations

from tupper import errors

BUS_NAME = "org.tupper1"
MANAGER_PATH = "/org/tupper1"
MANAGER_IFACE = "org.tupper1.Manager"
CONTAINER_IFACE = "org.tupper1.Container"
JOB_IFACE = "org.tupper1.Job"
JOB_PREFIX = "/org/tupper1/job"
CONTAINER_PREFIX = "/org/tupper1/container"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
# What the bus daemon answers when tupperd cannot be reached or started.
UNAVAILABLE = frozenset({"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.Spawn.ChildExited",
                         "org.freedesktop.DBus.Error.Spawn.ExecFailed", "org.freedesktop.DBus.Error.NameHasNoOwner"})

_ERROR_CLASSES: tuple[type[errors.TupperError], ...] = (
    errors.InvalidInput, errors.NotFound, errors.Exists, errors.Busy, errors.Failed)
ERRORS: dict[str, type[errors.TupperError]] = {cls.dbus_name: cls for cls in _ERROR_CLASSES}
_HINT = " (hint: "


def escape_label(name: str) -> str:
    """Object path label for a name, as systemd's bus_label_escape: [A-Za-z0-9] kept, every other byte
    of the UTF-8 text written _xx; "" is "_"."""
    if not name:
        return "_"
    return "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else f"_{b:02x}" for b in name.encode("utf-8", "surrogatepass"))


def unescape_label(label: str) -> str:
    if label == "_":
        return ""
    out, i = bytearray(), 0
    while i < len(label):
        if label[i] == "_" and i + 3 <= len(label):
            out.append(int(label[i + 1 : i + 3], 16))
            i += 3
        else:
            out += label[i].encode()
            i += 1
    return out.decode("utf-8", "surrogatepass")


def container_path(name: str) -> str:
    return f"{CONTAINER_PREFIX}/{escape_label(name)}"


def container_name(path: str) -> str:
    """The container name of an object path under CONTAINER_PREFIX."""
    return unescape_label(path[len(CONTAINER_PREFIX) + 1 :])


def error_text(exc: errors.TupperError) -> str:
    """The text of a D-Bus error reply: the message, with the hint after it where there is one."""
    return exc.message + (f"{_HINT}{exc.hint})" if exc.hint else "")


def error_from(name: str | None, text: str) -> errors.TupperError:
    """The TupperError a D-Bus error reply stands for (error_text's inverse for tupper's own names)."""
    if name == ACCESS_DENIED:
        return errors.Failed(f"access denied: {text}", hint="run as root or as a member of tupperd's admin group")
    if name in UNAVAILABLE:
        return errors.Failed(f"tupperd is not available: {text}", hint="install its bus activation files with `make setup`, or start `tupperd`")
    hint = None
    if text.endswith(")") and _HINT in text:
        text, _, hint = text[:-1].rpartition(_HINT)
    return ERRORS.get(name or "", errors.Failed)(text, hint=hint)
