"""The habits users bring from podman and machinectl, through tupperd: several names per lifecycle verb,
their other names, --json, one rule for idempotence, --version, and "did you mean" for a typo."""

from __future__ import annotations

from helpers import REPO

from tupper import __version__


def test_version_and_a_misspelt_command_that_suggests_the_right_one(tupper):
    assert tupper("--version", check=True).stdout.strip() == f"tupper {__version__}"
    p = tupper("stauts", "web")
    assert p.returncode == 2
    assert p.stderr.splitlines()[0].startswith("usage: tupper")
    assert p.stderr.splitlines()[1:] == ["tupper: unknown command 'stauts'", "hint: did you mean 'stats' or 'status'?"]
    p = tupper("frobnicate")
    assert p.returncode == 2 and "tupper --help" in p.stderr


def test_lifecycle_verbs_take_several_names_other_names_and_json(tupper, names):
    a, b = names("a"), names("b")
    for name in (a, b):
        tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    # starting running containers does nothing and succeeds, as stopping stopped ones does
    started = tupper.json("start", a, b)
    assert [(r["name"], r["state"]) for r in started] == [(a, "running"), (b, "running")]
    stopped = tupper.json("poweroff", a, b)  # machinectl's name for stop
    assert [(r["name"], r["state"]) for r in stopped] == [(a, "stopped"), (b, "stopped")]
    again = tupper("stop", a, b)
    assert again.returncode == 0 and again.stdout.splitlines()[0].startswith(f"{a}: stopped")
    listed = {r["name"]: r["state"] for r in tupper.json("ls")}  # podman's name for ps
    assert listed[a] == listed[b] == "stopped"
    # one name that does not exist: the others are still done; its error is said, and the exit code is its own
    p = tupper("remove", a, "no-such-container", b)
    assert p.returncode == 2
    assert p.stdout.splitlines() == [f"{a}: removed", f"{b}: removed"]
    assert "no container 'no-such-container'" in p.stderr
    assert not {a, b} & {r["name"] for r in tupper.json("ps")}


def test_exec_with_variables_a_user_and_a_working_directory(tupper, names):
    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    p = tupper("exec", name, "-e", "GREETING=hi there", "-e", "EMPTY=", "-u", "nobody", "-w", "/tmp", "--",
               "sh", "-c", 'echo "$GREETING|$EMPTY|$(pwd)|$(id -un)"')
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "hi there||/tmp|nobody"
    for args, message in ((["-u", "no-such-user"], "-u no-such-user: no such user in container"),
                          (["-w", "/no/such/dir"], "-w /no/such/dir: no such directory in container"),
                          (["-w", "relative"], "-w relative: not an absolute path"),
                          (["-e", "1BAD=x"], "-e 1BAD=…: not a variable name"),
                          (["-e", "NOEQUALS"], "-e NOEQUALS: expected KEY=VALUE")):
        p = tupper("exec", name, *args, "--", "true")
        assert p.returncode == 2 and message in p.stderr, (args, p.stderr)
    # failed commands leave no failed unit behind: the container's systemd stays `running`, not `degraded`
    for _ in range(3):
        assert tupper("exec", name, "--", "false").returncode == 1
    assert tupper("exec", name, "--", "systemctl", "is-system-running").stdout.strip() == "running"


def test_a_read_the_user_may_not_make_says_so_never_an_empty_table(store_root):
    """As an unprivileged user: one line and exit 1, never an empty table with exit 0 or an internal error."""
    import subprocess
    import sys

    for args, says in ((["image", "ls"], "cannot read the store's images"), (["component", "ls"], "cannot read the store's components"),
                       (["secret", "ls"], "Operation not permitted"), (["logs", "no-such-container"], "Permission denied")):
        p = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-m", "tupper",
                            "--root", str(store_root), *args], capture_output=True, text=True, timeout=60, cwd="/")
        assert p.returncode == 1, (args, p.returncode, p.stdout, p.stderr)
        assert p.stdout == "" and p.stderr.startswith("tupper: ") and says in p.stderr.splitlines()[0], (args, p.stderr)
        assert "hint: " in p.stderr and "internal error" not in p.stderr and "Traceback" not in p.stderr


def test_restart_boots_the_container_again_and_starts_a_stopped_one(tupper, names):
    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    before = tupper.json("status", name)["leader_pid"]
    [r] = tupper.json("restart", name)
    assert (r["name"], r["state"]) == (name, "running")
    after = tupper.json("status", name)
    assert after["state"] == "running" and after["leader_pid"] != before
    assert [u["active_state"] for u in after["units"]] == ["active"]
    tupper("stop", name, check=True)
    assert tupper("reboot", name).returncode == 0  # machinectl's name; a stopped container is just started
    assert tupper.json("status", name)["state"] == "running"


def test_ps_filters_by_label_name_and_state(tupper, names, tmp_path):
    a, b = names("a"), names("b")
    for name, team in ((a, "payments"), (b, "search")):
        spec = tmp_path / f"{name}.toml"
        spec.write_text((REPO / "examples/hello.toml").read_text().replace("../services", str(REPO / "services"))
                        + f'\n[labels]\nteam = "{team}"\ntier = "web"\n')
        tupper("run", spec, "--name", name, check=True)
    tupper("stop", b, check=True)
    mine = {a, b}

    def listed(*filters: str) -> set[str]:
        return {r["name"] for r in tupper.json("ps", *[x for f in filters for x in ("--filter", f)])} & mine

    assert listed("label=tier") == mine
    assert listed("label=team=payments") == {a}
    assert listed("label=tier=web", "state=stopped") == {b}
    assert listed(f"name={b[-6:]}") == {b}
    assert tupper.json("status", a)["labels"] == {"team": "payments", "tier": "web"}
    p = tupper("ps", "--filter", "colour=red")
    assert p.returncode == 2 and "--filter colour=red: expected one of label=…" in p.stderr


def test_inspect_tells_everything_about_a_container(tupper, names, store_root):
    from pathlib import Path

    name = names()
    tupper("run", REPO / "examples/hello.toml", "--name", name, check=True)
    info = tupper.json("inspect", name)
    assert info["name"] == name and info["state"] == "running" and info["machine"] == name
    assert Path(info["rootfs"]).is_dir() and str(store_root) in info["rootfs"]
    assert info["cgroups"] and all(Path(d).is_dir() for d in info["cgroups"].values())
    assert {m["target"] for m in info["mounts"]} == {"/opt/hello"} and all(m["read_only"] for m in info["mounts"])
    [hello] = info["components"]
    assert hello["name"] == "hello" and hello["units"] == ["hello.service"] and hello["installed"] is False
    assert info["image_os_release"]["ID"] == "debian" and info["image_os_release"]["VERSION_ID"] == "12"
    text = tupper("inspect", name, check=True).stdout
    assert any(line.split() == ["machine:", name] for line in text.splitlines())
    assert "Debian GNU/Linux 12" in text and "/opt/hello" in text
    tupper("stop", name, check=True)
    assert tupper.json("inspect", name)["last_exit"]["returncode"] == 0
    p = tupper("inspect", "no-such-container")
    assert p.returncode == 2 and "no container 'no-such-container'" in p.stderr
