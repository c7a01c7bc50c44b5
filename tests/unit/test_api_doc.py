"""docs/api.md is the complete reference of the D-Bus API: every method, property and signal of each
interface is in its table with the signature the introspection XML has (and, for properties, the
EmitsChangedSignal annotation; for methods, ✱ exactly where the method is privileged), and nothing
is documented that does not exist."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
from helpers import REPO

from tupper.daemon import api

INTERFACES = {
    "org.tupper1.Manager": lambda: api.ManagerInterface(None),
    "org.tupper1.Container": lambda: api.ContainerInterface(None, "web"),
    "org.tupper1.Job": lambda: api.JobInterface(None),
}
EMITS = "org.freedesktop.DBus.Property.EmitsChangedSignal"


def _types(part: str) -> list[str]:
    """'s name, a{ss} env' -> ['s', 'a{ss}']; '()' or '' -> []."""
    part = part.strip()
    if part in ("", "()"):
        return []
    return [item.strip().split()[0] for item in _split_top(part)]


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "({":
            depth += 1
        elif ch in ")}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur]


def documented() -> dict[str, dict[tuple[str, str], tuple]]:
    """{interface: {(kind, name): what the table says}} from docs/api.md."""
    text = (REPO / "docs/api.md").read_text()
    out: dict[str, dict[tuple[str, str], tuple]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            m = re.search(r"`(org\.tupper1\.\w+)`", line)
            current = m.group(1) if m else None
            continue
        if current is None or not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        name_cell, kind, signature = cells[0], cells[1], cells[2].strip("`")
        name = re.match(r"`(\w+)`", name_cell).group(1)
        privileged = "✱" in name_cell
        table = out.setdefault(current, {})
        if kind == "method":
            ins, _, outs = signature.partition(" → ")
            assert ins.startswith("(") and ins.endswith(")"), f"{current}.{name}: {signature}"
            table[("method", name)] = (_types(ins[1:-1]), _types(outs), privileged)
        elif kind == "property":
            sig, _, emits = cells[2].partition(",")
            table[("property", name)] = (sig.strip().strip("`"), emits.strip())
        elif kind == "signal":
            table[("signal", name)] = (_types(signature.strip()[1:-1]),)
        else:
            raise AssertionError(f"{current}.{name}: unknown kind {kind!r}")
    return out


def introspected(iface) -> dict[tuple[str, str], tuple]:
    xml = ET.fromstring(f"<node>{ET.tostring(iface.introspect().to_xml()).decode()}</node>").find("interface")
    assert xml is not None
    out: dict[tuple[str, str], tuple] = {}
    privileged = {m: getattr(getattr(type(iface), m), "__tupper_privileged__", False) for m in dir(type(iface)) if m[:1].isupper()}
    for m in xml.iter("method"):
        args = list(m.iter("arg"))
        out[("method", m.get("name"))] = ([a.get("type") for a in args if a.get("direction", "in") == "in"],
                                          [a.get("type") for a in args if a.get("direction") == "out"],
                                          privileged.get(m.get("name"), False))
    for p in xml.iter("property"):
        annotation = p.find("annotation")
        assert annotation is not None and annotation.get("name") == EMITS, f"{p.get('name')} says nothing of its changes"
        out[("property", p.get("name"))] = (p.get("type"), annotation.get("value"))
    for s in xml.iter("signal"):
        out[("signal", s.get("name"))] = ([a.get("type") for a in s.iter("arg")],)
    return out


@pytest.mark.parametrize("name", sorted(INTERFACES))
def test_the_reference_lists_every_member_with_its_signature(name):
    docs = documented()[name]
    real = introspected(INTERFACES[name]())
    assert sorted(set(real) - set(docs)) == [], "members missing from docs/api.md"
    assert sorted(set(docs) - set(real)) == [], "documented members that do not exist"
    wrong = {member: (docs[member], real[member]) for member in real if docs[member] != real[member]}
    assert wrong == {}, "docs/api.md (first) disagrees with the introspection (second)"


def test_every_property_tells_how_it_changes_and_none_claims_the_default():
    """The D-Bus default for a property without the annotation is "true": each says so itself."""
    for make in INTERFACES.values():
        for (kind, _member), values in introspected(make()).items():
            if kind == "property":
                assert values[1] in ("const", "true", "invalidates", "false")
