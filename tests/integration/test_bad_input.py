"""Bad input to the real CLI: exit code 2, one short line naming the file and key, no traceback, nothing left behind."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import SERVICES, system_snapshot, write_component, write_spec

UNIT = "[Service]\nType=exec\nExecStart=/bin/sleep infinity\n"


def assert_refused(p, *fragments: str) -> str:
    """Exit 2 with a short message whose first line is `tupper: ...` and holds every fragment."""
    assert p.returncode == 2, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    lines = p.stderr.splitlines()
    assert lines, "an error message is expected on stderr"
    assert lines[0].startswith("tupper: "), p.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert len(lines) <= 3, f"the message should be short:\n{p.stderr}"
    assert "Traceback" not in p.stderr + p.stdout
    return lines[0]


# ---- bad specs: each case writes its files into tmp_path and says which file and key the error names ----


def malformed_toml(tmp: Path, name: str):
    spec = tmp / "spec.toml"
    spec.write_text(f'name = "{name}"\nimage = \n')
    return spec, [str(spec), "malformed TOML", "line 2"]


def unknown_key(tmp: Path, name: str):
    spec = write_spec(tmp / "spec.toml", [SERVICES / "hello"], name=name, extra="[stop]\ntimout = 3\n")
    return spec, [str(spec), "stop.timout: unknown key", "did you mean 'timeout'?"]


def wrong_type(tmp: Path, name: str):
    spec = write_spec(tmp / "spec.toml", [SERVICES / "hello"], name=name, extra='[start]\ntimeout = "30"\n')
    return spec, [str(spec), "start.timeout: expected an integer or a number, got a string ('30')"]


def bool_for_number(tmp: Path, name: str):
    spec = write_spec(tmp / "spec.toml", [SERVICES / "hello"], name=name, extra="[stop]\ntimeout = true\n")
    return spec, [str(spec), "stop.timeout: expected an integer or a number, got a boolean"]


def missing_image(tmp: Path, name: str):
    spec = tmp / "spec.toml"
    spec.write_text(f'name = "{name}"\nimage = "no-such-image"\n[[components]]\npath = "{SERVICES / "hello"}"\n')
    return spec, [str(spec), "image: no image 'no-such-image'"]


def missing_component_dir(tmp: Path, name: str):
    spec = write_spec(tmp / "spec.toml", [SERVICES / "hello", tmp / "nowhere"], name=name)
    return spec, [str(spec), "components[1].path: no such directory"]


def dir_without_manifest(tmp: Path, name: str):
    (tmp / "empty").mkdir()
    spec = write_spec(tmp / "spec.toml", ["empty"], name=name)  # relative to the spec
    return spec, [str(spec), "components[0].path:", "has no component.toml"]


def missing_unit_file(tmp: Path, name: str):
    c = write_component(tmp / "c", "c", {"c.service": UNIT, "gone.service": UNIT})
    (c / "units" / "gone.service").unlink()
    return write_spec(tmp / "spec.toml", [c], name=name), [str(c / "component.toml"), "units[1]: missing unit file units/gone.service"]


def same_unit_twice(tmp: Path, name: str):
    a = write_component(tmp / "a", "a", {"shared.service": UNIT})
    b = write_component(tmp / "b", "b", {"shared.service": UNIT})
    spec = write_spec(tmp / "spec.toml", [a, b], name=name)
    return spec, [str(spec), "components[1]: unit shared.service is provided by both 'a' and 'b'"]


def requires_unknown(tmp: Path, name: str):
    app = write_component(tmp / "app", "app", {"app.service": UNIT}, requires=["db"])
    spec = write_spec(tmp / "spec.toml", [app], name=name)
    return spec, [str(app / "component.toml"), "requires[0]: no component 'db' in", str(spec)]


def requires_cycle(tmp: Path, name: str):
    a = write_component(tmp / "a", "a", {"a.service": UNIT}, requires=["b"])
    b = write_component(tmp / "b", "b", {"b.service": UNIT}, requires=["a"])
    spec = write_spec(tmp / "spec.toml", [a, b], name=name)
    return spec, [str(spec), "components: requires cycle: a -> b -> a"]


def bad_name_characters(tmp: Path, name: str):
    bad = name.replace("-", "_") + "!"
    spec = write_spec(tmp / "spec.toml", [SERVICES / "hello"], name=bad)
    return spec, [str(spec), f"name: invalid container name {bad!r}"]


def space_in_file_stem(tmp: Path, name: str):
    """Without a name key the file's stem is the name, and must be a valid one."""
    spec = write_spec(tmp / f"{name} x.toml", [SERVICES / "hello"])
    return spec, [str(spec), "name (from the file name): invalid container name"]


