"""What the test suite and the benchmarks ask of a test cluster (testcluster.py beside this file): the
script run for one cluster letter, a clone of an OCF agent, and where each clone's instances run."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

SCRIPT = [sys.executable, str(Path(__file__).with_name("testcluster.py"))]


def cluster(letter: str, *args: str, timeout: float = 180, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """testcluster.py ARGS for cluster `letter` (TUPPER_CLUSTER), `env` added to this process's."""
    return subprocess.run([*SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {}), "TUPPER_CLUSTER": letter})


def clone_xml(rsc: str, agent: str, params: dict[str, str], replicas: int = 2) -> str:
    """Clone `RSC-clone` of `replicas` instances of OCF agent `provider:type`, at most one per node
    (anti-affinity), monitored every 2 s."""
    provider, kind = agent.split(":")
    nv = "".join(f'<nvpair id="{rsc}-p-{k}" name="{k}" value="{v}"/>' for k, v in params.items())
    return (f'<clone id="{rsc}-clone"><meta_attributes id="{rsc}-clone-meta">'
            f'<nvpair id="{rsc}-clone-max" name="clone-max" value="{replicas}"/>'
            f'<nvpair id="{rsc}-clone-node-max" name="clone-node-max" value="1"/></meta_attributes>'
            f'<primitive id="{rsc}" class="ocf" provider="{provider}" type="{kind}">'
            + (f'<instance_attributes id="{rsc}-params">{nv}</instance_attributes>' if nv else "")
            + f'<operations><op id="{rsc}-start" name="start" interval="0s" timeout="120s"/>'
            f'<op id="{rsc}-stop" name="stop" interval="0s" timeout="90s"/>'
            f'<op id="{rsc}-mon" name="monitor" interval="2s" timeout="30s"/></operations></primitive></clone>')


def started(crm_mon_xml: str) -> dict[str, list[str]]:
    """{clone id: the nodes where its instances are started}, from `crm_mon --output-as=xml`."""
    root = ET.fromstring(crm_mon_xml)
    return {c.get("id", ""): sorted(n.get("name", "") for r in c.iterfind("resource")
                                    if r.get("active") == "true" and r.get("role") == "Started" for n in r.iterfind("node"))
            for c in root.iterfind("resources/clone")}
