"""Fleet files (`tupper fleet apply FLEET.toml`, docs/fleet.md) and the Pacemaker configuration they mean.

A fleet file names services; each becomes a clone of the `ocf:tupper:container` agent in Pacemaker's
CIB, with constraints for node preferences and ordering. Pacemaker stays the only decision maker:
this module only says what the CIB should hold; tupper.cli.fleet puts it there with Pacemaker's tools.

    [[service]]
    name = "web"                  # the service, and its containers' name on every node
    spec = "/srv/specs/web.toml"  # the spec, at this path on every node that may run it; or, instead:
    # components = ["web=1.2.0", "db"]   installed components (NAME or NAME=VERSION) on
    # image = "debian-bookworm"          this image, everything else at its default
    replicas = 2                  # containers across the cluster (default 1)
    anti_affinity = true          # at most one per node (default); false: Pacemaker may stack them
    prefer = { node1 = 100 }      # node preferences: a score per node, or "never"
    after = ["db"]                # start after these services (and stop before them)
    stop_timeout = 30             # seconds of clean stop before a kill (the agent's stop_timeout)
    source = "/srv/tupper"        # streams and packages each node fetches the spec's image and components from

Every object tupper makes in the CIB has an id starting with PREFIX ("tupper."; service names have no
dots), so that applying a file touches nothing else and finds what an earlier file made.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import attrs

from tupper import tomlfile
from tupper.errors import InvalidInput
from tupper.model import spec as specmod

PREFIX = "tupper."
NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")
NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
OPS = (("start", "120s", "0s"), ("stop", "90s", "0s"), ("monitor", "30s", "10s"))


@attrs.frozen
class Service:
    name: str
    spec: str | None  # None: a component set (components, image)
    replicas: int = 1
    anti_affinity: bool = True
    prefer: tuple[tuple[str, int | None], ...] = ()  # (node, score); None: never
    after: tuple[str, ...] = ()
    stop_timeout: float | None = None
    source: str | None = None  # the agent's source: a directory of IMAGE.timg and NAME-VERSION.tupper
    spec_digest: str | None = None  # sha256 of the spec file's bytes where apply read it (with_spec_digests)
    components: tuple[str, ...] = ()  # NAME or NAME=VERSION, instead of a spec
    image: str | None = None  # the component set's image (None: the default)

    @property
    def clone_id(self) -> str:
        return f"{PREFIX}{self.name}.clone"

    @property
    def primitive_id(self) -> str:
        return f"{PREFIX}{self.name}"


@attrs.frozen
class Fleet:
    services: tuple[Service, ...]

    def names(self) -> list[str]:
        return [s.name for s in self.services]


def load(path: Path) -> Fleet:
    doc, display = tomlfile.load(path, "fleet file")
    return from_document(doc, display)


def with_spec_digests(fleet: Fleet, display: str) -> Fleet:
    """The fleet with each service's spec digest, read from the spec files here (the same path on every
    node): a changed spec changes its service's resource, and Pacemaker restarts its replicas with it."""
    out = []
    for i, s in enumerate(fleet.services):
        if s.spec is None:
            out.append(s)
            continue
        try:
            data = Path(s.spec).read_bytes()
        except OSError as exc:
            raise InvalidInput(f"{display}: service[{i}].spec: {s.spec}: {exc.strerror}",
                               hint="the spec must be at this path on the node where `fleet apply` runs, as on every node") from None
        out.append(attrs.evolve(s, spec_digest="sha256:" + hashlib.sha256(data).hexdigest()))
    return Fleet(tuple(out))


def from_document(doc: dict, display: str) -> Fleet:
    top = tomlfile.Table(doc, display)
    services = []
    for t in top.tables("service"):
        name = t.get("name", str, required=True)
        if not NAME.match(name):
            raise t.error("name", f"{name!r}: lower-case letters, digits and '-', at most 41, starting with a letter or digit")
        spec = t.get("spec", str)
        components = t.str_list("components")
        image = t.get("image", str)
        if spec is None and not components:
            raise t.error(None, "give `spec` (a spec file) or `components` (installed components, NAME or NAME=VERSION)")
        if spec is not None and (components or image is not None):
            raise t.error("components" if components else "image", "only without `spec`: a spec file names its own image and components")
        if spec is not None and not spec.startswith("/"):
            raise t.error("spec", f"{spec!r}: an absolute path (the same on every node)")
        if components:
            specmod.component_set(image or specmod.DEFAULT_IMAGE, components, t.where("image"), t.where("components"))
        replicas = t.get("replicas", int, 1)
        if replicas < 1:
            raise t.error("replicas", f"must be 1 or more, got {replicas} (`tupper fleet rm` removes a service)")
        anti = t.get("anti_affinity", bool, True)
        prefer_t = t.table("prefer")
        prefer = []
        for node in sorted(prefer_t.data):
            value = prefer_t.get(node, (int, str))
            if not NODE.match(node):
                raise prefer_t.error(node, "not a node name")
            if isinstance(value, str):
                if value != "never":
                    raise prefer_t.error(node, f'a score (an integer) or "never", got {value!r}')
                prefer.append((node, None))
            else:
                prefer.append((node, value))
        prefer_t.check_unknown()
        after = t.str_list("after")
        stop = t.get("stop_timeout", (int, float), None)
        if stop is not None and stop <= 0:
            raise t.error("stop_timeout", f"must be more than 0 seconds, got {stop}")
        source = t.get("source", str, None)
        if source is not None and not source.startswith("/"):
            raise t.error("source", f"{source!r}: an absolute path (the same on every node)")
        t.check_unknown()
        services.append(Service(name, spec, replicas, anti, tuple(prefer), tuple(after), float(stop) if stop is not None else None,
                                source, components=tuple(components), image=image))
    top.check_unknown()
    names = [s.name for s in services]
    for s in services:
        if names.count(s.name) > 1:
            raise InvalidInput(f"{display}: service {s.name!r} is named twice")
        for dep in s.after:
            if dep not in names:
                raise InvalidInput(f"{display}: service {s.name!r}: after: no service {dep!r} in this file")
            if dep == s.name:
                raise InvalidInput(f"{display}: service {s.name!r}: after: itself")
    _no_cycle(services, display)
    return Fleet(tuple(services))


