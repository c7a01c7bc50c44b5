"""The three-node test cluster (tests/cluster/testcluster.py, `make cluster`): real Corosync and
Pacemaker, each node in namespaces of its own; the suite's own cluster ("t"), never `make cluster`'s.
A node's loss moves a replica to the third node; `down` leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET

import pytest
from helpers import BACKENDS, IMAGE, REPO, DirectStore, write_component

sys.path.insert(0, str(REPO / "tests/cluster"))
import clusterkit  # noqa: E402

FIRST_BACKEND = (os.environ.get("TUPPER_TEST_BACKENDS") or ",".join(BACKENDS)).split(",")[0].strip()

pytestmark = pytest.mark.skipif(shutil.which("corosync") is None or shutil.which("pacemakerd") is None,
                                reason="corosync and pacemaker are not installed (make setup installs them)")


def cluster(*args: str, timeout: float = 180, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return clusterkit.cluster("t", *args, timeout=timeout, env=env)


def tupper_on(node: int, *args: str) -> subprocess.CompletedProcess:
    """The tupper CLI inside a node: its store, its bus, its tupperd."""
    return crm(node, sys.executable, "-m", "tupper", *args)


def crm(node: int, *argv: str) -> subprocess.CompletedProcess:
    return cluster("run", str(node), *argv, timeout=60)


def placement(node: int, rsc: str) -> list[str]:
    """The nodes where the instances of clone `rsc` run, as node `node` sees it (crm_mon's XML)."""
    p = crm(node, "crm_mon", "--output-as=xml")
    return clusterkit.started(p.stdout).get(rsc, []) if p.returncode == 0 else []


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := check()):
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def up(store_root, backend):
    if backend != FIRST_BACKEND:
        pytest.skip("the test cluster runs once (its nodes' stores are overlay stores of their own either way)")
    p = cluster("up", env={"TUPPER_CLUSTER_IMAGE_STORE": str(store_root)})
    assert p.returncode == 0, p.stdout + p.stderr
    state = {"up": True}
    yield state
    if state["up"]:
        cluster("down")


def test_three_nodes_in_namespaces_form_a_quorate_cluster_without_fencing(up):
    p = crm(1, "crm_mon", "--output-as=xml")
    assert p.returncode == 0, p.stderr
    root = ET.fromstring(p.stdout)
    assert sorted(n.get("name") for n in root.iterfind("nodes/node") if n.get("online") == "true") == ["node1", "node2", "node3"]
    assert root.find("summary/current_dc").get("with_quorum") == "true"
    assert root.find("summary/cluster_options").get("stonith-enabled") == "false"
    # Each node is its own host name in its own network: the stack of node2 answers on node2.
    assert crm(2, "hostname").stdout.strip() == "node2"
    assert "10.99.19.2/24" in crm(2, "ip", "-br", "addr", "show", "eth0").stdout


def remove_clone(node: int, rsc: str) -> None:
    assert crm(node, "crm_resource", "--resource", f"{rsc}-clone", "--meta", "--set-parameter", "target-role",
               "--parameter-value", "Stopped").returncode == 0
    wait_for(lambda: placement(node, f"{rsc}-clone") == [], 120, f"{rsc} to stop everywhere")
    assert crm(node, "cibadmin", "--delete", "--xml-text", f'<clone id="{rsc}-clone"/>').returncode == 0


def test_a_clone_of_two_replicas_runs_them_on_two_nodes(up):
    assert crm(1, "cibadmin", "--create", "--scope", "resources", "--xml-text", clusterkit.clone_xml("d", "pacemaker:Dummy", {})).returncode == 0
    nodes = wait_for(lambda: (n := placement(1, "d-clone")) and len(n) == 2 and n, 60, "two replicas")
    assert len(set(nodes)) == 2  # one per node: the clone's anti-affinity
    remove_clone(1, "d")


def containers(node: int) -> dict[str, int]:
    """The tupper containers running on a node: {name: leader PID}."""
    return {c["name"]: c["leader_pid"] for c in json.loads(tupper_on(node, "ps", "--json").stdout)}


def fleet_status(node: int = 1) -> dict[str, dict]:
    p = tupper_on(node, "fleet", "status", "--json")
    assert p.returncode == 0, p.stderr
    return {r["service"]: r for r in json.loads(p.stdout)}


def epoch() -> str:
    return ET.fromstring(crm(1, "cibadmin", "--query").stdout).get("epoch", "")


