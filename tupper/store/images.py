"""Images: TOML definitions in `images/`, built with debootstrap into read-only btrfs subvolumes."""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

from tupper import durable, proc, tomlfile
from tupper.container import cgroups, nspawn
from tupper.errors import Busy, Failed, InvalidInput, NotFound
from tupper.progress import SILENT, Progress
from tupper.store.store import FREE_FOR_IMAGE, Store

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$")
REQUIRED_PACKAGES = ("systemd", "systemd-sysv", "dbus")
DEFAULT_MIRROR = "http://deb.debian.org/debian"


@attrs.frozen
class ImageDef:
    name: str
    suite: str
    variant: str
    packages: tuple[str, ...]
    mirror: str | None
    steps: tuple[str, ...]
    file: str
    parent: str | None = None  # `from`: a layer on that image (its [build] packages are apt-installed)
    layer_packages: tuple[str, ...] = ()

    @classmethod
    def from_file(cls, path: Path) -> ImageDef:
        doc, display = tomlfile.load(path, "image definition")
        t = tomlfile.Table(doc, display)
        name = t.get("name", str, path.stem)
        if not NAME_RE.fullmatch(name):
            raise t.error("name", f"invalid image name {name!r}")
        parent = t.get("from", str, None)
        if parent is not None:
            return cls._layer(t, name, parent, display)
        deb = t.table("debootstrap")
        suite = deb.get("suite", str, required=True)
        variant = deb.get("variant", str, "minbase")
        packages = deb.str_list("packages")
        mirror = deb.get("mirror", str, None)
        deb.check_unknown()
        build = t.table("build")
        steps = build.str_list("steps")
        build.check_unknown()
        t.get("description", str, "")
        t.check_unknown()
        for pkg in REQUIRED_PACKAGES:
            if pkg not in packages:
                raise deb.error("packages", f"must include {pkg!r} (containers boot systemd with a D-Bus system bus)")
        for i, pkg in enumerate(packages):
            if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", pkg):
                raise deb.error(f"packages[{i}]", f"invalid package name {pkg!r}")
        if variant not in ("minbase", "buildd", "fakechroot", "-"):
            raise deb.error("variant", f"unknown debootstrap variant {variant!r}")
        # Both land on debootstrap's command line: a leading '-' would make them options.
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", suite):
            raise deb.error("suite", f"invalid suite {suite!r} (like 'bookworm' or 'stable')")
        if mirror is not None and not re.fullmatch(r"(https?|ftp|file)://[^\s]+", mirror):
            raise deb.error("mirror", f"invalid mirror {mirror!r}: expected an http://, https://, ftp:// or file:// URL")
        return cls(name, suite, variant, tuple(packages), mirror, tuple(steps), display)

    @classmethod
    def _layer(cls, t: tomlfile.Table, name: str, parent: str, display: str) -> ImageDef:
        """`from = "PARENT"`: a snapshot of PARENT, plus [build] packages (apt-get install) and steps."""
        if not NAME_RE.fullmatch(parent):
            raise t.error("from", f"invalid image name {parent!r}")
        if parent == name:
            raise t.error("from", "an image cannot be a layer on itself")
        if "debootstrap" in t.data:
            raise t.error("debootstrap", "a layer (from = ...) takes its system from its parent: no [debootstrap]")
        build = t.table("build")
        packages = build.str_list("packages")
        steps = build.str_list("steps")
        build.check_unknown()
        t.get("description", str, "")
        t.check_unknown()
        for i, pkg in enumerate(packages):
            if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", pkg):
                raise build.error(f"packages[{i}]", f"invalid package name {pkg!r}")
        return cls(name, "", "", (), None, tuple(steps), display, parent, tuple(packages))

    def digest(self, parent_digest: str | None = None) -> str:
        """SHA-256 over what decides the image's contents (not its name, file or mirror): its definition
        and, for a layer, its parent's digest."""
        import hashlib

        what = {"suite": self.suite, "variant": self.variant, "packages": list(self.packages), "steps": list(self.steps),
                "from": self.parent, "from_digest": parent_digest, "layer_packages": list(self.layer_packages)}
        if self.parent is None:  # the digests of images built before layers existed stay what they were
            what = {k: what[k] for k in ("suite", "variant", "packages", "steps")}
        return "sha256:" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


@attrs.frozen
class Image:
    name: str
    path: Path
    built_at: float
    definition: str
    suite: str
    digest: str | None = None  # over the definition that built it (None: built before digests, or imported without one)
    tree_digest: str | None = None  # over its files (imagestream.tree_digest): equal on every host that has it
    parent: str | None = None  # the image an incremental import was received onto
    imported_at: float | None = None
    signed_by: str | None = None  # the key that signed the stream it was imported from
    pinned: bool = False  # `tupper image pin`: never pruned

    def to_json(self) -> dict:
        return {"name": self.name, "path": str(self.path), "built_at": self.built_at, "definition": self.definition, "suite": self.suite,
                "digest": self.digest, "tree_digest": self.tree_digest, "parent": self.parent, "imported_at": self.imported_at,
                "signed_by": self.signed_by, "pinned": self.pinned}


