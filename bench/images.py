"""Image streams against raw btrfs: export and import throughput of the base image, and stream sizes.

    .venv/bin/python bench/images.py [--runs N]

In one run, alternating, on the bench store ($TUPPER_BENCH_ROOT, default /var/lib/tupper-bench) and a
second store of its own beside it:

- raw: `btrfs send IMAGE | zstd | file`, then `zstd -d | btrfs receive` into the second store (what an
  export and an import do at their core, compressed alike);
- tupper: `tupper image export IMAGE -o file` on the first store, `tupper image import file` on the second
  (headers, framing, digests of the payload and of the received tree, the checks).

Throughput is the image's size (its files, `du`) over the wall time. Also: the full stream of a layer
with one package (`tree`) and its incremental stream from the base. Everything made is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import BENCH_ROOT, ensure_image, own_root
from helpers import timed_direct as tupper

REPO = Path(__file__).resolve().parent.parent
STORE = own_root("TUPPER_BENCH_ROOT", BENCH_ROOT)
SECOND = Path(f"{STORE}-images")
IMAGE = "debian-bookworm"


def sh(command: str) -> float:
    t0 = time.monotonic()
    subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True, capture_output=True)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    ensure_image(STORE, log=lambda t: print(t, file=sys.stderr))
    tupper(SECOND, "store", "info")
    work = Path(tempfile.mkdtemp(prefix="tupper-bench-images-"))
    image = STORE / "images" / IMAGE
    size = int(subprocess.run(["du", "-sb", str(image)], capture_output=True, text=True, check=True).stdout.split()[0])
    raw_dir = SECOND / "tmp" / "bench-raw"
    layer = "bench-layer"
    times: dict[str, list[float]] = {"raw export": [], "tupper export": [], "raw import": [], "tupper import": []}
    try:
        tupper(STORE, "image", "export", IMAGE, "-o", work / "warm.timg")  # the tree digest, once (kept in the metadata)
        for _ in range(args.runs):
            times["raw export"].append(sh(f"btrfs send -q {image} | zstd -q -T0 -3 -c > {work}/raw.zst"))
            times["tupper export"].append(tupper(STORE, "image", "export", IMAGE, "-o", work / "base.timg"))
            raw_dir.mkdir(parents=True, exist_ok=True)
            times["raw import"].append(sh(f"zstd -q -d -c {work}/raw.zst | btrfs receive -q -e {raw_dir}"))
            subprocess.run(["btrfs", "-q", "subvolume", "delete", str(raw_dir / IMAGE)], check=True)
            times["tupper import"].append(tupper(SECOND, "image", "import", work / "base.timg"))
            tupper(SECOND, "image", "rm", IMAGE)
        definition = work / "layer.toml"
        definition.write_text(f'name = "{layer}"\nfrom = "{IMAGE}"\n[build]\npackages = ["tree"]\n')
        tupper(STORE, "image", "build", definition)
        tupper(STORE, "image", "export", layer, "-o", work / "layer-full.timg")
        tupper(STORE, "image", "export", layer, "--parent", IMAGE, "-o", work / "layer.timg")
        sizes = {"base": (work / "base.timg").stat().st_size, "layer full": (work / "layer-full.timg").stat().st_size,
                 "layer incremental": (work / "layer.timg").stat().st_size}
    finally:
        tupper(STORE, "image", "rm", layer) if (STORE / "images" / f"{layer}.json").exists() else None
        subprocess.run(["rm", "-rf", str(work)], check=False)
        if raw_dir.exists():
            for sub in raw_dir.iterdir():
                subprocess.run(["btrfs", "-q", "subvolume", "delete", str(sub)], check=False)
            raw_dir.rmdir()
        tupper(SECOND, "store", "unmount")
        subprocess.run(["rm", "-rf", str(SECOND)], check=False)
        Path(f"{SECOND}.img").unlink(missing_ok=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"image_bytes": size, "runs": args.runs, "seconds": med,
           "mb_per_s": {k: size / 1e6 / v for k, v in med.items()},
           "ratio": {"export": med["raw export"] / med["tupper export"], "import": med["raw import"] / med["tupper import"]},
           "stream_bytes": sizes, "incremental_share": sizes["layer incremental"] / sizes["layer full"]}
    print(json.dumps(out, indent=2))
    print("\n| | raw btrfs (MB/s) | tupper (MB/s) | tupper / raw (target ≥ 0.8) |\n|---|---|---|---|")
    for kind in ("export", "import"):
        print(f"| {kind} of {IMAGE} ({size / 1e6:.0f} MB) | {out['mb_per_s']['raw ' + kind]:.0f} | {out['mb_per_s']['tupper ' + kind]:.0f} "
              f"| {out['ratio'][kind]:.2f} |")
    print(f"\nstreams: base {sizes['base'] / 1e6:.1f} MB; a layer with one package: full {sizes['layer full'] / 1e6:.1f} MB, "
          f"incremental {sizes['layer incremental'] / 1e3:.0f} kB ({out['incremental_share']:.2%} of the full stream)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
