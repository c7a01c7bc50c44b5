"""The CLI's D-Bus client against well-kept libraries: import + one call, as a CLI process meets it.

    .venv/bin/python bench/client.py [--runs 30]

Each candidate runs in a fresh Python process (`-S`-free, the venv's interpreter, bytecode compiled),
which imports its D-Bus code, connects to the bus, authenticates, calls org.tupper1.Manager.List on a
tupperd of the benchmark's own (a private dbus-daemon on the bench store, as bench/run.py does), and
decodes the reply. Reported: the median wall time of the whole process, and inside it the import and the
connect+call times. The floor is `python -c pass`. Candidates:

- tupper.client: the hand-written blocking client (tupper/cli/client.py);
- pystemd.dbuslib: sd-bus through pystemd (already a dependency of tupper);
- jeepney: a pure-Python blocking D-Bus library (installed into a scratch directory for the run only,
  when PyPI can be reached; left out otherwise).

Results go to the end of docs/benchmarks.md ("CLI client") when --write is given.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from helpers import BENCH_ROOT, PrivateBus, ensure_image, own_root  # noqa: E402

PY = str(REPO / ".venv/bin/python")

PROBES = {
    "floor (python -c pass)": "",
    "tupper.client (hand-written)": """
t0 = time.perf_counter()
from tupper.cli.client import Client
t1 = time.perf_counter()
rows = Client().call("List")
t2 = time.perf_counter()
""",
    "pystemd.dbuslib (sd-bus)": """
t0 = time.perf_counter()
from pystemd.dbuslib import DBusAddress
t1 = time.perf_counter()
bus = DBusAddress(os.environ["DBUS_SYSTEM_BUS_ADDRESS"].encode())
bus.open()
rows = bus.call_method(b"org.tupper1", b"/org/tupper1", b"org.tupper1.Manager", b"List", []).body
bus.close()
t2 = time.perf_counter()
""",
    "jeepney (pure Python)": """
t0 = time.perf_counter()
from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection
t1 = time.perf_counter()
conn = open_dbus_connection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
reply = conn.send_and_get_reply(new_method_call(DBusAddress("/org/tupper1", bus_name="org.tupper1", interface="org.tupper1.Manager"), "List"))
rows = reply.body
conn.close()
t2 = time.perf_counter()
""",
}


def _script(body: str) -> str:
    if not body:
        return "pass"
    return "import os, time, json\n" + body + "print(json.dumps([t1 - t0, t2 - t1]))\n"


def _jeepney_dir() -> str | None:
    d = tempfile.mkdtemp(prefix="tupper-bench-jeepney-")
    p = subprocess.run([PY, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", d, "jeepney"],
                       capture_output=True, text=True)
    return d if p.returncode == 0 else None


def measure(runs: int, env: dict[str, str], jeepney: str | None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for label, body in PROBES.items():
        if label.startswith("jeepney") and jeepney is None:
            continue
        penv = dict(env, PYTHONPATH=jeepney) if label.startswith("jeepney") else env
        walls, imports, calls = [], [], []
        for _ in range(runs + 2):  # two warm-ups: page cache, bytecode
            t0 = time.perf_counter()
            p = subprocess.run([PY, "-c", _script(body)], capture_output=True, text=True, env=penv, cwd=REPO)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                raise SystemExit(f"{label}: {p.stderr.strip()}")
            walls.append(wall)
            if body:
                i, c = json.loads(p.stdout)
                imports.append(i)
                calls.append(c)
        walls, imports, calls = walls[2:], imports[2:], calls[2:]
        out[label] = {"wall_ms": round(statistics.median(walls) * 1000, 1),
                      "import_ms": round(statistics.median(imports) * 1000, 1) if imports else None,
                      "call_ms": round(statistics.median(calls) * 1000, 1) if calls else None}
    return out


def markdown(results: dict[str, dict], runs: int) -> str:
    floor = results["floor (python -c pass)"]["wall_ms"]
    lines = [f"## CLI client: import + one call (bench/client.py, {runs} runs, medians, "
             f"{time.strftime('%Y-%m-%d')})", "",
             "| client | process wall (ms) | over `python -c pass` (ms) | import (ms) | connect + List (ms) |",
             "|---|---:|---:|---:|---:|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['wall_ms']} | {r['wall_ms'] - floor:+.1f} | {r['import_ms'] if r['import_ms'] is not None else '-'} "
                     f"| {r['call_ms'] if r['call_ms'] is not None else '-'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--write", action="store_true", help="append the table to docs/benchmarks.md")
    args = ap.parse_args()
    store = own_root("TUPPER_BENCH_ROOT", BENCH_ROOT)
    ensure_image(store, log=lambda t: print(t, file=sys.stderr))
    subprocess.run([PY, "-m", "compileall", "-q", str(REPO / "tupper")], check=False)
    jeepney = _jeepney_dir()
    bus = PrivateBus(store, python=PY, debug=False)
    try:
        env = bus.env(store)
        subprocess.run([PY, "-m", "tupper", "ps"], env=env, capture_output=True, check=True)  # activates tupperd
        results = measure(args.runs, env, jeepney)
    finally:
        bus.close()
        if jeepney:
            subprocess.run(["rm", "-rf", jeepney], check=False)
    text = markdown(results, args.runs)
    print(text)
    if args.write:
        doc = REPO / "docs/benchmarks.md"
        body = doc.read_text()
        marker = "## CLI client: import + one call"
        if marker in body:
            body = body[: body.index(marker)].rstrip() + "\n"
        doc.write_text(body + "\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
