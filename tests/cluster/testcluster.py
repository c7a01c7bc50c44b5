"""A three-node Corosync + Pacemaker test cluster on one machine (`make cluster`, `make cluster-down`).

    .venv/bin/python tests/cluster/testcluster.py up|down|status|kill N|run N COMMAND...

Each node is a process tree in network namespace `tupper-cnN` (eth0 10.99.2.N/24, a veth to the
bridge `tupper-cbr` on the host, 10.99.2.254; `c` is the cluster's letter, TUPPER_CLUSTER, and the
third octet follows it) and a mount and UTS namespace of its own: hostname
`nodeN`; tmpfs on /run and /dev/shm (libqb's IPC: its abstract sockets are per network namespace,
its shared-memory rings are files in /dev/shm, so every client of a node must enter both, as `run`
does); its own /etc/corosync, /var/lib/corosync, /var/lib/pacemaker and their logs, bound from
STATE/nodeN (STATE: /var/tmp/tupper-cluster-c). In it run `corosync -f` and `pacemakerd`, started by STATE/nodeN/node.sh, the leader of
the node's session (its pid in STATE/nodeN/pid). Corosync's token timeout is shortened to 1 s (the
default 3 s) for quick failover in tests, and it runs without real-time scheduling (`sched_rr: no`).
Fencing is disabled here only (`stonith-enabled=false`): a test cluster has no fence devices; a
production cluster needs them (docs/fleet.md).

`down` kills every process in the nodes' namespaces (SIGTERM, then SIGKILL), deletes the namespaces, the veths, the
bridge and STATE, and checks that nothing is left. Packages: corosync, pacemaker, pacemaker-cli-utils
(`make cluster` installs them without starting the host's own services).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

# One letter names a test cluster: `make cluster`'s is "c"; the test suite's own is "t", so that a
# cluster someone brought up by hand is never touched by the tests (TUPPER_CLUSTER picks it).
CLUSTER = os.environ.get("TUPPER_CLUSTER", "c")
if len(CLUSTER) != 1 or not CLUSTER.isalpha() or not CLUSTER.islower():
    raise SystemExit(f"TUPPER_CLUSTER: one lower-case letter, got {CLUSTER!r}")
STATE = Path(f"/var/tmp/tupper-cluster-{CLUSTER}")
NODES = 3
BRIDGE = f"tupper-{CLUSTER}br"
SUBNET = f"10.99.{ord(CLUSTER) - ord('a')}"
NETNS = f"tupper-{CLUSTER}n{{}}"
HOST_VETH = f"tupper-{CLUSTER}n{{}}h"
PRIVATE_DIRS = ("etc/corosync", "var/lib/corosync", "var/log/corosync", "var/lib/pacemaker", "var/log/pacemaker")
UP_TIMEOUT = 90.0
IMAGE = "debian-bookworm"  # the image every node's store gets
REPO = Path(__file__).resolve().parents[2]


def sh(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, input=input)


def corosync_conf() -> str:
    nodes = "\n".join(f"    node {{\n        name: node{i}\n        nodeid: {i}\n        ring0_addr: {SUBNET}.{i}\n    }}"
                      for i in range(1, NODES + 1))
    return textwrap.dedent("""\
        totem {
            version: 2
            cluster_name: tupper-test-%s
            transport: knet
            crypto_cipher: none
            crypto_hash: none
            token: 1000
            token_coefficient: 0
        }
        nodelist {
        %s
        }
        quorum {
            provider: corosync_votequorum
        }
        logging {
            to_stderr: yes
            to_logfile: yes
            logfile: /var/log/corosync/corosync.log
            to_syslog: no
            timestamp: on
        }
        system {
            sched_rr: no
            move_to_root_cgroup: no
        }
        """) % (CLUSTER, nodes)


NODE_SH = """\
set -e
N=$1; D=$2; TUPPERD=$3
hostname node$N
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777,size=256m tmpfs /dev/shm
for d in {dirs}; do mkdir -p "$D/$d" "/$d"; mount --bind "$D/$d" "/$d"; done
# The node's own system bus and tupperd, on the node's store ($TUPPER_ROOT, inherited by Pacemaker's
# agents). No D-Bus activation inside the node: an activated tupperd would serve tupper's default
# store, the host's.
mkdir -p /run/dbus "$D/no-activation"
mount --bind "$D/no-activation" /usr/share/dbus-1/system-services
# Pacemaker's ocf:tupper:container is this tree's agent, whatever `make setup` installed on the host.
mkdir -p /usr/lib/ocf/resource.d/tupper
mount --bind "$D/ocf" /usr/lib/ocf/resource.d/tupper
dbus-daemon --system --fork
"$TUPPERD" >>"$D/tupperd.log" 2>&1 &
mkdir -p /var/lib/pacemaker/cib /var/lib/pacemaker/pengine /var/lib/pacemaker/cores /var/lib/pacemaker/blackbox \\
         /var/log/pacemaker/bundles /run/resource-agents /run/crm
