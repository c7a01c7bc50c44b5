"""ocf:tupper:container: tupper as a resource of a Pacemaker cluster (the OCF resource agent).

Pacemaker runs `/usr/lib/ocf/resource.d/tupper/container ACTION` (installed by `make setup`: a two-line
script that runs `python -m tupper.cli.ocf ACTION`) with the resource's parameters in OCF_RESKEY_*
variables. Pacemaker decides where a container runs; this agent only runs, stops and looks at it on
its node, through the node's tupper CLI (and so its tupperd, or `--direct` where asked), the way the
podman agent of resource-agents drives podman:

- start: the spec is checked with tupper's own validator, what it needs is fetched from the `source`
  directory where one is given (`tupper fetch`), then `tupper run SPEC --name NAME`, which
  returns once every unit is active; a container of that name already running is left as it is (start
  twice succeeds), one that is stopped or failed is removed first.
- stop: `tupper stop NAME` (PowerOff, SIGKILL after the stop timeout), `tupper kill` where that fails,
  then `tupper rm --force NAME`; a container that is not there is stopped already (stop twice succeeds).
- monitor: tupper's state: running → running (0); starting → running; degraded, failed, crash-loop,
  stopping → failed (1, with the reason Pacemaker shows); stopped, exited, created, absent → not
  running (7).
- validate-all: the spec is parsed and validated as `tupper run` would; its image and installed
  components must be in the node's store or in `source` (else 5, ERR_INSTALLED: not on this node).

Exit codes exactly as OCF defines them (OcfCode). Where the agent cannot tell (tupper's CLI gives no
answer it understands), it says why on stderr as an `ocf-exit-reason:` line and fails generically.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs

AGENT = "container"
PROVIDER = "tupper"
DEFAULT_STOP_TIMEOUT = 60.0  # seconds, where neither the parameter nor Pacemaker's stop timeout says
START_MARGIN = 10.0  # seconds of Pacemaker's action timeout left for the agent's own steps


class OcfCode(enum.IntEnum):
    SUCCESS = 0
    ERR_GENERIC = 1
    ERR_ARGS = 2
    ERR_UNIMPLEMENTED = 3
    ERR_PERM = 4
    ERR_INSTALLED = 5
    ERR_CONFIGURED = 6
    NOT_RUNNING = 7


@attrs.frozen
class Param:
    name: str
    kind: str  # OCF content type: string, integer, boolean, time
    short: str
    long: str
    required: bool = False
    default: str | None = None


PARAMETERS = (
    Param("spec", "string", "spec file",
          "Path of the tupper spec (TOML) the container runs, the same path on every node that may run it "
          "(see docs/fleet.md: how specs and their components reach the nodes). Either spec or components is required."),
    Param("components", "string", "installed component set",
          "Instead of a spec: the installed components the container runs, NAME or NAME=VERSION separated by spaces "
          "or commas (`web=1.2.0 db`), on the image given by `image`; everything else at tupper's defaults. The agent "
          "writes the spec this means to /run/tupper-ocf/NAME.toml on the node."),
    Param("image", "string", "image", "The image of a component set (with `components`).", default="debian-bookworm"),
    Param("name", "string", "container name",
          "The container's name on its node. Default: the resource's instance name, ':' replaced by '-'."),
    Param("stop_timeout", "integer", "stop timeout (s)",
          "Seconds a clean stop (PowerOff) may take before the container is killed. Default: the stop "
          "action's timeout less 10 s (at least 10), else 60."),
    Param("source", "string", "image and package directory",
          "A directory, at this path on every node (a shared mount), of image streams (IMAGE.timg, from tupper image "
          "export) and component packages (NAME-VERSION.tupper). Before a start, what the spec needs and the node's store "
          "lacks is imported or installed from it, and what the store has is compared with it by digest (tupper fetch). "
          "Default: none; the node's store must hold the image and the components already."),
    Param("spec_digest", "string", "spec file digest",
          "sha256:HEX of the spec file's bytes as `tupper fleet apply` read them: a node whose spec file differs "
          "(a shared directory not yet in sync) refuses to start it (not installed here). A changed spec changes this "
          "parameter, and Pacemaker restarts the replicas with the new spec. Default: not checked."),
    Param("root", "string", "store root",
          "The tupper store on the node (tupper --root). Default: tupper's own default."),
    Param("direct", "boolean", "without tupperd",
          "Run tupper's verbs in the agent's process instead of through the node's tupperd (hosts without a "
          "system bus).", default="false"),
)

ACTIONS = (("start", "120s", None), ("stop", "90s", None), ("monitor", "30s", "10s"), ("validate-all", "30s", None),
           ("meta-data", "5s", None))


def meta_data() -> str:
    """The agent's description, OCF 1.0 (what ocf-tester validates against ra-api-1.dtd)."""
    def esc(text: str) -> str:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")

    params = []
    for p in PARAMETERS:
        default = f' default="{esc(p.default)}"' if p.default is not None else ""
        params.append(f'<parameter name="{p.name}" unique="0" required="{int(p.required)}">\n'
                      f'<longdesc lang="en">{esc(p.long)}</longdesc>\n'
                      f'<shortdesc lang="en">{esc(p.short)}</shortdesc>\n'
                      f'<content type="{p.kind}"{default}/>\n</parameter>')
    actions = [f'<action name="{name}" timeout="{timeout}"' + (f' interval="{interval}" depth="0"' if interval else "") + "/>"
               for name, timeout, interval in ACTIONS]
    return ('<?xml version="1.0"?>\n<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">\n'
            f'<resource-agent name="{AGENT}" version="1.0">\n<version>1.0</version>\n'
            '<longdesc lang="en">Runs a tupper container (systemd booted in a btrfs snapshot, its services bound in '
            'as components) from a spec on the node Pacemaker chose; stop removes it. The state tupper reports '
            'decides the monitor: running is running; degraded, failed or crash-looping is failed.</longdesc>\n'
            '<shortdesc lang="en">tupper container</shortdesc>\n'
            '<parameters>\n' + "\n".join(params) + '\n</parameters>\n'
            '<actions>\n' + "\n".join(actions) + '\n</actions>\n</resource-agent>\n')


