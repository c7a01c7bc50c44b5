"""The habits users bring from podman and machinectl, through tupperd: several names per lifecycle verb,
their other names, --json, one rule for idempotence, --version, and "did you mean" for a typo."""

from __future__ import annotations

from helpers import REPO

from tupper import __version__


def test_version_and_a_misspelt_command_that_suggests_the_right_one(tupper):
    assert tupper("--version", check=True).stdout.strip() == f"tupper {__version__}"
    p = tupper("stauts", "web")
    assert p.returncode == 2
    assert p.stderr.splitlines() == ["tupper: unknown command 'stauts'", "hint: did you mean 'stats' or 'status'?"]
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
