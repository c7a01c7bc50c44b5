"""`tupper fetch` (issue 15: images and components reach the nodes) against the imports it stands for.

    .venv/bin/python bench/fetch.py [--runs 3]

A source directory made from the bench store ($TUPPER_BENCH_ROOT, default /var/lib/tupper-bench): the
base image's full stream, a layer's incremental stream on it, and a component package; a spec that
needs all three. Then, alternating, into an empty store of its own beside the bench store (btrfs, as a
node's would be):

- raw: what a user would type without fetch: `image import BASE.timg`, `image import LAYER.timg`,
  `component install PKG` (three CLI runs, each with its own checks);
- tupper: `tupper fetch SPEC --source DIR` (one run: everything looked at first, then the same imports
  and install, each piece compared by digest);
- present: `tupper fetch` again with everything there (what each start of a resource with `source`
  costs on a node that already has it).

The store is emptied between runs and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import BENCH_ROOT, ensure_image, own_root, write_component
from helpers import timed_direct as tupper

STORE = own_root("TUPPER_BENCH_ROOT", BENCH_ROOT)
NODE = Path(f"{STORE}-fetch")
IMAGE = "debian-bookworm"


def empty(layer: str, component: str) -> None:
    tupper(NODE, "component", "rm", component, "1.0.0")
    tupper(NODE, "image", "rm", layer)
    tupper(NODE, "image", "rm", IMAGE)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    ensure_image(STORE, log=lambda t: print(t, file=sys.stderr))
    tag = uuid.uuid4().hex[:6]
    layer, component = f"bench-fetch-{tag}", f"fetch{tag}"
    work = Path(tempfile.mkdtemp(prefix="tupper-bench-fetch-"))
    source = work / "source"
    source.mkdir()
    times: dict[str, list[float]] = {"raw": [], "fetch": [], "present": []}
    try:
        definition = work / "layer.toml"
        definition.write_text(f'name = "{layer}"\nfrom = "{IMAGE}"\n[build]\nsteps = ["echo {tag} > /etc/bench-fetch"]\n')
        tupper(STORE, "image", "build", definition)
        tupper(STORE, "image", "export", IMAGE, "-o", source / f"{IMAGE}.timg")
        tupper(STORE, "image", "export", layer, "--parent", IMAGE, "-o", source / f"{layer}.timg")
        comp = write_component(work / component, component, {f"{component}.service": "[Service]\nExecStart=/bin/sleep infinity\n"})
        tupper(STORE, "sdk", "build", comp, "-o", source)
        pkg = source / f"{component}-1.0.0.tupper"
        spec = work / "svc.toml"
        spec.write_text(f'image = "{layer}"\n[[components]]\nname = "{component}"\n')
        tupper(NODE, "store", "info")
        for r in range(args.runs):
            raw = (tupper(NODE, "image", "import", source / f"{IMAGE}.timg") + tupper(NODE, "image", "import", source / f"{layer}.timg")
                   + tupper(NODE, "component", "install", pkg))
            empty(layer, component)
            fetch = tupper(NODE, "fetch", spec, "--source", source)
            present = tupper(NODE, "fetch", spec, "--source", source)
            empty(layer, component)
            print(f"fetch bench: run {r}: raw {raw:.2f} s, fetch {fetch:.2f} s, present {present:.2f} s", file=sys.stderr, flush=True)
            for k, v in (("raw", raw), ("fetch", fetch), ("present", present)):
                times[k].append(v)
        sizes = {p.name: p.stat().st_size for p in source.iterdir()}
    finally:
        tupper(STORE, "image", "rm", layer) if (STORE / "images" / f"{layer}.json").exists() else None
        subprocess.run(["rm", "-rf", str(work)], check=False)
        tupper(NODE, "store", "unmount")
        subprocess.run(["rm", "-rf", str(NODE)], check=False)
        Path(f"{NODE}.img").unlink(missing_ok=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"runs": times, "median": med, "ratio_fetch_raw": med["fetch"] / med["raw"], "source_bytes": sizes}, indent=2))
    print(f"\n| into an empty btrfs store: base ({sizes[f'{IMAGE}.timg'] / 1e6:.0f} MB stream) + layer + component (s) | "
          + " | ".join(f"run {i}" for i in range(args.runs)) + " | median |")
    print("|---|" + "---:|" * (args.runs + 1))
    for key, label in (("raw", "raw: `image import` ×2 + `component install`"), ("fetch", "`tupper fetch --source`"),
                       ("present", "`tupper fetch` with everything present")):
        print(f"| {label} | " + " | ".join(f"{x:.2f}" for x in times[key]) + f" | {med[key]:.2f} |")
    print(f"\nratio fetch / raw {med['fetch'] / med['raw']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