def container_name(env: Mapping[str, str]) -> str:
    """OCF_RESKEY_name, else the resource instance (`web`, `web:1` for a unique clone's instance)."""
    name = env.get("OCF_RESKEY_name") or env.get("OCF_RESOURCE_INSTANCE", "")
    return name.replace(":", "-")


def stop_timeout(env: Mapping[str, str]) -> float:
    """The stop's PowerOff budget: the parameter, else Pacemaker's stop timeout (ms) less a margin."""
    if env.get("OCF_RESKEY_stop_timeout"):
        return float(env["OCF_RESKEY_stop_timeout"])
    meta = env.get("OCF_RESKEY_CRM_meta_timeout", "")
    if meta.isdigit() and int(meta) > 0:
        return max(10.0, int(meta) / 1000 - START_MARGIN)
    return DEFAULT_STOP_TIMEOUT


def is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on", "y")


def is_probe(env: Mapping[str, str]) -> bool:
    """A monitor with interval 0: Pacemaker asking whether the resource runs here at all."""
    return env.get("__OCF_ACTION", "monitor") == "monitor" and env.get("OCF_RESKEY_CRM_meta_interval", "0") in ("", "0")


@attrs.frozen
class Verdict:
    code: OcfCode
    reason: str = ""


def monitor_verdict(state: str | None, detail: str = "") -> Verdict:
    """What a tupper state means to Pacemaker (None: no such container on this node)."""
    if state is None or state in ("stopped", "exited", "created"):
        return Verdict(OcfCode.NOT_RUNNING)
    if state in ("running", "starting"):
        return Verdict(OcfCode.SUCCESS)
    why = f"container is {state}" + (f": {detail}" if detail else "")
    return Verdict(OcfCode.ERR_GENERIC, why)


