"""Signing keys and the store's trust in them (image streams, imagestream.py).

    <store>/keys/NAME.key       an Ed25519 private key made here (PKCS#8 PEM, mode 0600, the directory 0700)
    <store>/trust/NAME.pub      a public key streams may be signed with (one line: "ed25519 BASE64")
    <store>/trust/policy.json   {"require_signature": true|false}: refuse unsigned or untrusted streams

A stream's signature covers its header and its payload's digest (imagestream.signed_bytes). An import
checks a signature whenever there is one: one that does not verify is refused always; an unsigned
stream, or one signed by a key not in trust/, is refused when the policy or --require-signature asks.
Keys are named by their id: "ed25519:" and the first 16 hex digits of SHA-256 over the public key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from tupper import durable
from tupper.errors import Exists, InvalidInput, NotFound
from tupper.store.store import Store

KEY_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


def key_id(public: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public).hexdigest()[:16]


def _public_line(public: bytes) -> str:
    return "ed25519 " + base64.b64encode(public).decode() + "\n"


def parse_public(text: str, where: str) -> bytes:
    parts = text.split()
    if len(parts) != 2 or parts[0] != "ed25519":
        raise InvalidInput(f"{where}: not a public key (expected one line: ed25519 BASE64)")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise InvalidInput(f"{where}: the key is not valid base64") from None
    if len(raw) != 32:
        raise InvalidInput(f"{where}: an Ed25519 public key is 32 bytes, this one {len(raw)}")
    return raw


class Keys:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys_dir = store.root / "keys"
        self.trust_dir = store.root / "trust"

    # ---- keys of this store -------------------------------------------------------------------

    def generate(self, name: str) -> dict:
        """A new key pair: the private key kept here, its public key trusted here (export it with
        `tupper image key show NAME` to trust it on other hosts)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._check_name(name)
        private_path = self.keys_dir / f"{name}.key"
        if private_path.exists() or (self.trust_dir / f"{name}.pub").exists():
            raise Exists(f"a key named {name!r} exists", hint="tupper image key ls lists them")
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.keys_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.keys_dir, 0o700)
        durable.write_bytes(private_path, pem, 0o600)
        self._write_public(name, public)
        return {"name": name, "key": key_id(public), "public": _public_line(public).strip(), "private": str(private_path)}

    def trust(self, name: str, text: str, where: str) -> dict:
        """Trust a public key (the line `tupper image key show` prints on the host that has the private key)."""
        self._check_name(name)
        public = parse_public(text, where)
        if (self.trust_dir / f"{name}.pub").exists():
            raise Exists(f"a trusted key named {name!r} exists", hint=f"tupper image key rm {name} first")
        self._write_public(name, public)
        return {"name": name, "key": key_id(public)}

    def remove(self, name: str) -> None:
        self._check_name(name)
        found = [p for p in (self.keys_dir / f"{name}.key", self.trust_dir / f"{name}.pub") if p.exists()]
        if not found:
            raise NotFound(f"no key {name!r}", hint="tupper image key ls lists them")
        for p in found:
            p.unlink()

    def show(self, name: str) -> dict:
        public = self._trusted().get(name)
        if public is None:
            raise NotFound(f"no key {name!r}", hint="tupper image key ls lists them")
        return {"name": name, "key": key_id(public), "public": _public_line(public).strip()}

    def list(self) -> list[dict]:
        trusted = self._trusted()
        private = {p.stem for p in self.keys_dir.glob("*.key")} if self.keys_dir.is_dir() else set()
        return [{"name": n, "key": key_id(trusted[n]) if n in trusted else None, "trusted": n in trusted, "private": n in private}
                for n in sorted(set(trusted) | private)]

    def signer(self, name: str) -> Callable[[bytes], dict]:
        """sign(bytes) -> {"key": id, "signature": base64} with this store's private key `name`."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._check_name(name)
        path = self.keys_dir / f"{name}.key"
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise NotFound(f"no private key {name!r} in this store", hint="tupper image key generate NAME makes one") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InvalidInput(f"{path}: not an Ed25519 key")
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

        def sign(data: bytes) -> dict:
            return {"key": key_id(public), "signature": base64.b64encode(key.sign(data)).decode()}

        return sign

    # ---- policy and checks --------------------------------------------------------------------

    @property
    def policy_path(self) -> Path:
        return self.trust_dir / "policy.json"

    def require_signature(self) -> bool:
        try:
            return bool(json.loads(self.policy_path.read_text()).get("require_signature", False))
        except FileNotFoundError:
            return False
        except ValueError:
            raise InvalidInput(f"{self.policy_path}: not valid JSON") from None

    def set_policy(self, require: bool) -> None:
        self.trust_dir.mkdir(mode=0o755, exist_ok=True)
        durable.write_json(self.policy_path, {"require_signature": require})

    def verify(self, signed: bytes, signature: dict | None, where: str, *, require: bool) -> str | None:
        """The id of the trusted key that signed `signed`, or None for an unsigned stream that may pass."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        require = require or self.require_signature()
        if signature is None:
            if require:
                raise InvalidInput(f"{where}: the stream is not signed, and this store requires signed images",
                                   hint="export it with --sign KEY on the host that made it")
            return None
        if not isinstance(signature, dict) or not isinstance(signature.get("key"), str) or not isinstance(signature.get("signature"), str):
            raise InvalidInput(f"{where}: trailer.signature: malformed")
        keys = {key_id(raw): raw for raw in self._trusted().values()}
        public = keys.get(signature["key"])
        if public is None:
            if require:
                raise InvalidInput(f"{where}: signed by {signature['key']}, a key this store does not trust",
                                   hint="trust its public key: tupper image key trust NAME FILE")
            return None
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(base64.b64decode(signature["signature"]), signed)
        except (InvalidSignature, ValueError):
            raise InvalidInput(f"{where}: the signature by {signature['key']} does not match the stream (altered or forged)") from None
        return signature["key"]

    # ---- internals ----------------------------------------------------------------------------

    def _trusted(self) -> dict[str, bytes]:
        out = {}
        if self.trust_dir.is_dir():
            for p in sorted(self.trust_dir.glob("*.pub")):
                try:
                    out[p.stem] = parse_public(p.read_text(), str(p))
                except (InvalidInput, OSError):
                    continue
        return out

    def _write_public(self, name: str, public: bytes) -> None:
        self.trust_dir.mkdir(mode=0o755, exist_ok=True)
        durable.write_bytes(self.trust_dir / f"{name}.pub", _public_line(public).encode())

    @staticmethod
    def _check_name(name: str) -> None:
        if not KEY_NAME.fullmatch(name):
            raise InvalidInput(f"invalid key name {name!r} (lowercase letters, digits, '.', '_', '-')")