chown -R hacluster:haclient /var/lib/pacemaker /var/log/pacemaker
chmod 750 /var/lib/pacemaker/cib /var/lib/pacemaker/pengine /var/lib/pacemaker/cores /var/lib/pacemaker/blackbox
chmod 770 /var/log/pacemaker
ip link set lo up
corosync -f &
i=0; until corosync-cfgtool -s >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 300 ] || exit 1; sleep 0.1; done
PCMK_logfile=/var/log/pacemaker/pacemaker.log PCMK_logfacility=none pacemakerd &
echo up > "$D/started"
wait
"""


def node_dir(n: int) -> Path:
    return STATE / f"node{n}"


def node_pid(n: int) -> int | None:
    try:
        pid = int((node_dir(n) / "pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def run_in(n: int, *argv: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    """A command inside node n (its network, mount and UTS namespaces: what the cluster's tools need)."""
    pid = node_pid(n)
    if pid is None:
        raise SystemExit(f"node{n} is not running (make cluster)")
    return subprocess.run(["nsenter", "-t", str(pid), "-m", "-u", "-n", *argv], capture_output=True, text=True, check=check,
                          timeout=timeout, env={**os.environ, "TUPPER_ROOT": str(node_store(n))})


def up() -> None:
    if any(node_pid(n) for n in range(1, NODES + 1)):
        raise SystemExit(f"a test cluster runs already ({STATE}); `make cluster-down` first")
    for tool in ("corosync", "pacemakerd", "crm_mon", "cibadmin", "crm_attribute", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool}: not installed (make cluster installs corosync, pacemaker and pacemaker-cli-utils)")
    try:
        _up()
    except BaseException:
        down(quiet=True)
        raise


def node_store(n: int) -> Path:
    """Node n's tupper store: an overlay store of its own (its own cgroup parent, run directory, nftables
    table), at a path that differs per node."""
    return node_dir(n) / "store"


def tupper(*args: str, root: Path | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "tupper", *(["--root", str(root)] if root else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TUPPER_DIRECT": "1"})


def make_stores() -> None:
    """Each node's store, with the image of tupper's default store (or $TUPPER_CLUSTER_IMAGE_STORE)
    exported once and imported into each (a stream checked by digest on import)."""
    source = os.environ.get("TUPPER_CLUSTER_IMAGE_STORE") or None
    stream = STATE / f"{IMAGE}.timg"
    p = tupper("image", "export", IMAGE, "-o", str(stream), root=Path(source) if source else None)
    if p.returncode != 0:
        raise SystemExit(f"exporting {IMAGE} for the nodes: {p.stderr.strip()}")
    for n in range(1, NODES + 1):
        for args in (("store", "init", "--backend", "overlay"), ("image", "import", str(stream))):
            p = tupper(*args, root=node_store(n))
            if p.returncode != 0:
                raise SystemExit(f"node{n}'s store: tupper {' '.join(args)}: {p.stderr.strip()}")
    stream.unlink()


def _up() -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    make_stores()
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    for n in range(1, NODES + 1):
        ns, veth = NETNS.format(n), HOST_VETH.format(n)
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", veth, "master", BRIDGE, "up")
        sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{n}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        d = node_dir(n)
        for sub in PRIVATE_DIRS:
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "etc/corosync/corosync.conf").write_text(corosync_conf())
        (d / "node.sh").write_text(NODE_SH.format(dirs=" ".join(PRIVATE_DIRS)))
        (d / "ocf").mkdir(exist_ok=True)
        agent = d / "ocf/container"
        agent.write_text((REPO / "ocf/container.in").read_text().replace("@PYTHON@", sys.executable))
        agent.chmod(0o755)
        log = open(d / "node.log", "ab")
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8", "TUPPER_ROOT": str(node_store(n))}
        # nsenter, not `ip netns exec`: that mounts a new /sys, without the cgroup hierarchies nspawn needs.
        p = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "unshare", "--mount", "--uts", "--propagation", "private", "--",
                              "/bin/sh", str(d / "node.sh"), str(n), str(d), str(Path(sys.executable).parent / "tupperd")],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, cwd="/", env=env)
        log.close()
        (d / "pid").write_text(str(p.pid))
    deadline = time.monotonic() + UP_TIMEOUT
    while time.monotonic() < deadline:
        if all((node_dir(n) / "started").exists() for n in range(1, NODES + 1)):
            break
        for n in range(1, NODES + 1):
            if node_pid(n) is None:
                raise SystemExit(f"node{n} ended while starting: {(node_dir(n) / 'node.log').read_text()[-2000:]}")
        time.sleep(0.2)
    else:
        raise SystemExit("the nodes' corosync did not come up in time")
    # Pacemaker's cluster-wide options, once its CIB answers on node 1.
    while time.monotonic() < deadline:
        if run_in(1, "cibadmin", "--query", "--scope", "crm_config").returncode == 0:
            break
        time.sleep(0.5)
    for name, value in (("stonith-enabled", "false"), ("no-quorum-policy", "stop"), ("dc-deadtime", "5s"),
                        ("cluster-recheck-interval", "1min")):
        p = run_in(1, "crm_attribute", "--type", "crm_config", "--name", name, "--update", value)
        if p.returncode != 0:
            raise SystemExit(f"crm_attribute {name}={value}: {p.stderr.strip()}")
    while time.monotonic() < deadline:
        if (s := state()) and s["quorum"] and s["online"] == [f"node{n}" for n in range(1, NODES + 1)]:
            print(f"test cluster up: {', '.join(s['online'])} online, DC {s['dc']}, quorum; state in {STATE}")
            return
        time.sleep(0.5)
    raise SystemExit(f"the cluster did not form within {UP_TIMEOUT:.0f}s: {state()}")


