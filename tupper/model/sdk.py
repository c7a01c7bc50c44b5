"""The developer SDK: scaffold a component, check it (every problem at once), build its package."""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path, PurePosixPath

import attrs

from tupper import tomlfile
from tupper.errors import InvalidInput
from tupper.model import components as comp

MAX_TOTAL_BYTES = 1 << 30  # 1 GiB of payload
MAX_FILES = 100_000
MAX_UNIT_BYTES = 1 << 20
EXEC_KEYS = ("ExecStart", "ExecStartPre", "ExecStartPost", "ExecCondition", "ExecReload", "ExecStop", "ExecStopPost")
CREDENTIAL_KEYS = ("LoadCredential", "LoadCredentialEncrypted")
SECTION_FOR = {".service": "Service", ".socket": "Socket", ".timer": "Timer", ".path": "Path", ".mount": "Mount"}
IMAGE_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


@attrs.frozen
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


# ---- init ---------------------------------------------------------------------------------------


def init(name: str, directory: Path) -> Path:
    if not comp.NAME_RE.fullmatch(name):
        raise InvalidInput(f"{name!r}: invalid component name: lowercase letters, digits, '_', '.', '-'")
    if directory.exists() and any(directory.iterdir()):
        raise InvalidInput(f"{directory}: exists and is not empty")
    (directory / "units").mkdir(parents=True, exist_ok=True)
    (directory / "bin").mkdir(exist_ok=True)
    (directory / "component.toml").write_text(
        f'name = "{name}"\nversion = "0.1.0"\ndescription = "{name}: describe what it does"\n'
        f'units = ["{name}.service"]\n# requires = ["other-component"]   # started after those are active\n'
        f'# mount = "/opt/{name}"                # where the component is bound (read-only)\n'
        f'# secrets = ["api_token"]              # credentials its units load (LoadCredential=)\n')
    (directory / "units" / f"{name}.service").write_text(
        f"[Unit]\nDescription={name}\n\n[Service]\nType=exec\nExecStart=/opt/{name}/bin/{name}\nRestart=on-failure\n")
    program = directory / "bin" / name
    program.write_text(f'#!/bin/sh\n# {name}: replace with your service. It runs from /opt/{name}, read-only.\n'
                       f'echo "{name} started"\nwhile :; do sleep 60; done\n')
    program.chmod(0o755)
    (directory / "README.md").write_text(
        f"# {name}\n\nA tupper component.\n\n- `component.toml`: name, version, units, requires, mount, secrets\n"
        f"- `units/`: its systemd units; paths in them point below the mount point (`/opt/{name}`)\n"
        f"- `bin/`: the program\n\n```sh\ntupper sdk check .\ntupper sdk build . -o dist/\n"
        f"tupper component install dist/{name}-0.1.0.tupper\n```\n")
    return directory


# ---- check --------------------------------------------------------------------------------------


def check(directory: Path, image: Path | None = None) -> tuple[comp.Component | None, list[Problem]]:
    """Every problem with the component at `directory`; `image` (a rootfs) enables the checks against
    the image's own programs and units."""
    problems: list[Problem] = []
    manifest = directory / comp.MANIFEST
    if not directory.is_dir():
        return None, [Problem(str(directory), "no such directory")]
    root = directory.resolve()
    problems += check_tree(root)
    component = None
    try:
        component = comp.load(directory, str(directory), tree=False)
    except InvalidInput as exc:
        problems.append(Problem(*_split(exc.message, str(manifest))))
    doc = _loose_manifest(manifest)
    listed: list = doc["units"] if isinstance(doc.get("units"), list) else []
    units = [u for u in listed if isinstance(u, str) and "/" not in u and u not in (".", "..")]
    name = doc.get("name") if isinstance(doc.get("name"), str) else directory.name
    mount = str(doc["mount"]) if isinstance(doc.get("mount"), str) else f"/opt/{name}"
    secrets = [s for s in doc.get("secrets", []) if isinstance(s, str)] if isinstance(doc.get("secrets"), list) else []
    for i, unit in enumerate(units):
        path = root / "units" / unit
        where = f"{manifest}: units[{i}] ({unit})"
        if not path.is_file() or path.is_symlink():
            continue  # the manifest check has reported it
        problems += check_unit(path, unit, where, root, mount, secrets, image)
    return component, _dedupe(problems)


def _split(message: str, default_where: str) -> tuple[str, str]:
    # Messages look like "FILE: key: what"; keep them whole, with the file as `where`.
    head, sep, rest = message.partition(": ")
    return (head, rest) if sep else (default_where, message)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if str(p) not in seen:
            seen.add(str(p))
            out.append(p)
    return out


