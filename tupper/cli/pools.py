"""The CLI's `pool` verbs (warm pools, docs/pools.md): parsers and renderers; the work is the runtime's,
through tupperd (which refills pools in the background) or, with --direct, in this process."""

from __future__ import annotations

import argparse
import json
import sys

from tupper.cli.helptext import examples as _examples


def _size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_pool(sub) -> None:
    po = sub.add_parser(
        "pool", help="keep containers of an image booted, for runs that start in milliseconds",
        description="A warm pool keeps SIZE containers of an image booted (systemd running, no components). `tupper run` "
                    "of a spec with that image takes one, binds its components and starts its units in it, instead of "
                    "booting a new container; tupperd then boots a replacement in the background. Specs that need "
                    "something only a boot can give (volumes, another network) boot cold (docs/pools.md). The sizes "
                    "are kept in <store>/tupperd.toml ([pool] IMAGE = SIZE).",
        **_examples("tupper pool set debian-bookworm --size 4", "tupper pool ls", "tupper pool ls --json | jq '.[].ready'",
                    "tupper pool rm debian-bookworm"))
    p = po.add_subparsers(dest="pool_command", metavar="ACTION", required=True)
    st = p.add_parser("set", help="keep SIZE ready containers of IMAGE (0 empties the pool)",
                      description="Set the size of IMAGE's pool. tupperd boots the containers in the background, one at a "
                                  "time (with --direct they are booted now, in this process).",
                      **_examples("tupper pool set debian-bookworm --size 2", "tupper pool set debian-bookworm --size 0"))
    st.add_argument("image")
    st.add_argument("--size", type=_size, required=True, help="how many ready containers to keep")
    st.add_argument("--json", action="store_true", help="the pool as JSON {image, size, ready, booting, age, containers}")
    ls = p.add_parser("ls", aliases=["list"], help="each pool's size, ready containers and age",
                      **_examples("tupper pool ls", "tupper pool ls --json"))
    ls.add_argument("--json", action="store_true", help="JSON list of {image, size, ready, booting, age, containers: [{name, state, age}]}")
    rm = p.add_parser("rm", aliases=["remove"], help="drain a pool: remove its containers and forget its size",
                      **_examples("tupper pool rm debian-bookworm", "tupper pool rm debian-bookworm --json"))
    rm.add_argument("image")
    rm.add_argument("--json", action="store_true", help="JSON object {image, removed: [names]}")


def cmd_pool(args, backend) -> int:
    from tupper.cli.ui import table

    cmd = {"list": "ls", "remove": "rm"}.get(args.pool_command, args.pool_command)
    if cmd == "set":
        view = backend.pool_set(args.image, args.size)
        if args.json:
            print(json.dumps(view, indent=2))
        else:
            print(f"pool {view['image']}: size {view['size']}, {view['ready']} ready" +
                  (f", {view['booting']} booting" if view.get("booting") else ""))
        return 0
    if cmd == "ls":
        views = backend.pool_list()
        if args.json:
            print(json.dumps(views, indent=2))
            return 0
        table(["IMAGE", "SIZE", "READY", "BOOTING", "AGE", "CONTAINERS"],
              [[v["image"], v["size"], v["ready"], v.get("booting", 0), _age(v.get("age")),
                ",".join(c["name"] for c in v.get("containers", [])) or "-"] for v in views])
        return 0
    if cmd == "rm":
        removed = backend.pool_remove(args.image)
        if args.json:
            print(json.dumps({"image": args.image, "removed": removed}, indent=2))
        else:
            print(f"pool {args.image}: removed" + (f" ({len(removed)} container(s): {', '.join(removed)})" if removed else ""))
        return 0
    print(f"tupper pool: unknown action {args.pool_command}", file=sys.stderr)
    return 2


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def pool_rows(views: list[dict]) -> list[dict]:
    """`ps --all`: the pools' containers as rows beside the containers (state ready or booting)."""
    return [{"name": c["name"], "state": c["state"], "image": v["image"], "pool": v["image"], "leader_pid": None,
             "started_at": None, "age": c["age"], "components": [], "labels": {}, "network": {"mode": "private"}}
            for v in views for c in v.get("containers", [])]
