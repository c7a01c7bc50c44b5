"""Secrets: encrypted at rest, delivered per container and unit by tupperd's agent, rotated, audited,
and found nowhere else: not in the store, records, journal, process list or D-Bus properties."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from helpers import write_component

FORGE = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(b"\\0forged/unit/" + sys.argv[2].encode() + b"/" + sys.argv[3].encode())
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect failed:", e.strerror)
    sys.exit(0)
print(repr(s.recv(65536)))
"""


@pytest.fixture
def secret(tupper):
    """A fresh secret name with a random value; removed afterwards."""
    made = []

    def new(value: str | None = None) -> tuple[str, str]:
        name = f"s-{uuid.uuid4().hex[:8]}"
        value = value or f"VALUE-{uuid.uuid4().hex}"
        p = tupper("secret", "set", name, input=value)
        assert p.returncode == 0, p.stderr
        made.append(name)
        return name, value

    yield new
    for name in made:
        tupper("secret", "rm", name)


def component(tmp: Path, name: str, cred: str, on_rotate: str = "restart") -> Path:
    return write_component(
        tmp / name, name,
        {f"{name}.service": (f"[Service]\nType=exec\nExecStart=/opt/{name}/bin/run\nExecReload=/bin/sh -c 'kill -HUP $MAINPID'\n"
                             f"LoadCredential={cred}\n")},
        files={"bin/run": "#!/bin/sh\ntrap 'echo reloaded' HUP\necho started\nwhile :; do sleep 0.2; done\n"},
        extra=f'secrets = ["{cred}"]\non_rotate = "{on_rotate}"\n')


def spec(tmp: Path, container: str, components: list[Path], grants: dict[str, str]) -> Path:
    lines = [f'name = "{container}"'] + [f'[[components]]\npath = "{c}"' for c in components]
    lines += ["[secrets]"] + [f'{k} = "{v}"' for k, v in grants.items()]
    path = tmp / f"{container}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def exec_out(tupper, name: str, *argv: str) -> str:
    p = tupper("exec", name, "--", *argv)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_service_reads_its_credential_0400_and_rotation_keeps_the_container(tupper, names, secret, tmp_path):
    sname, value = secret()
    c = component(tmp_path, "dbuser", "db_password")
    name = names()
    tupper("run", spec(tmp_path, name, [c], {"db_password": sname}), check=True)
    assert exec_out(tupper, name, "cat", "/run/credentials/dbuser.service/db_password") == value
    assert exec_out(tupper, name, "stat", "-c", "%a %U", "/run/credentials/dbuser.service/db_password") == "400 root\n"
    # The service itself sees it in $CREDENTIALS_DIRECTORY.
    assert exec_out(tupper, name, "sh", "-c", "tr '\\0' '\\n' < /proc/$(systemctl show -P MainPID dbuser.service)/environ "
                                              "| grep ^CREDENTIALS_DIRECTORY=") == "CREDENTIALS_DIRECTORY=/run/credentials/dbuser.service\n"
    leader = tupper.json("status", name)["leader_pid"]

    new_value = f"NEW-{uuid.uuid4().hex}"
    p = tupper("secret", "set", sname, input=new_value)
    assert p.returncode == 0, p.stderr
    assert f"{name}/dbuser.service: restart done" in p.stdout, (p.stdout, p.stderr)
    assert exec_out(tupper, name, "cat", "/run/credentials/dbuser.service/db_password") == new_value
    assert tupper.json("status", name)["leader_pid"] == leader, "the container was not restarted"

    versions = [(e["container"], e["unit"], e["credential"], e["version"], e["result"])
                for e in tupper.json("secret", "audit", sname)]
    assert versions == [(name, "dbuser.service", "db_password", 1, "delivered"), (name, "dbuser.service", "db_password", 2, "delivered")]


def test_reload_policy_refreshes_the_value_and_reloads_without_a_restart(tupper, names, secret, tmp_path):
    sname, value = secret()
    c = component(tmp_path, "reloader", "token", on_rotate="reload")
    name = names()
    tupper("run", spec(tmp_path, name, [c], {"token": sname}), check=True)
    main_pid = tupper.json("status", name)["units"][0]["main_pid"]
    new_value = f"NEW-{uuid.uuid4().hex}"
    p = tupper("secret", "set", sname, input=new_value)
    assert f"{name}/reloader.service: reload done" in p.stdout, (p.stdout, p.stderr)
    assert exec_out(tupper, name, "cat", "/run/credentials/reloader.service/token") == new_value
    assert exec_out(tupper, name, "stat", "-c", "%a", "/run/credentials/reloader.service/token") == "400\n"
    assert tupper.json("status", name)["units"][0]["main_pid"] == main_pid, "reloaded, not restarted"
    assert "reloaded" in tupper("logs", name, "-u", "reloader.service").stdout
    rotate = tupper("secret", "rotate", sname)
    assert f"{name}/reloader.service: reload done" in rotate.stdout