def _loose_manifest(path: Path) -> dict:
    """What TOML the manifest holds, for the checks that need some of its keys ({} if unreadable).
    Only a regular file is read: a FIFO or a device would block or never end; a symlink is not followed."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return {}
    except OSError:
        return {}
    return tomlfile.load_loose(path)


def check_tree(root: Path) -> list[Problem]:
    problems: list[Problem] = []
    total, count = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) == root and d in {".git", ".hg", ".svn"})]
        for entry in dirnames + filenames:
            path = Path(dirpath) / entry
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            mode = st.st_mode
            count += 1
            if stat.S_ISLNK(mode):
                target = os.readlink(path)
                lexical = os.path.normpath(os.path.join(os.path.dirname(rel), target))
                real = Path(os.path.realpath(path))
                if os.path.isabs(target):
                    problems.append(Problem(rel, f"absolute symlink to {target}"))
                elif lexical == ".." or lexical.startswith("../") or (real != root and root not in real.parents):
                    problems.append(Problem(rel, f"symlink to {target} leaves the component directory"))
                continue
            if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
                problems.append(Problem(rel, "device node"))
            elif stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                problems.append(Problem(rel, "named pipe or socket (components hold files, directories and symlinks)"))
            if mode & (stat.S_ISUID | stat.S_ISGID):
                problems.append(Problem(rel, f"setuid/setgid bit (mode {stat.S_IMODE(mode):o})"))
            if stat.S_ISREG(mode):
                total += st.st_size
                if st.st_nlink > 1:
                    problems.append(Problem(rel, f"hard link ({st.st_nlink} names for one file): copy it instead"))
    if total > MAX_TOTAL_BYTES:
        problems.append(Problem(str(root), f"payload is {total} bytes, more than the limit of {MAX_TOTAL_BYTES}"))
    if count > MAX_FILES:
        problems.append(Problem(str(root), f"{count} files, more than the limit of {MAX_FILES}"))
    return [Problem(f"{root}/{p.where}" if not p.where.startswith("/") else p.where, p.message) for p in problems]


def parse_unit(text: str) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """A unit file's sections as (key, value) lists, and the syntax errors found."""
    sections: dict[str, list[tuple[str, str]]] = {}
    errors: list[str] = []
    current: str | None = None
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i].strip()
        i += 1
        while line.endswith("\\") and i < len(lines):  # continuation lines
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                errors.append(f"line {number}: bad section header {line!r}")
                continue
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        if current is None:
            errors.append(f"line {number}: assignment before any [Section]")
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip() or not key.strip().replace("-", "").isalnum():
            errors.append(f"line {number}: not KEY=VALUE: {line!r}")
            continue
        sections[current].append((key.strip(), value.strip()))
    return sections, errors


def check_unit(path: Path, unit: str, where: str, root: Path, mount: str, secrets: list[str], image: Path | None) -> list[Problem]:
    problems: list[Problem] = []
    if path.stat().st_size > MAX_UNIT_BYTES:
        return [Problem(where, f"unit file larger than {MAX_UNIT_BYTES} bytes")]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return [Problem(where, "not valid UTF-8")]
    sections, errors = parse_unit(text)
    problems += [Problem(where, e) for e in errors]
    suffix = PurePosixPath(unit).suffix
    wanted = SECTION_FOR.get(suffix)
    if wanted and wanted not in sections:
        problems.append(Problem(where, f"a {suffix} unit needs a [{wanted}] section"))
    settings = [(sec, k, v) for sec, items in sections.items() for k, v in items]
    if suffix == ".service" and not any(k == "ExecStart" and v for _, k, v in settings):
        problems.append(Problem(where, "no ExecStart="))
    for _section, key, value in settings:
        if key in EXEC_KEYS and value:
            problems += _check_exec(where, key, value, root, mount, image)
        if key in CREDENTIAL_KEYS and value:
            cred = value.split(":", 1)[0]
            if cred not in secrets:
                problems.append(Problem(where, f"{key}={cred}: credential {cred!r} is not declared in the manifest's secrets"))
        if key in ("SetCredential", "SetCredentialEncrypted"):
            problems.append(Problem(where, f"{key}= puts a secret's value in the unit file; declare it in secrets and let tupper deliver it"))
    if image is not None:
        for d in ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system"):
            if os.path.lexists(image / d / unit):
                problems.append(Problem(where, f"shadows the image's own /{d}/{unit}: rename the unit"))
                break
    return problems


def _check_exec(where: str, key: str, value: str, root: Path, mount: str, image: Path | None) -> list[Problem]:
    try:
        words = shlex.split(value)
    except ValueError as exc:
        return [Problem(where, f"{key}=: cannot parse: {exc}")]
    if not words:
        return []
    program = words[0].lstrip("@-:+!|")
    if not program:
        return []
    mount_path = PurePosixPath(mount)
    if program.startswith("/"):
        p = PurePosixPath(os.path.normpath(program))
        if p == mount_path or mount_path in p.parents:
            rel = p.relative_to(mount_path)
            local = root / rel
            real = Path(os.path.realpath(local))
            if real != root and root not in real.parents:
                return [Problem(where, f"{key}={program} leaves the component directory")]
            if not local.is_file():
                return [Problem(where, f"{key}={program}: no file {rel} in the component")]
            if not os.access(local, os.X_OK):
                return [Problem(where, f"{key}={program}: {rel} is not executable")]
            return []
        if image is None:
            return []
        if not os.path.lexists(f"{image}{p}"):
            return [Problem(where, f"{key}={program}: neither below the component's mount point {mount} nor in the image")]
        return []
    if "$" in program or image is None:
        return []
    if not any(os.path.lexists(f"{image}{d}/{program}") for d in IMAGE_PATH):
        return [Problem(where, f"{key}={program}: not found on the image's PATH")]
    return []