def test_fleet_apply_is_idempotent_changes_only_what_changed_and_rm_removes(up, tmp_path):
    spec = REPO / "examples/hello.toml"
    web_spec = tmp_path / "web.toml"
    web_spec.write_text(f'image = "{IMAGE}"\n[[components]]\npath = "{REPO}/services/hello"\n')
    path = tmp_path / "fleet.toml"
    text = (f'[[service]]\nname = "db"\nspec = "{spec}"\n\n'
            f'[[service]]\nname = "web"\nspec = "{web_spec}"\nreplicas = 2\nafter = ["db"]\n')
    path.write_text(text)
    first = tupper_on(1, "fleet", "apply", str(path), "--json")
    assert first.returncode == 0, first.stderr
    assert {(c["action"], c["id"]) for c in json.loads(first.stdout)} == {
        ("create", "tupper.db.clone"), ("create", "tupper.web.clone"), ("create", "tupper.web.after.db")}
    status = wait_for(lambda: (s := fleet_status()) and s["web"]["running"] == 2 and s["db"]["running"] == 1 and s, 120,
                      "web's two replicas and db's one")
    assert len(set(status["web"]["nodes"])) == 2  # one per node
    web_nodes = [int(n[-1]) for n in status["web"]["nodes"]]
    leaders = {n: containers(n)["web"] for n in web_nodes}

    before = epoch()
    again = tupper_on(1, "fleet", "apply", str(path))
    assert again.returncode == 0 and "nothing to change" in again.stdout
    assert epoch() == before  # not one write to the cluster's configuration

    path.write_text(text.replace("replicas = 2", "replicas = 1"))
    lower = tupper_on(2, "fleet", "apply", str(path), "--json")  # any node
    assert [(c["action"], c["id"]) for c in json.loads(lower.stdout)] == [("replace", "tupper.web.clone")]
    wait_for(lambda: fleet_status()["web"]["running"] == 1 and sum("web" in containers(n) for n in web_nodes) == 1, 120,
             "exactly one web replica to stop")
    kept = next(n for n in web_nodes if "web" in containers(n))
    assert containers(kept)["web"] == leaders[kept]  # the other one was not touched
    assert fleet_status()["db"]["running"] == 1

    # The spec's content changes, its path does not: web's clone alone is replaced (its spec_digest), and
    # Pacemaker restarts web's replica with the new spec; db is not touched.
    db_node = int(fleet_status()["db"]["nodes"][0][-1])
    db_leader = containers(db_node)["db"]
    web_spec.write_text(web_spec.read_text() + '[labels]\nrev = "2"\n')
    changed = tupper_on(1, "fleet", "apply", str(path), "--json")
    assert [(c["action"], c["id"]) for c in json.loads(changed.stdout)] == [("replace", "tupper.web.clone")]

    def relabelled():
        s = fleet_status()["web"]
        if s["running"] != 1:
            return None
        n = int(s["nodes"][0][-1])
        st = tupper_on(n, "status", "web", "--json")
        return st.returncode == 0 and json.loads(st.stdout).get("labels") == {"rev": "2"} and json.loads(st.stdout)["state"] == "running"
    wait_for(relabelled, 120, "web's replica to restart with the changed spec")
    assert containers(db_node)["db"] == db_leader

    gone = tupper_on(1, "fleet", "rm", str(path))
    assert gone.returncode == 0, gone.stderr
    assert fleet_status() == {}
    wait_for(lambda: all(containers(n) == {} for n in (1, 2, 3)), 60, "the containers to be stopped and removed")


