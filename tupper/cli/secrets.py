"""The CLI's `secret` verbs: values in from stdin or a file (never the command line), names out."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_secret(sub) -> None:
    sec = sub.add_parser("secret", help="secrets delivered to services as systemd credentials",
                         description="Secrets are stored encrypted (systemd-creds, host key) and delivered by tupperd's agent to the "
                                     "units whose spec grants them ([secrets] table), as LoadCredential= credentials.")
    s = sec.add_subparsers(dest="secret_command", metavar="ACTION", required=True)
    st = s.add_parser("set", help="store a new value (from stdin or --from-file) and rotate it into running units")
    st.add_argument("name")
    st.add_argument("--from-file", type=Path, help="read the value from this file instead of standard input")
    ls = s.add_parser("ls", help="secret names, versions, times and which containers hold them (never values)")
    ls.add_argument("--json", action="store_true")
    rm = s.add_parser("rm", help="delete a secret")
    rm.add_argument("name")
    rot = s.add_parser("rotate", help="re-deliver a secret's value to every running unit that uses it")
    rot.add_argument("name")
    au = s.add_parser("audit", help="every delivery: time, container, unit, credential, secret, version (never the value)")
    au.add_argument("name", nargs="?")
    au.add_argument("--json", action="store_true")


def dispatch(args, store_factory) -> int:
    from tupper.store.secrets import SecretStore, read_value

    cmd = args.secret_command
    store = store_factory()
    secrets = SecretStore(store)
    if cmd == "set":
        secrets.check_name(args.name)
        info = secrets.set(args.name, read_value(sys.stdin, args.from_file))
        print(f"secret {info.name}: version {info.version}")
        _rotate(args.name, quiet_if_unused=True)
        return 0
    if cmd == "rotate":
        secrets.info(args.name)
        _rotate(args.name, quiet_if_unused=False)
        return 0
    if cmd == "rm":
        secrets.remove(args.name)
        print(f"secret {args.name}: removed")
        return 0
    from tupper.cli.ui import ago, table

    if cmd == "ls":
        from tupper.runtime.runtime import Runtime

        holders: dict[str, list[str]] = {}
        for rec in Runtime(store).records():
            for cred, secret in rec.grants.items():
                holders.setdefault(secret, []).append(f"{rec.name}:{cred}")
        rows = [dict(i.to_json(), held_by=holders.get(i.name, [])) for i in secrets.list()]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            table(["NAME", "VERSION", "CREATED", "UPDATED", "HELD BY (container:credential)"],
                  [[r["name"], r["version"], ago(r["created_at"]), ago(r["updated_at"]), ", ".join(r["held_by"]) or "-"] for r in rows])
        return 0
    if cmd == "audit":
        entries = secrets.audit_entries(args.name)
        if args.json:
            print(json.dumps(entries, indent=2))
        else:
            import time

            table(["TIME", "CONTAINER", "UNIT", "CREDENTIAL", "SECRET", "VERSION", "RESULT"],
                  [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"])), e["container"], e["unit"], e["credential"],
                    e["secret"] or "-", e["version"] or "-", e["result"]] for e in entries])
        return 0
    raise AssertionError(cmd)


def _rotate(name: str, quiet_if_unused: bool) -> None:
    from tupper.cli.client import Client
    from tupper.errors import TupperError

    try:
        client = Client()
        done = client.rotate_secret(name)
    except TupperError as exc:
        print(f"note: no rotation through tupperd ({exc.message}); running units get the new value when they next start",
              file=sys.stderr)
        return
    for line in done:
        print(line)
    if not done and not quiet_if_unused:
        print(f"secret {name}: no running unit uses it")
