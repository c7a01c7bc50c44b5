"""Secrets at rest: encrypted with `systemd-creds --with-key=host` (the TPM where there is one) in a
0700 directory of 0600 files under the store root, outside every subvolume that is snapshotted.

No file here holds a value in clear; values exist only in memory, on their way from `systemd-creds
decrypt` to the agent socket of a container that was granted them. The audit log records every
delivery (time, container, unit, credential, secret, version), never a value.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import time
from pathlib import Path

import attrs

from tupper import durable, proc
from tupper.errors import Failed, InvalidInput, NotFound
from tupper.model.spec import SECRET_NAME_RE as NAME_RE
from tupper.store.store import Store

MAX_VALUE = 1 << 20  # systemd's own limit for one credential is 1 MiB
KEEP_VERSIONS = 3  # older encrypted versions are deleted


@attrs.frozen
class SecretInfo:
    name: str
    version: int
    created_at: float
    updated_at: float

    def to_json(self) -> dict:
        return attrs.asdict(self)


class SecretStore:
    def __init__(self, store: Store) -> None:
        self.dir = store.root / "secrets"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.audit_log = self.dir / "audit.log"

    @staticmethod
    def check_name(name: str, where: str = "secret name") -> str:
        if not NAME_RE.fullmatch(name):
            raise InvalidInput(f"{where}: invalid secret name {name!r}: letters, digits, '_', '.', '-' (at most 64)")
        return name

    def _meta(self, name: str) -> dict:
        try:
            return json.loads((self.dir / name / "meta.json").read_text())
        except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: the name of a file, like audit.log
            raise NotFound(f"no secret {name!r}", hint=f"set it: tupper secret set {name} < FILE") from None

    def exists(self, name: str) -> bool:
        return NAME_RE.fullmatch(name) is not None and (self.dir / name / "meta.json").is_file()

    def info(self, name: str) -> SecretInfo:
        self.check_name(name)
        m = self._meta(name)
        return SecretInfo(name, m["version"], m["created_at"], m["updated_at"])

    def list(self) -> builtins.list[SecretInfo]:
        return [self.info(d.name) for d in sorted(self.dir.iterdir()) if d.is_dir() and (d / "meta.json").is_file()]

    def set(self, name: str, value: bytes) -> SecretInfo:
        """Store a new version of `name` (encrypted); returns its info."""
        self.check_name(name)
        if not value:
            raise InvalidInput(f"secret {name}: empty value")
        if len(value) > MAX_VALUE:
            raise InvalidInput(f"secret {name}: value larger than {MAX_VALUE} bytes")
        d = self.dir / name
        d.mkdir(mode=0o700, exist_ok=True)
        now = time.time()
        meta = self._meta(name) if (d / "meta.json").exists() else {"version": 0, "created_at": now}
        version = meta["version"] + 1
        target = d / f"v{version}.cred"
        tmp = d / f".v{version}.cred.tmp"
        # The value goes in on stdin: never on a command line, never in a file in clear.
        proc.run(["systemd-creds", "encrypt", "--with-key=host", f"--name={name}", "-", str(tmp)], input=value, binary=True)
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
        meta.update(version=version, updated_at=now)
        durable.write_json(d / "meta.json", meta, mode=0o600)
        for old in d.glob("v*.cred"):
            if int(old.stem[1:]) <= version - KEEP_VERSIONS:
                old.unlink()
        return self.info(name)

    def value(self, name: str) -> tuple[int, bytes]:
        """(version, value) of the current version: decrypted into memory only."""
        info = self.info(name)
        path = self.dir / name / f"v{info.version}.cred"
        out = proc.run(["systemd-creds", "decrypt", f"--name={name}", str(path), "-"], binary=True)
        return info.version, out.stdout

    def remove(self, name: str) -> None:
        self.info(name)
        shutil.rmtree(self.dir / name)

    # ---- audit --------------------------------------------------------------------------------

    def audit(self, *, container: str, unit: str, credential: str, secret: str, version: int | None, result: str) -> None:
        entry = {"time": round(time.time(), 3), "container": container, "unit": unit, "credential": credential,
                 "secret": secret, "version": version, "result": result}
        fd = os.open(self.audit_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def audit_entries(self, name: str | None = None) -> builtins.list[dict]:
        try:
            lines = self.audit_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if name is None or entry.get("secret") == name:
                out.append(entry)
        return out


def read_value(stdin, from_file: Path | None) -> bytes:
    """A value from a file or standard input (never from the command line); one trailing newline
    from a terminal or `echo` is dropped."""
    if from_file is not None:
        try:
            data = from_file.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"--from-file: {from_file}: {exc.strerror}") from None
    else:
        if stdin.isatty():
            raise InvalidInput("give the value on standard input (tupper secret set NAME < FILE) or with --from-file")
        data = stdin.buffer.read()
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise Failed("empty value: nothing stored")
    return data
