"""`tupper fleet`: services of a fleet file as Pacemaker resources (docs/fleet.md).

Pacemaker decides where containers run; this verb only writes what the fleet file means into the
cluster's configuration (the CIB), with Pacemaker's own tools (cibadmin, crm_mon, crm_resource), on
any node of the cluster, and reads back where the replicas run. What the CIB should hold is
tupper.model.fleet's; here it is compared with what the CIB holds and only the difference is written.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tupper import proc
from tupper.cli.helptext import examples as _examples
from tupper.errors import Failed
from tupper.model import fleet as fleetmod

SCOPES = ("resources", "constraints")


def add_fleet(sub) -> None:
    fl = sub.add_parser(
        "fleet", help="services across a Pacemaker cluster (replicas, placement, failover)",
        description="A fleet file's services become clones of the ocf:tupper:container agent in a Pacemaker cluster's "
                    "configuration, with their node preferences and ordering; Pacemaker decides where each replica runs "
                    "and moves it when a node is lost. Run on any node of the cluster (docs/fleet.md).",
        **_examples("tupper fleet apply fleet.toml", "tupper fleet apply fleet.toml --dry-run", "tupper fleet status",
                    "tupper fleet status --json | jq '.[].nodes'", "tupper fleet rm fleet.toml"))
    p = fl.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    ap = p.add_parser("apply", help="make the cluster's configuration say what the file says (only what differs is written)",
                      description="Create the file's services that are not in the cluster yet, replace those that differ "
                                  "(replicas, spec, preferences, ordering), and remove preferences and orderings of its "
                                  "services that the file no longer has. Applying the same file twice changes nothing. "
                                  "Services the file does not name are left alone (`tupper fleet rm` removes them).",
                      **_examples("tupper fleet apply fleet.toml", "tupper fleet apply fleet.toml --dry-run --json"))
    ap.add_argument("file", help="the fleet file (TOML), see docs/fleet.md")
    ap.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    ap.add_argument("--json", action="store_true", help="JSON list of {action, scope, id}")
    st = p.add_parser("status", help="each service's replicas and the nodes they run on",
                      **_examples("tupper fleet status", "tupper fleet status fleet.toml --json"))
    st.add_argument("file", nargs="?", help="only this fleet file's services")
    st.add_argument("--json", action="store_true", help="JSON list of {service, replicas, running, nodes, failed}")
    rm = p.add_parser("rm", help="remove services from the cluster (their containers are stopped and removed)",
                      **_examples("tupper fleet rm fleet.toml", "tupper fleet rm --service web"))
    rm.add_argument("file", nargs="?", help="remove this fleet file's services")
    rm.add_argument("--service", action="append", default=[], metavar="NAME", help="remove this service (repeatable)")
    rm.add_argument("--json", action="store_true", help="JSON list of {action, scope, id}")


# ---- Pacemaker's tools ---------------------------------------------------------------------------


def _tool(*argv: str, timeout: float = 120) -> str:
    try:
        p = proc.run(argv, check=False, timeout=timeout)
    except Failed as exc:
        if "command not found" in exc.message:
            raise Failed(f"{argv[0]}: Pacemaker's tools are not installed here",
                         hint="run `tupper fleet` on a node of the cluster (docs/fleet.md; `make cluster` starts a test one)") from None
        raise
    if p.returncode != 0:
        why = (p.stderr or p.stdout).strip().splitlines()
        raise Failed(f"{argv[0]} {argv[1]}: {why[-1] if why else f'exit status {p.returncode}'}",
                     hint="is the cluster running on this node? (`crm_mon -1`)")
    return p.stdout


def cib_objects() -> dict[str, dict[str, ET.Element]]:
    """tupper's objects in the CIB: {"resources": {id: element}, "constraints": {id: element}}."""
    out: dict[str, dict[str, ET.Element]] = {}
    for scope in SCOPES:
        root = ET.fromstring(_tool("cibadmin", "--query", "--scope", scope))
        out[scope] = {e.get("id", ""): e for e in root if e.get("id", "").startswith(fleetmod.PREFIX)}
    return out