def test_a_source_directory_brings_the_image_and_the_component_to_each_node(up, store_root, tmp_path):
    """A service whose spec needs an image layer and a component package that no node has: `source` in the
    fleet file makes the agent fetch both (the layer onto the nodes' base image) on each node Pacemaker
    picks, checked by digest, before the container starts there; the third node gets nothing."""
    here = DirectStore(store_root)
    tag = uuid.uuid4().hex[:6]
    layer, component = f"t-src-{tag}", f"src{tag}"
    source = tmp_path / "source"
    source.mkdir()
    (tmp_path / "layer.toml").write_text(f'name = "{layer}"\nfrom = "{IMAGE}"\n[build]\nsteps = ["echo {tag} > /etc/tupper-src"]\n')
    here("image", "build", tmp_path / "layer.toml", check=True)
    try:
        here("image", "export", layer, "--parent", IMAGE, "-o", source / f"{layer}.timg", check=True)
        comp = write_component(tmp_path / component, component, {f"{component}.service": "[Service]\nExecStart=/bin/sleep infinity\n"})
        here("sdk", "build", comp, "-o", source, check=True)
        spec = tmp_path / "src.toml"
        spec.write_text(f'image = "{layer}"\n[[components]]\nname = "{component}"\n')
        fleet = tmp_path / "fleet.toml"
        fleet.write_text(f'[[service]]\nname = "src"\nspec = "{spec}"\nreplicas = 2\nsource = "{source}"\n')
        p = tupper_on(1, "fleet", "apply", str(fleet))
        assert p.returncode == 0, p.stderr
        status = wait_for(lambda: (s := fleet_status()) and s.get("src", {}).get("running") == 2 and s, 180, "src's two replicas")
        ran = sorted(int(n[-1]) for n in status["src"]["nodes"])
        want = here.images()[layer]["tree_digest"]
        for n in ran:
            images = {i["name"]: i for i in json.loads(tupper_on(n, "image", "ls", "--json").stdout)}
            assert images[layer]["tree_digest"] == want and images[layer]["parent"] == IMAGE  # the same tree on every node
            installed = json.loads(tupper_on(n, "component", "ls", "--json").stdout)
            assert [(c["name"], c["version"], c["used_by"]) for c in installed] == [(component, "1.0.0", ["src"])]
            st = json.loads(tupper_on(n, "status", "src", "--json").stdout)
            assert st["state"] == "running" and [u["active_state"] for u in st["units"]] == ["active"]
        third = ({1, 2, 3} - set(ran)).pop()
        assert layer not in {i["name"] for i in json.loads(tupper_on(third, "image", "ls", "--json").stdout)}  # fetched where it runs
        assert tupper_on(1, "fleet", "rm", str(fleet)).returncode == 0
        wait_for(lambda: all(containers(n) == {} for n in (1, 2, 3)), 60, "the containers to be stopped and removed")
    finally:
        here("image", "rm", layer)


def test_a_lost_nodes_tupper_container_is_started_on_the_third_node(up, capsys):
    """ocf:tupper:container under Pacemaker: two replicas of examples/hello.toml, each in its node's store
    through its node's tupperd; node loss (its cluster stack, tupperd and containers SIGKILLed) makes
    Pacemaker start the lost replica on the third node, its units active."""
    spec = REPO / "examples/hello.toml"
    p = crm(1, "cibadmin", "--create", "--scope", "resources", "--xml-text", clusterkit.clone_xml("web", "tupper:container", {"spec": str(spec)}))
    assert p.returncode == 0, p.stderr
    first = wait_for(lambda: (n := placement(1, "web-clone")) and len(n) == 2 and n, 120, "two replicas of web")
    for name in first:
        status = json.loads(tupper_on(int(name[-1]), "status", "web", "--json").stdout)
        assert status["state"] == "running" and all(u["active_state"] == "active" for u in status["units"])
    lost = int(first[0][-1])
    survivor = next(n for n in (1, 2, 3) if f"node{n}" in first and n != lost)
    third = ({"node1", "node2", "node3"} - set(first)).pop()
    began = time.monotonic()
    assert cluster("kill", str(lost)).returncode == 0
    wait_for(lambda: third in placement(survivor, "web-clone"), 120, "the lost replica to start on the third node")
    took = time.monotonic() - began
    status = json.loads(tupper_on(int(third[-1]), "status", "web", "--json").stdout)
    assert status["state"] == "running" and all(u["active_state"] == "active" for u in status["units"])
    with capsys.disabled():
        print(f"\n  failover of a tupper container from node{lost} to {third}, units active: {took:.1f} s (token 1 s)")
    remove_clone(survivor, "web")
    # Stopping removed them (crm_mon may show an instance stopped a moment before its stop has returned).
    wait_for(lambda: all(containers(n) == {} for n in (1, 2, 3) if n != lost), 60, "the containers to be removed")


def test_down_leaves_no_process_namespace_link_or_state(up):
    p = cluster("down")
    up["up"] = False
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no process, namespace, link, cgroup, mount or state left" in p.stdout
    assert not [x for x in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n") if x.startswith("tupper-tn")]
    assert "tupper-tbr" not in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    state = "/var/tmp/tupper-cluster-t"
    assert not os.path.exists(state)  # the nodes' stores and configuration
    with open("/proc/self/mountinfo") as f:
        assert [line for line in f if state in line] == []
    assert subprocess.run(["pgrep", "-f", state], capture_output=True).returncode == 1  # no node process
