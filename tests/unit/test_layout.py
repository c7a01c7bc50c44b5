"""The "one place" claims of tupper's modules, kept true: read from the code's own syntax trees."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "tupper"


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(REPO)): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(tree: ast.Module) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def _calls_of(tree: ast.Module, module: str) -> list[str]:
    """`module.fn(...)` calls, as 'fn'."""
    return [node.func.attr for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == module]


def _owners(library: str) -> list[str]:
    return [path for path, tree in _modules().items() if library in _imports(tree)]


def test_only_the_systemd_adapter_imports_pystemd():
    assert _owners("pystemd") == ["tupper/container/systemd.py"]


def test_only_tomlfile_reads_toml():
    assert _owners("tomllib") == ["tupper/tomlfile.py"]


def test_only_proc_starts_processes():
    starters = {"run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput"}
    found = {path: sorted(set(_calls_of(tree, "subprocess")) & starters) for path, tree in _modules().items()}
    found.update({path: sorted({"system", "popen", "spawnv", "spawnvp", "execv", "execvp", "posix_spawn"} & set(_calls_of(tree, "os")))
                  for path, tree in _modules().items() if path not in found or not found[path]})
    assert {p: f for p, f in found.items() if f and p != "tupper/proc.py"} == {
        # `tupper logs` hands the terminal to journalctl: replacing the process is the point.
        "tupper/cli/main.py": ["execvp"],
    }


def test_tests_share_helpers_through_helpers_not_conftest():
    offenders = [str(p.relative_to(REPO)) for p in sorted((REPO / "tests").rglob("*.py"))
                 if "conftest" in _imports(ast.parse(p.read_text()))]
    assert offenders == []


def _tupper_imports(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {f"tupper.{a.name}" for a in node.names} if node.module == "tupper" else {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("tupper.")}


def test_the_fast_client_path_does_not_import_dbus_next():
    """The CLI and its client serve every call to tupperd; dbus-next (and its import time) is tupperd's.
    cli/main.py imports tupperd only inside `tupper daemon`, which becomes tupperd."""
    for path in sorted((REPO / "tupper/cli").glob("*.py")):
        tree = ast.parse(path.read_text())
        rel = str(path.relative_to(REPO))
        allowed = {"tupper.daemon.tupperd"} if rel == "tupper/cli/main.py" else set()
        assert "dbus_next" not in _imports(tree), rel
        assert {m for m in _tupper_imports(tree) if m.startswith("tupper.daemon")} <= allowed, rel


# The subpackages, bottom up: a module may import its own package and the ones below it, never one above.
LAYERS = ["", "model", "container", "store", "runtime", "daemon", "cli"]  # "": tupper's base modules


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else 0


def test_imports_point_down_the_layers():
    upward = []
    for path, tree in _modules().items():
        if path == "tupper/__main__.py":
            continue
        me = _layer(path[:-3].replace("/", "."))
        for target in _tupper_imports(tree):
            if _layer(target) > me and not (path == "tupper/cli/main.py" and target == "tupper.daemon.tupperd"):
                upward.append(f"{path} imports {target}")
    assert upward == []


def test_modules_have_docstrings():
    missing = [path for path, tree in _modules().items() if not ast.get_docstring(tree) and Path(path).name != "__init__.py"]
    assert missing == []
