"""Component packages (`NAME-VERSION.tupper`): reproducible build, digest, safe install into the store.

A package is a gzip'd tar with normalised metadata (sorted entries, mtime 0, owner root, modes 0644
/0755) whose first member, `tupper-package.json`, holds the name, version and a sha256 digest over a
canonical listing of every other member (type, path, mode, size, content hash, link target). The same
directory gives the same bytes whatever its files' mtimes, owners or directory order.
"""

from __future__ import annotations

import builtins
import contextlib
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO

import attrs

from tupper import durable
from tupper.errors import Busy, Exists, InvalidInput, NotFound
from tupper.model import components as comp
from tupper.store.store import FREE_FOR_CONTAINER, Store

META = "tupper-package.json"
FORMAT = 1
SKIP_DIRS = {".git", ".hg", ".svn"}  # version control metadata is not part of a component
CHUNK = 1 << 20


@attrs.frozen
class Entry:
    """One member: kind 'dir', 'file' or 'symlink'; path relative, POSIX; for files the sha256."""

    kind: str
    path: str
    mode: int = 0
    size: int = 0
    sha256: str = ""
    target: str = ""

    def line(self) -> str:
        if self.kind == "dir":
            return f"D {self.path}\n"
        if self.kind == "symlink":
            return f"L {self.path} -> {self.target}\n"
        return f"F {self.path} {self.mode:o} {self.size} {self.sha256}\n"


def digest_of(entries: list[Entry]) -> str:
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.path):
        h.update(e.line().encode())
    return f"sha256:{h.hexdigest()}"


def hash_stream(src: IO[bytes], *sinks: Callable[[bytes], object]) -> tuple[str, int]:
    """sha256 hex digest and size of what `src` yields, in chunks; each chunk also goes to every sink."""
    h, size = hashlib.sha256(), 0
    while chunk := src.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
        for sink in sinks:
            sink(chunk)
    return h.hexdigest(), size


def _member(tar: tarfile.TarFile, m: tarfile.TarInfo) -> IO[bytes]:
    """A regular member's data (tarfile returns None only for what is not a file, checked before)."""
    data = tar.extractfile(m)
    if data is None:
        raise InvalidInput(f"{m.name}: not a regular file in the package")
    return data


def normal_mode(mode: int, kind: str) -> int:
    if kind == "dir":
        return 0o755
    if kind == "symlink":
        return 0o777
    return 0o755 if mode & 0o111 else 0o644


def _hash_file(path: Path) -> tuple[str, int]:
    with open(path, "rb") as f:
        return hash_stream(f)


def scan(root: Path) -> list[Entry]:
    """Every member of a component directory, sorted; the SDK checker has refused anything unsafe."""
    out: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not (Path(dirpath) == root and d in SKIP_DIRS))
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out.append(Entry("symlink", rel, 0o777, target=os.readlink(path)))
            elif stat.S_ISDIR(st.st_mode):
                out.append(Entry("dir", rel, 0o755))
            elif stat.S_ISREG(st.st_mode):
                sha, size = _hash_file(path)
                out.append(Entry("file", rel, normal_mode(st.st_mode, "file"), size, sha))
    return sorted(out, key=lambda e: e.path)


def build(root: Path, component: comp.Component, out: Path) -> tuple[Path, str]:
    """Write the package for `component` (already checked) to `out` (a directory or a file path)."""
    entries = scan(root)
    digest = digest_of(entries)
    target = out / f"{component.name}-{component.version}.tupper" if out.is_dir() else out
    meta = json.dumps({"format": FORMAT, "name": component.name, "version": component.version,
                       "description": component.description, "digest": digest, "files": len(entries)},
                      indent=1, sort_keys=True).encode() + b"\n"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            tar.addfile(_info(META, tarfile.REGTYPE, 0o644, len(meta)), io.BytesIO(meta))
            for e in entries:
                if e.kind == "file":
                    with open(root / e.path, "rb") as f:
                        tar.addfile(_info(e.path, tarfile.REGTYPE, e.mode, e.size), f)
                elif e.kind == "dir":
                    tar.addfile(_info(e.path, tarfile.DIRTYPE, 0o755))
                else:
                    info = _info(e.path, tarfile.SYMTYPE, 0o777)
                    info.linkname = e.target
                    tar.addfile(info)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target, digest


