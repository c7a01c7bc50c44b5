"""`tupper`: the command line. Parses arguments, calls the runtime, renders results; turns errors into exit codes."""

from __future__ import annotations

import argparse
import os
import sys
import time

from tupper.cli.helptext import Formatter, RawFormatter
from tupper.cli.helptext import examples as _examples
from tupper.errors import InvalidInput, NotFound, TupperError

# Imports are deferred to where they are needed: every command pays for what the module imports, and
# the commands that go to tupperd (the common case) need little besides argparse and a socket.

EPILOG = """\
examples:
  tupper run examples/web.toml
  tupper ps
  tupper exec demo -- systemctl status
  tupper logs demo -f
  tupper stop demo && tupper rm demo
  tupper COMMAND --help (each command has examples of its own)

exit codes: 0 success, 1 runtime failure, 2 invalid input or usage.
The store lives at /var/lib/tupper (--root, TUPPER_ROOT or `root` in /etc/tupper/tupper.toml to change it);
where that is not on btrfs, tupper creates a sparse loopback btrfs pool beside it (<root>.img) and mounts it there.
Settings: a command-line flag wins over an environment variable, which wins over the config file
(/etc/tupper/tupper.toml, or $TUPPER_CONFIG), which wins over the built-in default. See `man tupper`.
"""


# Container verbs: served by tupperd unless --direct. Everything else runs in this process.
DAEMON_COMMANDS = frozenset({"run", "ps", "status", "inspect", "stop", "start", "restart", "kill", "shutdown", "rm", "exec", "events", "update", "stats",
                             "network", "port", "shell", "prune", "pool"})


