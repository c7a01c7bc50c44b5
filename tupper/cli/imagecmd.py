"""`tupper image export|import|key`: images between hosts (tupper.store.imagestream, tupper.store.trust)."""

from __future__ import annotations

import json
import sys


def add_transfer(isub, examples) -> None:
    pr = isub.add_parser("prune", help="remove the images nothing uses (no container, no layer on them, not pinned)",
                         description="Remove every image that no container was made from, no other image is a layer on, and "
                                     "that is not pinned (tupper image pin), layers before their parents. Asks on a terminal; "
                                     "--force does not ask. Reports each image and the bytes its files took.",
                         **examples("tupper image prune", "tupper image prune --force --json", "tupper image pin debian-bookworm"))
    pr.add_argument("--force", "-f", action="store_true", help="do not ask")
    pr.add_argument("--json", action="store_true", help="JSON list of {name, state, bytes}")
    for verb, what in (("pin", "keep an image from image prune"), ("unpin", "let image prune remove an image again")):
        pn = isub.add_parser(verb, help=what, **examples(f"tupper image {verb} debian-bookworm"))
        pn.add_argument("name", metavar="IMAGE")
        pn.add_argument("--json", action="store_true")
    ex = isub.add_parser("export", help="write an image as a stream (zstd btrfs send, with a header and digests) to a file or stdout",
                         description="Write IMAGE as a stream another host imports with `tupper image import`. With --parent, "
                                     "the stream is incremental: it carries only what changed since PARENT, which the other "
                                     "host must have. --sign signs it with a key of this store.",
                         **examples("tupper image export debian-bookworm -o bookworm.timg",
                                    "tupper image export web --parent debian-bookworm -o web.timg --sign release",
                                    "tupper image export debian-bookworm -o - | ssh host tupper image import -"))
    ex.add_argument("name", metavar="IMAGE")
    ex.add_argument("-o", "--output", required=True, metavar="FILE", help="the stream's file, or - for stdout")
    ex.add_argument("--parent", metavar="PARENT", help="incremental: only what differs from this image")
    ex.add_argument("--sign", metavar="KEY", help="sign with this store's private key KEY (tupper image key generate KEY)")
    ex.add_argument("--json", action="store_true", help="JSON object {header, trailer} (on stderr when the stream goes to stdout)")
    im = isub.add_parser("import", help="add an image from a stream (checked: header, digests, signature) to the store",
                         description="Receive the image a stream carries into a scratch place of the store, check its payload's "
                                     "digest, its signature and its tree's digest against the header, then publish it. A "
                                     "corrupt, truncated, forged or untrusted stream, or one whose parent is missing, is "
                                     "refused (exit 2) and leaves nothing behind.",
                         **examples("tupper image import bookworm.timg", "ssh host tupper image export web -o - | tupper image import -",
                                    "tupper image import web.timg --require-signature --json"))
    im.add_argument("file", metavar="FILE", help="the stream's file, or - for stdin")
    im.add_argument("--require-signature", action="store_true", help="refuse a stream not signed by a key in the store's trust directory")
    im.add_argument("--json", action="store_true", help="JSON object of the imported image")
    key = isub.add_parser("key", help="signing keys and the store's trust in them",
                          description="Keys sign image streams (Ed25519). A key made here is kept in <store>/keys (mode 0600) "
                                      "and trusted here; another host trusts it with `key trust` and the line `key show` prints.",
                          **examples("tupper image key generate release", "tupper image key show release > release.pub",
                                     "tupper image key trust release release.pub", "tupper image key ls --json",
                                     "tupper image key policy --require"))
    ksub = key.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    kg = ksub.add_parser("generate", help="make a key pair (private key kept in the store, public key trusted)",
                         **examples("tupper image key generate release"))
    kg.add_argument("key", metavar="NAME")
    kg.add_argument("--json", action="store_true")
    kl = ksub.add_parser("ls", help="list keys: trusted public keys and private keys of this store", **examples("tupper image key ls"))
    kl.add_argument("--json", action="store_true")
    ks = ksub.add_parser("show", help="print a key's public line (give it to `key trust` on other hosts)",
                         **examples("tupper image key show release > release.pub"))
    ks.add_argument("key", metavar="NAME")
    ks.add_argument("--json", action="store_true")
    kt = ksub.add_parser("trust", help="trust a public key (a file holding the line `key show` printed, or - for stdin)",
                         **examples("tupper image key trust release release.pub"))
    kt.add_argument("key", metavar="NAME")
    kt.add_argument("file", metavar="FILE")
    kt.add_argument("--json", action="store_true")
    kr = ksub.add_parser("rm", help="forget a key (its private and public parts)", **examples("tupper image key rm release"))
    kr.add_argument("key", metavar="NAME")
    kr.add_argument("--json", action="store_true")
    kp = ksub.add_parser("policy", help="show or set whether imports must be signed by a trusted key",
                         **examples("tupper image key policy", "tupper image key policy --require", "tupper image key policy --no-require"))
    kp.add_argument("--require", dest="require", action="store_true", default=None, help="refuse unsigned or untrusted streams")
    kp.add_argument("--no-require", dest="require", action="store_false", help="accept unsigned streams (signatures are still checked)")
    kp.add_argument("--json", action="store_true")


