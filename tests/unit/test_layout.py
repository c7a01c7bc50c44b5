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
    assert _owners("pystemd") == ["tupper/systemd.py"]


def test_only_tomlfile_reads_toml():
    assert _owners("tomllib") == ["tupper/tomlfile.py"]


def test_only_proc_starts_processes():
    starters = {"run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput"}
    found = {path: sorted(set(_calls_of(tree, "subprocess")) & starters) for path, tree in _modules().items()}
    found.update({path: sorted({"system", "popen", "spawnv", "spawnvp", "execv", "execvp", "posix_spawn"} & set(_calls_of(tree, "os")))
                  for path, tree in _modules().items() if path not in found or not found[path]})
    assert {p: f for p, f in found.items() if f and p != "tupper/proc.py"} == {
        # `tupper logs` hands the terminal to journalctl: replacing the process is the point.
        "tupper/cli.py": ["execvp"],
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
    """cli.py and client.py serve every call to tupperd; dbus-next (and its import time) is tupperd's.
    cli.py imports tupper.daemon only inside `tupper daemon`, which becomes tupperd."""
    for path, allowed in (("tupper/cli.py", {"tupper.daemon"}), ("tupper/client.py", set())):
        tree = ast.parse((REPO / path).read_text())
        assert "dbus_next" not in _imports(tree), path
        assert _tupper_imports(tree) & {"tupper.api", "tupper.daemon"} <= allowed, path


def test_modules_have_docstrings():
    missing = [path for path, tree in _modules().items() if not ast.get_docstring(tree) and Path(path).name != "__init__.py"]
    assert missing == []