def _path(text: str):
    from pathlib import Path

    return Path(text)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose formatter is helptext.Formatter by default; subparsers are of the same class."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `only`, the top level and that one command (the rest are never
    looked at: building all of them costs a command-line call about 10 ms, mostly argparse's gettext)."""
    p = _Parser(
        prog="tupper",
        description="tupper: containers that boot systemd in a btrfs snapshot, with self-contained service components.",
        epilog=EPILOG,
        formatter_class=RawFormatter,
    )
    from tupper import __version__

    p.add_argument("--version", action="version", version=f"tupper {__version__}")
    p.add_argument("--root", type=_path, help="store root (default: $TUPPER_ROOT, `root` in /etc/tupper/tupper.toml, or /var/lib/tupper)")
    p.add_argument("--debug", action="store_true", help="log every command tupper runs; show tracebacks")
    p.add_argument("--direct", action="store_true", default=os.environ.get("TUPPER_DIRECT") == "1",
                   help="run container verbs in this process instead of through tupperd (hosts without a system bus; $TUPPER_DIRECT=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, add in _COMMANDS.items():
        if only is None or name == only:
            add(sub)
    return p


def _add_run(sub) -> None:
    r = sub.add_parser("run", help="boot a container from a spec and start its components",
                       description="Snapshot the spec's image, bind its components, boot systemd with systemd-nspawn, "
                                   "and wait until every component unit is active. The container keeps running after tupper returns.",
                       **_examples("tupper run examples/web.toml", "tupper run examples/hello.toml --name hello2",
                                   "tupper run spec.toml --keep-failed --json", "tupper run spec.toml --cold"))
    r.add_argument("spec", help="spec file (TOML), see docs/spec.md")
    r.add_argument("--name", help="container name (default: the spec's `name`, else the file's stem)")
    r.add_argument("--keep-failed", action="store_true", help="when a unit fails, leave the container running for inspection")
    r.add_argument("--cold", action="store_true", help="boot a new container even where a warm pool of the image has a ready one "
                                                       "(see `tupper pool --help`)")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    _wait_options(r)


def _wait_options(parser) -> None:
    """--wait (the default) and --no-wait: tupperd answers run/start/stop/restart with a job at once."""
    parser.add_argument("--no-wait", dest="wait", action="store_false",
                        help="return as soon as tupperd has taken the job (its object path is printed; D-Bus JobRemoved says when it ends)")
    parser.add_argument("--wait", dest="wait", action="store_true", default=True, help="wait until it is done (the default)")


def _add_ps(sub) -> None:
    ps = sub.add_parser("ps", aliases=ALIASES_OF["ps"], help="list containers", description="List every container in the store with its state.",
                        **_examples("tupper ps", "tupper ps --filter label=team=payments --filter state=running",
                                    "tupper ps --json | jq '.[].name'"))
    ps.add_argument("--json", action="store_true", help="JSON list of {name, state, image, leader_pid, ...}")
    ps.add_argument("--all", "-a", action="store_true", help="also the warm pools' containers (state ready or booting; see `tupper pool`)")
    ps.add_argument("--filter", "-f", action="append", default=[], metavar="KEY=VALUE",
                    help="only containers that match: label=K or label=K=V, name=PART, state=STATE, image=NAME (again: all must match)")


def _add_status(sub) -> None:
    st = sub.add_parser("status", help="show one container and its component units",
                        description="State, leader PID, image, start time, and each component unit's state read from systemd over D-Bus.",
                        **_examples("tupper status demo", "tupper status demo --json | jq '.units[].active_state'"))
    st.add_argument("name")
    st.add_argument("--json", action="store_true", help="JSON object with name, state, leader_pid and units")


def _add_inspect(sub) -> None:
    ins = sub.add_parser("inspect", help="everything about one container",
                         description="The container's record, where it lives on the host (root, machine name, cgroups), what "
                                     "is bound into it, its components with their installed digests, its last exit, and the "
                                     "os-release of its image.",
                         **_examples("tupper inspect web", "tupper inspect web --json | jq .cgroups"))
    ins.add_argument("name")
    ins.add_argument("--json", action="store_true", help="the whole document as JSON")


def _names_verb(sub, verb: str, help: str, description: str, examples: tuple[str, ...], *, timeout: bool) -> None:
    """A lifecycle verb on several containers: NAME..., --json, --wait/--no-wait (and --timeout)."""
    p = sub.add_parser(verb, aliases=ALIASES_OF[verb], help=help, description=description, **_examples(*examples))
    p.add_argument("names", nargs="+", metavar="NAME")
    if timeout:
        from tupper.cli.backends import finite_seconds

        p.add_argument("--timeout", type=finite_seconds, help="seconds before SIGKILL (default: the spec's [stop] timeout)")
    p.add_argument("--json", action="store_true", help="JSON list of {name, state}")
    _wait_options(p)


def _add_stop(sub) -> None:
    _names_verb(sub, "stop", "power containers off",
                "PowerOff over each container's D-Bus; SIGKILL when it is not down after the timeout. "
                "Stopping a stopped container does nothing and succeeds, as starting a running one does.",
                ("tupper stop web", "tupper stop web db --timeout 5", "tupper stop web --json"), timeout=True)


def _add_start(sub) -> None:
    _names_verb(sub, "start", "boot stopped containers again",
                "Boot existing (stopped, failed or crash-looping) containers and wait for their units. "
                "Starting a running container does nothing and succeeds, as stopping a stopped one does.",
                ("tupper start web", "tupper start web db", "tupper start web --json"), timeout=False)


def _add_restart(sub) -> None:
    _names_verb(sub, "restart", "stop containers, then start them again",
                "Stop (PowerOff; SIGKILL after the timeout) and start each container again, waiting for its "
                "units, as `systemctl restart` does to a unit. A stopped container is just started.",
                ("tupper restart web", "tupper restart web db --timeout 5 --json"), timeout=True)


def _add_kill(sub) -> None:
    k = sub.add_parser("kill", aliases=ALIASES_OF["kill"], help="send a signal to containers' PID 1 (default SIGKILL: stop them now)",
                       **_examples("tupper kill web", "tupper kill web --signal HUP", "tupper kill web db -s 9 --json"))
    k.add_argument("names", nargs="+", metavar="NAME")
    k.add_argument("--signal", "-s", default="KILL", help="signal name or number (default KILL)")
    k.add_argument("--json", action="store_true", help="JSON list of {name, state}")


def _add_stats(sub) -> None:
    import argparse

    from tupper.cli.backends import finite_seconds

    st = sub.add_parser(
        "stats", help="live CPU, memory, IO, pids and pressure of containers",
        description="A live table of each running container's use of CPU (percent of one CPU), memory (in use, peak, "
                    "limit), IO (bytes read and written), pids, and pressure (PSI some avg10 for cpu, memory and io; "
                    "'-' where the kernel has no figure), read from its cgroups; --components adds each component.",
        epilog="examples:\n  tupper stats\n  tupper stats web --components\n  tupper stats --no-stream --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("names", nargs="*", metavar="NAME", help="containers to show (default: every running one)")
    st.add_argument("--no-stream", action="store_true", help="one sample, then exit (CPU %% averaged since the container started)")
    st.add_argument("--interval", type=finite_seconds, default=2.0, help="seconds between samples (default 2)")
    st.add_argument("--components", action="store_true", help="a row per component below each container")
    st.add_argument("--json", action="store_true", help="a JSON list per sample (one per line when streaming)")


# `tupper update` options: the keys of a spec's [resources], as --memory-max etc.
UPDATE_KEYS = ("memory_min", "memory_low", "memory_high", "memory_max", "memory_swap_max", "cpu_weight", "cpu_max", "io_weight", "pids_max")


def _add_update(sub) -> None:
    import argparse

    up = sub.add_parser(
        "update", help="change resource limits of a container or of one component, live",
        description="Change resource limits of a container (or, with --component, of one component's units) without "
                    "restarting it, like `podman update` or `systemctl set-property`; kept for its next starts. "
                    "Values as in a spec's [resources] (docs/resources.md).",
        epilog="examples:\n  tupper update web --memory-max 1G --cpu-max 200%\n  tupper update web --component api --memory-max 256M\n"
               "  tupper update web --pids-max infinity",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("name")
    up.add_argument("--component", help="limit this component's units instead of the whole container")
    for key in UPDATE_KEYS:
        up.add_argument(f"--{key.replace('_', '-')}", dest=key, metavar="SIZE" if key.startswith("memory") else
                        ("PERCENT" if key == "cpu_max" else "N"))
    up.add_argument("--json", action="store_true", help="JSON object with the limits now, notes, and whether they were applied live")


def _add_network(sub) -> None:
    import argparse

    nw = sub.add_parser("network", help="create, list and remove container networks",
                        description="Networks that containers in mode = \"private\" join (docs/network.md): a bridge, "
                                    "an address for each running container, NAT for outbound traffic, names between "
                                    "containers. The default network, tupper0, is made on first use.",
                        **_examples("tupper network create backend", "tupper network ls", "tupper network rm backend"))
    nsub = nw.add_subparsers(dest="network_command", metavar="ACTION", required=True)
    nc = nsub.add_parser("create", help="create a network",
                         epilog="examples:\n  tupper network create backend\n  tupper network create db --subnet 10.90.0.0/24 --ipv6 fd00:90::/64",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    nc.add_argument("name", help="a lowercase letter, then lowercase letters, digits and '-' (at most 11)")
    nc.add_argument("--subnet", help="private IPv4 subnet, /16 to /29 (default: a free 10.X.0.0/24)")
    nc.add_argument("--ipv6", metavar="SUBNET", help="a unique local /64 (fd00::/8) for IPv6 too")
    nc.add_argument("--json", action="store_true")
    nl = nsub.add_parser("ls", help="list networks with their running containers", **_examples("tupper network ls", "tupper network ls --json"))
    nl.add_argument("--json", action="store_true")
    nr = nsub.add_parser("rm", help="remove a network (refused while a container is configured to join it)",
                         **_examples("tupper network rm backend", "tupper network rm backend --json"))
    nr.add_argument("name")
    nr.add_argument("--json", action="store_true", help="JSON object {name, state}")


def _add_port(sub) -> None:
    import argparse

    pt = sub.add_parser("port", help="list a container's published ports",
                        description="The container's [[network.ports]]: host address and port -> container port/protocol.",
                        epilog="examples:\n  tupper port web\n  curl http://127.0.0.1:$(tupper port web --json | jq '.[0].host')/",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pt.add_argument("name")
    pt.add_argument("--json", action="store_true", help="JSON list of {host, container, protocol, address}")


def _add_shutdown(sub) -> None:
    sh = sub.add_parser("shutdown", help="stop containers, the last started first", **_examples("tupper shutdown --all"))
    sh.add_argument("--all", action="store_true", required=True, help="every running container")
    sh.add_argument("--json", action="store_true", help="JSON list of {name, state}")


def _add_events(sub) -> None:
    ev = sub.add_parser("events", help="stream container and unit state changes as they happen",
                        description="Container states, unit states, health and OOM kills, as tupperd signals them, until interrupted.",
                        **_examples("tupper events", "tupper events --filter name=web --filter type=unit",
                                    "tupper events --filter state=failed --json"))
    ev.add_argument("--json", action="store_true", help="one JSON object per line")
    ev.add_argument("--filter", "-f", action="append", default=[], metavar="KEY=VALUE",
                    help=f"only events that match: name=PART, type={'|'.join(EVENT_TYPES)}, state=STATE (a container's state, "
                         "a unit's active state, a health state), component=NAME (again: all must match)")


def _add_daemon(sub) -> None:
    sub.add_parser("daemon", help="run tupperd in the foreground (usually started by D-Bus activation)",
                   description="tupperd in this process, on the system bus: for debugging, or hosts where D-Bus activation is not set up.",
                   **_examples("tupper daemon", "tupper --debug --root /srv/tupper daemon"))


def _add_sdk(sub) -> None:
    from tupper.cli import sdk as cli_sdk

    cli_sdk.add_sdk(sub)


def _add_component(sub) -> None:
    from tupper.cli import sdk as cli_sdk

    cli_sdk.add_component(sub)


def _add_secret(sub) -> None:
    from tupper.cli import secrets as cli_secrets

    cli_secrets.add_secret(sub)


def _add_rm(sub) -> None:
    rm = sub.add_parser("rm", aliases=ALIASES_OF["rm"], help="remove stopped containers (snapshot and record)",
                        **_examples("tupper rm web", "tupper rm -f web db", "tupper rm web --json"))
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.add_argument("--force", "-f", action="store_true", help="kill them first if they run")
    rm.add_argument("--json", action="store_true", help="JSON list of {name, state}")


def _add_exec(sub) -> None:
    ex = sub.add_parser("exec", help="run a command inside a running container",
                        description="Run CMD as a transient systemd service inside the container (no shell is spawned by tupper), "
                                    "stream its output, and exit with its exit code.",
                        **_examples("tupper exec web -- ls /opt", "tupper exec web -e LANG=C -u nobody -w /tmp -- id",
                                    "tupper exec web -- sh -c 'journalctl -u web.service -n 5'"))
    ex.add_argument("name")
    ex.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE", help="set a variable (again for more)")
    ex.add_argument("-u", "--user", help="run as this user of the container (name or uid; default root)")
    ex.add_argument("-w", "--workdir", metavar="DIR", help="run in this directory of the container (default /)")
    ex.add_argument("-t", "--tty", action="store_true",
                    help="on a new terminal inside the container, relayed to yours (interactive programs; as tupper shell)")
    ex.add_argument("-i", "--interactive", action="store_true", help="accepted for podman's -it: stdin is always passed on")
    ex.add_argument("cmd", nargs="*", help="-- CMD [ARGS...] (everything after -- is the command)")


def _add_shell(sub) -> None:
    sh = sub.add_parser("shell", help="an interactive login shell inside a running container",
                        description="Open a login shell (or CMD) on a new pseudo-terminal inside the container, as machinectl shell "
                                    "does: the container's systemd runs it as a transient unit on that terminal; tupper relays it "
                                    "to yours, follows your window size, and exits with the shell's exit code.",
                        **_examples("tupper shell web", "tupper shell web nobody", "tupper shell admin@web",
                                    "tupper shell web -- /usr/bin/top", "tupper shell web -e LANG=C.UTF-8 -w /var/log"))
    sh.add_argument("name", metavar="[USER@]NAME")
    sh.add_argument("user", nargs="?", help="log in as this user of the container (default root)")
    sh.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE", help="set a variable (again for more)")
    sh.add_argument("-w", "--workdir", metavar="DIR", help="start in this directory (default: the user's home)")
    sh.add_argument("cmd", nargs="*", help="-- CMD [ARGS...] to run in place of the login shell")


def _add_logs(sub) -> None:
    from tupper.model import journal

    lg = sub.add_parser("logs", help="show a container's journal",
                        description="The container's journal, read by journalctl on the host (nothing runs inside the container). "
                                    "TIME is journalctl's: '2024-05-01 10:00', 'today', 'yesterday', '1 hour ago', -1h (write "
                                    "--since=-1h, as it starts with a dash), @EPOCH.",
                        **_examples("tupper logs demo", "tupper logs demo -u nginx.service -n 50 -f",
                                    "tupper logs demo --component web --since '1 hour ago' -p warning",
                                    "tupper logs demo --since today -o json | jq -r .MESSAGE"))
    lg.add_argument("name")
    which = lg.add_mutually_exclusive_group()
    which.add_argument("-u", "--unit", help="only this unit")
    which.add_argument("--component", metavar="NAME", help="only the units of this component of the container")
    lg.add_argument("-n", "--lines", type=int, help="last N lines")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    lg.add_argument("-S", "--since", metavar="TIME", help="entries from this time on")
    lg.add_argument("-U", "--until", metavar="TIME", help="entries up to this time")
    lg.add_argument("-p", "--priority", metavar="PRIORITY",
                    help=f"this priority or more important: {', '.join(journal.PRIORITIES)} or 0-7, or a range FROM..TO")
    lg.add_argument("-o", "--output", metavar="MODE", default="short-precise", choices=journal.OUTPUTS,
                    help=f"journalctl's output mode: {', '.join(journal.OUTPUTS)} (default short-precise)")


def _add_image(sub) -> None:
    im = sub.add_parser("image", help="build, list and remove images",
                        description="Images are read-only btrfs subvolumes that containers are snapshots of (docs/images.md).",
                        **_examples("tupper image build images/debian-bookworm.toml", "tupper image ls", "tupper image rm debian-bookworm"))
    isub = im.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    ib = isub.add_parser("build", help="build an image from its definition (debootstrap into a read-only subvolume)",
                         description="Build the image a definition describes (a layer: on its parent, built first where missing). An "
                                     "image whose digest (its definition's, and its parent's) is already in the store is kept as "
                                     "it is; a changed definition is built again; --rebuild builds it whatever its digest.",
                         **_examples("tupper image build images/debian-bookworm.toml", "tupper image build images/debian-bookworm.toml --rebuild --json"))
    ib.add_argument("definition", type=_path, help="image definition, e.g. images/debian-bookworm.toml")
    ib.add_argument("--rebuild", "--force", dest="force", action="store_true", help="build it again even if its digest is in the store")
    ib.add_argument("--json", action="store_true", help="JSON object {name, path, built_at, definition, suite}")
    il = isub.add_parser("ls", help="list images", **_examples("tupper image ls", "tupper image ls --json | jq '.[].name'"))
    il.add_argument("--json", action="store_true")
    ir = isub.add_parser("rm", help="remove an image (refused while a container uses it)",
                         **_examples("tupper image rm debian-bookworm", "tupper image rm debian-bookworm --json"))
    ir.add_argument("name")
    ir.add_argument("--json", action="store_true", help="JSON object {name, state}")
    from tupper.cli import imagecmd

    imagecmd.add_transfer(isub, _examples)


def _add_store(sub) -> None:
    so = sub.add_parser("store", help="the store: images, containers, components and records",
                        description="The store holding images, containers, components and records: btrfs (subvolumes and snapshots; "
                                    "a loopback pool where the root is not on btrfs) or overlay (directory trees and overlayfs "
                                    "container roots, on any filesystem; chosen where no loop pool can be made).",
                        **_examples("tupper store info", "tupper store check", "tupper --root /srv/tupper store unmount",
                                    "tupper --root /srv/tupper store init --backend overlay"))
    ssub = so.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    sn = ssub.add_parser("init", help="create the store at --root with a given backend (any command creates a default one)",
                         description="Create the store at --root. btrfs: the root's btrfs, or a sparse loopback pool beside it. "
                                     "overlay: images as directory trees and container roots as overlayfs mounts, on any "
                                     "filesystem that takes an overlayfs upper layer (ext4, xfs, tmpfs). A store keeps its backend; "
                                     "an existing store of the same backend is left as it is.",
                         **_examples("tupper --root /srv/tupper store init --backend overlay", "tupper store init --json"))
    sn.add_argument("--backend", choices=["btrfs", "overlay"], default=None,
                    help="btrfs (default where a btrfs mount or a loop pool can be had) or overlay")
    sn.add_argument("--json", action="store_true", help="the store's info as `store info --json`")
    si = ssub.add_parser("info", help="path, backing, size and free space", **_examples("tupper store info", "tupper store info --json | jq .free"))
    si.add_argument("--json", action="store_true")
    su = ssub.add_parser("unmount", help="unmount the loopback pool, or the overlay backend's container roots (refused while containers run)",
                         **_examples("tupper store unmount", "tupper --root /var/lib/tupper-test store unmount --json"))
    su.add_argument("--json", action="store_true", help="JSON object {root, state}")
    sc = ssub.add_parser("check", help="find what a crash or a manual change left inconsistent; --repair fixes it",
                         formatter_class=RawFormatter,
                         description="Orphan roots, records without roots, operations interrupted by a crash, scratch space of dead "
                                     "processes, stale cgroups, nspawn runtime dirs and agent dirs, half-built images and "
                                     "half-installed components. Exit 0 when the store is consistent (or was repaired), 1 otherwise.",
                         epilog="examples:\n  tupper store check\n  tupper store check --repair --json")
    sc.add_argument("--repair", action="store_true", help="fix each finding and say what was done")
    sc.add_argument("--json", action="store_true", help="a JSON list of findings (with --repair: each with its result)")


# In the order `tupper --help` lists them.
_COMMANDS = {
    "run": _add_run, "ps": _add_ps, "status": _add_status, "inspect": _add_inspect, "stats": _add_stats, "stop": _add_stop, "start": _add_start, "restart": _add_restart,
    "kill": _add_kill, "update": _add_update, "port": _add_port, "network": _add_network, "shutdown": _add_shutdown, "events": _add_events, "daemon": _add_daemon, "rm": _add_rm, "exec": _add_exec, "shell": _add_shell,
    "logs": _add_logs, "image": _add_image, "store": _add_store, "sdk": _add_sdk, "component": _add_component,
    "secret": _add_secret, "volume": lambda sub: _volumes().add_volume(sub), "cp": lambda sub: _volumes().add_cp(sub),
    "prune": lambda sub: _volumes().add_prune(sub), "pool": lambda sub: _pools().add_pool(sub),
    "fetch": lambda sub: _fetch().add_fetch(sub), "fleet": lambda sub: _fleet().add_fleet(sub),
}


def _fetch():
    from tupper.cli import fetch

    return fetch


def _fleet():
    from tupper.cli import fleet

    return fleet


def _pools():
    from tupper.cli import pools

    return pools


def _volumes():
    from tupper.cli import volumes

    return volumes


# Other names users bring from podman and machinectl; args.command is always the first name.
ALIASES_OF = {"ps": ["ls", "list"], "stop": ["poweroff"], "start": [], "restart": ["reboot"], "kill": ["terminate"], "rm": ["remove"]}
CANONICAL = {alias: name for name, aliases in ALIASES_OF.items() for alias in aliases}


def _first_word(argv: list[str]) -> str | None:
    """The first argument that is not one of the global options: the command, if argv names one."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--debug", "--direct") or arg.startswith("--root="):
            i += 1
        elif arg == "--root":
            i += 2
        elif arg.startswith("-"):
            return None
        else:
            return arg
    return None


def _unknown_command(word: str) -> InvalidInput:
    import difflib

    known = sorted([*_COMMANDS, *CANONICAL])
    close = difflib.get_close_matches(word, known, n=2, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "`tupper --help` lists the commands"
    return InvalidInput(f"unknown command {word!r}", hint=hint)


def _command_in(argv: list[str]) -> str | None:
    """The command argv names, when that is certain without parsing; None means: build the whole parser."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--debug", "--direct") or arg.startswith("--root="):
            i += 1
        elif arg == "--root":
            i += 2
        elif arg.startswith("-"):
            return None  # -h, an abbreviation (--dir), a typo: argparse's full treatment
        else:
            arg = CANONICAL.get(arg, arg)
            return arg if arg in _COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    """The program (argv None: sys.argv; a client of tupperd then ends the process itself), or one call."""
    program = argv is None
    if argv is None:
        argv = sys.argv[1:]
    word = _first_word(argv)
    if word is not None and word not in _COMMANDS and word not in CANONICAL:
        exc = _unknown_command(word)
        usage = build_parser("run").format_usage()  # the top level's: "usage: tupper [-h] ... COMMAND ..."
        print(f"{usage.rstrip()}\ntupper: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    command = _command_in(argv)
    after: list[str] | None = None
    if command in ("exec", "shell") and "--" in argv:  # their own options come before --, the command after it
        cut = argv.index("--")
        argv, after = argv[:cut], argv[cut + 1:]
    args = build_parser(command).parse_args(argv)
    args.command = CANONICAL.get(args.command, args.command)
    if after is not None:
        args.cmd = [*args.cmd, *after]
    client = not (args.debug or args.direct or args.command not in DAEMON_COMMANDS)
    if not client:
        # Library code logs (--debug traces every command it runs); a client of tupperd runs none of it.
        import logging

        logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s", stream=sys.stderr)
        logging.getLogger("pyroute2").setLevel(logging.WARNING)  # --debug traces tupper, not each netlink message
    code = _main(args)
    if program and client:
        _exit(code)
    return code


def _main(args) -> int:
    try:
        return dispatch(args)
    except TupperError as exc:
        print(f"tupper: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        if args.debug:
            raise
        return exc.exit_code
    except KeyboardInterrupt:
        print("tupper: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as exc:
        if args.debug:
            raise
        import errno

        where = f": {exc.filename}" if exc.filename else ""
        print(f"tupper: {exc.strerror or exc}{where}", file=sys.stderr)
        if exc.errno == errno.ENOSPC:
            print("hint: the store is full: see `tupper store info`; remove containers or images you no longer need "
                  "(stop and rm keep working on a full store), or grow the pool", file=sys.stderr)
        elif exc.errno in (errno.EACCES, errno.EPERM):
            print("hint: this needs root (tupperd answers container verbs for the admin group; see docs/api.md)", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the edge: one line, traceback only with --debug
        if args.debug:
            raise
        print(f"tupper: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _exit(code: int) -> None:
    """End a client of tupperd without the interpreter's teardown (freeing every module and object:
    several ms). It holds a socket and its output, no threads and nothing for atexit: flush and go."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, a closed stream
            code = code or 1
    os._exit(code)


def _progress(args):
    from tupper.cli.ui import TerminalProgress

    return TerminalProgress(quiet=getattr(args, "json", False))


def _store(args, create: bool = True):
    from tupper.store.store import Store

    return Store.open(args.root, create=create, progress=_progress(args))


def _runtime(args):
    from tupper.runtime.runtime import Runtime

    return Runtime(_store(args))


def _backend(args):
    from tupper.cli.backends import DaemonBackend, DirectBackend

    if args.direct:
        return DirectBackend(args.root, _progress(args))
    if args.root is not None:
        raise InvalidInput("--root works with --direct only; tupperd serves the store it was started with (tupperd --root)")
    return DaemonBackend()


def _signal_number(text: str) -> int:
    import signal

    if text.isdigit():
        return int(text)
    name = text.upper() if text.upper().startswith("SIG") else f"SIG{text.upper()}"
    if name.startswith("SIGRTMIN+") and name[9:].isdigit():
        return int(signal.SIGRTMIN) + int(name[9:])
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise InvalidInput(f"--signal: unknown signal {text!r}") from None


def dispatch(args) -> int:
    cmd = args.command
    if cmd == "secret":
        from tupper.cli import secrets as cli_secrets

        return cli_secrets.dispatch(args, lambda: _store(args))
    if cmd in ("sdk", "component"):
        from tupper.cli import sdk as cli_sdk

        return cli_sdk.dispatch(args, lambda: _backend(args), lambda: _store(args))
    if cmd == "daemon":
        from tupper.daemon.tupperd import main as daemon_main

        return daemon_main(["--root", str(args.root)] if args.root else [])
    if cmd == "volume":
        return _volumes().cmd_volume(args, lambda: _runtime(args))
    if cmd == "cp":
        return _volumes().cmd_cp(args, lambda: _runtime(args))
    if cmd == "prune":
        return _volumes().cmd_prune(args, lambda: _backend(args))
    if cmd == "fleet":
        return _fleet().cmd_fleet(args)
    if cmd == "fetch":
        return _fetch().cmd_fetch(args, _store(args), _progress(args))
    if cmd == "image":
        return cmd_image(args)
    if cmd == "store":
        return cmd_store(args)
    if cmd == "logs":
        rt = _runtime(args)
        argv = rt.logs_argv(rt.record(args.name), unit=args.unit, lines=args.lines, follow=args.follow, component=args.component,
                            since=args.since, until=args.until, priority=args.priority, output=args.output)
        sys.stdout.flush()
        os.execvp(argv[0], argv)
    if cmd == "exec":
        command = args.cmd
        if not command:
            raise InvalidInput("exec: no command given (tupper exec NAME -- CMD [ARGS...])")
        env = _env_options("exec", args.env)
        sys.stdout.flush()
        if args.tty:
            return _session(args, args.name, user=args.user, argv=command, env=env, workdir=args.workdir or "/")
        return _backend(args).exec(args.name, command, env=env or None, user=args.user, workdir=args.workdir)
    if cmd == "shell":
        user, _, name = args.name.rpartition("@")
        if user and args.user and user != args.user:
            raise InvalidInput(f"shell: two users given ({user}@{name} and {args.user})")
        return _session(args, name, user=args.user or user or None, argv=args.cmd or None, env=_env_options("shell", args.env),
                        workdir=args.workdir)
    if cmd == "events":
        return cmd_events(args, _filters(args.filter, EVENT_FILTER_KEYS))
    if cmd == "run" and args.direct:
        from pathlib import Path

        from tupper import tomlfile

        tomlfile.load(Path(args.spec), "spec file")  # a bad path or bad TOML is refused before any store is opened
    backend = _backend(args)
    if cmd == "run":
        return cmd_run(args, backend)
    if cmd == "ps":
        return cmd_ps(args, backend)
    if cmd == "status":
        return cmd_status(args, backend)
    if cmd == "inspect":
        return cmd_inspect(args, backend)
    if cmd == "update":
        return cmd_update(args, backend)
    if cmd == "stats":
        return cmd_stats(args, backend)
    if cmd == "network":
        return cmd_network(args, backend)
    if cmd == "pool":
        return _pools().cmd_pool(args, backend)
    if cmd == "port":
        return cmd_port(args, backend)
    if cmd == "shutdown":
        stopped = backend.shutdown_all()
        _report(args, [{"name": name, "state": "stopped"} for name in stopped])
        return 0
    if cmd == "kill":
        signal_number = _signal_number(args.signal)
    if not getattr(args, "wait", True) and args.direct:
        raise InvalidInput(f"{cmd} --no-wait: only tupperd takes jobs; --direct does the work in this process (drop one of them)")
    wait = getattr(args, "wait", True)
    verbs = {
        "stop": lambda name: backend.stop(name, args.timeout, wait=wait),
        "start": lambda name: backend.start(name, wait=wait),
        "restart": lambda name: backend.restart(name, args.timeout, wait=wait),
        "kill": lambda name: backend.kill(name, signal_number),
        "rm": lambda name: (backend.remove(name, args.force), "removed")[1],
    }
    return _each(args, verbs[cmd])


def _env_options(verb: str, items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{verb}: -e {item}: expected KEY=VALUE")
        env[key] = value
    return env


def _session(args, name: str, *, user: str | None, argv: list[str] | None, env: dict[str, str], workdir: str | None) -> int:
    """`tupper shell` and `exec -t`: a session on a terminal inside the container, relayed to ours."""
    from tupper.cli import terminal

    rows, cols = terminal.size_of_user_terminal()
    backend = _backend(args)
    master, session = backend.open_shell(name, user=user, argv=argv, env=env or None, workdir=workdir,
                                         term=os.environ.get("TERM", ""), rows=rows, cols=cols)
    terminal.relay(master)
    return backend.shell_exit(session)


def each_name(names: list[str], verb) -> tuple[list[tuple[str, object, float]], int]:
    """`verb(name)` on each name once, in the order given: (name, what it returned, seconds) of those that
    worked; an error line for each that failed; and the worst exit code of them all."""
    done, code = [], 0
    for name in dict.fromkeys(names):
        t0 = time.monotonic()
        try:
            result = verb(name)
        except TupperError as exc:
            print(f"tupper: {exc.message}", file=sys.stderr)
            if exc.hint:
                print(f"hint: {exc.hint}", file=sys.stderr)
            code = max(code, exc.exit_code)
            continue
        done.append((name, result, time.monotonic() - t0))
    return done, code


def _each(args, verb) -> int:
    """A lifecycle verb on each named container in turn: a line (or a JSON entry) for each."""
    done, code = each_name(args.names, verb)
    if getattr(args, "wait", True):
        _report(args, [{"name": name, "state": state, "seconds": round(seconds, 3)} for name, state, seconds in done])
    else:
        _report(args, [{"name": name, "job": job} for name, job, _ in done])
    return code


def _done(args, result: dict, line: str) -> None:
    """What a verb that did one thing says: `result` as JSON on stdout with --json, else `line`."""
    if getattr(args, "json", False):
        import json

        print(json.dumps(result, indent=2))
    else:
        print(line)


def _report(args, results: list[dict]) -> None:
    if getattr(args, "json", False):
        import json

        print(json.dumps(results, indent=2))
        return
    for r in results:
        if "job" in r:
            print(f"{r['name']}: job {r['job']}")
            continue
        print(f"{r['name']}: {r['state']}" + (f" ({r['seconds']:.2f}s)" if args.command in ("stop", "start", "restart") else ""))


def cmd_network(args, backend) -> int:
    import json

    from tupper.cli.ui import table

    if args.network_command == "create":
        net = backend.network_create(args.name, args.subnet, args.ipv6)
        if args.json:
            print(json.dumps(net, indent=2))
        else:
            print(f"network {net['name']}: {net['subnet']}" + (f", {net['subnet6']}" if net["subnet6"] else "") + f" on bridge {net['bridge']}")
        return 0
    if args.network_command == "ls":
        nets = backend.network_list()
        if args.json:
            print(json.dumps(nets, indent=2))
            return 0
        table(["NAME", "SUBNET", "IPV6", "BRIDGE", "RUNNING", "CONTAINERS"],
              [[n["name"], n["subnet"], n["subnet6"] or "-", n["bridge"],
                ",".join(f"{c}={a}" for c, a in sorted(n["running"].items())) or "-", ",".join(n["containers"]) or "-"] for n in nets])
        return 0
    if args.network_command == "rm":
        backend.network_remove(args.name)
        _done(args, {"name": args.name, "state": "removed"}, f"network {args.name}: removed")
        return 0
    raise AssertionError(args.network_command)


def cmd_port(args, backend) -> int:
    import json

    rec = next((r for r in backend.list() if r["name"] == args.name), None)
    if rec is None:
        raise NotFound(f"no container {args.name!r}", hint="see `tupper ps`")
    ports = rec["network"]["ports"]
    if args.json:
        print(json.dumps(ports, indent=2))
        return 0
    for p in ports:
        host = f"[{p['address']}]" if ":" in p["address"] else (p["address"] or "0.0.0.0")
        print(f"{p['container']}/{p['protocol']} -> {host}:{p['host']}")
    return 0


def cmd_stats(args, backend) -> int:
    import json

    from tupper.cli.ui import size, table

    previous: dict[str, dict] = {}
    first = True
    try:
        while True:
            samples = backend.stats(args.names)
            for s in samples:
                _rate(s, previous.get(s["name"]))
            previous = {s["name"]: s for s in samples}
            if args.json:
                print(json.dumps(samples, indent=None if not args.no_stream else 2), flush=True)
            else:
                if not first and sys.stdout.isatty():
                    print("\033[H\033[J", end="")
                rows = []
                for s in samples:
                    rows.append(_stats_row(s["name"], s, size))
                    if args.components:
                        rows += [_stats_row(f"  {c['name']}", c, size) for c in s["components"]]
                table(["NAME", "CPU %", "MEM", "LIMIT", "PEAK", "IO READ", "IO WRITE", "PIDS", "PSI CPU", "PSI MEM", "PSI IO"], rows)
                sys.stdout.flush()
            first = False
            if args.no_stream:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _rate(sample: dict, previous: dict | None) -> None:
    """CPU % since the previous sample of the same container (and of each component), when there is one."""
    if previous is None:
        return
    before = {c["name"]: c for c in previous.get("components", [])}
    for now, then in [(sample, previous), *((c, before.get(c["name"])) for c in sample["components"])]:
        if then and now.get("cpu_ns") is not None and then.get("cpu_ns") is not None and now["at"] > then["at"]:
            now["cpu_percent"] = round(max(0.0, (now["cpu_ns"] - then["cpu_ns"]) / (now["at"] - then["at"]) / 1e7), 2)


def _stats_row(label: str, s: dict, size) -> list:
    def b(v):
        return "-" if v is None else size(v)

    def psi(kind):
        p = s.get("pressure", {}).get(kind)
        return "-" if not p or p.get("some_avg10") is None else f"{p['some_avg10']:.2f}"

    cpu = s.get("cpu_percent")
    return [label, "-" if cpu is None else f"{cpu:.1f}", b(s.get("memory")), b(s.get("memory_limit")), b(s.get("memory_peak")),
            b(s.get("io_read")), b(s.get("io_write")), "-" if s.get("pids") is None else s["pids"], psi("cpu"), psi("memory"), psi("io")]


def cmd_update(args, backend) -> int:
    import json

    from tupper.model import resources

    changes: dict[str, str] = {}
    for key in UPDATE_KEYS:
        value = getattr(args, key)
        if value is None:
            continue
        text = value.strip()
        # Checked here too, so a bad value names the option; the runtime checks the whole again.
        resources.parse_value(key, resources.from_text(text), f"--{key.replace('_', '-')}")
        changes[key] = text
    if not changes:
        raise InvalidInput("update: give at least one limit (--memory-max, --cpu-max, …)", hint="see `tupper update --help`")
    result = backend.update(args.name, args.component, changes)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    what = f"{args.name}" + (f" component {args.component}" if args.component else "")
    limits = ", ".join(f"{k}={v}" for k, v in result["resources"].items()) or "none"
    print(f"{what}: {limits} ({'applied' if result['applied'] else 'at its next start'})")
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0


def cmd_run(args, backend) -> int:
    from tupper.cli.ui import table

    if not args.wait:
        if args.direct:
            raise InvalidInput("run --no-wait: only tupperd takes jobs; --direct does the work in this process (drop one of them)")
        taken = backend.run(args.spec, args.name, args.keep_failed, _progress(args), wait=False, cold=args.cold)
        import json

        print(json.dumps(taken, indent=2) if args.json else f"job {taken['job']} runs {taken['container']}")
        return 0
    result = backend.run(args.spec, args.name, args.keep_failed, _progress(args), cold=args.cold)
    import json  # through tupperd, imported already while the container started (DaemonBackend.run)

    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['name']} is running (leader pid {result['leader_pid']}, image {result['image']}) in {result['seconds']:.2f}s")
    if net := result.get("network"):
        if net.get("address"):
            print(f"network {net['name']}: {net['address']}" + (f", {net['address6']}" if net.get("address6") else ""))
        if result.get("ports"):
            print(f"ports: {', '.join(result['ports'])}")
    table(["UNIT", "ACTIVE", "SUB", "MAIN PID"], [[u["name"], u["active_state"], u["sub_state"], u["main_pid"] or "-"] for u in result["units"]])
    return 0


def cmd_ps(args, backend) -> int:
    import json

    from tupper.cli.ui import ago, table

    listed = backend.list() + (_pools().pool_rows(backend.pool_list()) if args.all else [])
    recs = [r for r in listed if all(_matches(r, f) for f in _filters(args.filter))]
    if args.json:
        print(json.dumps(recs, indent=2))
        return 0
    table(
        ["NAME", "STATE", "HEALTH", "IMAGE", "LEADER", "STARTED", "ADDRESS", "PORTS", "COMPONENTS"],
        [[r["name"], r["state"], health_summary(r), r["image"], r["leader_pid"] or "-", ago(r["started_at"]) if "pool" not in r else "-",
          address_summary(r), ",".join(r.get("ports", ())) or "-", ",".join(c["name"] for c in r["components"]) or "-"] for r in recs],
    )
    return 0


FILTER_KEYS = ("label", "name", "state", "image")
EVENT_FILTER_KEYS = ("name", "type", "state", "component")
EVENT_TYPES = ("container", "unit", "health", "oom")


def _filters(items: list[str], keys: tuple[str, ...] = FILTER_KEYS) -> list[tuple[str, str]]:
    """`--filter KEY=VALUE` options of ps (and, with their keys, of events), checked."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in keys or not value:
            raise InvalidInput(f"--filter {item}: expected one of {', '.join(k + '=…' for k in keys)}",
                               hint="e.g. --filter name=web, --filter state=running")
        out.append((key, value))
    return out


def _event_matches(event: dict, f: tuple[str, str]) -> bool:
    """events --filter: name= is part of the container's name (as in ps), state= any state the event reports."""
    key, value = f
    if key == "name":
        return value in event["name"]
    if key == "state":
        return value in (event.get("state"), event.get("active_state"), event.get("sub_state"), event.get("health"), event.get("event"))
    return event.get(key) == value


def _matches(rec: dict, f: tuple[str, str]) -> bool:
    key, value = f
    if key == "label":
        label, sep, wanted = value.partition("=")
        labels = rec.get("labels") or {}
        return label in labels and (not sep or labels[label] == wanted)
    if key == "name":
        return value in rec["name"]
    return rec.get(key) == value


def address_summary(rec: dict) -> str:
    """The ADDRESS column: the running container's address on its network, or its mode."""
    net = rec.get("network") or {"mode": "host"}
    if net["mode"] != "private":
        return net["mode"]
    return net.get("address") or "-"


def health_summary(rec: dict) -> str:
    """The HEALTH column: the worst of its components' (unhealthy, starting, healthy), with the
    unhealthy ones named; "-" where nothing is checked (or tupperd does not check it)."""
    states = {c["name"]: c["health"]["state"] for c in rec["components"] if c.get("health")}
    if not states or rec["state"] not in ("running", "degraded"):
        return "-"
    bad = [name for name, state in states.items() if state == "unhealthy"]
    if bad:
        return f"unhealthy ({','.join(bad)})"
    return "starting" if "starting" in states.values() else "healthy"


def cmd_inspect(args, backend) -> int:
    import json

    info = backend.inspect(args.name)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    release = info.get("image_os_release") or {}
    rows = [
        ("name", info["name"]), ("state", info["state"]), ("machine", info["machine"]), ("image", f"{info['image']} ({release.get('PRETTY_NAME', '?')})"),
        ("spec", info["spec"]), ("rootfs", info["rootfs"]), ("leader", info["leader_pid"] or "-"),
        ("network", f"{info['network']['mode']}" + (f" {info['network']['name']} {info['network']['address'] or ''}".rstrip() if info["network"]["name"] else "")),
        ("labels", ", ".join(f"{k}={v}" for k, v in info["labels"].items()) or "-"),
        ("last exit", json.dumps(info["last_exit"]) if info["last_exit"] else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key + ':':{width + 1}} {value}")
    print("cgroups:")
    for hierarchy, path in info["cgroups"].items():
        print(f"  {hierarchy:10} {path}")
    print("mounts:")
    for m in info["mounts"]:
        print(f"  {m['target']:20} <- {m['source']} ({'ro' if m['read_only'] else 'rw'})")
    print("components:")
    for c in info["components"]:
        print(f"  {c['name']} {c['version']}: {', '.join(c['units'])}; " + (c["digest"] if c["digest"] else "a directory (not installed)"))
    return 0


def cmd_status(args, backend) -> int:
    import json

    from tupper.cli.ui import ago, table

    st = backend.status(args.name)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"name:     {st['name']}")
    print(f"state:    {st['state']}" + (f" (systemd: {st['system_state']})" if "system_state" in st else ""))
    print(f"leader:   {st['leader_pid'] or '-'}")
    print(f"image:    {st['image']}")
    started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(st['started_at'])) if st["started_at"] else "-"
    print(f"started:  {started} ({ago(st['started_at'])})")
    print(f"restart:  {st.get('restart_policy', 'no')}")
    if net := st.get("network"):
        where = f"{net['mode']}" + (f" on {net['name']}" if net.get("name") else "")
        addresses = ", ".join(a for a in (net.get("address"), net.get("address6")) if a)
        print(f"network:  {where}" + (f" ({addresses})" if addresses else ""))
        if st.get("ports"):
            print(f"ports:    {', '.join(st['ports'])}")
    if "exit" in st:
        print(f"exit:     status {st['exit']['returncode']}")
    if st.get("oom_kills"):
        per = ", ".join(f"{c['name']} {c['oom_kills']}" for c in st["components"] if c.get("oom_kills"))
        print(f"oom:      {st['oom_kills']} process(es) killed for lack of memory" + (f" ({per})" if per else ""))
    if st.get("resources"):
        print(f"limits:   {', '.join(f'{k}={v}' for k, v in st['resources'].items())}")
    for c in st["components"]:
        if h := c.get("health"):
            restarts = f", restarted {h['restarts']}x" if h.get("restarts") else ""
            print(f"health:   {c['name']}: {h['state']} ({h['check']}: {h['detail'] or 'not checked yet'}{restarts})")
    print()
    table(["UNIT", "ACTIVE", "SUB", "RESULT", "MAIN PID"],
          [[u["name"], u["active_state"], u["sub_state"], u["result"] or "-", u["main_pid"] or "-"] for u in st["units"]])
    return 0


def cmd_events(args, filters: list[tuple[str, str]]) -> int:
    import json

    from tupper.cli.client import Client

    for key, value in filters:
        if key == "type" and value not in EVENT_TYPES:
            raise InvalidInput(f"--filter type={value}: expected one of {', '.join(EVENT_TYPES)}")

    client = Client()

    def show(msg) -> None:
        if msg.member == "ContainerStateChanged":
            event = {"type": "container", "name": msg.body[0], "state": msg.body[1]}
        elif msg.member in ("ContainerAdded", "ContainerRemoved"):
            event = {"type": "container", "name": msg.body[0], "event": msg.member[len("Container"):].lower()}
        elif msg.member == "HealthChanged":
            event = {"type": "health", "name": msg.body[0], "component": msg.body[1], "health": msg.body[2], "detail": msg.body[3]}
        elif msg.member == "OOMKilled":
            event = {"type": "oom", "name": msg.body[0], "component": msg.body[1] or None, "oom_kills": msg.body[2],
                     "pid": msg.body[3] or None, "process": msg.body[4] or None}
        elif msg.member == "UnitStateChanged":
            from tupper.busnames import container_name

            name = container_name(msg.path)
            event = {"type": "unit", "name": name, "unit": msg.body[0], "active_state": msg.body[1], "sub_state": msg.body[2]}
        else:
            return
        if not all(_event_matches(event, f) for f in filters):
            return
        event["time"] = round(time.time(), 3)
        if args.json:
            print(json.dumps(event), flush=True)
        else:
            stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
            if event["type"] == "unit":
                print(f"{stamp}  {event['name']}  {event['unit']}: {event['active_state']}/{event['sub_state']}", flush=True)
            elif event["type"] == "health":
                print(f"{stamp}  {event['name']}  {event['component']}: {event['health']} ({event['detail']})", flush=True)
            elif event["type"] == "oom":
                where = f"component {event['component']}" if event["component"] else "container"
                who = f"{event['process']} (pid {event['pid']})" if event["process"] else "a process"
                print(f"{stamp}  {event['name']}  OOM killer killed {who} in the {where} ({event['oom_kills']} since start)", flush=True)
            else:
                print(f"{stamp}  {event['name']}  {event.get('state') or event.get('event')}", flush=True)

    client.subscribe("type='signal',sender='org.tupper1',path_namespace='/org/tupper1'", show)
    client.call("Ping", path="/org/tupper1", interface="org.freedesktop.DBus.Peer")  # start tupperd if needed
    client.wait_forever()
    return 0


def cmd_image(args) -> int:
    import json

    from tupper.cli.ui import ago, size, table
    from tupper.store.images import ImageDef, Images

    if args.image_command in ("export", "import", "key", "prune", "pin", "unpin"):
        from tupper.cli import imagecmd

        return imagecmd.dispatch(args, _store(args), _progress(args))
    if args.image_command == "build":
        definition = ImageDef.from_file(args.definition)
        store = _store(args)
        image = Images(store).build(definition, force=args.force, progress=_progress(args))
        if args.json:
            print(json.dumps(image.to_json(), indent=2))
        else:
            print(f"image {image.name}: {image.path}")
        return 0
    runtime = _runtime(args)
    if args.image_command == "ls":
        rows = runtime.list_images()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            table(["NAME", "PARENT", "SUITE", "BUILT", "SIZE", "EXCLUSIVE", "SHARED", "TREE DIGEST", "USED BY"],
                  [[r["name"], r.get("parent") or "-", r["suite"], ago(r["built_at"]),
                    *(size(r[k]) if r.get(k) is not None else "-" for k in ("size", "exclusive", "shared")),
                    (r.get("tree_digest") or "-")[:19], ",".join(r["used_by"]) or "-"] for r in rows])
        return 0
    if args.image_command == "rm":
        runtime.remove_image(args.name)
        _done(args, {"name": args.name, "state": "removed"}, f"image {args.name}: removed")
        return 0
    raise AssertionError(args.image_command)


def cmd_store(args) -> int:
    import json

    from tupper.cli.ui import size

    if args.store_command == "init":
        from tupper.store.store import Store

        store = Store.open(args.root, create=True, progress=_progress(args), backend=args.backend)
        info = store.info()
        _done(args, info, f"{info['path']}: store with the {info['backend']} backend ({info['backing']})")
        return 0
    store = _store(args)
    if args.store_command == "info":
        info = store.info()
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        print(f"path:     {info['path']}")
        print(f"backend:  {info['backend']}")
        print(f"backing:  {info['backing']}" + (f" (pool file {info['pool_file']}, {size(info['pool_file_allocated'])} allocated)" if info["pool_file"] else ""))
        print(f"device:   {info['device']}")
        print(f"size:     {size(info['size'])}")
        print(f"used:     {size(info['used'])}")
        print(f"free:     {size(info['free'])}")
        return 0
    if args.store_command == "check":
        return cmd_store_check(args, store)
    if args.store_command == "unmount":
        from tupper.runtime.runtime import Runtime

        Runtime(store).unmount_store()
        _done(args, {"root": str(store.root), "state": "unmounted"}, f"unmounted {store.root}")
        return 0
    raise AssertionError(args.store_command)


def cmd_store_check(args, store) -> int:
    import json

    from tupper.cli.ui import table
    from tupper.runtime import check
    from tupper.runtime.runtime import Runtime

    runtime = Runtime(store)
    findings = check.check(runtime)
    if args.repair:
        done = check.repair(runtime, findings)
        failed = [d for d in done if d.result != "removed" and d.result.startswith(("failed", "could not"))]
        if args.json:
            print(json.dumps([d.to_json() for d in done], indent=2))
        elif not done:
            print(f"{store.root}: consistent, nothing to repair")
        else:
            table(["KIND", "PATH", "DONE"], [[d.finding.kind, d.finding.path, d.result] for d in done])
        return 1 if failed else 0
    if args.json:
        print(json.dumps([f.to_json() for f in findings], indent=2))
    elif not findings:
        print(f"{store.root}: consistent")
    else:
        table(["KIND", "PATH", "PROBLEM", "--repair WOULD"], [[f.kind, f.path, f.detail, f.repair] for f in findings])
        print(f"\n{len(findings)} finding(s); `tupper store check --repair` fixes them")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
