"""Live upgrades, with a fake runtime behind tupper.runtime.live.RuntimeView: every refusal comes before
anything in the container changes (no bus is opened, the record is not touched), and the component
the container would get is the installed one. Real packages in a store on a plain directory."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
from helpers import PlainStore

from tupper.errors import Busy, Failed, InvalidInput, NotFound
from tupper.model import components as comp
from tupper.runtime.live import LiveChanges
from tupper.runtime.records import ComponentEntry, PendingUpgrade, Record
from tupper.store import packages
from tupper.store.store import Store


def _no_bus(leader: int, **_kw):
    raise AssertionError(f"a refused change opened the bus of the container with leader {leader}")


@attrs.define
class FakeRuntime:
    """RuntimeView: one store, records in memory; `running` never looks at processes; no bus to open."""

    store: Store
    connect_bus: Callable = _no_bus
    recs: dict[str, Record] = attrs.Factory(dict)
    saved: list[str] = attrs.Factory(list)

    def record(self, name: str) -> Record:
        try:
            return self.recs[name]
        except KeyError:
            raise NotFound(f"no container {name!r}") from None

    def records(self) -> list[Record]:
        return list(self.recs.values())

    def running(self, name: str) -> Record:
        return self.record(name)


def _component(base: Path, name: str, version: str, units: list[str], **extra) -> Path:
    d = base / f"{name}-{version}"
    (d / "units").mkdir(parents=True)
    lines = [f'name = "{name}"', f'version = "{version}"', f"units = {json.dumps(units)}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    (d / "component.toml").write_text("\n".join(lines) + "\n")
    for unit in units:
        (d / "units" / unit).write_text("[Service]\nExecStart=/bin/true\n")
    return d


@pytest.fixture
def world(tmp_path):
    store = PlainStore(tmp_path / "store")
    installer = packages.Installer(store)
    out = tmp_path / "dist"
    out.mkdir()

    def install(name: str, version: str, units: list[str], **extra):
        d = _component(tmp_path / "src", name, version, units, **extra)
        pkg, _ = packages.build(d, comp.load(d, str(d)), out)
        return installer.install(pkg)

    web1 = install("web", "1.0.0", ["web.service"])
    db = install("db", "1.0.0", ["db.service"])
    rt = FakeRuntime(store)
    cdir = tmp_path / "containers" / "c"
    cdir.mkdir(parents=True)
    rec = Record(name="c", dir=cdir, image="img", spec_file="/s.toml", created_at=1.0, stop_timeout=5.0, phase="running",
                 grants={"token": "api-token"},
                 components=[ComponentEntry(name="web", version="1.0.0", mount="/opt/web", source=str(web1.path), units=("web.service",)),
                             ComponentEntry(name="db", version="1.0.0", mount="/opt/db", source=str(db.path), units=("db.service",))])
    rt.recs["c"] = rec
    return rt, install


def _refused(rt: FakeRuntime, *args) -> str:
    rec = rt.recs["c"]
    before = attrs.asdict(rec)
    with pytest.raises((InvalidInput, Busy, NotFound)) as info:
        LiveChanges(rt).upgrade("c", *args)
    assert attrs.asdict(rec) == before, "a refused upgrade changed the record"
    assert not (rec.dir / "record.json").exists(), "a refused upgrade wrote the record"
    return info.value.message


def test_an_upgrade_to_a_version_that_is_not_installed_is_refused(world):
    rt, _ = world
    assert "no installed component web 9.9.9" in _refused(rt, "web", "9.9.9")


def test_a_component_the_container_does_not_have_is_refused(world):
    rt, install = world
    install("cache", "1.0.0", ["cache.service"])
    assert "has no component 'cache' (it has: web, db)" in _refused(rt, "cache", "1.0.0")


def test_a_new_version_that_moves_the_mount_point_is_refused(world):
    rt, install = world
    install("web", "2.0.0", ["web.service"], mount="/srv/web")
    assert "mounts at /srv/web, the running one at /opt/web" in _refused(rt, "web", "2.0.0")


def test_a_new_version_bringing_another_components_unit_is_refused(world):
    rt, install = world
    install("web", "2.0.0", ["web.service", "db.service"])
    assert "brings unit(s) db.service that another component" in _refused(rt, "web", "2.0.0")


def test_a_new_version_requiring_a_missing_component_is_refused(world):
    rt, install = world
    install("web", "2.0.0", ["web.service"], requires=["queue"])
    assert "requires queue, which container 'c' does not have" in _refused(rt, "web", "2.0.0")


def test_a_new_version_needing_an_ungranted_credential_is_refused(world):
    rt, install = world
    install("web", "2.0.0", ["web.service"], secrets=["password"])
    assert "needs credential(s) password, which container 'c' was not granted" in _refused(rt, "web", "2.0.0")


def test_a_second_upgrade_while_one_is_under_way_is_refused(world):
    rt, install = world
    install("web", "2.0.0", ["web.service"])
    rt.recs["c"].upgrade = PendingUpgrade(component="db", version="0.9.0", source="/x", to_source="/y")
    assert "has an upgrade of db under way" in _refused(rt, "web", "2.0.0")


def test_an_acceptable_upgrade_records_what_to_roll_back_to_before_touching_the_container(world):
    """Past the checks, the record names the old version and its owner on disk before the container's
    bus is opened: a crash from here on is rolled back by `recover`."""
    rt, install = world
    new = install("web", "2.0.0", ["web.service"], secrets=["token"])
    rec = rt.recs["c"]
    seen: dict = {}

    def no_bus(leader, timeout, alive):
        seen["record"] = json.loads((rec.dir / "record.json").read_text())
        raise Failed("the fake has no container bus")

    rt.connect_bus = no_bus
    with pytest.raises(Failed):
        LiveChanges(rt).upgrade("c", "web", "2.0.0")
    assert seen["record"]["upgrade"] == {"component": "web", "version": "1.0.0", "source": rec.components[0].source,
                                         "to_source": str(new.path)}
    assert seen["record"]["owner_pid"] > 0
    # The bus never came: nothing changed, and the record says so again.
    assert rec.upgrade is None and rec.owner_pid == 0
    assert json.loads((rec.dir / "record.json").read_text())["upgrade"] is None
    assert rec.component("web").version == "1.0.0"


def test_unit_jobs_are_refused_for_units_the_container_does_not_have(world):
    rt, _ = world
    with pytest.raises(InvalidInput, match="not a unit of container 'c' \\(its units: web.service, db.service\\)"):
        LiveChanges(rt).unit_job("c", "dbus.service", "RestartUnit")


def test_secret_holders_are_names_only(world):
    rt, _ = world
    assert LiveChanges(rt).secret_holders() == [("c", "token", "api-token")]