def _info(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size = kind, mode, size
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


# ---- reading -------------------------------------------------------------------------------------


class _CheckedTarInfo(tarfile.TarInfo):
    """Every header as read, refused before tarfile acts on a crafted size: a negative one (tarfile
    would read with a negative length, or look for the next header before this one), or an extended
    header (pax, GNU long name) beyond 1 MiB, which tarfile would read into memory whole."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        info = super().frombuf(buf, encoding, errors)
        if info.size < 0 or info.type in _EXTENDED_HEADERS and info.size > 1 << 20:
            raise tarfile.ReadError(f"a header with size {info.size}")
        return info


# What reading a damaged archive (truncated, corrupt gzip or tar data) raises: tarfile lets a bad
# number in a pax header (size, mtime, a sparse map) out as a ValueError.
READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)
_EXTENDED_HEADERS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


def _open(pkg: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(pkg, mode="r:gz", tarinfo=_CheckedTarInfo)
    except FileNotFoundError:
        raise InvalidInput(f"{pkg}: no such package") from None
    except READ_ERRORS as exc:
        raise InvalidInput(f"{pkg}: not a tupper package ({exc})") from None


@contextlib.contextmanager
def _reading(pkg: Path) -> Iterator[None]:
    try:
        yield
    except READ_ERRORS as exc:
        raise InvalidInput(f"{pkg}: damaged package: {exc}") from None


def _meta(pkg: Path, tar: tarfile.TarFile) -> dict:
    with _reading(pkg):
        first = tar.next()
        if first is None or first.name != META or not first.isreg() or not 0 <= first.size <= 65536:
            raise InvalidInput(f"{pkg}: not a tupper package (its first member is not {META})")
        raw = _member(tar, first).read()
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: arrays or objects nested too deeply
        raise InvalidInput(f"{pkg}: {META} is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InvalidInput(f"{pkg}: unsupported package format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    for key in ("name", "version", "digest"):
        if not isinstance(meta.get(key), str):
            raise InvalidInput(f"{pkg}: {META}: {key} missing")
    if not comp.NAME_RE.fullmatch(meta["name"]) or not comp.VERSION_RE.fullmatch(meta["version"]):
        raise InvalidInput(f"{pkg}: {META}: invalid name or version")
    return meta


def members(pkg: Path) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """Every member after the metadata, each checked: the only place package paths are trusted."""
    with _open(pkg) as tar:
        _meta(pkg, tar)
        seen: set[str] = set()
        links: set[str] = set()
        for index, m in enumerate(tar):
            if index == 0:
                continue  # the metadata, read above
            name = _safe_name(pkg, m)
            where = f"{pkg}: member {m.name!r}"
            if name in seen:
                raise InvalidInput(f"{where}: appears twice")
            seen.add(name)
            parents = [str(p) for p in PurePosixPath(name).parents if str(p) != "."]
            if any(p in links for p in parents):
                raise InvalidInput(f"{where}: its path goes through a symlink in the package")
            if m.islnk():
                raise InvalidInput(f"{where}: hard link (packages hold files, directories and symlinks only)")
            if m.ischr() or m.isblk():
                raise InvalidInput(f"{where}: device node")
            if m.isfifo():
                raise InvalidInput(f"{where}: named pipe")
            if m.type == tarfile.GNUTYPE_SPARSE or m.sparse is not None:
                # Its holes are read as zeros without being in the archive: any size, for free.
                raise InvalidInput(f"{where}: sparse file")
            if not (m.isreg() or m.isdir() or m.issym()):
                raise InvalidInput(f"{where}: unsupported member type")
            if m.size < 0:  # from a pax header: tarfile would look for the next member before this one
                raise InvalidInput(f"{where}: negative size {m.size}")
            if m.mode & (stat.S_ISUID | stat.S_ISGID):
                raise InvalidInput(f"{where}: setuid/setgid bit (mode {m.mode:o})")
            if m.issym():
                target = m.linkname
                if os.path.isabs(target) or not target:
                    raise InvalidInput(f"{where}: absolute symlink to {target!r}")
                if any(ord(c) < 0x20 for c in target) or not _utf8(target):
                    raise InvalidInput(f"{where}: symlink to {target!r}: not a clean path")
                lexical = os.path.normpath(os.path.join(os.path.dirname(name), target))
                if lexical == ".." or lexical.startswith("../"):
                    raise InvalidInput(f"{where}: symlink to {target!r} leaves the package")
                links.add(name)
            yield m, tar


def _safe_name(pkg: Path, m: tarfile.TarInfo) -> str:
    name = m.name
    p = PurePosixPath(name)
    if not name or name.startswith("/") or p.is_absolute():
        raise InvalidInput(f"{pkg}: member {name!r}: absolute path")
    if ".." in p.parts:
        raise InvalidInput(f"{pkg}: member {name!r}: '..' in its path")
    if not _utf8(name):
        raise InvalidInput(f"{pkg}: member {name!r}: not a UTF-8 path")
    if any(ord(c) < 0x20 for c in name) or "\\" in name or str(p) != name.rstrip("/") or name in (".", "./"):
        raise InvalidInput(f"{pkg}: member {name!r}: not a clean relative path")
    return str(p)


def _utf8(text: str) -> bool:
    """tarfile reads names that are not UTF-8 with surrogate escapes; the digest needs UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def inspect(pkg: Path) -> dict:
    """Manifest, units, files and digest; verifies the digest on the way."""
    with _open(pkg) as tar:
        meta = _meta(pkg, tar)
    entries: list[Entry] = []
    manifest_text, units = "", []
    with _reading(pkg):
        for m, tar in members(pkg):
            if m.isdir():
                entries.append(Entry("dir", m.name, 0o755))
            elif m.issym():
                entries.append(Entry("symlink", m.name, 0o777, target=m.linkname))
            else:
                manifest = bytearray()
                digest, size = hash_stream(_member(tar, m), *([manifest.extend] if m.name == comp.MANIFEST else []))
                manifest_text += manifest.decode("utf-8", "replace")
                entries.append(Entry("file", m.name, normal_mode(m.mode, "file"), size, digest))
                if m.name.startswith("units/"):
                    units.append(m.name[len("units/"):])
    actual = digest_of(entries)
    return {
        "name": meta["name"], "version": meta["version"], "description": meta.get("description", ""),
        "digest": meta["digest"], "digest_ok": actual == meta["digest"], "computed_digest": actual,
        "manifest": manifest_text, "units": units,
        "files": [attrs.asdict(e) for e in entries],
    }


# ---- the store's installed components --------------------------------------------------------------


@attrs.frozen
class Installed:
    name: str
    version: str
    path: Path
    digest: str
    installed_at: float

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "path": str(self.path), "digest": self.digest,
                "installed_at": self.installed_at}


