"""The files tupper writes into a container's /etc/systemd/system: component units, drop-ins, tupper.target.

`plan()` is pure (spec in, {path: text} out) so it is tested as a value; `write()` puts it in a rootfs.
"""

from __future__ import annotations

from pathlib import Path

from tupper.container.inroot import Root
from tupper.model.components import Component
from tupper.model.spec import Spec

UNIT_DIR = "etc/systemd/system"
TARGET = "tupper.target"
# Where the container finds its secrets agent (tupper.agent serves it; the runtime bind-mounts the
# container's agent directory there; units load their credentials from the socket).
AGENT_DIR = "/run/host/tupper"
AGENT_SOCKET_NAME = "creds.sock"
AGENT_SOCKET = f"{AGENT_DIR}/{AGENT_SOCKET_NAME}"


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "%": "%%"}


def _quote_env(key: str, value: str) -> str:
    # systemd unit syntax: a double-quoted word with C escapes; '%' starts a specifier and is doubled.
    # systemd ends a unit-file line at '\n', '\r' and NUL, so no raw control character may be written.
    escaped = "".join(
        _ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch) for ch in value
    )
    return f'"{key}={escaped}"'


def plan(spec: Spec) -> dict[str, str]:
    """Every file to write, keyed by its path relative to the rootfs."""
    files: dict[str, str] = {}
    by_name = {u.component.name: u.component for u in spec.components}
    for use in spec.components:
        required_units = [u for req in use.component.requires for u in by_name[req].units]
        files.update(component_files(use.component, use.env, required_units, use.component.secrets))
    files.update(target_file(spec.name, spec.units))
    return files


def component_files(c: Component, env: tuple[tuple[str, str], ...] | list, required_units: list[str],
                    credentials: tuple[str, ...] | list = ()) -> dict[str, str]:
    """One component's units and their drop-ins (requires as After=/Requires=, env as Environment=,
    granted credentials as LoadCredential= from the container's secrets agent)."""
    files: dict[str, str] = {}
    for unit in c.units:
        files[f"{UNIT_DIR}/{unit}"] = c.unit_path(unit).read_text(encoding="utf-8")
        dropin = [f"# written by tupper for component {c.name} {c.version}", "[Unit]", f"PartOf={TARGET}"]
        if required_units:
            joined = " ".join(required_units)
            dropin += [f"After={joined}", f"Requires={joined}"]
        if (env or credentials) and unit.endswith(".service"):
            dropin += ["", "[Service]"] + [f"Environment={_quote_env(k, v)}" for k, v in env]
            dropin += [f"LoadCredential={cred}:{AGENT_SOCKET}" for cred in credentials]
        files[f"{UNIT_DIR}/{unit}.d/50-tupper.conf"] = "\n".join(dropin) + "\n"
    return files


def target_file(name: str, units: list[str]) -> dict[str, str]:
    return {f"{UNIT_DIR}/{TARGET}": "\n".join(["[Unit]", f"Description=tupper components of {name}", f"Wants={' '.join(units)}", ""])}


def remove(rootfs: Path, paths: list[str]) -> None:
    """Remove unit files (a directory in their place is left alone)."""
    with Root(rootfs) as root:
        for rel in paths:
            root.unlink(rel)


def write(rootfs: Path, files: dict[str, str]) -> None:
    """Write the unit files and the target's wants link, inside the root: a running container can make
    any directory on the way a symlink, and the image may hold one where a unit goes (`systemctl mask`
    makes UNIT -> /dev/null); neither is followed out of the root, and a symlink in a unit's place is
    replaced, not written through (see tupper.inroot)."""
    with Root(rootfs) as root:
        for rel, text in files.items():
            root.write_text(rel, text)
        root.symlink(f"{UNIT_DIR}/multi-user.target.wants/{TARGET}", f"/{UNIT_DIR}/{TARGET}")
