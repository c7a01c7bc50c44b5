"""The files tupper writes into a container's /etc/systemd/system: component units, drop-ins, tupper.target.

`plan()` is pure (spec in, {path: text} out) so it is tested as a value; `write()` puts it in a rootfs.
"""

from __future__ import annotations

import os
from pathlib import Path

from tupper.components import Component
from tupper.spec import Spec

UNIT_DIR = "etc/systemd/system"
TARGET = "tupper.target"
AGENT_SOCKET = "/run/host/tupper/creds.sock"  # the secrets agent's socket as the container sees it (tupper.agent)


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


def read(rootfs: Path, paths: list[str]) -> dict[str, str | None]:
    """The current content of `paths` (None: absent), to put back on a rollback."""
    out: dict[str, str | None] = {}
    for rel in paths:
        path = rootfs / rel
        out[rel] = path.read_text(encoding="utf-8") if path.is_file() and not path.is_symlink() else None
    return out


def restore(rootfs: Path, saved: dict[str, str | None]) -> None:
    write(rootfs, {rel: text for rel, text in saved.items() if text is not None})
    for rel, text in saved.items():
        if text is None:
            (rootfs / rel).unlink(missing_ok=True)


def write(rootfs: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = rootfs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # The image may hold a symlink here (`systemctl mask` makes UNIT -> /dev/null, aliases point
        # to /lib/systemd/system/...): writing through it would follow the link on the host.
        if path.is_symlink():
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(path, 0o644)
    wants = rootfs / UNIT_DIR / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / TARGET
    if not link.is_symlink():
        link.symlink_to(f"/{UNIT_DIR}/{TARGET}")