def unit_path_with_dotdot(tmp: Path, name: str):
    c = write_component(tmp / "c", "c", {"c.service": UNIT})
    (tmp / "evil.service").write_text(UNIT)
    (c / "component.toml").write_text('name = "c"\nversion = "1"\nunits = ["../../evil.service"]\n')
    return write_spec(tmp / "spec.toml", [c], name=name), [str(c / "component.toml"), "units[0]: '../../evil.service' is not a unit file name"]


def unit_absolute_path(tmp: Path, name: str):
    c = write_component(tmp / "c", "c", {"c.service": UNIT})
    (c / "component.toml").write_text('name = "c"\nversion = "1"\nunits = ["/lib/systemd/system/ssh.service"]\n')
    return write_spec(tmp / "spec.toml", [c], name=name), [str(c / "component.toml"), "units[0]: '/lib/systemd/system/ssh.service' is not a unit file name"]


def unit_symlink_pointing_out(tmp: Path, name: str):
    (tmp / "outside.service").write_text(UNIT)
    c = write_component(tmp / "c", "c", {"c.service": UNIT})
    (c / "units" / "c.service").unlink()
    (c / "units" / "c.service").symlink_to("../../outside.service")
    return write_spec(tmp / "spec.toml", [c], name=name), [str(c / "component.toml"), "units/c.service: symlink to ../../outside.service leaves the component directory"]


def payload_absolute_symlink(tmp: Path, name: str):
    c = write_component(tmp / "c", "c", {"c.service": UNIT}, files={"bin/run": "#!/bin/sh\n"})
    (c / "bin" / "passwd").symlink_to("/etc/shadow")
    return write_spec(tmp / "spec.toml", [c], name=name), [str(c / "component.toml"), "bin/passwd: absolute symlink to /etc/shadow"]


def payload_symlink_climbing_out(tmp: Path, name: str):
    (tmp / "secret").mkdir()
    c = write_component(tmp / "c", "c", {"c.service": UNIT})
    (c / "data").symlink_to("../secret")
    return write_spec(tmp / "spec.toml", [c], name=name), [str(c / "component.toml"), "data: symlink to ../secret leaves the component directory"]


def mount_with_dotdot(tmp: Path, name: str):
    c = write_component(tmp / "c", "c", {"c.service": UNIT}, extra='mount = "/opt/../etc"\n')
    return write_spec(tmp / "spec.toml", [c], name=name), [str(c / "component.toml"), "mount: '/opt/../etc' must not contain '..'"]


def mount_on_system_dir(tmp: Path, name: str):
    c = write_component(tmp / "c", "c", {"c.service": UNIT}, extra='mount = "/etc"\n')
    return write_spec(tmp / "spec.toml", [c], name=name), [str(c / "component.toml"), "mount: '/etc' is a system directory"]


def mount_through_image_symlink(tmp: Path, name: str):
    """/var/run is an absolute symlink to /run in the image: a mount point made through it would land on the host."""
    c = write_component(tmp / "c", "c", {"c.service": UNIT}, extra=f'mount = "/var/run/{name}"\n')
    return write_spec(tmp / "spec.toml", [c], name=name), [str(c / "component.toml"), f"mount: '/var/run/{name}' is a system directory"]


def negative_memory(tmp: Path, name: str):
    spec = write_spec(tmp / "spec.toml", [SERVICES / "hello"], name=name, extra="[resources]\nmemory_max = -1\n")
    return spec, [str(spec), "resources.memory_max: a size cannot be negative"]


def unparseable_cpu(tmp: Path, name: str):
    spec = write_spec(tmp / "spec.toml", [SERVICES / "hello"], name=name, extra='[resources]\ncpu_max = "1.5 CPUs"\n')
    return spec, [str(spec), "resources.cpu_max: not a CPU share: '1.5 CPUs'"]


def low_above_high(tmp: Path, name: str):
    spec = write_spec(tmp / "spec.toml", [SERVICES / "hello"], name=name, extra='[resources]\nmemory_low = "2G"\nmemory_high = "1G"\n')
    return spec, [str(spec), "resources.memory_low: 2G is above memory_high (1G)"]


