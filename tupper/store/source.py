"""A source: a directory of image streams and component packages from which a store takes what a spec needs.

    DIR/IMAGE.timg           `tupper image export IMAGE -o DIR/IMAGE.timg` (full, or incremental on a parent
                             that is itself in DIR as PARENT.timg or already in the store)
    DIR/NAME-VERSION.tupper  `tupper component pack` (the SDK's packages)

`tupper fetch SPEC --source DIR` and the Pacemaker agent's `source` parameter (docs/fleet.md) bring a
spec's image and its installed components (`name =` entries) into the node's store before the
container starts there: what is missing is imported or installed, which checks it as any import or
install does (the stream's digests and tree digest, the package's content digest, signatures by the
store's policy); what is there already is compared by digest with the source's, and a difference is
refused: every node runs the same bytes, or none starts.

With a source, the source decides an unpinned component's version (`name` without `version`: the
newest package in DIR, not the newest installed here), so that every node resolves the spec alike.
Fetches into one store are serialised (a lock file): two services starting on a node at once import a
shared image once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs

from tupper.errors import Exists, InvalidInput, NotFound
from tupper.model import components as comp
from tupper.model import spec as specmod
from tupper.progress import SILENT, Progress
from tupper.store import imagestream, packages
from tupper.store.images import Images
from tupper.store.store import Store

STREAM_SUFFIX = ".timg"
PACKAGE_SUFFIX = ".tupper"
MAX_CHAIN = 32  # parents followed from one image stream


class Missing(NotFound):
    """What a spec needs is neither in the store nor in the source: this node cannot run it (yet)."""


@attrs.frozen
class Brought:
    """One thing a spec needs, and what fetching it did: imported/installed, or present (same digest)."""

    kind: str  # image, component
    name: str
    version: str | None
    digest: str
    action: str  # imported, installed, present

    def to_json(self) -> dict:
        return {"kind": self.kind, "name": self.name, "version": self.version, "digest": self.digest, "action": self.action}


# verify(header, trailer, where) -> the signing key's id or None (imagecmd: the store's trust policy)
StreamVerifier = Callable[[dict, dict, str], "str | None"]


@attrs.define
class Source:
    """`directory` as seen from `store`'s host (None: no source, the store alone must have everything);
    `fetch=False` only looks (validate-all: nothing is written)."""

    store: Store
    directory: Path | None
    verify: StreamVerifier | None = None
    progress: Progress = SILENT
    fetch: bool = True
    brought: list[Brought] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        if self.directory is None:
            return
        if not self.directory.is_absolute():
            raise InvalidInput(f"source {self.directory}: not an absolute path")
        if not self.directory.is_dir():
            raise Missing(f"source {self.directory}: no such directory on this host",
                          hint="mount the shared directory here, or copy the streams and packages into it")

    def spec(self, path: Path) -> list[Brought]:
        """Bring what the spec at `path` needs into the store (fetch), or say what that would take (look):
        Missing where neither the store nor the source has something, Exists where they differ."""
        image, components = specmod.needs(path)
        with self._locked():
            if self.fetch:  # look first: a missing or differing piece is refused before anything is written
                Source(self.store, self.directory, fetch=False).spec(path)
            for need in components:
                self.component(need.name, need.version, need.where)
            self.image(image)
        return self.brought

    # ---- components -------------------------------------------------------------------------------

    def packages_of(self, name: str) -> dict[str, Path]:
        """{version: package path} of component `name` in the source (files named NAME-VERSION.tupper; a
        file name alone is ambiguous, web-cache-1.0 being web's or web-cache's: the package's metadata says)."""
        out: dict[str, Path] = {}
        if self.directory is None:
            return out
        for p in self.directory.glob(f"{name}-*{PACKAGE_SUFFIX}"):
            version = p.name[len(name) + 1:-len(PACKAGE_SUFFIX)]
            if not comp.VERSION_RE.fullmatch(version) or not p.is_file():
                continue
            try:
                if packages.read_meta(p)["name"] != name:
                    continue  # another component's, whose name starts with this one's and a '-'
            except InvalidInput:
                pass  # unreadable: kept, so that fetching it says what is wrong with it
            out[version] = p
        return out

    def component(self, name: str, version: str | None, where: str) -> None:
        """Component `name` (`version`, or the source's newest) in the store: installed from the source
        where missing, else compared by digest with the source's package."""
        installer = packages.Installer(self.store)
        offered = self.packages_of(name)
        if version is None and offered:
            version = max(offered, key=packages.version_key)
        pkg = offered.get(version) if version is not None else None
        try:
            installed = installer.get(name, version)
        except NotFound:
            installed = None
        if pkg is None:
            if installed is None:
                what, file = (f"{name} {version}", f"{name}-{version}{PACKAGE_SUFFIX}") if version else (name, f"{name}-VERSION{PACKAGE_SUFFIX}")
                nor = f" and {self.directory} has no {file}" if self.directory else ""
                raise Missing(f"{where}: component {what} is not installed here{nor}",
                              hint=f"install it here (tupper component install {file}), or give a source directory that has it")
            self.brought.append(Brought("component", name, installed.version, installed.digest, "present"))
            return
        meta = packages.read_meta(pkg)
        if (meta["name"], meta["version"]) != (name, version):
            raise InvalidInput(f"{pkg}: the package is {meta['name']} {meta['version']}, its file name says {name} {version}")
        remedy = f"tupper component rm {name} {version}"
        if installed is not None:
            self._same("component", f"{name} {version}", installed.digest, meta["digest"], pkg, remedy)
            self.brought.append(Brought("component", name, version, installed.digest, "present"))
            return
        if not self.fetch:
            self.brought.append(Brought("component", name, version, meta["digest"], "to install"))
            return
        with self.progress.step(f"Installing {name} {version} from {self.directory}"):
            try:
                done = installer.install(pkg)
            except Exists:  # installed meanwhile by a tupper outside this lock (a user's `component install`)
                done = installer.get(name, version)
                self._same("component", f"{name} {version}", done.digest, meta["digest"], pkg, remedy)
        self.brought.append(Brought("component", name, version, done.digest, "installed"))

    # ---- images -----------------------------------------------------------------------------------

    def image(self, name: str) -> None:
        """Image `name` in the store: imported from DIR/NAME.timg (its parents first) where missing, else
        compared with that stream's tree digest where the source has one."""
        images = Images(self.store)
        chain: list[tuple[str, str]] = []  # (image, its stream's tree digest), to import, child first
        current: str | None = name
        while current is not None:  # up the parents the streams name, to one in the store or a full stream
            if current in [c for c, _ in chain] or len(chain) >= MAX_CHAIN:
                raise InvalidInput(f"{self.directory}: the streams' parents go round in a circle or too deep: "
                                   f"{' -> '.join([*(c for c, _ in chain), current])}")
            stream = self.directory / f"{current}{STREAM_SUFFIX}" if self.directory else None
            header = self._header(stream) if stream is not None and stream.is_file() else None
            if header is not None and header["name"] != current:
                raise InvalidInput(f"{stream}: the stream is image {header['name']!r}, its file name says {current!r}")
            if images.exists(current):
                here = images.get(current)
                digest = here.tree_digest or ""
                if header is not None and stream is not None:
                    digest = imagestream.ensure_tree_digest(images, here)
                    self._same("image", current, digest, header["tree_digest"], stream, f"tupper image rm {current}")
                if not chain:
                    self.brought.append(Brought("image", current, None, digest, "present"))
                break
            if header is None:
                needed_by = f" (the parent of {chain[-1][0]})" if chain else ""
                if stream is None:
                    raise Missing(f"image {current}{needed_by} is not in this store",
                                  hint="import it (tupper image import), or give a source directory with its stream")
                raise Missing(f"image {current}{needed_by} is not in this store and {self.directory} has no {stream.name}",
                              hint=f"export it there: tupper image export {current} -o {stream}")
            chain.append((current, header["tree_digest"]))
            current = header["parent"]
        for image, digest in reversed(chain):  # parents first
            if self.fetch:
                self._import(images, image)
            else:
                self.brought.append(Brought("image", image, None, digest, "to import"))

    def _header(self, stream: Path) -> dict:
        with open(stream, "rb") as f:
            return imagestream.peek_header(f, str(stream))

    def _import(self, images: Images, name: str) -> None:
        assert self.directory is not None  # only what a stream there offers is imported
        stream = self.directory / f"{name}{STREAM_SUFFIX}"
        where = str(stream)

        def verify(header: dict, trailer: dict) -> str | None:
            return self.verify(header, trailer, where) if self.verify is not None else None

        with open(stream, "rb") as f:
            image = imagestream.import_stream(images, f, where, verify=verify, progress=self.progress)
        self.brought.append(Brought("image", name, None, image.tree_digest or "", "imported"))

    # ---- both -------------------------------------------------------------------------------------

    @staticmethod
    def _same(kind: str, what: str, here: str, there: str, origin: Path, remedy: str) -> None:
        if here != there:
            raise Exists(f"{kind} {what} in this store ({here}) is not the one in {origin} ({there})",
                         hint=f"every node must run the same bytes: give the new one a new version, or remove this one ({remedy})")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One fetch at a time into a store: two services starting at once import a shared image once."""
        if not self.fetch:
            yield
            return
        fd = os.open(self.store.root / ".fetch.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
