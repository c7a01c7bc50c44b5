"""Isolation benchmarks (issue 10): what resource limits add to a start, and what health checks cost tupperd.

- start with [resources] against the same spec without: `tupper run` wall time, alternating, ratio of medians.
- tupperd's CPU (utime + stime from /proc) over a window while N containers are checked every second,
  for http checks (a socket in each container's network namespace) and exec checks (a transient unit
  in each container), against the same window with the same containers unchecked.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HELLO = REPO / "services/hello"
LIMITS = 'memory_max = "512M"\nmemory_high = "384M"\ncpu_max = "150%"\ncpu_weight = 200\nio_weight = 200\npids_max = 512\n'
CLK_TCK = os.sysconf("SC_CLK_TCK")

# An HTTP server for the checks: python3 from the image, one process, one port.
SERVER = """#!/usr/bin/python3
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
while True:
    c, _ = s.accept()
    with c:
        c.recv(4096)
        c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 0\\r\\n\\r\\n")
"""


def measure_limits_start(tupper, prefix: str, runs: int, cleanup_names: list[str]) -> dict:
    """`tupper run` of services/hello with and without a [resources] table, alternating; each removed after."""
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-limits-"))
    try:
        specs = {}
        for kind, extra in (("plain", ""), ("limited", f"[resources]\n{LIMITS}")):
            specs[kind] = work / f"{kind}.toml"
            specs[kind].write_text(f'image = "debian-bookworm"\n{extra}[[components]]\npath = "{HELLO}"\n')
        times: dict[str, list[float]] = {"plain": [], "limited": []}
        for i in range(runs):
            order = ("plain", "limited") if i % 2 == 0 else ("limited", "plain")
            for kind in order:
                name = f"{prefix}-lim-{kind}-{i}"
                cleanup_names.append(name)
                t, _ = tupper("run", str(specs[kind]), "--name", name)
                times[kind].append(t)
                tupper("rm", "--force", name)
                cleanup_names.remove(name)
        return times
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checked_component(root: Path, kind: str) -> Path:
    d = root / f"checked-{kind}"
    (d / "units").mkdir(parents=True)
    (d / "bin").mkdir()
    check = ('http = "http://127.0.0.1:${PORT:-8080}/health"' if kind == "http" else 'exec = ["/bin/true"]') if kind != "none" else ""
    health = f'\n[health]\n{check}\ninterval = "1s"\ntimeout = "900ms"\n' if check else ""
    (d / "component.toml").write_text(f'name = "checked"\nversion = "1.0.0"\nunits = ["checked.service"]\n{health}')
    (d / "units" / "checked.service").write_text("[Service]\nType=exec\nExecStart=/opt/checked/bin/server ${PORT}\n")
    (d / "bin" / "server").write_text(SERVER)
    (d / "bin" / "server").chmod(0o755)
    return d


# The baseline for http checks: the same GETs, once a second to each port, by a plain blocking loop in
# a process of its own, which prints the CPU it used (user + system) over the window.
RAW_CHECKER = """
import resource, socket, sys, time
ports, window = [int(p) for p in sys.argv[1].split(",")], float(sys.argv[2])
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
tick = t0
while time.monotonic() - t0 < window:
    for port in ports:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /health HTTP/1.0\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
            assert s.recv(4096).startswith(b"HTTP/1.0 200")
    tick += 1.0
    time.sleep(max(0.0, tick - time.monotonic()))
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(100 * (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / (time.monotonic() - t0))
"""


def raw_checks_percent(ports: list[int], window: float) -> float:
    out = subprocess.run([sys.executable, "-c", RAW_CHECKER, ",".join(map(str, ports)), str(window)],
                         capture_output=True, text=True, check=True).stdout
    return float(out)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def measure_health_cpu(tupper, prefix: str, count: int, window: float, tupperd_pid, cleanup_names: list[str]) -> dict:
    """tupperd's CPU share over `window` s with `count` containers checked every second (http, then
    exec), and with the same containers unchecked: percent of one CPU."""
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-health-"))
    out: dict = {}
    try:
        for kind in ("none", "http", "exec"):
            component = _checked_component(work, kind)
            names, ports = [], []
            for i in range(count):
                name = f"{prefix}-hc-{kind}-{i}"
                spec = work / f"{name}.toml"
                port = _free_port()
                ports.append(port)
                # The host's network: the baseline loop reaches the same servers on the host's loopback.
                spec.write_text(f'image = "debian-bookworm"\n[network]\nmode = "host"\n[[components]]\npath = "{component}"\n'
                                f'[components.env]\nPORT = "{port}"\n')
                cleanup_names.append(name)
                names.append(name)
                tupper("run", str(spec), "--name", name)
            time.sleep(2.0)  # past the first checks
            pid = tupperd_pid()
            samples = []
            for _ in range(3):
                c0, t0 = cpu_seconds(pid), time.monotonic()
                time.sleep(window / 3)
                samples.append(100 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0))
            if kind != "none":
                _, text = tupper("ps", "--json")
                health = [c.get("health", {}).get("state") for r in json.loads(text) if r["name"] in names for c in r["components"]]
                if health.count("healthy") != count:
                    raise RuntimeError(f"{kind} checks: expected {count} healthy components, ps shows {health}")
            out[kind] = {"percent": statistics.median(samples), "samples": samples, "containers": count, "window": window}
            if kind == "http":  # the same GETs by a plain loop, with the containers still checked by tupperd
                out[kind]["raw_percent"] = raw_checks_percent(ports, window / 3)
            for name in names:
                tupper("rm", "--force", name)
                cleanup_names.remove(name)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)
