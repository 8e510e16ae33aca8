"""The wheel the install guide names (``./dev wheel``): built from this checkout without a
warning about what it leaves out, holding the code, the wire contract and the shipped
scenarios, and installing both daemons' commands."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import creditmeter

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_the_wheel_holds_everything_and_builds_without_warnings(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    built = subprocess.run(
        [*pip, "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    assert "is absent from the `packages` configuration" not in built.stderr, built.stderr
    (wheel,) = tmp_path.glob(f"creditmeter-{creditmeter.__version__}-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    shipped = {p.name for p in (ROOT / "simnvml" / "scenarios").glob("*.toml")}
    assert {f"creditmeter/simnvml/scenarios/{name}" for name in shipped} <= names
    assert {
        "creditmeter/py.typed",
        "creditmeter/agent/main.py",
        "creditmeter/collector/main.py",
        "creditmeter/v1/usage.proto",
        "creditmeter/v1/usage_pb2.pyi",
        "creditmeter/verify.py",
        "creditmeter/collector/web/openapi.json",
        "creditmeter/collector/web/static/style.css",
        "creditmeter/collector/web/templates/account.html",
    } <= names
    assert "creditmeter-agent = creditmeter.agent.cli:main_entry" in scripts
    assert "creditmeter-collector = creditmeter.collector.main:main_entry" in scripts
    assert "creditmeter-verify = creditmeter.verify:main" in scripts
