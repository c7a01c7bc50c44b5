"""Typed D-Bus values for tupperd's replies, and properties whose introspection tells the truth.

`variant_map` turns the JSON-shaped results the runtime already has (records, status, inspect, images)
into `a{sv}`: strings stay `s`, booleans `b`, integers `x`, floats `d`, lists of strings `as`, lists of
objects `aa{sv}`, objects `a{sv}`; None (no value) leaves the key out. A client gets the same data as
from the *JSON methods, typed, with no JSON parser.

`prop(emits)` declares a read-only property with the `org.freedesktop.DBus.Property.EmitsChangedSignal`
annotation systemd's own services carry: "const" (never changes while the object exists), "true"
(PropertiesChanged carries the new value on every change), "invalidates" (PropertiesChanged names it)
or "false" (no signal: read it when you need it). dbus-next 0.2 has no annotations: its introspection
Property is extended here.
"""
# No `from __future__ import annotations`: dbus-next reads the signature strings from the annotations.

import xml.etree.ElementTree as ET

from dbus_next import Variant
from dbus_next import introspection as intr
from dbus_next.service import PropertyAccess, dbus_property

EMITS = "org.freedesktop.DBus.Property.EmitsChangedSignal"
EMITS_VALUES = ("const", "true", "invalidates", "false")


class _AnnotatedProperty(intr.Property):
    def __init__(self, base: intr.Property, emits: str) -> None:
        super().__init__(base.name, base.signature, base.access)
        self.emits = emits

    def to_xml(self) -> ET.Element:
        element = super().to_xml()
        ET.SubElement(element, "annotation", name=EMITS, value=self.emits)
        return element


def prop(emits: str):
    """A read-only D-Bus property whose EmitsChangedSignal annotation is `emits`."""
    if emits not in EMITS_VALUES:
        raise ValueError(emits)

    def decorate(fn):
        p = dbus_property(access=PropertyAccess.READ)(fn)
        p.introspection = _AnnotatedProperty(p.introspection, emits)
        p.emits = emits
        return p

    return decorate


def emitting(interface) -> dict[str, str]:
    """{property name: its EmitsChangedSignal} of a ServiceInterface."""
    from dbus_next.service import ServiceInterface

    return {p.name: getattr(p, "emits", "true") for p in ServiceInterface._get_properties(interface)}


def variant(value) -> Variant | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("x", value)
    if isinstance(value, float):
        return Variant("d", value)
    if isinstance(value, str):
        return Variant("s", value)
    if isinstance(value, dict):
        return Variant("a{sv}", variant_map(value))
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return Variant("as", list(value))
        if all(isinstance(v, dict) for v in value):
            return Variant("aa{sv}", [variant_map(v) for v in value])
        return Variant("av", [v for v in (variant(x) for x in value) if v is not None])
    return Variant("s", str(value))


def variant_map(data: dict) -> dict[str, Variant]:
    """A JSON object as a{sv} (keys whose value is None are left out)."""
    out = {}
    for key, value in data.items():
        v = variant(value)
        if v is not None:
            out[str(key)] = v
    return out