class TupperGone(Exception):
    """tupper's CLI could not answer (not installed, tupperd unreachable): its message."""


# What the tupper CLI needs of the agent's environment (Pacemaker's execd passes its own on).
PASSED_ENV = ("DBUS_SYSTEM_BUS_ADDRESS", "TUPPER_ROOT", "TUPPER_DIRECT", "TUPPER_CONFIG", "PYTHONPATH")


def _run_cli(argv: list[str], timeout: float | None) -> subprocess.CompletedProcess:
    from tupper import proc

    return proc.run(argv, check=False, timeout=timeout, env={k: os.environ[k] for k in PASSED_ENV if k in os.environ})


@attrs.define
class Cli:
    """The node's tupper, as its CLI: `python -m tupper [--root R] [--direct] VERB ... --json`."""

    root: str | None = None
    direct: bool = False
    run: Callable[[list[str], float | None], subprocess.CompletedProcess] = _run_cli

    def _argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tupper", *(["--root", self.root] if self.root else []), *(["--direct"] if self.direct else []), *args]

    def call(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        from tupper.errors import Failed

        try:
            return self.run(self._argv(*args), timeout)
        except (Failed, OSError) as exc:  # not installed, or no answer in time
            raise TupperGone(str(exc)) from None

    def state(self, name: str) -> tuple[str | None, str]:
        """(tupper's state of container `name` or None where there is none, a detail for failures)."""
        p = self.call("status", name, "--json", timeout=60)
        if p.returncode == 2 and "no container" in p.stderr:
            return None, ""
        if p.returncode != 0:
            raise TupperGone(_last_line(p.stderr) or f"`tupper status` exited with {p.returncode}")
        try:
            status = json.loads(p.stdout)
        except ValueError:
            raise TupperGone("`tupper status --json` printed no JSON") from None
        failed = [u["name"] for u in status.get("units", []) if u.get("active_state") == "failed"]
        detail = f"failed unit(s): {', '.join(failed)}" if failed else ""
        return str(status.get("state")), detail


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def exit_reason(text: str) -> None:
    """Why an action failed, in the form Pacemaker shows (crm_mon's failures: exitreason)."""
    prefix = os.environ.get("OCF_EXIT_REASON_PREFIX", "ocf-exit-reason:")
    print(f"{prefix}{text}", file=sys.stderr, flush=True)


SPEC_DIR = Path("/run/tupper-ocf")  # where a component set's spec is written on the node


def component_set_spec(image: str, components: str) -> str:
    """The spec (TOML) a component set means: `web=1.2.0 db` on `image`. InvalidInput names the parameter."""
    from tupper.model.spec import component_set

    return component_set(image, [t for t in re.split(r"[\s,]+", components.strip()) if t], "parameter image", "parameter components")


def look_in_store(spec: Path, source: Path | None, root: str | None) -> bool:
    """Whether `source` has something the spec needs that the node's store lacks (looked at, not fetched:
    validate-all changes nothing); NotFound where neither has it (without a source: where the store lacks
    the image or a component), Exists where they differ (tupper.store.source)."""
    from tupper.errors import Failed, NotFound
    from tupper.store.source import Source
    from tupper.store.store import Store

    try:
        store = Store.open(Path(root) if root else None, create=False)
    except Failed as exc:  # no store on this node, or it cannot be mounted here: this node's trouble alone
        raise NotFound(exc.message, hint=exc.hint) from None
    return any(b.action != "present" for b in Source(store, source, fetch=False).spec(spec))


@attrs.define
class Agent:
    env: Mapping[str, str]
    cli: Cli
    look: Callable[[Path, Path | None, str | None], bool] = look_in_store
    spec_dir: Path = SPEC_DIR

    def spec_path(self) -> Path:
        """The spec file: the parameter, or the one written for the component set (InvalidInput: neither,
        both, or a bad set)."""
        from tupper.errors import InvalidInput

        spec, components = self.env.get("OCF_RESKEY_spec", ""), self.env.get("OCF_RESKEY_components", "")
        if spec and components:
            raise InvalidInput("parameters spec and components: give one of them, not both")
        if spec:
            return Path(spec)
        if not components:
            raise InvalidInput("parameter spec (or components) is required")
        from tupper import durable
        from tupper.model.spec import DEFAULT_IMAGE

        text = component_set_spec(self.env.get("OCF_RESKEY_image") or DEFAULT_IMAGE, components)
        self.spec_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        path = self.spec_dir / f"{self.name}.toml"
        if not path.is_file() or path.read_text() != text:
            durable.write_bytes(path, text.encode(), sync=False)  # /run: gone with a reboot, as the container
        return path

    @property
    def name(self) -> str:
        return container_name(self.env)

    def validate(self) -> Verdict:
        """The parameters and the spec, checked as `tupper run` would check them."""
        from tupper.errors import Exists, NotFound, TupperError
        from tupper.model import spec as specmod

        try:
            specmod.check_name(self.name, "parameter name")
            path = self.spec_path()
        except TupperError as exc:
            return Verdict(OcfCode.ERR_CONFIGURED, exc.message)
        spec = str(path)
        if self.env.get("OCF_RESKEY_stop_timeout"):
            try:
                if float(self.env["OCF_RESKEY_stop_timeout"]) <= 0:
                    raise ValueError
            except ValueError:
                return Verdict(OcfCode.ERR_CONFIGURED, f"parameter stop_timeout: not a positive number of seconds: {self.env['OCF_RESKEY_stop_timeout']!r}")
        if not path.is_file():
            # Not here, maybe elsewhere: a hard error on this node only (ERR_INSTALLED), not everywhere.
            return Verdict(OcfCode.ERR_INSTALLED, f"spec {spec} is not on this node")
        want = self.env.get("OCF_RESKEY_spec_digest", "")
        if want:
            try:
                here = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as exc:
                return Verdict(OcfCode.ERR_INSTALLED, f"spec {spec}: {exc.strerror}")
            if here != want:
                return Verdict(OcfCode.ERR_INSTALLED, f"spec {spec} on this node ({here}) is not the one the fleet was applied with ({want})")
        source = self.env.get("OCF_RESKEY_source", "")
        try:
            if self.look(path, Path(source) if source else None, self.cli.root):
                return Verdict(OcfCode.SUCCESS)  # the rest is checked once they are here: by fetch, then by run
            specmod.load(path, self.name, resolve=self._resolver())
        except (NotFound, Exists) as exc:  # this node lacks it, or holds another one: elsewhere may do
            return Verdict(OcfCode.ERR_INSTALLED, exc.message)
        except TupperError as exc:
            return Verdict(OcfCode.ERR_CONFIGURED, exc.message)
        return Verdict(OcfCode.SUCCESS)

    def _resolver(self):
        """Installed components are found in the node's store (opened only when a spec names one)."""
        def resolve(name: str, version: str | None, where: str) -> Path:
            from tupper.runtime.runtime import Runtime
            from tupper.store.store import Store

            return Runtime(Store.open(Path(self.cli.root) if self.cli.root else None, create=False)).resolve_component(name, version, where)
        return resolve

    def monitor(self) -> Verdict:
        state, detail = self.cli.state(self.name)
        return monitor_verdict(state, detail)

    def start(self) -> Verdict:
        checked = self.validate()
        if checked.code != OcfCode.SUCCESS:
            return checked
        state, _ = self.cli.state(self.name)
        if state == "running":
            return Verdict(OcfCode.SUCCESS)
        if state is not None:  # stopped, failed, crash-looping: what Pacemaker starts is a fresh one
            self.cli.call("rm", "--force", self.name, timeout=120)
        if self.env.get("OCF_RESKEY_source"):
            p = self.cli.call("fetch", str(self.spec_path()), "--source", self.env["OCF_RESKEY_source"], "--json", timeout=None)
            if p.returncode != 0:  # 2: the source lacks it or differs from this store (this node only); else try again
                reason = _last_line(p.stderr) or f"`tupper fetch` exited with {p.returncode}"
                return Verdict(OcfCode.ERR_INSTALLED if p.returncode == 2 else OcfCode.ERR_GENERIC, reason)
        p = self.cli.call("run", str(self.spec_path()), "--name", self.name, "--json", timeout=None)
        if p.returncode != 0:
            reason = _last_line(p.stderr) or f"`tupper run` exited with {p.returncode}"
            return Verdict(OcfCode.ERR_CONFIGURED if p.returncode == 2 else OcfCode.ERR_GENERIC, reason)
        state, detail = self.cli.state(self.name)
        if state != "running":
            return Verdict(OcfCode.ERR_GENERIC, f"container is {state} after its start" + (f": {detail}" if detail else ""))
        return Verdict(OcfCode.SUCCESS)

    def stop(self) -> Verdict:
        state, _ = self.cli.state(self.name)
        if state is None:
            self._forget_spec()
            return Verdict(OcfCode.SUCCESS)
        timeout = stop_timeout(self.env)
        if state not in ("stopped", "exited", "created", "failed", "crash-loop"):
            p = self.cli.call("stop", self.name, "--timeout", f"{timeout:g}", timeout=timeout + 30)
            if p.returncode != 0:
                self.cli.call("kill", self.name, timeout=30)
        p = self.cli.call("rm", "--force", self.name, timeout=120)
        state, _ = self.cli.state(self.name)
        if state is not None:
            return Verdict(OcfCode.ERR_GENERIC, f"container is still {state} after its stop: {_last_line(p.stderr)}")
        self._forget_spec()
        return Verdict(OcfCode.SUCCESS)

    def _forget_spec(self) -> None:
        """A component set's written spec goes with its container."""
        if self.env.get("OCF_RESKEY_components") and not self.env.get("OCF_RESKEY_spec"):
            (self.spec_dir / f"{self.name}.toml").unlink(missing_ok=True)


USAGE = f"usage: {AGENT} {{start|stop|monitor|validate-all|meta-data}}"


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    environ = dict(os.environ if env is None else env)
    action = args[0] if args else ""
    environ["__OCF_ACTION"] = action
    if action == "meta-data":
        sys.stdout.write(meta_data())
        return OcfCode.SUCCESS
    if action in ("usage", "help"):
        print(USAGE)
        return OcfCode.SUCCESS
    if action not in ("start", "stop", "monitor", "validate-all"):
        print(USAGE, file=sys.stderr)
        return OcfCode.ERR_UNIMPLEMENTED
    cli = Cli(root=environ.get("OCF_RESKEY_root") or None, direct=is_true(environ.get("OCF_RESKEY_direct")))
    if environ.get("OCF_TESTER_FAIL_HAVE_BINARY") == "1":  # ocf-tester: "as if tupper were not installed here"
        cli = Cli(cli.root, cli.direct, run=_missing)
    agent = Agent(environ, cli)
    try:
        verdict = {"start": agent.start, "stop": agent.stop, "monitor": agent.monitor, "validate-all": agent.validate}[action]()
    except TupperGone as exc:
        if action == "monitor" and is_probe(environ):
            return OcfCode.NOT_RUNNING  # nothing of tupper answers here: nothing of ours runs here
        if action == "stop":
            exit_reason(f"tupper did not answer: {exc}")
            return OcfCode.ERR_GENERIC
        exit_reason(f"tupper did not answer: {exc}")
        return OcfCode.ERR_INSTALLED if "not found" in str(exc) or "No such file" in str(exc) else OcfCode.ERR_GENERIC
    if verdict.reason:
        exit_reason(verdict.reason)
    return verdict.code


def _missing(argv: list[str], timeout: float | None) -> subprocess.CompletedProcess:
    raise FileNotFoundError(f"{argv[0]}: command not found (OCF_TESTER_FAIL_HAVE_BINARY)")


if __name__ == "__main__":
    sys.exit(main())