def search_path(extra: list[Path] | None = None) -> list[Path]:
    """Directories holding image definitions, in the order they are tried."""
    dirs = list(extra or [])
    if env := os.environ.get("TUPPER_IMAGES"):
        dirs += [Path(p) for p in env.split(":") if p]
    dirs.append(Path(__file__).resolve().parent.parent / "images")  # a source checkout
    dirs.append(Path("/usr/share/tupper/images"))
    return dirs


def find_definition(name: str, extra: list[Path] | None = None) -> Path | None:
    for d in search_path(extra):
        candidate = d / f"{name}.toml"
        if candidate.is_file():
            return candidate
    return None


def host_mirror(sources: list[Path] | None = None) -> str:
    """The Debian mirror the host's apt uses (debootstrap from the same place the machine trusts).

    `.sources` files are deb822, anything else one-line. Like apt, the default search reads only
    sources.list.d/*.list and *.sources (not backups such as *.save or *.disabled).
    """
    if sources is None:
        d = Path("/etc/apt/sources.list.d")
        sources = [Path("/etc/apt/sources.list"), *sorted(p for p in d.glob("*") if p.suffix in (".list", ".sources"))]
    for f in sources:
        try:
            text = f.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        uris = _deb822_uris(text) if f.suffix == ".sources" else _one_line_uris(text)
        for uri in uris:
            if "security" not in uri and re.search(r"/debian/?$", uri):
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def _one_line_uris(text: str) -> list[str]:
    """URIs of the `deb` lines of a one-line sources.list (not deb-src, not comments)."""
    return re.findall(r"^[ \t]*deb[ \t]+(?:\[[^\]]*\][ \t]+)?(\S+)", text, re.M)


def _deb822_uris(text: str) -> list[str]:
    """URIs of the enabled paragraphs with Types including `deb` of a deb822 .sources file."""
    out = []
    for para in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in para.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()  # a continuation line
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()  # field names are case-insensitive
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        out += fields.get("uris", "").split()
    return out


