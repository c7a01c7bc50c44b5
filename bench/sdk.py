"""SDK benchmarks: live component upgrade in a running container, and `sdk build` of a 50 MB payload."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

PAYLOAD_MB = 50


def _component(root: Path, name: str, version: str, payload_mb: int = 0) -> Path:
    d = root / f"{name}-{version}"
    (d / "units").mkdir(parents=True)
    (d / "bin").mkdir()
    (d / "component.toml").write_text(f'name = "{name}"\nversion = "{version}"\nunits = ["{name}.service"]\n')
    (d / "units" / f"{name}.service").write_text(f"[Service]\nType=exec\nExecStart=/opt/{name}/bin/run\n")
    (d / "bin" / "run").write_text(f"#!/bin/sh\necho {name} {version}\nexec sleep infinity\n")
    (d / "bin" / "run").chmod(0o755)
    if payload_mb:
        # Half incompressible, half text-like: neither gzip's best nor its worst case.
        (d / "data").mkdir()
        for i in range(payload_mb):
            chunk = os.urandom(1 << 19) + (f"line {i} of a text-like payload\n" * 20000).encode()[: 1 << 19]
            (d / "data" / f"part-{i:03d}").write_bytes(chunk)
    return d


def measure_upgrade(tupper, prefix: str, runs: int, cleanup_names: list[str]) -> dict:
    """`tupper component upgrade` wall time, alternating between two installed versions."""
    name = prefix.replace("-", "").lower()[:40] + "up"
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-up-"))
    installed: list[str] = []
    container = f"{prefix}-upgrade"
    try:
        for version in ("1.0.0", "2.0.0"):
            d = _component(work, name, version)
            tupper("sdk", "build", str(d), "-o", str(work))
            tupper("component", "install", str(work / f"{name}-{version}.tupper"))
            installed.append(version)
        spec = work / "spec.toml"
        spec.write_text(f'name = "{container}"\n[[components]]\nname = "{name}"\nversion = "1.0.0"\n')
        cleanup_names.append(container)
        tupper("run", str(spec))
        times = []
        for i in range(runs):
            t, _ = tupper("component", "upgrade", container, name, "2.0.0" if i % 2 == 0 else "1.0.0")
            times.append(t)
        tupper("rm", "--force", container)
        return {"times": times}
    finally:
        _quietly(tupper, "rm", "--force", container)
        for version in installed:
            _quietly(tupper, "component", "rm", name, version)
        shutil.rmtree(work, ignore_errors=True)


def _quietly(tupper, *args: str) -> None:
    """Clean-up: the thing may be gone already."""
    try:
        tupper(*args)
    except RuntimeError:
        pass


def measure_sdk_build(tupper, prefix: str, runs: int) -> dict:
    """`tupper sdk build` of a component with a 50 MB payload (wall time, package size)."""
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-sdk-"))
    try:
        d = _component(work, "bigpayload", "1.0.0", PAYLOAD_MB)
        out = work / "dist"
        out.mkdir()
        times = []
        for _ in range(runs):
            t, _ = tupper("sdk", "build", str(d), "-o", str(out))
            times.append(t)
        size = (out / "bigpayload-1.0.0.tupper").stat().st_size
        return {"times": times, "payload_bytes": PAYLOAD_MB << 20, "package_bytes": size}
    finally:
        shutil.rmtree(work, ignore_errors=True)
