"""Fleet files and the Pacemaker configuration they mean (tupper/model/fleet.py), and what `tupper fleet
apply` would write given what the CIB holds (plan). The real cluster: tests/integration/test_cluster.py."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tupper.cli.main import main
from tupper.errors import InvalidInput
from tupper.model import fleet

WEB = """
[[service]]
name = "web"
spec = "/srv/web.toml"
replicas = 2
prefer = { node1 = 100, node3 = "never" }
stop_timeout = 20
source = "/srv/tupper"

[[service]]
name = "db"
spec = "/srv/db.toml"

[[service]]
name = "app"
spec = "/srv/app.toml"
after = ["db", "web"]
"""


def parse(text: str) -> fleet.Fleet:
    import tomllib

    return fleet.from_document(tomllib.loads(text), "f.toml")


def test_a_fleet_file_gives_services_with_their_defaults():
    f = parse(WEB)
    assert f.names() == ["web", "db", "app"]
    web, db, app = f.services
    assert (web.replicas, web.anti_affinity, web.prefer, web.stop_timeout) == (2, True, (("node1", 100), ("node3", None)), 20.0)
    assert web.source == "/srv/tupper"
    assert (db.replicas, db.after, db.prefer, db.source) == (1, (), (), None)
    assert app.after == ("db", "web")


@pytest.mark.parametrize(("text", "where"), [
    ('[[service]]\nspec = "/s.toml"\n', "f.toml: service[0].name: missing"),
    ('[[service]]\nname = "Web"\nspec = "/s.toml"\n', "f.toml: service[0].name"),
    ('[[service]]\nname = "web"\nspec = "s.toml"\n', "f.toml: service[0].spec"),
    ('[[service]]\nname = "web"\nspec = "/s.toml"\nreplicas = -1\n', "f.toml: service[0].replicas"),
    ('[[service]]\nname = "web"\nspec = "/s.toml"\nreplica = 2\n', "f.toml: service[0].replica: unknown key (did you mean 'replicas'?)"),
    ('[[service]]\nname = "web"\nspec = "/s.toml"\nprefer = { node1 = "always" }\n', "f.toml: service[0].prefer.node1"),
    ('[[service]]\nname = "web"\nspec = "/s.toml"\nafter = ["db"]\n', "no service 'db'"),
    ('[[service]]\nname = "a"\nspec = "/s.toml"\nafter = ["b"]\n[[service]]\nname = "b"\nspec = "/s.toml"\nafter = ["a"]\n', "in a circle: a -> b -> a"),
    ('[[service]]\nname = "a"\nspec = "/s.toml"\n[[service]]\nname = "a"\nspec = "/t.toml"\n', "named twice"),
    ('[[services]]\nname = "a"\n', "f.toml: services: unknown key"),
    ('[[service]]\nname = "web"\nspec = "/s.toml"\nsource = "srv"\n', "f.toml: service[0].source: 'srv': an absolute path"),
    ('[[service]]\nname = "web"\n', "f.toml: service[0]: give `spec` (a spec file) or `components`"),
    ('[[service]]\nname = "web"\nspec = "/s.toml"\ncomponents = ["web"]\n', "f.toml: service[0].components: only without `spec`"),
    ('[[service]]\nname = "web"\ncomponents = ["Web!"]\n', "f.toml: service[0].components: 'Web!' is not NAME or NAME=VERSION"),
    ('[[service]]\nname = "web"\ncomponents = ["web"]\nimage = "../x"\n', "f.toml: service[0].image: invalid image name"),
])
def test_bad_fleet_files_name_the_file_and_the_key(text, where):
    with pytest.raises(InvalidInput) as exc:
        parse(text)
    assert where in exc.value.message


def test_the_cli_refuses_a_bad_fleet_file_with_exit_2_and_one_line(tmp_path, capsys):
    bad = tmp_path / "fleet.toml"
    bad.write_text('[[service]]\nname = "web"\nspec = "/s.toml"\nreplicas = "two"\n')
    assert main(["fleet", "apply", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tupper: {bad}: service[0].replicas: expected an integer") and "Traceback" not in err


def test_a_service_is_a_clone_of_the_tupper_agent_with_its_constraints():
    web = parse(WEB).services[0]
    clone = fleet.resource(web)
    assert clone.get("id") == "tupper.web.clone"
    meta = {nv.get("name"): nv.get("value") for nv in clone.iterfind("meta_attributes/nvpair")}
    assert meta == {"clone-max": "2", "clone-node-max": "1"}  # at most one per node: anti-affinity
    prim = clone.find("primitive")
    assert (prim.get("class"), prim.get("provider"), prim.get("type")) == ("ocf", "tupper", "container")
    params = {nv.get("name"): nv.get("value") for nv in prim.iterfind("instance_attributes/nvpair")}
    assert params == {"spec": "/srv/web.toml", "name": "web", "stop_timeout": "20", "source": "/srv/tupper"}
    assert {op.get("name") for op in prim.iterfind("operations/op")} == {"start", "stop", "monitor"}
    cons = {c.get("id"): c.attrib for c in fleet.constraints(web)}
    assert cons["tupper.web.on.node1"]["score"] == "100" and cons["tupper.web.on.node3"]["score"] == "-INFINITY"
    app = parse(WEB).services[2]
    order = {c.get("id"): c.attrib for c in fleet.constraints(app)}["tupper.app.after.db"]
    assert (order["first"], order["then"], order["kind"]) == ("tupper.db.clone", "tupper.app.clone", "Mandatory")
    stacked = fleet.resource(fleet.Service("w", "/s.toml", replicas=3, anti_affinity=False))
    assert {nv.get("name"): nv.get("value") for nv in stacked.iterfind("meta_attributes/nvpair")}["clone-node-max"] == "3"


def _as_in_the_cib(want: dict) -> dict:
    """What cibadmin --query gives back: the same elements, serialized and parsed, with whitespace."""
    return {scope: {oid: ET.fromstring(ET.tostring(e).decode().replace("><", ">\n  <")) for oid, e in objs.items()}
            for scope, objs in want.items()}


def test_plan_creates_what_is_missing_and_nothing_when_the_cib_says_the_same():
    want = fleet.desired(parse(WEB))
    empty: dict = {"resources": {}, "constraints": {}}
    created = fleet.plan(want, empty)
    assert {(c.action, c.id) for c in created} == {("create", i) for scope in want.values() for i in scope}
    assert fleet.plan(want, _as_in_the_cib(want)) == []  # applying twice changes nothing


def test_plan_replaces_only_what_changed_and_removes_only_its_services_stale_objects():
    have = _as_in_the_cib(fleet.desired(parse(WEB)))
    have["constraints"]["tupper.other.on.node2"] = ET.Element("rsc_location", id="tupper.other.on.node2")  # another file's
    changed = parse(WEB.replace("replicas = 2", "replicas = 1").replace(', node3 = "never"', ""))
    changes = fleet.plan(fleet.desired(changed), have, only=set(changed.names()))
    assert [(c.action, c.scope, c.id) for c in changes] == [
        ("replace", "resources", "tupper.web.clone"),
        ("delete", "constraints", "tupper.web.on.node3"),
    ]
    assert fleet.service_of("tupper.web.on.node3") == "web" and fleet.service_of("tupper.a-b.clone") == "a-b"


def test_apply_puts_each_specs_digest_in_its_resource_so_a_changed_spec_replaces_it(tmp_path):
    spec = tmp_path / "web.toml"
    spec.write_text('image = "debian-bookworm"\n')
    text = f'[[service]]\nname = "web"\nspec = "{spec}"\n'
    first = fleet.with_spec_digests(parse(text), "f.toml")
    params = {nv.get("name"): nv.get("value") for nv in fleet.resource(first.services[0]).iterfind("primitive/instance_attributes/nvpair")}
    assert params["spec_digest"].startswith("sha256:") and len(params["spec_digest"]) == 71
    have = _as_in_the_cib(fleet.desired(first))
    assert fleet.plan(fleet.desired(fleet.with_spec_digests(parse(text), "f.toml")), have) == []  # same bytes: nothing
    spec.write_text('image = "debian-bookworm"\n[labels]\ntier = "new"\n')
    changes = fleet.plan(fleet.desired(fleet.with_spec_digests(parse(text), "f.toml")), have)
    assert [(c.action, c.id) for c in changes] == [("replace", "tupper.web.clone")]
    with pytest.raises(InvalidInput) as exc:
        fleet.with_spec_digests(parse(text.replace(str(spec), str(tmp_path / "gone.toml"))), "f.toml")
    assert exc.value.message.startswith("f.toml: service[0].spec: ") and "No such file" in exc.value.message


def test_a_service_may_be_a_set_of_installed_components_instead_of_a_spec():
    f = parse('[[service]]\nname = "web"\ncomponents = ["web=1.2.0", "db"]\nimage = "web-layer"\n')
    svc = f.services[0]
    assert (svc.spec, svc.components, svc.image) == (None, ("web=1.2.0", "db"), "web-layer")
    params = {nv.get("name"): nv.get("value") for nv in fleet.resource(svc).iterfind("primitive/instance_attributes/nvpair")}
    assert params == {"components": "web=1.2.0 db", "image": "web-layer", "name": "web"}
    assert fleet.with_spec_digests(f, "f.toml") == f  # no spec file to read
