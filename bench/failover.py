"""Failover (issue 15): from a node's loss to the replacement replica's units active, under Pacemaker.

    .venv/bin/python bench/failover.py [--rounds 3] [--image-store ROOT]

Each round brings up a three-node test cluster of the benchmark's own (tests/cluster/testcluster.py,
TUPPER_CLUSTER=b: namespaces `tupper-bn1…3`, Corosync's token 1 s), with two clones of two replicas
each, kept on the same nodes (colocation):

- `web-clone`: ocf:tupper:container running examples/hello.toml through each node's tupperd (a start
  returns once every unit is active);
- `d-clone`: ocf:pacemaker:Dummy, the baseline: what Corosync's detection and Pacemaker's decision
  cost with an agent that does nothing.

It then kills one node running both (every process in its namespaces and its store's cgroups) and
measures, from the kill, when crm_mon on a surviving node shows each clone started on the third node
(polled every 0.1 s), and for tupper that the container there has every unit active. The ratio tupper /
Dummy is what tupper adds to the cluster's own failover. Target: tupper < 10 s. The cluster is removed
after each round (`down` checks that nothing is left). Results: bench/results/failover-DATE-TIME.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests/cluster"))
import clusterkit  # noqa: E402

RESULTS_DIR = REPO / "bench/results"
SPEC = REPO / "examples/hello.toml"
TARGET = 10.0


def cluster(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return clusterkit.cluster("b", *args, timeout=timeout, env=env)


def placement(env: dict[str, str], node: int) -> dict[str, list[str]]:
    p = cluster(env, "run", str(node), "crm_mon", "--output-as=xml", timeout=30)
    return clusterkit.started(p.stdout) if p.returncode == 0 else {}


def one_round(env: dict[str, str], say) -> dict:
    up = cluster(env, "up")
    if up.returncode != 0:
        raise SystemExit(f"failover: the test cluster did not come up: {up.stdout}{up.stderr}")
    try:
        for xml in (clusterkit.clone_xml("web", "tupper:container", {"spec": str(SPEC)}), clusterkit.clone_xml("d", "pacemaker:Dummy", {})):
            p = cluster(env, "run", "1", "cibadmin", "--create", "--scope", "resources", "--xml-text", xml)
            if p.returncode != 0:
                raise SystemExit(f"failover: cibadmin: {p.stderr}")
        colo = '<rsc_colocation id="bench-d-with-web" rsc="d-clone" with-rsc="web-clone" score="INFINITY"/>'
        cluster(env, "run", "1", "cibadmin", "--create", "--scope", "constraints", "--xml-text", colo)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            where = placement(env, 1)
            if len(where.get("web-clone", [])) == 2 and where.get("d-clone") == where.get("web-clone"):
                break
            time.sleep(0.5)
        else:
            raise SystemExit(f"failover: the replicas did not start: {placement(env, 1)}")
        first = where["web-clone"]
        lost = int(first[0][-1])
        survivor = int(first[1][-1])
        third = ({"node1", "node2", "node3"} - set(first)).pop()
        say(f"replicas on {', '.join(first)}; killing node{lost}; expecting them on {third}")
        began = time.monotonic()
        cluster(env, "kill", str(lost))
        seen: dict[str, float] = {}
        while time.monotonic() - began < 120 and len(seen) < 2:
            where = placement(env, survivor)
            for rsc in ("web-clone", "d-clone"):
                if rsc not in seen and third in where.get(rsc, []):
                    seen[rsc] = time.monotonic() - began
            time.sleep(0.1)
        status = cluster(env, "run", third[-1], sys.executable, "-m", "tupper", "status", "web", "--json", timeout=60)
        units = json.loads(status.stdout).get("units", []) if status.returncode == 0 else []
        if "web-clone" not in seen or not units or any(u["active_state"] != "active" for u in units):
            raise SystemExit(f"failover: web did not come up on {third}: {seen}, {status.stdout}{status.stderr}")
        return {"lost": f"node{lost}", "to": third, "tupper_s": round(seen["web-clone"], 2), "dummy_s": round(seen.get("d-clone", float("nan")), 2)}
    finally:
        down = cluster(env, "down")
        if down.returncode != 0:
            print(f"failover: cluster down: {down.stdout}{down.stderr}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-store", help="the store the nodes' image is exported from (default: tupper's default store)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("failover: needs root")
    env: dict[str, str] = {}
    if args.image_store:
        env["TUPPER_CLUSTER_IMAGE_STORE"] = args.image_store

    def say(text: str) -> None:
        print(f"failover: {text}", flush=True)

    started = datetime.datetime.now()
    rounds = []
    for r in range(args.rounds):
        got = one_round(env, say)
        say(f"round {r}: tupper {got['tupper_s']:.2f} s, Dummy {got['dummy_s']:.2f} s")
        rounds.append(got)
    t = [g["tupper_s"] for g in rounds]
    d = [g["dummy_s"] for g in rounds]
    ratio = statistics.median(t) / statistics.median(d)
    print("\n| node loss → replacement replica started on the third node (s) | " + " | ".join(f"round {i}" for i in range(len(rounds)))
          + " | median |")
    print("|---|" + "---:|" * (len(rounds) + 1))
    print("| ocf:tupper:container (examples/hello.toml, every unit active) | " + " | ".join(f"{x:.2f}" for x in t) + f" | {statistics.median(t):.2f} |")
    print("| ocf:pacemaker:Dummy (the cluster's own detection and decision) | " + " | ".join(f"{x:.2f}" for x in d) + f" | {statistics.median(d):.2f} |")
    print(f"\nratio tupper / Dummy {ratio:.2f}; tupper median {statistics.median(t):.2f} s: target < {TARGET:.0f} s: "
          f"{'met' if statistics.median(t) < TARGET else 'MISSED'} (Corosync token 1 s)")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"failover-{started:%Y-%m-%d-%H%M%S}.json"
    path.write_text(json.dumps({"started": started.isoformat(timespec="seconds"), "rounds": rounds, "ratio": ratio}, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