def state(n: int = 1) -> dict | None:
    """crm_mon's view from node n: online nodes, the DC, quorum; None where it does not answer."""
    p = run_in(n, "crm_mon", "--output-as=xml")
    if p.returncode != 0:
        return None
    root = ET.fromstring(p.stdout)
    dc = root.find("summary/current_dc")
    return {"online": sorted(x.get("name", "") for x in root.iterfind("nodes/node") if x.get("online") == "true"),
            "dc": dc.get("name") if dc is not None else None,
            "quorum": dc is not None and dc.get("with_quorum") == "true"}


def down(quiet: bool = False) -> None:
    # Every process in a node's network namespace: node.sh, corosync, pacemakerd, and pacemakerd's
    # daemons, each of which is the leader of a session of its own (so not the node's session alone).
    # Then the containers of the nodes' stores (in network namespaces of their own, found by cgroup).
    spaces = set()
    for n in range(1, NODES + 1):
        try:
            spaces.add(os.stat(f"/run/netns/{NETNS.format(n)}").st_ino)
        except OSError:
            pass
    tops = [top for n in range(1, NODES + 1) for top in store_cgroups(n)]

    def alive() -> set[int]:
        return set(_in_spaces(spaces)) | _in_cgroups(tops)

    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for pid in alive():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and alive():
            time.sleep(0.1)
    _remove_cgroups(tops)
    for n in range(1, NODES + 1):
        sh("ip", "netns", "del", NETNS.format(n), check=False)
        sh("ip", "link", "del", HOST_VETH.format(n), check=False)
    sh("ip", "link", "del", BRIDGE, check=False)
    shutil.rmtree(STATE, ignore_errors=True)
    left = leftovers(spaces)
    if left:
        raise SystemExit(f"the test cluster left: {left}")
    if not quiet:
        print("test cluster removed: no process, namespace, link, cgroup, mount or state left")