def _no_cycle(services: list[Service], display: str) -> None:
    after = {s.name: s.after for s in services}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 1:
            raise InvalidInput(f"{display}: services wait for each other in a circle: {' -> '.join([*path, name])}")
        if state.get(name) == 2:
            return
        state[name] = 1
        for dep in after[name]:
            visit(dep, [*path, name])
        state[name] = 2

    for s in services:
        visit(s.name, [])


def _nv(parent: ET.Element, owner: str, name: str, value: str) -> None:
    ET.SubElement(parent, "nvpair", id=f"{owner}.{name}", name=name, value=value)


def resource(service: Service) -> ET.Element:
    """The service's clone in the CIB's resources section."""
    clone = ET.Element("clone", id=service.clone_id)
    meta = ET.SubElement(clone, "meta_attributes", id=f"{service.clone_id}.meta")
    _nv(meta, service.clone_id, "clone-max", str(service.replicas))
    _nv(meta, service.clone_id, "clone-node-max", "1" if service.anti_affinity else str(max(1, service.replicas)))
    prim = ET.SubElement(clone, "primitive", {"id": service.primitive_id, "class": "ocf", "provider": "tupper", "type": "container"})
    params = ET.SubElement(prim, "instance_attributes", id=f"{service.primitive_id}.params")
    if service.spec is not None:
        _nv(params, service.primitive_id, "spec", service.spec)
    else:
        _nv(params, service.primitive_id, "components", " ".join(service.components))
        if service.image is not None:
            _nv(params, service.primitive_id, "image", service.image)
    _nv(params, service.primitive_id, "name", service.name)
    if service.stop_timeout is not None:
        _nv(params, service.primitive_id, "stop_timeout", f"{service.stop_timeout:g}")
    if service.source is not None:
        _nv(params, service.primitive_id, "source", service.source)
    if service.spec_digest is not None:
        _nv(params, service.primitive_id, "spec_digest", service.spec_digest)
    ops = ET.SubElement(prim, "operations")
    for op, timeout, interval in OPS:
        ET.SubElement(ops, "op", id=f"{service.primitive_id}.{op}.{interval}", name=op, interval=interval, timeout=timeout)
    return clone


def constraints(service: Service) -> list[ET.Element]:
    """The service's node preferences and ordering, in the CIB's constraints section."""
    out = []
    for node, score in service.prefer:
        out.append(ET.Element("rsc_location", id=f"{PREFIX}{service.name}.on.{node}", rsc=service.clone_id, node=node,
                              score="-INFINITY" if score is None else str(score)))
    for dep in service.after:
        out.append(ET.Element("rsc_order", id=f"{PREFIX}{service.name}.after.{dep}", first=f"{PREFIX}{dep}.clone",
                              then=service.clone_id, kind="Mandatory"))
    return out


def desired(fleet: Fleet) -> dict[str, dict[str, ET.Element]]:
    """{"resources": {id: element}, "constraints": {id: element}}: what the CIB holds for this fleet."""
    res = {s.clone_id: resource(s) for s in fleet.services}
    cons = {c.get("id", ""): c for s in fleet.services for c in constraints(s)}
    return {"resources": res, "constraints": cons}


def canonical(element: ET.Element) -> str:
    """An element's XML with attributes in order and no whitespace between elements: equal means same."""
    copy = ET.fromstring(ET.tostring(element))
    for e in copy.iter():
        e.text = None if e.text is None or not e.text.strip() else e.text
        e.tail = None
    return ET.canonicalize(ET.tostring(copy, encoding="unicode"))


@attrs.frozen
class Change:
    action: str  # create, replace, delete
    scope: str  # resources, constraints
    id: str
    element: ET.Element | None  # None for delete


def plan(want: dict[str, dict[str, ET.Element]], have: dict[str, dict[str, ET.Element]], only: set[str] | None = None) -> list[Change]:
    """What turns the CIB's tupper objects (`have`) into `want`: creations, replacements of what
    differs, deletions of tupper objects no longer wanted (`only`: of those services' objects alone)."""
    changes: list[Change] = []
    for scope in ("resources", "constraints"):
        for oid, element in want[scope].items():
            current = have[scope].get(oid)
            if current is None:
                changes.append(Change("create", scope, oid, element))
            elif canonical(current) != canonical(element):
                changes.append(Change("replace", scope, oid, element))
    # Constraints go before the resources they name (Pacemaker refuses a constraint on a missing resource
    # only on create; on delete, it drops the constraints of a deleted resource itself).
    for scope in ("constraints", "resources"):
        for oid in have[scope]:
            if oid not in want[scope] and (only is None or service_of(oid) in only):
                changes.append(Change("delete", scope, oid, None))
    return changes


def service_of(oid: str) -> str:
    """The service a tupper object id belongs to (tupper.web.clone, tupper.web.on.node1, tupper.web.after.db:
    service names have no dots)."""
    return oid[len(PREFIX):].split(".", 1)[0]
