"""memory_high under a hog: memory pressure in the container's cgroup, where the kernel can show it.

That needs the memory controller on the unified hierarchy (a pure cgroup v2 host, or a hybrid one that
moved it there): memory_high is then written as memory.high, which throttles an allocator above it, and
the stalls show in the cgroup's memory.pressure. On hosts whose memory controller lives on cgroup v1
(these machines) memory_high becomes memory.soft_limit_in_bytes, which reclaims only under global
memory pressure (docs/resources.md), and this test is skipped: there is nothing to see there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import wait_for, write_component, write_spec

UNIFIED_CONTROLLERS = next((p / "cgroup.controllers" for p in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
                            if (p / "cgroup.controllers").exists()), None)
pytestmark = pytest.mark.skipif(
    UNIFIED_CONTROLLERS is None or "memory" not in UNIFIED_CONTROLLERS.read_text().split(),
    reason="the memory controller is not on the unified hierarchy here (cgroup v1): memory_high cannot throttle")

HOG = "#!/bin/sh\nx=\nwhile :; do\n  x=\"$x$(yes | head -c 4000000)\"\n  sleep 0.05\ndone\n"


def test_memory_high_makes_a_hog_show_memory_pressure(tupper, names, tmp_path):
    comp = write_component(tmp_path / "hog", "hog", {"hog.service": "[Service]\nType=exec\nExecStart=/opt/hog/bin/hog\n"},
                           files={"bin/hog": HOG})
    name = names()
    spec = write_spec(tmp_path / "s.toml", [comp], extra='[resources]\nmemory_high = "32M"\n', name=name)
    tupper("run", spec, "--name", name, check=True)

    def pressured() -> bool:
        stats = tupper.json("stats", name, "--no-stream")
        entry = stats[0] if isinstance(stats, list) else stats
        some = entry["pressure"].get("memory", {}).get("some_avg10")
        return some is not None and some > 0

    wait_for(pressured, 30, "memory pressure under memory_high")
    assert tupper.json("status", name)["state"] in ("running", "degraded")  # throttled, not killed: memory_max is unset
