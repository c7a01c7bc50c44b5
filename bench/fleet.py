"""`tupper fleet apply` of 20 services (issue 15), against writing the same objects with cibadmin by hand.

    .venv/bin/python bench/fleet.py [--services 20] [--rounds 3] [--image-store ROOT]

Brings up the benchmark's own three-node test cluster (tests/cluster/testcluster.py, TUPPER_CLUSTER=b),
then per round, on node 1:
- tupper: `tupper fleet apply` of a file with N services (each 1 replica of examples/hello.toml, the
  odd ones after the one before), wall time of the CLI; then the same file again (nothing to write);
  then `tupper fleet rm --service …` of all (not timed);
- raw: the same N clones and constraints (tupper.model.fleet's XML) written by one shell script in the
  node with one `cibadmin --create` each, wall time; then removed (not timed).
Pacemaker starts the services' containers meanwhile (that is not what is timed: apply returns once
the configuration is written). The cluster is removed at the end; results in bench/results/fleet-*.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests/cluster"))
import clusterkit  # noqa: E402

from tupper.model import fleet as fleetmod  # noqa: E402

RESULTS_DIR = REPO / "bench/results"
SPEC = REPO / "examples/hello.toml"


def cluster(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return clusterkit.cluster("b", *args, timeout=timeout, env=env)


def timed(env: dict[str, str], *args: str) -> float:
    began = time.monotonic()
    p = cluster(env, "run", "1", *args)
    took = time.monotonic() - began
    if p.returncode != 0:
        raise SystemExit(f"fleet bench: {' '.join(args[:3])}: {p.stderr.strip()}")
    return took


def fleet_text(n: int) -> str:
    out = []
    for i in range(n):
        out.append(f'[[service]]\nname = "s{i:02d}"\nspec = "{SPEC}"\n' + (f'after = ["s{i - 1:02d}"]\n' if i % 2 else ""))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-store")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("fleet bench: needs root")
    env: dict[str, str] = {}
    if args.image_store:
        env["TUPPER_CLUSTER_IMAGE_STORE"] = args.image_store
    started = datetime.datetime.now()
    up = cluster(env, "up")
    if up.returncode != 0:
        raise SystemExit(f"fleet bench: the test cluster did not come up: {up.stdout}{up.stderr}")
    tupper_cli = str(REPO / ".venv/bin/tupper")
    rows = []
    try:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "fleet.toml"
            path.write_text(fleet_text(args.services))
            want = fleetmod.desired(fleetmod.load(path))
            names = [f"s{i:02d}" for i in range(args.services)]
            script = Path(d) / "raw.sh"  # the baseline: one shell in the node, one cibadmin per object
            script.write_text("".join(f"cibadmin --create --scope {scope} --xml-text {shlex.quote(ET.tostring(e, encoding='unicode'))}\n"
                                      for scope in ("resources", "constraints") for e in want[scope].values()))
            for r in range(args.rounds):
                apply_s = timed(env, tupper_cli, "fleet", "apply", str(path))
                again_s = timed(env, tupper_cli, "fleet", "apply", str(path))
                timed(env, tupper_cli, "fleet", "rm", *[x for n in names for x in ("--service", n)])
                raw_s = timed(env, "sh", "-e", str(script))
                timed(env, tupper_cli, "fleet", "rm", *[x for n in names for x in ("--service", n)])
                row = {"apply_s": round(apply_s, 3), "again_s": round(again_s, 3), "raw_s": round(raw_s, 3)}
                print(f"fleet: round {r}: apply {apply_s:.2f} s, again {again_s:.2f} s, raw cibadmin {raw_s:.2f} s", flush=True)
                rows.append(row)
    finally:
        down = cluster(env, "down")
        if down.returncode != 0:
            print(f"fleet bench: cluster down: {down.stdout}{down.stderr}", file=sys.stderr)
    med = {k: statistics.median(r[k] for r in rows) for k in ("apply_s", "again_s", "raw_s")}
    print(f"\n| {args.services} services (s) | " + " | ".join(f"round {i}" for i in range(len(rows))) + " | median |")
    print("|---|" + "---:|" * (len(rows) + 1))
    for key, label in (("apply_s", "`tupper fleet apply` (all new)"), ("again_s", "`tupper fleet apply` again (nothing to write)"),
                       ("raw_s", "the same objects, one `cibadmin --create` each")):
        print(f"| {label} | " + " | ".join(f"{r[key]:.2f}" for r in rows) + f" | {med[key]:.2f} |")
    print(f"\nratio apply / raw {med['apply_s'] / med['raw_s']:.2f} (each measured through `testcluster.py run`, nsenter included)")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"fleet-{started:%Y-%m-%d-%H%M%S}.json"
    out.write_text(json.dumps({"started": started.isoformat(timespec="seconds"), "services": args.services, "rounds": rows, "median": med},
                              indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
