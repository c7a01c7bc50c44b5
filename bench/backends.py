"""Start and remove on the overlay backend against the btrfs backend, in one run.

    .venv/bin/python bench/backends.py [--runs N]

Two stores of the benchmark's own: $TUPPER_BENCH_ROOT (default /var/lib/tupper-bench, btrfs: a
loopback pool) and the same path with "-overlay" (the overlay backend, on the host's filesystem), the
base image carried from the first to the second with `image export | image import`. Alternating, N
times each: `tupper --direct run examples/hello.toml` (a snapshot, or an overlayfs mount, then the
boot, until the unit is active) and `tupper --direct rm -f` (the snapshot deleted, or the mount taken
down and the upper layer removed). Prints the medians and overlay / btrfs. Everything made is removed
(containers, and the networks they made: no bridge is left).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import BENCH_ROOT, _clean_env, backend_root, ensure_image, mounted, own_root
from helpers import timed_direct as tupper

REPO = Path(__file__).resolve().parent.parent
STORE = own_root("TUPPER_BENCH_ROOT", BENCH_ROOT)
STORES = {"btrfs": STORE, "overlay": backend_root(STORE, "overlay")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    was_mounted = mounted(STORE)
    for backend, root in STORES.items():
        ensure_image(root, log=lambda t: print(t, file=sys.stderr), backend=backend)
    times: dict[str, list[float]] = {f"{verb} {b}": [] for verb in ("run", "rm") for b in STORES}
    made: list[tuple[Path, str]] = []
    try:
        for i in range(args.runs):
            for backend in (("btrfs", "overlay") if i % 2 == 0 else ("overlay", "btrfs")):
                root, name = STORES[backend], f"bench-backend-{uuid.uuid4().hex[:6]}"
                made.append((root, name))
                times[f"run {backend}"].append(tupper(root, "run", REPO / "examples/hello.toml", "--name", name))
                times[f"rm {backend}"].append(tupper(root, "rm", "-f", name))
                made.pop()
    finally:
        for root, name in made:
            subprocess.run([sys.executable, "-m", "tupper", "--direct", "--root", str(root), "rm", "-f", name], capture_output=True,
                           env=_clean_env(), cwd=REPO)
        for root in STORES.values():  # the networks the runs made: their bridges go with them
            listed = subprocess.run([sys.executable, "-m", "tupper", "--direct", "--root", str(root), "network", "ls", "--json"],
                                    capture_output=True, text=True, env=_clean_env(), cwd=REPO).stdout
            for net in json.loads(listed or "[]"):
                tupper(root, "network", "rm", net["name"])
        tupper(STORES["overlay"], "store", "unmount")
        if not was_mounted:
            tupper(STORE, "store", "unmount")
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"runs": args.runs, "seconds": med, "ratio": {verb: med[f"{verb} overlay"] / med[f"{verb} btrfs"] for verb in ("run", "rm")}}
    print(json.dumps(out, indent=2))
    print("\n| | btrfs (s) | overlay (s) | overlay / btrfs |\n|---|---|---|---|")
    for verb, what in (("run", "`tupper run examples/hello.toml` (root made, boot, unit active)"), ("rm", "`tupper rm -f` (root removed)")):
        print(f"| {what} | {med[f'{verb} btrfs']:.3f} | {med[f'{verb} overlay']:.3f} | {out['ratio'][verb]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