def write(change: fleetmod.Change) -> None:
    if change.action == "delete":
        tag = "clone" if change.scope == "resources" else "rsc_location" if ".on." in change.id else "rsc_order"
        _tool("cibadmin", "--delete", "--scope", change.scope, "--xml-text", f'<{tag} id="{change.id}"/>')
        return
    assert change.element is not None
    verb = "--create" if change.action == "create" else "--replace"
    _tool("cibadmin", verb, "--scope", change.scope, "--xml-text", ET.tostring(change.element, encoding="unicode"))


def placement() -> dict[str, dict]:
    """crm_mon's view of tupper's clones: {clone id: {"nodes": [...], "failed": [...]}}."""
    root = ET.fromstring(_tool("crm_mon", "--output-as=xml"))
    out: dict[str, dict] = {}
    for clone in root.iterfind("resources/clone"):
        cid = clone.get("id", "")
        if not cid.startswith(fleetmod.PREFIX):
            continue
        nodes, failed = [], []
        for r in clone.iterfind("resource"):
            where = [n.get("name", "") for n in r.iterfind("node")]
            if r.get("failed") == "true":
                failed += where
            elif r.get("active") == "true" and r.get("role") == "Started":
                nodes += where
        out[cid] = {"nodes": sorted(nodes), "failed": sorted(failed)}
    return out


# ---- the verbs -----------------------------------------------------------------------------------


def cmd_fleet(args) -> int:
    if args.fleet_command == "apply":
        return _apply(args)
    if args.fleet_command == "status":
        return _status(args)
    return _rm(args)


def _report(args, changes: list[fleetmod.Change], dry: bool = False) -> None:
    if args.json:
        json.dump([{"action": c.action, "scope": c.scope, "id": c.id} for c in changes], sys.stdout)
        print()
        return
    if not changes:
        print("nothing to change: the cluster's configuration already says what the file says")
        return
    for c in changes:
        done = {"create": "created", "replace": "replaced", "delete": "removed"}[c.action]
        print(f"{'would ' + c.action if dry else done} {c.scope[:-1]} {c.id}")


def _apply(args) -> int:
    fleet = fleetmod.with_spec_digests(fleetmod.load(Path(args.file)), args.file)
    changes = fleetmod.plan(fleetmod.desired(fleet), cib_objects(), only=set(fleet.names()))
    if not args.dry_run:
        for change in changes:
            write(change)
    _report(args, changes, dry=args.dry_run)
    return 0


def _status(args) -> int:
    have = cib_objects()["resources"]
    where = placement()
    only = set(fleetmod.load(Path(args.file)).names()) if args.file else None
    rows = []
    for cid, clone in sorted(have.items()):
        service = fleetmod.service_of(cid)
        if only is not None and service not in only:
            continue
        meta = {nv.get("name"): nv.get("value") for nv in clone.iterfind("meta_attributes/nvpair")}
        wanted = int(meta.get("clone-max") or 0)
        got = where.get(cid, {"nodes": [], "failed": []})
        rows.append({"service": service, "replicas": wanted, "running": len(got["nodes"]), "nodes": got["nodes"],
                     "failed": got["failed"]})
    if args.json:
        json.dump(rows, sys.stdout)
        print()
        return 0
    if not rows:
        print("no tupper services in this cluster (tupper fleet apply FILE adds them)")
        return 0
    from tupper.cli.ui import table

    table(["SERVICE", "REPLICAS", "RUNNING", "NODES", "FAILED"],
          [[r["service"], str(r["replicas"]), str(r["running"]), ",".join(r["nodes"]) or "-", ",".join(r["failed"]) or "-"] for r in rows])
    return 0


def _rm(args) -> int:
    names = set(args.service)
    if args.file:
        names |= set(fleetmod.load(Path(args.file)).names())
    if not names:
        raise Failed("name what to remove: a fleet file, or --service NAME", hint="tupper fleet rm fleet.toml")
    have = cib_objects()
    changes = fleetmod.plan({"resources": {}, "constraints": {}}, have, only=names)
    for change in changes:
        write(change)
    if changes:
        _tool("crm_resource", "--wait", "--timeout=120s", timeout=180)  # Pacemaker stops (and so removes) the containers
    _report(args, changes)
    return 0
