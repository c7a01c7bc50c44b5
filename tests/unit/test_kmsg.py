"""The kernel's OOM kill records, parsed, and attributed to a container's component (cgroup v1: tupper's
component cgroups; v2: the unit's cgroup made by the container's systemd)."""

from __future__ import annotations

from pathlib import Path

from tupper.container import kmsg
from tupper.runtime.runtime import OOMCounter

TOP = "/process_api/df73/tupper-59d9b51d/web-1"
RECORD = (f"3,1850,609049156,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
          f"oom_memcg={TOP}/hog,task_memcg={TOP}/hog,task=hog,pid=13135,uid=0\n")


def test_a_kmsg_record_and_a_dmesg_message():
    kill = kmsg.parse(RECORD)
    assert kill == kmsg.OOMKill(pid=13135, task="hog", memcg=f"{TOP}/hog", task_memcg=f"{TOP}/hog")
    assert kmsg.parse(RECORD.split(";", 1)[1]) == kill


def test_other_records_are_not_kills():
    assert kmsg.parse("6,1851,609049184,-;Memory cgroup out of memory: Killed process 13135 (hog) total-vm:96348kB") is None
    assert kmsg.parse("4,1849,609047261,-;yes invoked oom-killer: gfp_mask=0x100cca, order=0") is None
    assert kmsg.parse("3,1,1,-;oom-kill:constraint=CONSTRAINT_NONE,task=x,pid=notanumber") is None


def test_below():
    assert kmsg.below(f"{TOP}/hog", TOP) == "hog"
    assert kmsg.below(f"{TOP}/system.slice/web.service", TOP) == "system.slice"
    assert kmsg.below(TOP, TOP) == ""
    assert kmsg.below(f"{TOP}-2/hog", TOP) is None  # another container whose name starts the same
    assert kmsg.below("/elsewhere", TOP) is None


def counter() -> OOMCounter:
    return OOMCounter(total=None, components=(("hog", Path("/x")), ("web", Path("/y"))), nested=False, memcg=TOP,
                      units=(("hog.service", "hog"), ("web.service", "web"), ("web-sidecar.service", "web")))


def kill_in(memcg: str) -> kmsg.OOMKill:
    return kmsg.OOMKill(pid=1, task="t", memcg=TOP, task_memcg=memcg)


def test_a_kill_is_attributed_to_the_component_it_was_in():
    c = counter()
    assert c.component_of(kill_in(f"{TOP}/hog")) == "hog"  # v1: tupper's component cgroup
    assert c.component_of(kill_in(f"{TOP}/system.slice/web-sidecar.service")) == "web"  # v2: the unit's cgroup
    assert c.component_of(kill_in(TOP)) == ""  # the container's own processes (systemd, journald, ...)
    assert c.component_of(kill_in(f"{TOP}/system.slice/systemd-journald.service")) == ""
    assert c.component_of(kill_in(f"{TOP}-other/hog")) is None
    assert OOMCounter(total=None, components=(), nested=True).component_of(kill_in(TOP)) is None