def component_weight_out_of_range(tmp: Path, name: str):
    spec = tmp / "spec.toml"
    spec.write_text(f'name = "{name}"\n[[components]]\npath = "{SERVICES / "hello"}"\n[components.resources]\nio_weight = 0\n')
    return spec, [str(spec), "components[0].resources.io_weight: must be between 1 and 10000"]


def misspelt_resource(tmp: Path, name: str):
    spec = write_spec(tmp / "spec.toml", [SERVICES / "hello"], name=name, extra="[resources]\npids_maximum = 5\n")
    return spec, [str(spec), "resources.pids_maximum: unknown key (did you mean 'pids_max'?)"]


def _checked(tmp: Path, health: str) -> Path:
    return write_component(tmp / "checked", "checked", {"checked.service": UNIT}, extra=f"[health]\n{health}")


def health_two_checks(tmp: Path, name: str):
    c = _checked(tmp, 'tcp = 80\nhttp = "http://127.0.0.1/"\n')
    return write_spec(tmp / "spec.toml", [c], name=name), [str(c / "component.toml"), "health: give one check, not http and tcp"]


def health_https(tmp: Path, name: str):
    c = _checked(tmp, 'http = "https://127.0.0.1/"\n')
    return write_spec(tmp / "spec.toml", [c], name=name), [str(c / "component.toml"), "health.http: 'https://127.0.0.1/' is not an http:// URL"]


def health_hostname(tmp: Path, name: str):
    c = _checked(tmp, 'tcp = "db.example:5432"\n')
    return write_spec(tmp / "spec.toml", [c], name=name), [str(c / "component.toml"), "health.tcp: 'db.example' is not an IP address"]


def health_bad_interval(tmp: Path, name: str):
    c = _checked(tmp, 'tcp = 80\ninterval = "soon"\n')
    return write_spec(tmp / "spec.toml", [c], name=name), [str(c / "component.toml"), "health.interval: not a duration: 'soon'"]


def health_timeout_above_interval(tmp: Path, name: str):
    c = _checked(tmp, 'tcp = 80\ninterval = "1s"\ntimeout = 5\n')
    return write_spec(tmp / "spec.toml", [c], name=name), [str(c / "component.toml"), "health.timeout: 5s is longer than the interval (1s)"]


def health_negative_retries(tmp: Path, name: str):
    c = _checked(tmp, "tcp = 80\nretries = -1\n")
    return write_spec(tmp / "spec.toml", [c], name=name), [str(c / "component.toml"), "health.retries: -1 is out of range (1-100)"]


def health_port_from_a_bad_env(tmp: Path, name: str):
    c = _checked(tmp, 'tcp = "${PORT:-8080}"\n')
    spec = tmp / "spec.toml"
    spec.write_text(f'name = "{name}"\n[[components]]\npath = "{c}"\n[components.env]\nPORT = "99999"\n')
    return spec, [str(spec), "components[0].env", "port 99999 is out of range"]


def network_bad_mode(tmp: Path, name: str):
    spec = write_spec(tmp / "spec.toml", [SERVICES / "hello"], name=name, extra='[network]\nmode = "bridge"\n')
    return spec, [str(spec), "network.mode: must be one of private, host, none, got 'bridge'"]


def network_ports_in_host_mode(tmp: Path, name: str):
    spec = write_spec(tmp / "spec.toml", [SERVICES / "hello"], name=name, extra='[network]\nmode = "host"\n[[network.ports]]\nhost = 8080\n')
    return spec, [str(spec), 'network.ports: publishing ports needs mode = "private"']


def network_that_does_not_exist(tmp: Path, name: str):
    spec = write_spec(tmp / "spec.toml", [SERVICES / "hello"], name=name, extra='[network]\nnetwork = "nosuchnet"\n')
    return spec, [str(spec), "network.network: no network 'nosuchnet'"]


def network_port_out_of_range(tmp: Path, name: str):
    spec = write_spec(tmp / "spec.toml", [SERVICES / "hello"], name=name, extra="[network]\n[[network.ports]]\nhost = 70000\n")
    return spec, [str(spec), "network.ports[0].host: port 70000 is out of range (1-65535)"]