class Installer:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.dir = store.root / "components"
        self.dir.mkdir(mode=0o700, exist_ok=True)

    def path(self, name: str, version: str) -> Path:
        return self.dir / name / version

    def get(self, name: str, version: str | None = None) -> Installed:
        if version is None:
            versions = [i for i in self.list() if i.name == name]
            if not versions:
                raise NotFound(f"no installed component {name!r}", hint="install it: tupper component install PKG")
            return max(versions, key=lambda i: _version_key(i.version))
        meta = self.dir / name / f"{version}.json"
        if not comp.NAME_RE.fullmatch(name) or not comp.VERSION_RE.fullmatch(version) or not meta.is_file():
            raise NotFound(f"no installed component {name} {version}", hint="see `tupper component ls`")
        data = json.loads(meta.read_text())
        return Installed(name, version, self.path(name, version), data["digest"], data["installed_at"])

    def list(self) -> builtins.list[Installed]:
        out = []
        for meta in sorted(self.store.listable(self.dir, "components").glob("*/*.json")):
            try:
                out.append(self.get(meta.parent.name, meta.stem))
            except (NotFound, ValueError, KeyError):
                continue
        return sorted(out, key=lambda i: (i.name, _version_key(i.version)))

    def install(self, pkg: Path) -> Installed:
        """Verify and extract `pkg` into a read-only subvolume; nothing is left if anything is wrong."""
        with _open(pkg) as tar:
            meta = _meta(pkg, tar)
        name, version = meta["name"], meta["version"]
        final = self.path(name, version)
        meta_file = final.parent / f"{version}.json"
        if meta_file.is_file():
            raise Exists(f"{pkg}: component {name} {version} is already installed", hint=f"tupper component rm {name} {version}")
        self.store.require_free(max(FREE_FOR_CONTAINER, 2 * pkg.stat().st_size), f"component install {pkg}")
        tmp = self.store.scratch("component", f"{name}-{version}")
        self.store.create_subvolume(tmp)
        try:
            try:
                entries = self._extract(pkg, tmp)
            except READ_ERRORS as exc:
                raise InvalidInput(f"{pkg}: cannot extract: {exc}") from None
            actual = digest_of(entries)
            if actual != meta["digest"]:
                raise InvalidInput(f"{pkg}: digest mismatch: the package says {meta['digest']}, its content is {actual}")
            component = comp.load(tmp, f"{pkg}")
            if (component.name, component.version) != (name, version):
                raise InvalidInput(f"{pkg}: {comp.MANIFEST} says {component.name} {component.version}, the package {name} {version}")
            final.parent.mkdir(mode=0o700, exist_ok=True)
            self.store.delete_subvolume(final)  # what a crash left of an earlier install (no metadata: not installed)
            self.store.publish(tmp, final)
        finally:
            self.store.delete_subvolume(tmp)
        # Installed when its metadata appears, atomically.
        durable.write_json(meta_file, {"digest": actual, "installed_at": time.time(), "package": str(pkg)})
        return self.get(name, version)

    @staticmethod
    def _extract(pkg: Path, dest: Path) -> builtins.list[Entry]:
        entries: builtins.list[Entry] = []
        for m, tar in members(pkg):
            path = dest / m.name
            if m.isdir():
                path.mkdir(mode=0o755, exist_ok=True)
                entries.append(Entry("dir", m.name, 0o755))
            elif m.issym():
                path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                os.symlink(m.linkname, path)
                entries.append(Entry("symlink", m.name, 0o777, target=m.linkname))
            else:
                path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                mode = normal_mode(m.mode, "file")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
                with os.fdopen(fd, "wb") as out:
                    digest, size = hash_stream(_member(tar, m), out.write)
                os.chmod(path, mode)
                entries.append(Entry("file", m.name, mode, size, digest))
        return entries

    def remove(self, name: str, version: str, users: builtins.list[str]) -> None:
        installed = self.get(name, version)
        if users:
            raise Busy(f"component {name} {version} is used by container(s): {', '.join(users)}", hint="remove those containers first")
        (self.dir / name / f"{version}.json").unlink(missing_ok=True)  # uninstalled first; a crash leaves files `store check` removes
        self.store.delete_subvolume(installed.path)
        try:
            (self.dir / name).rmdir()
        except OSError:
            pass


def _version_key(version: str) -> tuple:
    """Order versions like 1.2.10 > 1.2.9 (numeric parts as numbers)."""
    import re

    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.+_-]", version))


def read_meta(pkg: Path) -> dict:
    """A package's metadata (name, version, digest), from its first member alone: its content is checked on install."""
    with _open(pkg) as tar:
        return _meta(pkg, tar)


def version_key(version: str) -> tuple:
    return _version_key(version)
