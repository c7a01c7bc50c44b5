"""The CLI's `volume`, `cp` and `prune` verbs: parsers and renderers; the work is the runtime's.

`volume` and `cp` run in this process on the store (as `image` and `store` do), so they need root;
`prune` lists and removes through the usual backend (tupperd, or the runtime with --direct)."""

from __future__ import annotations

import json
import sys

from tupper.cli.helptext import examples as _examples
from tupper.errors import InvalidInput, TupperError


def _wrap(text: str) -> str:
    """A description, wrapped here: the examples' formatter keeps text as written."""
    import textwrap

    return textwrap.fill(text, width=100)


# ---- parsers -----------------------------------------------------------------------------------------


def add_volume(sub) -> None:
    vo = sub.add_parser("volume", help="create, list, inspect and remove named volumes",
                        description=_wrap("Named volumes are btrfs subvolumes in the store (<root>/volumes/NAME) that a spec binds with "
                                    "[[volumes]] source = \"NAME\"; they outlive the containers that use them. `run` creates a "
                                    "missing one. Runs in this process on the store (not through tupperd): needs root."),
                        **_examples("tupper volume create pgdata", "tupper volume ls", "tupper volume inspect pgdata --json",
                                    "tupper volume rm pgdata", "tupper volume prune --force"))
    v = vo.add_subparsers(dest="volume_command", metavar="ACTION", required=True)
    create = v.add_parser("create", help="make an empty named volume",
                          **_examples("tupper volume create pgdata", "tupper volume create pgdata --json"))
    create.add_argument("name")
    create.add_argument("--json", action="store_true", help="JSON object {name, path, created, used_by, size}")
    ls = v.add_parser("ls", aliases=["list"], help="list named volumes and the containers that use them",
                      **_examples("tupper volume ls", "tupper volume ls --json | jq '.[].name'"))
    ls.add_argument("--json", action="store_true", help="JSON list of {name, path, created, used_by}")
    inspect = v.add_parser("inspect", help="one volume: path, creation time, size, the containers that use it",
                           **_examples("tupper volume inspect pgdata", "tupper volume inspect pgdata --json | jq .size"))
    inspect.add_argument("name")
    inspect.add_argument("--json", action="store_true", help="JSON object {name, path, created, used_by, size}")
    rm = v.add_parser("rm", aliases=["remove"], help="delete named volumes and their data (refused while a container uses one)",
                      description=_wrap("Delete each named volume with its data. Refused while any container record names it, running "
                                  "or stopped: `tupper rm` those containers first."),
                      **_examples("tupper volume rm pgdata", "tupper volume rm cache1 cache2 --json"))
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.add_argument("--json", action="store_true", help="JSON list of {name, state}")
    prune = v.add_parser("prune", help="delete every named volume no container uses",
                         **_examples("tupper volume prune", "tupper volume prune --force --json"))
    prune.add_argument("--force", "-f", action="store_true", help="do not ask for confirmation")
    prune.add_argument("--json", action="store_true", help="JSON list of the names removed")


def add_cp(sub) -> None:
    cp = sub.add_parser(
        "cp", help="copy files and directories between a container and the host",
        description=_wrap("Copy a file or a directory (recursively) out of a container (NAME:PATH LOCAL) or into one "
                    "(LOCAL NAME:PATH), running or stopped. PATH is absolute and is resolved inside the container's root "
                    "as the container sees it: a symlink on the way (absolute or ../..) resolves within the root and never "
                    "reaches the host's files. Where the target is an existing directory, the copy goes into it. Symlinks "
                    "met in a tree are copied as symlinks; a PATH ending in '/' follows a last symlink to a directory. "
                    "Modes and times are kept; the copy is owned by root. Runs in this process on the store (not through "
                    "tupperd): needs root."),
        **_examples("tupper cp web:/etc/nginx/nginx.conf .", "tupper cp ./site web:/srv/www", "tupper cp web:/var/log/nginx/ logs/ --json"))
    cp.add_argument("source", metavar="SRC", help="NAME:PATH in a container, or a local path")
    cp.add_argument("dest", metavar="DEST", help="a local path, or NAME:PATH in a container")
    cp.add_argument("--json", action="store_true", help="JSON object {files, directories, symlinks, bytes, skipped}")


def add_prune(sub) -> None:
    pr = sub.add_parser(
        "prune", help="remove every stopped, failed or exited container",
        description=_wrap("Remove every container that is not running (stopped, failed, exited, crash-loop); running ones are "
                    "never touched, and named volumes are kept (see `tupper volume prune`). Asks for confirmation on a "
                    "terminal; without one, --force is needed. Exit 1 when the confirmation is declined. The space freed is not "
                    "reported: a container's snapshot shares most blocks with its image, and btrfs frees its own ones in the "
                    "background (`tupper store info` shows the free space)."),
        **_examples("tupper prune", "tupper prune --force", "tupper prune -f --json"))
    pr.add_argument("--force", "-f", action="store_true", help="do not ask for confirmation")
    pr.add_argument("--json", action="store_true", help="JSON object {removed: [names], failed: [{name, error}]}")