class Images:
    def __init__(self, store: Store) -> None:
        self.store = store

    def path(self, name: str) -> Path:
        return self.store.images_dir / name

    def _meta(self, name: str) -> Path:
        return self.store.images_dir / f"{name}.json"

    def meta_path(self, name: str) -> Path:
        """The image's metadata: the image exists (is published) once this file does."""
        return self._meta(name)

    def get(self, name: str) -> Image:
        meta = self._meta(name)
        if not self.path(name).is_dir() or not meta.is_file():
            raise NotFound(f"no image {name!r}", hint=f"build it (tupper image build images/{name}.toml) or import it (tupper image import FILE)")
        data = json.loads(meta.read_text())
        return Image(name, self.path(name), data["built_at"], data["definition"], data["suite"], data.get("digest"),
                     data.get("tree_digest"), data.get("parent"), data.get("imported_at"), data.get("signed_by"),
                     bool(data.get("pinned", False)))

    def update_meta(self, name: str, **changes) -> None:
        with self.lock(name):
            data = json.loads(self._meta(name).read_text())
            data.update(changes)
            durable.write_json(self._meta(name), data)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """One build, import or metadata change per image name at a time."""
        fd = os.open(self.store.images_dir / f".{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def exists(self, name: str) -> bool:
        return self.path(name).is_dir() and self._meta(name).is_file()

    def list(self) -> builtins.list[Image]:
        out = []
        for meta in sorted(self.store.listable(self.store.images_dir, "images").glob("*.json")):
            try:
                out.append(self.get(meta.stem))
            except (NotFound, ValueError, KeyError):
                continue
        return out

    def remove(self, name: str, users: builtins.list[str]) -> None:
        image = self.get(name)
        if users:
            raise Busy(f"image {name!r} is used by container(s): {', '.join(users)}", hint="remove those containers first")
        if children := self.children(name):
            raise Busy(f"image {name!r} is the parent of image(s): {', '.join(children)}", hint="remove those images first")
        self._meta(name).unlink(missing_ok=True)  # unpublished first: a crash leaves files `store check` removes
        self.store.delete_subvolume(image.path)

    def build(self, definition: ImageDef, *, force: bool = False, progress: Progress = SILENT) -> Image:
        """Build the image (a layer: on its parent, which must be in the store). One that exists is kept
        when its digest is the definition's (force rebuilds it); one built from another definition is rebuilt."""
        parent = self.get(definition.parent) if definition.parent else None
        digest = definition.digest(parent.digest if parent else None)
        # One build per image name at a time; a second caller waits, then finds it built.
        with self.lock(definition.name):
            if self.exists(definition.name) and not force:
                existing = self.get(definition.name)
                if existing.digest in (None, digest):  # None: built before digests; its definition is taken as is
                    return existing
                if self.children(definition.name):
                    raise Busy(f"image {definition.name!r} changed but image(s) {', '.join(self.children(definition.name))} "
                               "are layers on it", hint="remove them first, or give the new definition another name")
            return self._build(definition, progress, parent, digest)

    def size(self, name: str) -> int:
        """Bytes of the image's files (du): what removing it frees at most (layers share their parent's blocks)."""
        out = proc.run(["du", "-sb", str(self.path(name))], check=False).stdout
        return int(out.split()[0]) if out.split() and out.split()[0].isdigit() else 0

    def children(self, name: str) -> builtins.list[str]:
        """Images that are layers on `name` (built from it, or received onto it)."""
        return [i.name for i in self.list() if i.parent == name]

    def _build(self, definition: ImageDef, progress: Progress, parent: Image | None, digest: str) -> Image:
        self.store.require_free(FREE_FOR_IMAGE, f"image build {definition.name}")
        tmp = self.store.scratch("image", definition.name)
        if parent is not None:
            self.store.copy_tree(parent.path, tmp)  # writable: the layer's changes go on top
        else:
            self.store.create_subvolume(tmp)
        try:
            if parent is None:
                mirror = definition.mirror or host_mirror()
                with progress.step(f"Building image {definition.name} (debootstrap {definition.suite} from {mirror})"):
                    self._debootstrap(definition, tmp, mirror, progress)
            elif definition.layer_packages:
                install = ("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
                           + " ".join(definition.layer_packages) + " && apt-get clean")
                with progress.step(f"Layer {definition.name} on {parent.name}: installing {', '.join(definition.layer_packages)}"):
                    self._run_step(definition, tmp, install, -1)
            with progress.step("Preparing the image for containers"):
                _prepare_rootfs(tmp)
            for i, step in enumerate(definition.steps):
                with progress.step(f"Build step {i + 1}/{len(definition.steps)}: {step}"):
                    self._run_step(definition, tmp, step, i)
            from tupper.store.imagestream import tree_digest

            with progress.step("Digest of the image's tree"):
                tree = tree_digest(tmp)
            final = self.path(definition.name)
            # The old image, or a half-published one a crash left without metadata, makes way.
            self._meta(definition.name).unlink(missing_ok=True)
            self.store.delete_subvolume(final)
            self.store.publish(tmp, final)
        finally:
            self.store.delete_subvolume(tmp)
            self.store.settle()  # the scratch copy's extents freed: `image ls` shows what the new image holds alone
        # Published when its metadata appears (atomically): until then the image does not exist.
        meta = {"built_at": time.time(), "definition": definition.file, "suite": parent.suite if parent else definition.suite,
                "digest": digest, "tree_digest": tree, "parent": parent.name if parent else None}
        durable.write_json(self._meta(definition.name), meta)
        return self.get(definition.name)

    def _debootstrap(self, d: ImageDef, target: Path, mirror: str, progress: Progress) -> None:
        argv = ["debootstrap", f"--variant={d.variant}", f"--include={','.join(d.packages)}", d.suite, str(target), mirror]
        p = proc.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: builtins.list[str] = []
        counts = {"Retrieving": 0, "Extracting": 0, "Unpacking": 0, "Configuring": 0}
        assert p.stdout is not None
        for line in p.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-10:]
            m = re.match(r"I: (Retrieving|Extracting|Unpacking|Configuring) (\S+)", line)
            if m:
                counts[m.group(1)] += 1
                progress.update(f"{m.group(1).lower()} {m.group(2)} ({counts[m.group(1)]})")
            elif line.startswith("I: "):
                progress.update(line[3:])
        if p.wait() != 0:
            raise Failed(f"debootstrap failed (status {p.returncode}): {' / '.join(tail[-3:])}", hint="see the mirror and suite in the image definition")

    def _run_step(self, d: ImageDef, rootfs: Path, step: str, index: int) -> None:
        host = nspawn.Host.detect()
        argv = nspawn.command_argv(rootfs, ["/bin/sh", "-c", step], host)
        group = f".build-{d.name}-{os.getpid()}"
        parent = self.store.cgroup_parent
        cgroups.create(group, parent=parent)
        try:
            p = proc.popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=None if host.systemd else (lambda: cgroups.join(group, parent=parent)),
            )
            out, _ = p.communicate()
            if p.returncode != 0:
                tail = " / ".join(out.strip().splitlines()[-3:])
                where = "build.packages" if index < 0 else f"build.steps[{index}]"
                raise InvalidInput(f"{d.file}: {where}: exited with status {p.returncode}: {tail}")
        finally:
            cgroups.remove(group, parent=parent)


def _prepare_rootfs(root: Path) -> None:
    """Make a debootstrapped tree a good container image."""
    # Every container gets its own machine id at creation; the image holds none.
    (root / "etc/machine-id").write_text("")
    # Without /etc/hostname, nspawn gives each container its machine name as hostname.
    (root / "etc/hostname").unlink(missing_ok=True)
    # A persistent journal lets `tupper logs` read a container's journal after it stopped.
    (root / "var/log/journal").mkdir(parents=True, exist_ok=True)
    for cache in (root / "var/cache/apt/archives").glob("*.deb"):
        cache.unlink()
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
