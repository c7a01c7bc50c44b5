"""The CLI's `sdk` and `component` verbs: package a service directory, install packages, upgrade live."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tupper.cli.helptext import examples as _examples
from tupper.errors import InvalidInput


def add_sdk(sub) -> None:
    sdk = sub.add_parser("sdk", help="package a service directory as a component",
                         description="Scaffold, check and build component packages (NAME-VERSION.tupper).",
                         **_examples("tupper sdk init hello", "tupper sdk check hello", "tupper sdk build hello -o dist/",
                                     "tupper component install dist/hello-0.1.0.tupper"))
    s = sdk.add_subparsers(dest="sdk_command", metavar="ACTION", required=True)
    init = s.add_parser("init", help="scaffold a working component: manifest, one unit, a program, a README",
                        **_examples("tupper sdk init hello", "tupper sdk init api --dir services/api"))
    init.add_argument("name")
    init.add_argument("--dir", type=Path, help="where (default: ./NAME)")
    check = s.add_parser("check", help="validate a component; report every problem; exit 2 if any",
                         description="Check the manifest, the units (also with systemd-analyze verify) and, where the image is "
                                     "built, the programs and unit names against it. Every problem is reported, not only the first.",
                         **_examples("tupper sdk check hello", "tupper sdk check services/web --image debian-bookworm --json"))
    check.add_argument("dir", type=Path)
    check.add_argument("--image", default="debian-bookworm", help="image to check programs and unit names against (when built)")
    check.add_argument("--json", action="store_true", help="JSON object {dir, ok, name, version, units, problems: [{where, message}]}")
    build = s.add_parser("build", help="check, then write NAME-VERSION.tupper (reproducible, with a sha256 digest)",
                         **_examples("tupper sdk build hello", "tupper sdk build hello -o dist/", "tupper sdk build hello -o dist/ --json"))
    build.add_argument("dir", type=Path)
    build.add_argument("-o", "--output", default=".", help="a directory (made if missing where it ends with /) or a file (default: .)")
    build.add_argument("--image", default="debian-bookworm", help=argparse.SUPPRESS)
    build.add_argument("--json", action="store_true", help="JSON object {path, digest, size, seconds} (problems as sdk check --json)")
    inspect = s.add_parser("inspect", help="show a package's manifest, units, files and digest (verified)",
                           **_examples("tupper sdk inspect dist/hello-0.1.0.tupper", "tupper sdk inspect dist/hello-0.1.0.tupper --json | jq .digest_ok"))
    inspect.add_argument("package", type=Path)
    inspect.add_argument("--json", action="store_true")


def add_component(sub) -> None:
    component = sub.add_parser("component", help="install, list, remove and upgrade components",
                               description="Installed components live in the store as read-only subvolumes, keyed by name and version.",
                               **_examples("tupper component install dist/hello-0.1.0.tupper", "tupper component ls",
                                           "tupper component upgrade demo hello 0.2.0", "tupper component rm hello 0.1.0"))
    c = component.add_subparsers(dest="component_command", metavar="ACTION", required=True)
    install = c.add_parser("install", help="verify a package's digest and install it",
                           **_examples("tupper component install dist/hello-0.1.0.tupper", "tupper component install dist/hello-0.1.0.tupper --json"))
    install.add_argument("package", type=Path)
    install.add_argument("--json", action="store_true", help="JSON object {name, version, path, digest, installed_at}")
    ls = c.add_parser("ls", help="list installed components", **_examples("tupper component ls", "tupper component ls --json | jq '.[].name'"))
    ls.add_argument("--json", action="store_true")
    rm = c.add_parser("rm", help="remove an installed version (refused while a container uses it)",
                      **_examples("tupper component rm hello 0.1.0", "tupper component rm hello 0.1.0 --json"))
    rm.add_argument("name")
    rm.add_argument("version")
    rm.add_argument("--json", action="store_true", help="JSON object {name, version, state}")
    up = c.add_parser("upgrade", help="swap a component of a running container for another installed version",
                      description="Replace the component's bind mount inside the running container, write its units, reload "
                                  "systemd, restart only its units and wait until they are active; roll back by itself if not.",
                      **_examples("tupper component upgrade demo hello 0.2.0", "tupper component upgrade demo hello 0.1.0 --json"))
    up.add_argument("container")
    up.add_argument("name")
    up.add_argument("version")
    up.add_argument("--json", action="store_true", help="JSON object with the container, component, version and seconds")


def _image_root(args) -> Path | None:
    """The image's rootfs for the SDK checks, if a store with it is at hand (root only)."""
    try:
        from tupper.store.images import Images
        from tupper.store.store import Store

        images = Images(Store.open(args.root, create=False))
        return images.path(args.image) if images.exists(args.image) else None
    except Exception:  # noqa: BLE001 - no store, not root: the checks against the image are skipped
        return None


