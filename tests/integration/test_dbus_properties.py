"""The D-Bus API keeps its promises: every Container property annotated EmitsChangedSignal=true is
announced by PropertiesChanged each time it changes (each is changed here: stop, start, a limit, a live
upgrade, a health check), const ones never change, `starting`/`stopping` are signalled, and the job
methods answer at once with a job whose end is signalled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

from helpers import REPO, label, wait_for, write_component

from tupper.daemon import api
from tupper.daemon.typed import emitting

WATCH = r"""
import asyncio, json, sys
from dbus_next.aio import MessageBus
from dbus_next import BusType, Message, MessageType

def plain(v):
    v = getattr(v, "value", v)
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v

async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    def on(msg):
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.member == "PropertiesChanged" and msg.path == sys.argv[1]:
            print(json.dumps({"changed": plain(msg.body[1])}), flush=True)
        elif msg.member in ("ContainerStateChanged", "JobRemoved"):
            print(json.dumps({msg.member: plain(msg.body)}), flush=True)
    bus.add_message_handler(on)
    for rule in ("type='signal',sender='org.tupper1',interface='org.freedesktop.DBus.Properties'",
                 "type='signal',sender='org.tupper1',interface='org.tupper1.Manager'"):
        await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
                               member="AddMatch", signature="s", body=[rule]))
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class Watcher:
    def __init__(self, env: dict, path: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WATCH, path], env=env, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.seen: list[dict] = []
        self.read_until(lambda w: {"ready": True} in w.seen, 30)

    def read_until(self, done, timeout: float = 60) -> None:
        """Read what was signalled until done(self) holds."""
        import select

        deadline = time.monotonic() + timeout
        while not done(self):
            assert time.monotonic() < deadline, f"not seen in {timeout}s; seen: {self.seen}"
            if select.select([self.fd], [], [], 0.5)[0]:  # raw reads: a buffered reader would hide lines from select
                chunk = os.read(self.fd, 65536)
                assert chunk, f"the watcher ended; seen: {self.seen}"
                self.buf += chunk
                *lines, self.buf = self.buf.split(b"\n")
                self.seen += [json.loads(line) for line in lines if line]

    def announced(self) -> dict:
        """Each property's value as last announced."""
        out: dict = {}
        for event in self.seen:
            out.update(event.get("changed", {}))
        return out

    def states(self) -> list[str]:
        return [e["ContainerStateChanged"][1] for e in self.seen if "ContainerStateChanged" in e]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _properties(tupper, path: str) -> dict:
    """Every property of the container, read now (busctl --json)."""
    from helpers import busctl

    out = {}
    for name in emitting(api.ContainerInterface(None, "x")):
        p = busctl(tupper.bus, "--json=short", "get-property", "org.tupper1", path, "org.tupper1.Container", name)
        assert p.returncode == 0, p.stderr
        out[name] = json.loads(p.stdout)["data"]
    return out


def test_every_changing_property_is_announced_and_const_ones_never_change(tupper, names, tmp_path):
    name = names()
    net = "p" + uuid.uuid4().hex[:6]
    tupper("network", "create", net, "--ipv6", f"fd{uuid.uuid4().hex[:2]}:{uuid.uuid4().hex[:4]}::/64", check=True)
    try:
        _changes(tupper, name, net, tmp_path)
    finally:
        tupper("rm", "-f", name)
        tupper("network", "rm", net)


def _changes(tupper, name: str, net: str, tmp_path) -> None:
    comp = f"prop{uuid.uuid4().hex[:6]}"
    (tmp_path / "dist").mkdir()
    for version, units in (("1.0.0", [f"{comp}.service"]), ("2.0.0", [f"{comp}.service", f"{comp}-extra.service"])):
        d = write_component(tmp_path / f"{comp}-{version}", comp,
                            {u: "[Service]\nType=exec\nExecStart=/bin/sleep infinity\n" for u in units})
        (d / "component.toml").write_text((d / "component.toml").read_text().replace('version = "1.0.0"', f'version = "{version}"'))
        tupper("sdk", "build", d, "-o", tmp_path / "dist", check=True)
        tupper("component", "install", tmp_path / "dist" / f"{comp}-{version}.tupper", check=True)
    spec = tmp_path / "spec.toml"
    spec.write_text(f'name = "{name}"\nimage = "debian-bookworm"\n[[components]]\nname = "{comp}"\nversion = "1.0.0"\n'
                    f'[[components]]\npath = "{REPO / "services/web"}"\n[network]\nmode = "private"\nnetwork = "{net}"\n')
    path = f"/org/tupper1/container/{label(name)}"
    watcher = Watcher(tupper.env, path)
    try:
        # run: no job answer waits for the boot; Run's job ends with JobRemoved
        taken = tupper.json("run", spec, "--no-wait")
        assert taken["job"].startswith("/org/tupper1/job/") and taken["container"] == path
        watcher.read_until(lambda w: any(e.get("JobRemoved", [0, taken["job"]])[1] == taken["job"] for e in w.seen if "JobRemoved" in e))
        removed = next(e["JobRemoved"] for e in watcher.seen if "JobRemoved" in e and e["JobRemoved"][1] == taken["job"])
        assert removed[2:] == [name, "run", "done"], removed
        wait_for(lambda: tupper.json("status", name)["state"] == "running", 60, "the web component to be healthy")
        first = _properties(tupper, path)
        assert first["Health"] == {"web": "healthy"} and first["Address"] and first["Address6"]
        # stop and start: State, LeaderPID, StartedAt, Address, Address6; starting and stopping are said
        tupper("stop", name, check=True)
        watcher.read_until(lambda w: w.announced().get("State") == "stopped" and w.announced().get("LeaderPID") == 0)
        tupper("start", name, check=True)
        wait_for(lambda: tupper.json("status", name)["state"] == "running", 60, "the container to be running again")
        tupper("update", name, "--memory-max", "300M", check=True)  # Resources
        tupper("component", "upgrade", name, comp, "2.0.0", check=True)  # Versions, Units
        last = _properties(tupper, path)
        changing = {n for n, e in emitting(api.ContainerInterface(None, "x")).items() if e == "true"}
        watcher.read_until(lambda w: all(w.announced().get(n) == last[n] for n in changing))
        # each of them changed at least once here, and was announced with every value it took
        values: dict[str, list] = {}
        for event in watcher.seen:
            for n, v in event.get("changed", {}).items():
                values.setdefault(n, []).append(v)
        for n in changing:
            assert len({json.dumps(v, sort_keys=True) for v in values.get(n, [])}) >= 2 or n == "Health", (n, values.get(n))
        assert values["Health"][-1] == {"web": "healthy"}
        assert last["Versions"] == {comp: "2.0.0", "web": "1.0.0"} and sorted(last["Units"]) == sorted(
            [f"{comp}.service", f"{comp}-extra.service", "web.service"])
        assert last["Resources"]["memory_max"] == str(300 << 20)
        assert last["LeaderPID"] != first["LeaderPID"] and last["StartedAt"] > first["StartedAt"]
        # const ones did not change, and were never announced
        for n, e in emitting(api.ContainerInterface(None, "x")).items():
            if e == "const":
                assert last[n] == first[n], n
                assert n not in values, n
        states = watcher.states()
        for expected in (["starting", "running"], ["stopping", "stopped"], ["starting", "running"]):
            assert expected[0] in states
        assert states.index("stopping") < states.index("stopped") < len(states) - 1 - states[::-1].index("starting")
    finally:
        watcher.close()
