"""The secrets agent: one AF_UNIX socket per container, bind-mounted into that container only.

systemd inside the container connects to it for `LoadCredential=ID:/run/host/tupper/creds.sock`
from an abstract address `\\0<random>/unit/<unit>/<ID>`. The socket tells the agent which container
asks; the address which unit and which credential; and the kernel (SO_PEERCRED) which process,
whose cgroup must be that unit's. The agent answers with the value only if that container's spec
granted that credential to that unit's component, and records every answer in the audit log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from tupper.container.unitfiles import AGENT_SOCKET_NAME
from tupper.errors import TupperError
from tupper.store.secrets import SecretStore

log = logging.getLogger("tupperd")

def parse_peer(address: bytes | str) -> tuple[str, str] | None:
    """(unit, credential ID) from systemd's abstract peer address, None if it is not one."""
    if isinstance(address, str):
        address = address.encode()
    if not address.startswith(b"\0"):
        return None
    parts = address[1:].decode("utf-8", "replace").split("/")
    if len(parts) != 4 or parts[1] != "unit" or not parts[2] or not parts[3]:
        return None
    return parts[2], parts[3]


def unit_of_pid(pid: int) -> str | None:
    """The systemd unit a process of the container runs in, from its cgroup path (…/system.slice/UNIT)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers in ("", "name=systemd"):
            last = path.rstrip("/").rsplit("/", 1)[-1]
            if "." in last:
                return last
    return None


class Agent:
    """Serves one container. `grants()` gives {unit: {credential: secret}} as they are now."""

    def __init__(self, container: str, secrets: SecretStore, grants: Callable[[], dict[str, dict[str, str]]], directory: Path) -> None:
        self.container = container
        self.secrets = secrets
        self.grants = grants
        self.dir = directory
        self.server: asyncio.AbstractServer | None = None

    async def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir.parent, 0o700)  # agents/: only root finds the sockets
        os.chmod(self.dir, 0o755)
        path = self.dir / AGENT_SOCKET_NAME
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        self.server = await asyncio.start_unix_server(self._serve, sock=sock)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        shutil.rmtree(self.dir, ignore_errors=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        unit, credential, secret, version, result = "?", "?", "", None, "denied"
        try:
            asked = parse_peer(writer.get_extra_info("peername") or b"")
            if asked is None:
                result = "denied: not a systemd credential request"
                return
            unit, credential = asked
            pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            if unit_of_pid(pid) != unit:
                result = f"denied: the caller runs in {unit_of_pid(pid) or 'no unit'}, not {unit}"
                return
            secret = self.grants().get(unit, {}).get(credential, "")
            if not secret:
                result = "denied: not granted"
                return
            version, value = await asyncio.to_thread(self.secrets.value, secret)
            writer.write(value)
            await writer.drain()
            result = "delivered"
        except (TupperError, OSError) as exc:
            result = f"error: {exc.message if isinstance(exc, TupperError) else exc.strerror}"
        finally:
            writer.close()
            try:
                self.secrets.audit(container=self.container, unit=unit, credential=credential, secret=secret,
                                   version=version, result=result)
            except OSError as exc:
                log.warning("%s: cannot write the audit log: %s", self.container, exc)
            if result != "delivered":
                log.warning("%s: credential %s for %s: %s", self.container, credential, unit, result)