# ---- commands ----------------------------------------------------------------------------------------


def cmd_volume(args, runtime_factory) -> int:
    from tupper.cli.ui import ago, size, table

    cmd = {"list": "ls", "remove": "rm"}.get(args.volume_command, args.volume_command)
    runtime = runtime_factory()
    if cmd == "create":
        out = runtime.create_volume(args.name)
        print(json.dumps(out, indent=2) if args.json else f"volume {out['name']}: {out['path']}")
        return 0
    if cmd == "ls":
        rows = runtime.list_volumes()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            table(["NAME", "CREATED", "USED BY"], [[r["name"], ago(r["created"]), ",".join(r["used_by"]) or "-"] for r in rows])
        return 0
    if cmd == "inspect":
        out = runtime.inspect_volume(args.name)
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            print(f"name:     {out['name']}\npath:     {out['path']}\ncreated:  {ago(out['created'])}\nsize:     {size(out['size'])}\n"
                  f"used by:  {', '.join(out['used_by']) or '-'}")
        return 0
    if cmd == "rm":
        return _each_name(args, runtime.remove_volume, "volume")
    if cmd == "prune":
        unused = [v["name"] for v in runtime.list_volumes() if not v["used_by"]]
        if unused and not args.force:
            _confirm(f"Remove {len(unused)} volume(s) and their data ({', '.join(unused)})?", "tupper volume prune --force")
        removed = runtime.prune_volumes() if unused else []
        if args.json:
            print(json.dumps(removed))
        else:
            print("\n".join(f"volume {name}: removed" for name in removed) if removed else "no unused volumes")
        return 0
    raise AssertionError(cmd)


def _each_name(args, verb, what: str) -> int:
    from tupper.cli.main import each_name

    done, code = each_name(args.names, verb)
    if args.json:
        print(json.dumps([{"name": name, "state": "removed"} for name, _, _ in done], indent=2))
    else:
        for name, _, _ in done:
            print(f"{what} {name}: removed")
    return code


def split_location(text: str) -> tuple[str | None, str]:
    """("NAME", "/PATH") for NAME:/PATH (a valid container name, then an absolute path), else (None, text):
    a local path (write ./a:/b for a local file with a colon in its name)."""
    from tupper.model.spec import NAME_RE

    name, sep, path = text.partition(":")
    if sep and NAME_RE.fullmatch(name) and len(name) <= 64:
        if not path.startswith("/"):
            raise InvalidInput(f"cp: {text}: the path in the container must be absolute ({name}:/PATH)")
        return name, path
    return None, text


def cmd_cp(args, runtime_factory) -> int:
    from tupper.cli.ui import size

    src_name, src = split_location(args.source)
    dst_name, dst = split_location(args.dest)
    if src_name and dst_name:
        raise InvalidInput("cp: both SRC and DEST are in containers; copy out to the host, then in")
    if not src_name and not dst_name:
        raise InvalidInput("cp: neither SRC nor DEST is in a container (NAME:/PATH)", hint="tupper cp NAME:/PATH LOCAL, or tupper cp LOCAL NAME:/PATH")
    runtime = runtime_factory()
    result = runtime.copy_from(src_name, src, dst) if src_name else runtime.copy_to(dst_name, src, dst)
    for path in result.skipped:
        print(f"tupper: skipped {path} (not a file, directory or symlink, or a kernel file system)", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        counts = ((result.files, "file(s)"), (result.directories, "directory(ies)"), (result.symlinks, "symlink(s)"))
        parts = [f"{n} {what}" for n, what in counts if n] or ["nothing"]
        print(f"copied {', '.join(parts)} ({size(result.bytes)}) {args.source} -> {args.dest}")
    return 0


def cmd_prune(args, backend_factory) -> int:
    from tupper.runtime.records import prunable

    backend = backend_factory()
    victims = [r["name"] for r in backend.list() if prunable(r)]
    if victims and not args.force:
        _confirm(f"Remove {len(victims)} container(s) ({', '.join(victims)})?", "tupper prune --force")
    removed, failed, code = [], [], 0
    for name in victims:
        try:
            backend.remove(name, False)  # never --force: one that started meanwhile is refused, not killed
        except TupperError as exc:
            print(f"tupper: {exc.message}", file=sys.stderr)
            failed.append({"name": name, "error": exc.message})
            code = max(code, exc.exit_code)
            continue
        removed.append(name)
    if args.json:
        print(json.dumps({"removed": removed, "failed": failed}, indent=2))
    elif not victims:
        print("no stopped containers")
    else:
        for name in removed:
            print(f"{name}: removed")
        if removed:
            print(f"removed {len(removed)} container(s)")
    return code


def _confirm(question: str, forced: str) -> None:
    """Ask on the terminal; without one, refuse (exit 2) with the --force command as the hint."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise InvalidInput(f"{question.rstrip('?')}: no terminal to confirm on", hint=f"pass --force: {forced}")
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise Declined("nothing removed")


class Declined(TupperError):
    """The user said no: nothing was done (exit 1)."""
