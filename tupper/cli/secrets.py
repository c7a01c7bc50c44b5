"""The CLI's `secret` verbs: values in from stdin or a file (never the command line), names out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tupper.cli.helptext import examples as _examples


def add_secret(sub) -> None:
    sec = sub.add_parser("secret", help="secrets delivered to services as systemd credentials",
                         description="Secrets are stored encrypted (systemd-creds, host key) and delivered by tupperd's agent to the "
                                     "units whose spec grants them ([secrets] table), as LoadCredential= credentials.",
                         **_examples("tupper secret set db-password < password.txt", "tupper secret ls", "tupper secret audit db-password"))
    s = sec.add_subparsers(dest="secret_command", metavar="ACTION", required=True)
    st = s.add_parser("set", help="store a new value (from stdin or --from-file) and rotate it into running units",
                      **_examples("tupper secret set db-password < password.txt", "tupper secret set api-key --from-file key.txt --json"))
    st.add_argument("name")
    st.add_argument("--from-file", type=Path, help="read the value from this file instead of standard input")
    st.add_argument("--json", action="store_true", help="JSON object {name, version, rotated: [what was re-delivered]}")
    ls = s.add_parser("ls", help="secret names, versions, times and which containers hold them (never values)",
                      **_examples("tupper secret ls", "tupper secret ls --json | jq '.[].name'"))
    ls.add_argument("--json", action="store_true")
    rm = s.add_parser("rm", help="delete a secret", **_examples("tupper secret rm db-password", "tupper secret rm db-password --json"))
    rm.add_argument("name")
    rm.add_argument("--json", action="store_true", help="JSON object {name, state}")
    rot = s.add_parser("rotate", help="re-deliver a secret's value to every running unit that uses it",
                       **_examples("tupper secret rotate db-password", "tupper secret rotate db-password --json"))
    rot.add_argument("name")
    rot.add_argument("--json", action="store_true", help="JSON object {name, rotated: [what was re-delivered]}")
    au = s.add_parser("audit", help="every delivery: time, container, unit, credential, secret, version (never the value)",
                      **_examples("tupper secret audit", "tupper secret audit db-password --json"))
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
        if not args.json:
            print(f"secret {info.name}: version {info.version}")
        rotated = _rotate(args.name, quiet_if_unused=True, show=not args.json)
        if args.json:
            print(json.dumps({"name": info.name, "version": info.version, "rotated": rotated}, indent=2))
        return 0
    if cmd == "rotate":
        secrets.info(args.name)
        rotated = _rotate(args.name, quiet_if_unused=False, show=not args.json)
        if args.json:
            print(json.dumps({"name": args.name, "rotated": rotated}, indent=2))
        return 0
    if cmd == "rm":
        secrets.remove(args.name)
        print(json.dumps({"name": args.name, "state": "removed"}, indent=2) if args.json else f"secret {args.name}: removed")
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


def _rotate(name: str, quiet_if_unused: bool, show: bool = True) -> list[str]:
    """Have tupperd re-deliver the secret; what it did, one line each (printed unless not `show`)."""
    from tupper.cli.client import Client
    from tupper.errors import TupperError

    try:
        client = Client()
        done = client.rotate_secret(name)
    except TupperError as exc:
        print(f"note: no rotation through tupperd ({exc.message}); running units get the new value when they next start",
              file=sys.stderr)
        return []
    if show:
        for line in done:
            print(line)
        if not done and not quiet_if_unused:
            print(f"secret {name}: no running unit uses it")
    return list(done)