def kill(n: int) -> int:
    """Node n lost: SIGKILL to every process in its namespaces (its cluster stack, bus, tupperd, keeper)
    and in its store's cgroups (its containers, which have network namespaces of their own). The
    namespaces stay (`down` removes them). Returns how many processes were killed."""
    try:
        space = os.stat(f"/run/netns/{NETNS.format(n)}").st_ino
    except OSError:
        raise SystemExit(f"node{n} has no namespace (make cluster)") from None
    victims = sorted(set(_in_spaces({space})) | _in_cgroups(store_cgroups(n)))
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(victims)


def store_cgroups(n: int) -> list[Path]:
    """Node n's store's cgroup parent in every hierarchy (tupper makes its containers' cgroups below it)."""
    from tupper.container import cgroups

    parent = f"tupper-{hashlib.sha256(str(node_store(n)).encode()).hexdigest()[:8]}"  # as Store.cgroup_parent
    found = []
    for h in cgroups.Layout.detect().hierarchies:
        for base in {h.own, h.mount}:
            if (base / parent).is_dir():
                found.append(base / parent)
    return found


def _in_cgroups(tops: list[Path]) -> set[int]:
    pids: set[int] = set()
    for top in tops:
        for dirpath, _dirs, files in os.walk(top):
            if "cgroup.procs" in files:
                try:
                    pids |= {int(x) for x in Path(dirpath, "cgroup.procs").read_text().split()}
                except OSError:
                    continue
    return pids


def _remove_cgroups(tops: list[Path]) -> None:
    for top in tops:
        for dirpath, _dirs, _files in sorted(os.walk(top, topdown=False), key=lambda w: -len(w[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


def _in_spaces(spaces: set[int]) -> list[int]:
    """The processes whose network namespace is one of `spaces` (inode numbers)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.stat(d / "ns/net").st_ino in spaces and (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(d.name))
            except (OSError, IndexError):
                continue
    return found


def leftovers(spaces: set[int]) -> dict:
    """What of this test cluster is on the machine: processes in its namespaces (`spaces`: their inode
    numbers), its namespaces, links, its stores' cgroups, mounts under its state directory (its stores'
    container roots, where one reached the host's mount namespace), and the state directory."""
    netns = [x for x in sh("ip", "netns", "list", check=False).stdout.split("\n") if x.startswith(NETNS.format(""))]
    links = [x.split()[0] for x in sh("ip", "-br", "link", check=False).stdout.split("\n") if x.startswith((HOST_VETH.format(""), BRIDGE))]
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if line.split()[4].startswith(str(STATE))]
    out = {"processes": _in_spaces(spaces), "netns": netns, "links": links,
           "cgroups": [str(c) for n in range(1, NODES + 1) for c in store_cgroups(n)],
           "mounts": mounts, "state": STATE.exists()}
    return {k: v for k, v in out.items() if v}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    sub.add_parser("up")
    sub.add_parser("down")
    sub.add_parser("status")
    k = sub.add_parser("kill", help="node N lost: SIGKILL every process in its namespaces")
    k.add_argument("node", type=int)
    r = sub.add_parser("run")
    r.add_argument("node", type=int)
    r.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the test cluster needs root")
    if args.verb == "up":
        up()
    elif args.verb == "down":
        down()
    elif args.verb == "status":
        print(state() or "no test cluster answers")
    elif args.verb == "kill":
        print(f"node{args.node}: {kill(args.node)} processes killed")
    else:
        p = run_in(args.node, *args.command)
        sys.stdout.write(p.stdout)
        sys.stderr.write(p.stderr)
        return p.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