def test_a_container_cannot_get_another_containers_secret_nor_an_ungranted_one(tupper, names, secret, tmp_path):
    a_secret, a_value = secret()
    b_secret, b_value = secret()
    a, b = names("a"), names("b")
    tupper("run", spec(tmp_path, a, [component(tmp_path, "alpha", "a_key")], {"a_key": a_secret}), check=True)
    tupper("run", spec(tmp_path, b, [component(tmp_path, "beta", "b_key")], {"b_key": b_secret}), check=True)

    def forged(container: str, unit: str, cred: str) -> str:
        return tupper("exec", container, "--", "python3", "-c", FORGE, "/run/host/tupper/creds.sock", unit, cred).stdout.strip()

    # A asks its own agent for B's unit and credential: nothing.
    assert forged(a, "beta.service", "b_key") == "b''"
    # A process of A that is not the granted unit, claiming to be it: nothing either (its cgroup says who it is).
    assert forged(a, "alpha.service", "a_key") == "b''"
    # A cannot see B's agent at all; only its own socket is mounted in.
    listing = exec_out(tupper, a, "ls", "-A", "/run/host/tupper")
    assert listing == "creds.sock\n"
    (b_agent,) = Path("/run/tupper").glob(f"*/agents/{b}")  # the suite's store has agents of its own
    assert tupper("exec", a, "--", "ls", str(b_agent)).returncode != 0
    denied = [e for e in tupper.json("secret", "audit") if e["container"] == a and e["result"].startswith("denied")]
    assert {e["unit"] for e in denied} >= {"beta.service", "alpha.service"}
    assert all(not e["secret"] or e["secret"] == a_secret for e in tupper.json("secret", "audit") if e["container"] == a)


def test_spec_without_a_grant_or_with_a_missing_secret_is_refused_and_leaves_nothing(tupper, names, secret, tmp_path, store_root):
    c = component(tmp_path, "needy", "db_password")
    name = names()
    ungranted = spec(tmp_path, name, [c], {})
    p = tupper("run", ungranted)
    assert p.returncode == 2 and "needs credential 'db_password'" in p.stderr and "grants it no secret" in p.stderr
    missing = spec(tmp_path, name, [c], {"db_password": "no-such-secret"})
    p = tupper("run", missing)
    assert p.returncode == 2 and "secrets.db_password: no secret 'no-such-secret'" in p.stderr
    sname, _ = secret()
    extra = spec(tmp_path, name, [c], {"db_password": sname, "other": sname})
    p = tupper("run", extra)
    assert p.returncode == 2 and "secrets.other: no component of this spec declares credential 'other'" in p.stderr
    assert not (store_root / "containers" / name).exists()
    assert not list(Path("/run/tupper").glob(f"**/agents/{name}"))


def test_secret_values_appear_nowhere_but_in_the_service(tupper, bus, names, secret, tmp_path, store_root):
    sname, value = secret()
    name = names()
    tupper("run", spec(tmp_path, name, [component(tmp_path, "leaky", "db_password")], {"db_password": sname}), check=True)
    new_value = f"ROTATED-{uuid.uuid4().hex}"
    tupper("secret", "set", sname, input=new_value, check=True)
    assert exec_out(tupper, name, "cat", "/run/credentials/leaky.service/db_password") == new_value

    needles = [value.encode(), new_value.encode()]
    # The store: secrets (encrypted), the container's record, snapshot and console log, components, scratch.
    hits = subprocess.run(["grep", "-r", "-l", "-a", "-F", "-e", value, "-e", new_value,
                           str(store_root / "secrets"), str(store_root / "containers" / name), str(store_root / "tmp")],
                          capture_output=True, text=True)
    assert hits.stdout == "", f"value found in {hits.stdout}"
    # The container's journal (also what the service logged).
    journal = tupper("logs", name).stdout
    assert value not in journal and new_value not in journal
    # Every process's command line and environment on the host.
    ps = subprocess.run(["ps", "-ef", "e"], capture_output=True, text=True).stdout
    assert value not in ps and new_value not in ps
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            data = (proc_dir / "cmdline").read_bytes() + (proc_dir / "environ").read_bytes()
        except OSError:
            continue
        assert not any(n in data for n in needles), f"value in /proc/{proc_dir.name}"
    # D-Bus: every property of the manager and of the container object.
    label = "".join(c if c.isalnum() else f"_{ord(c):02x}" for c in name)
    for path, iface in (("/org/tupper1", "org.tupper1.Manager"), (f"/org/tupper1/container/{label}", "org.tupper1.Container")):
        props = subprocess.run(["busctl", f"--address={bus.address}", "--json=short", "call", "org.tupper1", path,
                                "org.freedesktop.DBus.Properties", "GetAll", "s", iface], capture_output=True, text=True)
        assert props.returncode == 0, props.stderr
        assert value not in props.stdout and new_value not in props.stdout
        assert sname in props.stdout or iface == "org.tupper1.Manager", "the container's Secrets property names it"
    holders = subprocess.run(["busctl", f"--address={bus.address}", "call", "org.tupper1", "/org/tupper1",
                              "org.tupper1.Manager", "SecretHolders"], capture_output=True, text=True).stdout
    assert f'"{name}" "db_password" "{sname}"' in holders and value not in holders
    # `secret ls` and the audit show names and versions only.
    listing = tupper("secret", "ls", "--json").stdout + tupper("secret", "audit", "--json").stdout
    assert value not in listing and new_value not in listing
    assert any(s["name"] == sname and s["version"] == 2 and f"{name}:db_password" in s["held_by"] for s in json.loads(tupper("secret", "ls", "--json").stdout))
    # At rest: 0700 directory, 0600 files, none in clear.
    d = store_root / "secrets"
    assert d.stat().st_mode & 0o777 == 0o700
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in (d / sname).iterdir())


def test_secret_set_takes_no_value_from_the_command_line(tupper, tmp_path):
    p = tupper("secret", "set", "x-cli", "the-value")
    assert p.returncode == 2  # argparse: unrecognized argument
    f = tmp_path / "v"
    f.write_text("from-a-file\n")
    name = f"s-{uuid.uuid4().hex[:8]}"
    assert tupper("secret", "set", name, "--from-file", f).returncode == 0
    try:
        assert [s["version"] for s in tupper.json("secret", "ls") if s["name"] == name] == [1]
    finally:
        tupper("secret", "rm", name)