def _check(args) -> tuple:
    from tupper.container import verify
    from tupper.model import sdk

    image = _image_root(args)
    component, problems = sdk.check(args.dir, image)
    if image is None:
        print(f"note: image {args.image!r} not available: programs and unit names were not checked against it", file=sys.stderr)
    if component is not None:
        if verify.available():
            root = args.dir.resolve()
            problems += [sdk.Problem(f"{args.dir / where}", what)
                         for where, what in verify.findings([root / "units" / u for u in component.units], root)]
        else:
            print("note: systemd-analyze is not installed: the units were not verified by systemd", file=sys.stderr)
    return component, problems


def dispatch(args, backend_factory, store_factory) -> int:
    if args.command == "sdk":
        return _sdk(args)
    return _component(args, backend_factory, store_factory)


def _sdk(args) -> int:
    from tupper.model import sdk
    from tupper.store import packages

    cmd = args.sdk_command
    if cmd == "init":
        d = sdk.init(args.name, args.dir or Path(args.name))
        print(f"created component {args.name} in {d}; next: tupper sdk check {d}")
        return 0
    if cmd in ("check", "build"):
        component, problems = _check(args)
        for p in problems:
            print(f"{p}", file=sys.stderr)
        if problems:
            print(f"tupper: {len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        if args.json and (problems or cmd == "check"):
            print(json.dumps({"dir": str(args.dir), "ok": not problems, "name": component.name if component else None,
                              "version": component.version if component else None, "units": list(component.units) if component else [],
                              "problems": [{"where": p.where, "message": p.message} for p in problems]}, indent=2))
        if problems:
            return 2
        if cmd == "check":
            if not args.json:
                print(f"{args.dir}: {component.name} {component.version} is fine ({len(component.units)} unit(s))")
            return 0
        t0 = time.monotonic()
        path, digest = packages.build(args.dir.resolve(), component, _output(args.output))
        built = {"path": str(path), "digest": digest, "size": path.stat().st_size, "seconds": round(time.monotonic() - t0, 3)}
        if args.json:
            print(json.dumps(built, indent=2))
        else:
            print(f"{path} {digest} ({built['size']} bytes, {built['seconds']:.2f}s)")
        return 0
    if cmd == "inspect":
        info = packages.inspect(args.package)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            from tupper.cli.ui import size, table

            print(f"component: {info['name']} {info['version']}")
            if info["description"]:
                print(f"about:     {info['description']}")
            print(f"digest:    {info['digest']} ({'verified' if info['digest_ok'] else 'MISMATCH: content is ' + info['computed_digest']})")
            print(f"units:     {', '.join(info['units'])}")
            print("\nmanifest:\n" + "".join(f"  {line}\n" for line in info["manifest"].splitlines()))
            table(["MODE", "SIZE", "PATH"], [[f"{f['mode']:o}", size(f["size"]) if f["kind"] == "file" else "-",
                                               f["path"] + (f" -> {f['target']}" if f["target"] else "")] for f in info["files"]])
        return 0 if info["digest_ok"] else 1
    raise AssertionError(cmd)


def _output(text: str) -> Path:
    """`sdk build -o`: a directory where it names one or ends with "/" (made, with its parents, as
    `mkdir -p` would), else the package file itself, in a directory that must exist."""
    out = Path(text)
    if text.endswith("/") or out.is_dir():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise InvalidInput(f"-o {text}: exists and is not a directory") from None
        except OSError as exc:
            raise InvalidInput(f"-o {text}: cannot make the directory: {exc.strerror}") from None
        return out
    if not out.parent.is_dir():
        raise InvalidInput(f"-o {text}: no directory {out.parent}", hint=f"end it with / to have it made: -o {text}/")
    return out


def _component(args, backend_factory, store_factory) -> int:
    from tupper.store.packages import Installer

    cmd = args.component_command
    if cmd == "upgrade":
        result = backend_factory().upgrade(args.container, args.name, args.version)
        if args.json:
            print(json.dumps({"container": args.container, "component": args.name, **result}, indent=2))
        else:
            print(f"{args.container}: {args.name} is now {result['version']} ({result['seconds']:.2f}s)")
        return 0
    store = store_factory()
    installer = Installer(store)
    if cmd == "install":
        installed = installer.install(args.package)
        if args.json:
            print(json.dumps(installed.to_json(), indent=2))
        else:
            print(f"installed {installed.name} {installed.version} ({installed.digest})")
        return 0
    from tupper.runtime.runtime import Runtime

    runtime = Runtime(store)
    if cmd == "ls":
        rows = runtime.list_components()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            from tupper.cli.ui import ago, table

            table(["NAME", "VERSION", "DIGEST", "INSTALLED", "USED BY"],
                  [[r["name"], r["version"], r["digest"][:19], ago(r["installed_at"]), ",".join(r["used_by"]) or "-"] for r in rows])
        return 0
    if cmd == "rm":
        runtime.remove_component(args.name, args.version)
        if args.json:
            print(json.dumps({"name": args.name, "version": args.version, "state": "removed"}, indent=2))
        else:
            print(f"removed {args.name} {args.version}")
        return 0
    raise InvalidInput(f"unknown component action {cmd}")
