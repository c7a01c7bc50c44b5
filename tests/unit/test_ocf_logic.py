"""The OCF resource agent's logic (tupper/cli/ocf.py): what tupper's states mean to Pacemaker, the
parameters, the meta-data, and start/stop/monitor against a stand-in for the tupper CLI (the real one,
under ocf-tester and a real tupperd: tests/integration/test_ocf.py)."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tupper.cli import ocf
from tupper.cli.ocf import Agent, Cli, OcfCode
from tupper.errors import Exists, NotFound

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples/hello.toml"


@pytest.mark.parametrize(("state", "code"), [
    (None, OcfCode.NOT_RUNNING),
    ("stopped", OcfCode.NOT_RUNNING),
    ("exited", OcfCode.NOT_RUNNING),
    ("created", OcfCode.NOT_RUNNING),
    ("running", OcfCode.SUCCESS),
    ("starting", OcfCode.SUCCESS),
    ("degraded", OcfCode.ERR_GENERIC),
    ("failed", OcfCode.ERR_GENERIC),
    ("crash-loop", OcfCode.ERR_GENERIC),
    ("stopping", OcfCode.ERR_GENERIC),
])
def test_tuppers_states_mean_to_pacemaker(state, code):
    verdict = ocf.monitor_verdict(state, "failed unit(s): web.service" if state == "degraded" else "")
    assert verdict.code == code
    if code == OcfCode.ERR_GENERIC:
        assert state in verdict.reason  # what crm_mon shows as the failure's exit reason
    if state == "degraded":
        assert "web.service" in verdict.reason


def test_the_container_name_is_the_parameter_else_the_instance_without_colons():
    assert ocf.container_name({"OCF_RESKEY_name": "db", "OCF_RESOURCE_INSTANCE": "x"}) == "db"
    assert ocf.container_name({"OCF_RESOURCE_INSTANCE": "web:1"}) == "web-1"


def test_the_stop_timeout_is_the_parameter_else_pacemakers_less_a_margin():
    assert ocf.stop_timeout({"OCF_RESKEY_stop_timeout": "5"}) == 5.0
    assert ocf.stop_timeout({"OCF_RESKEY_CRM_meta_timeout": "90000"}) == 80.0
    assert ocf.stop_timeout({"OCF_RESKEY_CRM_meta_timeout": "12000"}) == 10.0  # at least 10 s
    assert ocf.stop_timeout({}) == ocf.DEFAULT_STOP_TIMEOUT


def test_a_monitor_with_no_interval_is_a_probe():
    assert ocf.is_probe({"__OCF_ACTION": "monitor", "OCF_RESKEY_CRM_meta_interval": "0"})
    assert ocf.is_probe({"__OCF_ACTION": "monitor"})
    assert not ocf.is_probe({"__OCF_ACTION": "monitor", "OCF_RESKEY_CRM_meta_interval": "10000"})


def test_meta_data_names_every_parameter_and_action_in_ocf_1_0_order():
    text = ocf.meta_data()
    assert '<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">' in text
    root = ET.fromstring(text.split("\n", 2)[2])  # past the declaration and the doctype
    assert root.tag == "resource-agent" and root.get("name") == "container"
    assert [c.tag for c in root] == ["version", "longdesc", "shortdesc", "parameters", "actions"]  # the DTD's order
    params = {p.get("name"): p for p in root.find("parameters")}
    assert set(params) == {"spec", "components", "image", "name", "stop_timeout", "source", "spec_digest", "root", "direct"}
    assert params["spec"].get("required") == "0"  # spec or components
    for p in params.values():
        assert [c.tag for c in p] == ["longdesc", "shortdesc", "content"]
    actions = {a.get("name"): a for a in root.find("actions")}
    assert set(actions) == {"start", "stop", "monitor", "validate-all", "meta-data"}
    assert all(a.get("timeout") for a in actions.values())


class FakeTupper:
    """The tupper CLI as the agent calls it, over a dict of container states."""

    def __init__(self, containers: dict[str, str] | None = None, run_fails: bool = False, stop_fails: bool = False,
                 store: str = "complete", fetch_code: int = 0) -> None:
        self.containers = dict(containers or {})
        self.run_fails, self.stop_fails = run_fails, stop_fails
        # the node's store against the spec and the source: complete, lacking (the source has the rest),
        # missing (neither has it), differs (another component of that version here)
        self.store, self.fetch_code = store, fetch_code
        self.calls: list[list[str]] = []
        self.looks: list[tuple[Path, Path | None]] = []

    def look(self, spec: Path, source: Path | None, root: str | None) -> bool:
        self.looks.append((spec, source))
        if self.store == "missing" or (self.store == "lacking" and source is None):
            raise NotFound("components[0].name: component db 1.0 is not installed here")
        if self.store == "differs":
            raise Exists("component db 1.0 in this store (sha256:a) is not the one in /srv/tupper/db-1.0.tupper (sha256:b)")
        return self.store == "lacking"

    def __call__(self, argv: list[str], timeout: float | None) -> subprocess.CompletedProcess:
        args = argv[3:]  # past python -m tupper
        self.calls.append(args)
        verb = args[0]
        name = args[-1] if verb == "rm" else args[1]  # rm --force NAME; status NAME --json; stop NAME --timeout T

        def done(code: int = 0, out: str = "", err: str = "") -> subprocess.CompletedProcess:
            return subprocess.CompletedProcess(argv, code, out, err)

        if verb == "status":
            if name not in self.containers:
                return done(2, err=f"tupper: no container {name!r}\n")
            return done(out=json.dumps({"name": name, "state": self.containers[name], "units": []}))
        if verb == "run":
            name = args[args.index("--name") + 1]
            if self.run_fails:
                self.containers[name] = "failed"
                return done(1, err="tupper: unit web.service failed\n")
            self.containers[name] = "running"
            return done(out="{}")
        if verb == "stop":
            if self.stop_fails:
                return done(1, err="tupper: PowerOff failed\n")
            self.containers[name] = "stopped"
            return done()
        if verb == "fetch":
            if self.fetch_code == 0:
                self.store = "complete"
            return done(self.fetch_code, out="[]" if self.fetch_code == 0 else "", err="" if self.fetch_code == 0 else "tupper: no space left\n")
        if verb == "kill":
            self.containers[name] = "failed"
            return done()
        if verb == "rm":
            self.containers.pop(name, None)
            return done()
        raise AssertionError(f"unexpected call {args}")


def agent(fake: FakeTupper, spec: Path = HELLO, **env: str) -> Agent:
    return Agent({"OCF_RESOURCE_INSTANCE": "web", "OCF_RESKEY_spec": str(spec), **env}, Cli(run=fake), look=fake.look)


def test_start_runs_the_spec_and_a_second_start_changes_nothing():
    fake = FakeTupper()
    assert agent(fake).start().code == OcfCode.SUCCESS
    assert fake.containers == {"web": "running"}
    assert ["run", str(HELLO), "--name", "web", "--json"] in fake.calls
    runs = sum(c[0] == "run" for c in fake.calls)
    assert agent(fake).start().code == OcfCode.SUCCESS
    assert sum(c[0] == "run" for c in fake.calls) == runs  # already running: left as it is


def test_start_replaces_a_stopped_or_failed_container_of_that_name():
    fake = FakeTupper({"web": "crash-loop"})
    assert agent(fake).start().code == OcfCode.SUCCESS
    assert [c[0] for c in fake.calls if c[0] in ("rm", "run")] == ["rm", "run"]


def test_a_failed_run_is_a_generic_failure_with_tuppers_reason():
    fake = FakeTupper(run_fails=True)
    verdict = agent(fake).start()
    assert verdict.code == OcfCode.ERR_GENERIC and "web.service failed" in verdict.reason


def test_stop_stops_and_removes_and_a_second_stop_succeeds():
    fake = FakeTupper({"web": "running"})
    assert agent(fake, OCF_RESKEY_stop_timeout="7").stop().code == OcfCode.SUCCESS
    assert fake.containers == {}
    assert ["stop", "web", "--timeout", "7"] in fake.calls
    assert agent(fake).stop().code == OcfCode.SUCCESS


def test_a_stop_that_fails_kills_then_removes():
    fake = FakeTupper({"web": "running"}, stop_fails=True)
    assert agent(fake).stop().code == OcfCode.SUCCESS
    assert [c[0] for c in fake.calls if c[0] in ("stop", "kill", "rm")] == ["stop", "kill", "rm"]


def test_validate_tells_a_spec_missing_here_from_a_bad_one(tmp_path):
    fake = FakeTupper()
    assert agent(fake).validate().code == OcfCode.SUCCESS
    assert agent(fake, tmp_path / "nope.toml").validate().code == OcfCode.ERR_INSTALLED  # maybe on another node
    bad = tmp_path / "bad.toml"
    bad.write_text('image = "debian-bookworm"\nrestart = "sometimes"\n')
    verdict = agent(fake, bad).validate()
    assert verdict.code == OcfCode.ERR_CONFIGURED and "bad.toml" in verdict.reason
    assert agent(fake, OCF_RESKEY_name="no/slash").validate().code == OcfCode.ERR_CONFIGURED
    assert agent(fake, OCF_RESKEY_stop_timeout="soon").validate().code == OcfCode.ERR_CONFIGURED
    assert fake.calls == []  # validating runs nothing


def test_validate_says_what_this_node_lacks_and_what_the_source_brings(tmp_path):
    source = {"OCF_RESKEY_source": "/srv/tupper"}
    missing = agent(FakeTupper(store="missing"), **source).validate()
    assert missing.code == OcfCode.ERR_INSTALLED and "not installed here" in missing.reason  # this node only
    assert agent(FakeTupper(store="lacking")).validate().code == OcfCode.ERR_INSTALLED  # no source: the store alone
    differs = agent(FakeTupper(store="differs"), **source).validate()
    assert differs.code == OcfCode.ERR_INSTALLED and "is not the one in" in differs.reason
    fake = FakeTupper(store="lacking")
    assert agent(fake, **source).validate().code == OcfCode.SUCCESS  # the source has the rest
    assert fake.looks == [(HELLO, Path("/srv/tupper"))] and fake.calls == []  # looked, nothing fetched


def test_a_spec_that_differs_from_the_fleets_is_not_installed_here(tmp_path):
    import hashlib

    spec = tmp_path / "web.toml"
    spec.write_text('image = "debian-bookworm"\n')
    digest = "sha256:" + hashlib.sha256(spec.read_bytes()).hexdigest()
    assert agent(FakeTupper(), spec, OCF_RESKEY_spec_digest=digest).validate().code == OcfCode.SUCCESS
    spec.write_text('image = "debian-bookworm"\n[labels]\ntier = "new"\n')  # edited here, not (yet) where apply ran
    fake = FakeTupper()
    verdict = agent(fake, spec, OCF_RESKEY_spec_digest=digest).start()
    assert verdict.code == OcfCode.ERR_INSTALLED and "is not the one the fleet was applied with" in verdict.reason
    assert not any(c[0] == "run" for c in fake.calls)


def test_a_component_set_runs_the_spec_the_agent_writes_for_it(tmp_path):
    fake = FakeTupper()
    env = {"OCF_RESOURCE_INSTANCE": "web", "OCF_RESKEY_components": "hello=1.0.0, db", "OCF_RESKEY_image": "web-layer"}
    a = Agent(env, Cli(run=fake), look=lambda spec, source, root: True, spec_dir=tmp_path / "ocf")  # the store lacks them: not loaded
    assert a.start().code == OcfCode.SUCCESS
    written = tmp_path / "ocf/web.toml"
    assert ["run", str(written), "--name", "web", "--json"] in fake.calls
    assert written.read_text() == 'image = "web-layer"\n[[components]]\nname = "hello"\nversion = "1.0.0"\n[[components]]\nname = "db"\n'
    assert a.stop().code == OcfCode.SUCCESS and not written.exists()  # it goes with its container
    for extra, message in (({"OCF_RESKEY_spec": str(HELLO)}, "give one of them, not both"), ({"OCF_RESKEY_components": "a=b=c"}, "is not NAME"),
                           ({"OCF_RESKEY_components": ""}, "parameter spec (or components) is required")):
        verdict = Agent({**env, **extra}, Cli(run=fake), look=fake.look, spec_dir=tmp_path / "ocf").validate()
        assert verdict.code == OcfCode.ERR_CONFIGURED and message in verdict.reason


def test_start_with_a_source_fetches_before_it_runs():
    fake = FakeTupper(store="lacking")
    assert agent(fake, OCF_RESKEY_source="/srv/tupper").start().code == OcfCode.SUCCESS
    verbs = [c[0] for c in fake.calls if c[0] in ("fetch", "run")]
    assert verbs == ["fetch", "run"]
    assert ["fetch", str(HELLO), "--source", "/srv/tupper", "--json"] in fake.calls
    plain = FakeTupper()
    assert agent(plain).start().code == OcfCode.SUCCESS
    assert not any(c[0] == "fetch" for c in plain.calls)  # no source: nothing to fetch


@pytest.mark.parametrize(("code", "ocf_code"), [(2, OcfCode.ERR_INSTALLED), (1, OcfCode.ERR_GENERIC)])
def test_a_failed_fetch_fails_the_start_before_anything_runs(code, ocf_code):
    fake = FakeTupper(store="lacking", fetch_code=code)
    verdict = agent(fake, OCF_RESKEY_source="/srv/tupper").start()
    assert verdict.code == ocf_code and "no space left" in verdict.reason
    assert not any(c[0] == "run" for c in fake.calls) and fake.containers == {}


def test_actions_and_exit_codes_of_main(capsys):
    assert ocf.main(["meta-data"], {}) == OcfCode.SUCCESS
    assert "resource-agent" in capsys.readouterr().out
    assert ocf.main(["promote"], {}) == OcfCode.ERR_UNIMPLEMENTED
    assert ocf.main([], {}) == OcfCode.ERR_UNIMPLEMENTED
    # A probe where tupper is missing: nothing of ours runs here. Elsewhere: not installed.
    missing = {"OCF_TESTER_FAIL_HAVE_BINARY": "1", "OCF_RESOURCE_INSTANCE": "web", "OCF_RESKEY_spec": str(HELLO)}
    assert ocf.main(["monitor"], {**missing, "OCF_RESKEY_CRM_meta_interval": "0"}) == OcfCode.NOT_RUNNING
    assert ocf.main(["monitor"], {**missing, "OCF_RESKEY_CRM_meta_interval": "10000"}) == OcfCode.ERR_INSTALLED
    assert "ocf-exit-reason:tupper did not answer" in capsys.readouterr().err


def test_a_node_without_a_store_cannot_run_it_but_others_may(tmp_path):
    with pytest.raises(NotFound, match="no tupper store"):
        ocf.look_in_store(HELLO, None, str(tmp_path / "nostore"))
    verdict = Agent({"OCF_RESOURCE_INSTANCE": "web", "OCF_RESKEY_spec": str(HELLO), "OCF_RESKEY_root": str(tmp_path / "nostore")},
                    Cli(root=str(tmp_path / "nostore"), run=FakeTupper())).validate()
    assert verdict.code == OcfCode.ERR_INSTALLED and "no tupper store" in verdict.reason