CASES: list[Callable] = [
    malformed_toml, unknown_key, wrong_type, bool_for_number, missing_image, missing_component_dir, dir_without_manifest,
    missing_unit_file, same_unit_twice, requires_unknown, requires_cycle, bad_name_characters, space_in_file_stem,
    unit_path_with_dotdot, unit_absolute_path, unit_symlink_pointing_out, payload_absolute_symlink,
    payload_symlink_climbing_out, mount_with_dotdot, mount_on_system_dir, mount_through_image_symlink,
    negative_memory, unparseable_cpu, low_above_high, component_weight_out_of_range, misspelt_resource,
    health_two_checks, health_https, health_hostname, health_bad_interval, health_timeout_above_interval,
    health_negative_retries, health_port_from_a_bad_env, network_bad_mode, network_ports_in_host_mode,
    network_that_does_not_exist, network_port_out_of_range,
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_run_refuses_bad_spec_with_exit_2_naming_file_and_key_and_leaves_nothing(tupper, names, store_root, tmp_path, case):
    name = names()
    spec, fragments = case(tmp_path, name)
    # Names a case derives from `name` ('_' for '-') still contain its unique hex tail; filtering by it keeps
    # other work on the machine (other tests running at the same time) out of the comparison.
    token = name.rsplit("-", 1)[1]
    before = system_snapshot(store_root, only=token)
    p = tupper("run", spec)
    assert_refused(p, *fragments)
    assert system_snapshot(store_root, only=token) == before
    assert not (store_root / "containers" / name).exists()
    assert not any(token in c for c in os.listdir(store_root / "containers"))
    assert not Path("/run", name).exists(), "nothing may be created on the host outside the store"


def test_run_refuses_bad_name_option(tupper, names, store_root, tmp_path):
    name = names()
    spec = write_spec(tmp_path / "spec.toml", [SERVICES / "hello"], name=name)
    before = system_snapshot(store_root, only=name)
    p = tupper("run", spec, "--name", "bad name")
    assert_refused(p, "--name: invalid container name 'bad name'")
    assert system_snapshot(store_root, only=name) == before
    assert not (store_root / "containers" / name).exists()


def test_run_refuses_missing_spec_file(tupper, tmp_path):
    p = tupper("run", tmp_path / "nope.toml")
    assert_refused(p, f"{tmp_path / 'nope.toml'}: no such spec file")


def test_run_refuses_a_name_already_in_use_and_leaves_the_running_container_alone(tupper, names, store_root, tmp_path):
    name = names()
    first = write_spec(tmp_path / "first.toml", [SERVICES / "hello"], name=name)
    tupper("run", first, check=True)
    running = tupper.json("status", name)
    assert running["state"] == "running"

    # The second spec is valid on its own (a spec-relative component path) and only its name collides.
    (tmp_path / "second").mkdir()
    second = write_spec(tmp_path / "second" / "spec.toml", [os.path.relpath(SERVICES / "web", tmp_path / "second")], name=name)
    before = system_snapshot(store_root, only=name)
    record = (store_root / "containers" / name / "record.json").read_text()
    p = tupper("run", second)
    assert_refused(p, f"{second}: name: a container named {name!r} already exists")
    assert system_snapshot(store_root, only=name) == before
    assert (store_root / "containers" / name / "record.json").read_text() == record
    after = tupper.json("status", name)
    assert after["state"] == "running"
    assert after["leader_pid"] == running["leader_pid"]
    assert [u["name"] for u in after["units"]] == ["hello.service"]


# ---- the command line itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["run"], ["status"], ["image"], ["image", "build"], ["stop", "--timeout", "soon", "x"], ["logs", "x", "-n", "many"]],
    ids=["nothing", "unknown-subcommand", "run-without-spec", "status-without-name", "image-without-action",
         "image-build-without-file", "non-numeric-timeout", "non-numeric-lines"],
)  # fmt: skip
def test_usage_errors_exit_2_with_usage_and_no_traceback(tupper, argv):
    p = tupper(*argv)
    assert p.returncode == 2, p.stderr
    assert "usage: tupper" in p.stderr
    assert "Traceback" not in p.stderr


def test_status_of_unknown_container_exits_2_not_found(tupper):
    p = tupper("status", "no-such")
    assert_refused(p, "no container 'no-such'")


@pytest.mark.parametrize("verb", ["stop", "kill", "rm", "logs"])
def test_verbs_on_unknown_container_exit_2_not_found(tupper, verb):
    p = tupper(verb, "no-such-container")
    assert_refused(p, "no container 'no-such-container'")


def test_status_with_an_invalid_name_exits_2(tupper):
    p = tupper("status", "../etc")
    assert_refused(p, "invalid container name '../etc'")


@pytest.mark.parametrize("rest", [[], ["--"]], ids=["no-command", "empty-after-dashes"])
def test_exec_without_a_command_exits_2(tupper, rest):
    p = tupper("exec", "some-container", *rest)
    assert_refused(p, "exec: no command given")
