"""Where the systemd-nspawn command line is built: a pure function of the container's plan and the host."""

from __future__ import annotations

import os
import re
from pathlib import Path

import attrs


@attrs.frozen
class Bind:
    source: Path
    target: str
    read_only: bool = True


@attrs.frozen
class Host:
    """What nspawn must know about the host it runs on."""

    systemd: bool  # systemd is PID 1 with a system bus: register with machined, let it make a scope

    @classmethod
    def detect(cls) -> Host:
        return cls(systemd=os.path.isdir("/run/systemd/system") and os.path.exists("/run/dbus/system_bus_socket"))


def machine_name(name: str) -> str:
    """nspawn's machine name (also the hostname) for a container: hostnames have no '_'."""
    return name.replace("_", "-")


def network_args(mode: str, netns_path: str | None) -> list[str]:
    """private: the namespace tupper made and configured (tupper.runtime.network); none: a namespace of
    nspawn's own with only a loopback; host: the host's network (no option)."""
    if mode == "private":
        if netns_path is None:
            raise ValueError("a private network needs the namespace tupper made")
        return [f"--network-namespace-path={netns_path}"]
    return ["--private-network"] if mode == "none" else []


def boot_argv(name: str, rootfs: Path, binds: list[Bind], host: Host, properties: list[tuple[str, str]] | None = None,
              network: list[str] | None = None) -> list[str]:
    """argv that boots systemd in `rootfs` as container `name`. `properties`: resource limits for the
    scope machined makes on a systemd host (cgroups.systemd_properties); elsewhere tupper writes them."""
    argv = [
        "systemd-nspawn",
        "--quiet",
        "--directory", str(rootfs),
        "--machine", machine_name(name),
        "--boot",
        "--console", "pipe",
        "--link-journal", "no",
        # The record is the one source of a container's settings: a NAME.nspawn file in /etc/systemd/nspawn,
        # /run/systemd/nspawn or beside the root would otherwise change it behind tupper's back.
        "--settings", "no",
    ]
    if host.systemd:
        argv += ["--register", "yes"]
        argv += [f"--property={k}={v}" for k, v in properties or ()]
    else:
        # No host systemd and no system bus: nspawn must neither register nor create a scope.
        argv += ["--register", "no", "--keep-unit"]
    argv += network or []
    for b in binds:
        argv += ["--bind-ro" if b.read_only else "--bind", f"{_escape(str(b.source))}:{_escape(b.target)}"]
    return argv


def command_argv(rootfs: Path, command: list[str], host: Host) -> list[str]:
    """argv that runs one command in `rootfs` without booting (image build steps)."""
    argv = ["systemd-nspawn", "--quiet", "--directory", str(rootfs), "--pipe", "--link-journal", "no", "--settings", "no"]
    if not host.systemd:
        argv += ["--register", "no", "--keep-unit"]
    return argv + ["--", *command]


def writable_sources(argv: list[str]) -> list[str]:
    """The host paths an nspawn argv binds read-write (`--bind SRC:DST`): they must stay writable where
    nspawn runs (mountns.confine)."""
    out = []
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--bind":
            source = re.split(r"(?<!\\):", value, maxsplit=1)[0]
            out.append(source.replace("\\:", ":"))
    return out


def _escape(path: str) -> str:
    # nspawn splits --bind arguments at ':'; a literal colon is written '\:'.
    return path.replace("\\", "\\\\").replace(":", "\\:")


def runtime_dirs(name: str) -> list[Path]:
    """Directories nspawn keeps for a running machine. Where /run is not a tmpfs (as on hosts without
    systemd) nspawn refuses to delete them when a container is killed, so tupper removes them."""
    base = Path("/run/systemd/nspawn")
    return [base / "propagate" / machine_name(name), base / "unix-export" / machine_name(name)]


def remove_runtime_dirs(name: str) -> None:
    import shutil

    for d in runtime_dirs(name):
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