def dispatch(args, store, progress) -> int:
    from tupper.store.images import Images
    from tupper.store.trust import Keys

    if args.image_command in ("prune", "pin", "unpin"):
        return _prune_or_pin(args, store)
    images, keys = Images(store), Keys(store)
    if args.image_command == "export":
        return _export(args, images, keys, progress)
    if args.image_command == "import":
        return _import(args, images, keys, progress)
    return _key(args, keys)


def _export(args, images, keys, progress) -> int:
    from tupper.store import imagestream

    sign = keys.signer(args.sign) if args.sign else None
    images.get(args.name)  # a missing image is said before a file is made
    out, finish = imagestream.open_output(args.output)
    ok = False
    try:
        result = imagestream.export(images, args.name, out, parent=args.parent, sign=sign, progress=progress)
        ok = True
    finally:
        finish(ok)
    report = sys.stderr if args.output == "-" else sys.stdout
    if args.json:
        print(json.dumps(result, indent=2), file=report)
    else:
        h, t = result["header"], result["trailer"]
        kind = f"incremental from {h['parent']}" if h["parent"] else "full"
        signed = f", signed by {t['signature']['key']}" if t["signature"] else ""
        print(f"image {h['name']}: {kind} stream of {t['payload_size'] / 1e6:.1f} MB{signed} to {args.output}", file=report)
    return 0


def _import(args, images, keys, progress) -> int:
    from tupper.errors import InvalidInput
    from tupper.store import imagestream

    where = "stdin" if args.file == "-" else args.file
    if args.file == "-":
        stream = sys.stdin.buffer
    else:
        try:
            stream = open(args.file, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise InvalidInput(f"{args.file}: {exc.strerror}") from None

    def verify(header: dict, trailer: dict) -> str | None:
        return keys.verify(imagestream.signed_bytes(header, str(trailer.get("payload_sha256"))), trailer.get("signature"), where,
                    require=args.require_signature)

    try:
        image = imagestream.import_stream(images, stream, where, verify=verify, progress=progress)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    if args.json:
        print(json.dumps(image.to_json(), indent=2))
    else:
        via = f" onto {image.parent}" if image.parent else ""
        signed = f", signed by {image.signed_by}" if image.signed_by else ""
        print(f"image {image.name}: imported{via} ({image.tree_digest}{signed})")
    return 0


def _key(args, keys) -> int:
    cmd = args.key_command
    if cmd == "generate":
        result = keys.generate(args.key)
        line = f"key {result['name']} ({result['key']}): private key {result['private']}; its public line: {result['public']}"
    elif cmd == "ls":
        rows = keys.list()
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        from tupper.cli.ui import table

        table(["NAME", "KEY", "TRUSTED", "PRIVATE"], [[r["name"], r["key"] or "-", "yes" if r["trusted"] else "no",
                                                      "yes" if r["private"] else "no"] for r in rows])
        return 0
    elif cmd == "show":
        result = keys.show(args.key)
        line = result["public"]
    elif cmd == "trust":
        text = sys.stdin.read() if args.file == "-" else _read(args.file)
        result = keys.trust(args.key, text, args.file)
        line = f"key {result['name']} ({result['key']}) is trusted"
    elif cmd == "rm":
        keys.remove(args.key)
        result, line = {"name": args.key, "state": "removed"}, f"key {args.key}: removed"
    elif cmd == "policy":
        if args.require is not None:
            keys.set_policy(args.require)
        required = keys.require_signature()
        result = {"require_signature": required}
        line = "imports must be signed by a trusted key" if required else "unsigned imports are accepted (signatures are checked)"
    else:
        raise AssertionError(cmd)
    print(json.dumps(result, indent=2) if args.json else line)
    return 0


def _prune_or_pin(args, store) -> int:
    from tupper.runtime.runtime import Runtime

    runtime = Runtime(store)
    if args.image_command in ("pin", "unpin"):
        runtime.pin_image(args.name, args.image_command == "pin")
        result = {"name": args.name, "pinned": args.image_command == "pin"}
        print(json.dumps(result, indent=2) if args.json else f"image {args.name}: {args.image_command}ned")
        return 0
    victims = runtime.prunable_images()
    if victims and not args.force:
        from tupper.cli.volumes import _confirm

        _confirm(f"Remove {len(victims)} image(s) ({', '.join(victims)})?", "tupper image prune --force")
    done = runtime.prune_images(victims)
    if args.json:
        print(json.dumps(done, indent=2))
    elif not done:
        print("no image to prune: every one is used by a container or a layer, or pinned")
    else:
        for d in done:
            print(f"image {d['name']}: {d['state']}" + (f" ({d['bytes'] / 1e6:.0f} MB of files)" if d["state"] == "removed" else f": {d['why']}"))
    return 0 if all(d["state"] == "removed" for d in done) else 1


def _read(path: str) -> str:
    from tupper.errors import InvalidInput

    try:
        with open(path) as f:
            return f.read(4096)
    except OSError as exc:
        raise InvalidInput(f"{path}: {exc.strerror}") from None
