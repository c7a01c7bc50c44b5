"""`tupper fetch SPEC --source DIR`: bring a spec's image and installed components from a shared directory
into this store, each checked by digest (tupper.store.source; the Pacemaker agent's `source` step)."""

from __future__ import annotations

import json
from pathlib import Path

from tupper.cli.helptext import examples


def add_fetch(sub) -> None:
    f = sub.add_parser(
        "fetch", help="bring a spec's image and components from a directory of streams and packages into the store",
        description="For each installed component the spec names (name = ...) and for its image: where this store lacks it, "
                    "install DIR/NAME-VERSION.tupper or import DIR/IMAGE.timg (its parents first), checked as "
                    "`component install` and `image import` check them; where the store has it, compare its digest with "
                    "the source's and refuse a difference. Without a version, the source's newest package is the one. "
                    "Exit 2 when the source lacks something the spec needs or holds something else than this store.",
        **examples("tupper fetch /srv/specs/web.toml --source /srv/tupper",
                   "tupper fetch /srv/specs/web.toml --source /srv/tupper --dry-run --json"))
    f.add_argument("spec", help="spec file (TOML)")
    f.add_argument("--source", required=True, metavar="DIR",
                   help="directory of image streams (IMAGE.timg, from `image export`) and packages (NAME-VERSION.tupper)")
    f.add_argument("--dry-run", action="store_true", help="say what would be imported or installed; write nothing")
    f.add_argument("--require-signature", action="store_true", help="refuse image streams not signed by a key this store trusts")
    f.add_argument("--json", action="store_true", help="JSON list of {kind, name, version, digest, action}")


def cmd_fetch(args, store, progress) -> int:
    from tupper.store.imagestream import signed_bytes
    from tupper.store.source import Source
    from tupper.store.trust import Keys

    keys = Keys(store)

    def verify(header: dict, trailer: dict, where: str) -> str | None:
        return keys.verify(signed_bytes(header, str(trailer.get("payload_sha256"))), trailer.get("signature"), where,
                           require=args.require_signature)

    source = Source(store, Path(args.source).absolute(), verify=verify, progress=progress, fetch=not args.dry_run)
    brought = source.spec(Path(args.spec))
    if args.json:
        print(json.dumps([b.to_json() for b in brought], indent=2))
        return 0
    for b in brought:
        version = f" {b.version}" if b.version else ""
        print(f"{b.kind} {b.name}{version}: {b.action} ({b.digest})")
    return 0
