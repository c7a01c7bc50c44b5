"""Network benchmarks (issue 11): what a private network with a published port adds to a start, and what
the forward costs a client.

- start: `tupper run` of services/hello with `mode = "private"` and one published port, and the same
  spec with `mode = "host"`, against the raw baseline (bench/baseline.py: nspawn on the host's network),
  the three alternating; ratios of medians.
- requests per second: `ab` (apache2-utils) against the web component of examples/web.toml, through
  the forwarded port on the host's 127.0.0.1 and straight to the container's address on its bridge,
  alternating, a bounded number of requests each (-n, with a time limit -t); ratio of medians.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HELLO = REPO / "services/hello"
WEB = REPO / "examples/web.toml"
AB_REQUESTS = 3000
AB_CONCURRENCY = 8
AB_TIME_LIMIT = 20  # seconds, at most, for one ab run


def measure_network_start(tupper, prefix: str, runs: int, cleanup_names: list[str], raw_start: Callable[[int], float]) -> dict:
    """`tupper run` with a private network and one port, with host networking, and the raw baseline."""
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-net-"))
    try:
        specs = {
            "private": 'image = "debian-bookworm"\n[network]\nmode = "private"\n[[network.ports]]\ncontainer = 8080\n',
            "host": 'image = "debian-bookworm"\n[network]\nmode = "host"\n',
        }
        paths = {}
        for kind, head in specs.items():
            paths[kind] = work / f"{kind}.toml"
            paths[kind].write_text(f'{head}[[components]]\npath = "{HELLO}"\n')
        times: dict[str, list[float]] = {"private": [], "host": [], "baseline": []}
        for i in range(runs):
            order = ["private", "host", "baseline"]
            order = order[i % 3:] + order[:i % 3]
            for kind in order:
                if kind == "baseline":
                    times[kind].append(raw_start(i))
                    continue
                name = f"{prefix}-net-{kind}-{i}"
                cleanup_names.append(name)
                t, _ = tupper("run", str(paths[kind]), "--name", name)
                times[kind].append(t)
                tupper("rm", "--force", name)
                cleanup_names.remove(name)
        return times
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ab(url: str) -> float:
    # -t before -n: ab reads -t as "-n 50000" too, and a later -n sets the count back.
    p = subprocess.run(["ab", "-q", "-t", str(AB_TIME_LIMIT), "-n", str(AB_REQUESTS), "-c", str(AB_CONCURRENCY), "-s", "5", url],
                       capture_output=True, text=True, timeout=AB_TIME_LIMIT + 30)
    m = re.search(r"Requests per second:\s+([\d.]+)", p.stdout)
    failed = re.search(r"Failed requests:\s+(\d+)", p.stdout)
    if p.returncode != 0 or m is None or (failed and int(failed.group(1)) > 0):
        raise RuntimeError(f"ab {url} failed: {p.stderr.strip() or p.stdout[-300:]}")
    return float(m.group(1))


def measure_forward_rps(tupper, prefix: str, runs: int, cleanup_names: list[str]) -> dict:
    """Requests per second to examples/web.toml's server through 127.0.0.1:HOSTPORT and straight to
    the container's address, alternating."""
    if shutil.which("ab") is None:
        raise RuntimeError("ab is not installed (apache2-utils; `make setup` installs it)")
    name = f"{prefix}-net-web"
    cleanup_names.append(name)
    try:
        tupper("run", str(WEB), "--name", name)
        _, out = tupper("port", name, "--json")
        host_port = json.loads(out)[0]["host"]
        _, out = tupper("status", name, "--json")
        address = json.loads(out)["network"]["address"]
        urls = {"forwarded": f"http://127.0.0.1:{host_port}/", "direct": f"http://{address}:8080/"}
        for url in urls.values():  # warm-up (and a check that both answer)
            _ab(url)
        rps: dict[str, list[float]] = {"forwarded": [], "direct": []}
        for i in range(runs):
            for kind in (("forwarded", "direct") if i % 2 == 0 else ("direct", "forwarded")):
                rps[kind].append(_ab(urls[kind]))
                time.sleep(0.2)
        return {"rps": rps, "requests": AB_REQUESTS, "concurrency": AB_CONCURRENCY}
    finally:
        try:
            tupper("rm", "--force", name)
            cleanup_names.remove(name)
        except RuntimeError:
            pass  # the run's own cleanup tries again
