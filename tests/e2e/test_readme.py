"""The README's "Try it" path, run as written (issue 15): the shell block after the
``<!-- readme-test: try -->`` marker is taken from README.md itself and run by bash from
the repository root, so a README that drifts from the programs fails here. It must end with
credits for the simulated host's accounts, and leave no daemon behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- readme-test: try -->"
DEADLINE_S = 240.0

pytestmark = pytest.mark.slow


def readme_block(marker: str) -> str:
    """The fenced shell block right after ``marker``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text.split(marker, 1)[1]
    match = re.match(r"\s*```sh\n(.*?)```", after, re.DOTALL)
    assert match is not None, f"no ```sh block after {marker}"
    return match.group(1)


def test_the_readme_try_it_block_ends_in_credits(tmp_path: Path) -> None:
    block = readme_block(MARKER)
    # Only the environment is the test's: a scratch TMPDIR and HOME, no inherited database.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITMETER_")}
    env.update(TMPDIR=str(tmp_path), HOME=str(tmp_path))
    script = "set -euo pipefail\n" + block
    process = subprocess.Popen(
        ["bash", "-c", script],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its background collector is in our reach at the end
    )
    try:
        out, _ = process.communicate(timeout=DEADLINE_S)
    finally:
        # The whole group, whether bash is done or not: a step that fails ends the script
        # with its background collector still serving on 127.0.0.1:7300, and the next run
        # of this test then talked to it (its agent "lost or replaced" against a database
        # that already held try-host's records).
        with contextlib.suppress(ProcessLookupError):  # empty: everything stopped by itself
            os.killpg(process.pid, signal.SIGKILL)
        if process.poll() is None:
            process.communicate()
    assert process.returncode == 0, out[-4000:]
    assert "127.0.0.1:7300: SERVING" in out, out[-4000:]
    report = re.search(r"^ACCOUNT\s+MODEL.*?^TOTAL[^\n]*", out, re.MULTILINE | re.DOTALL)
    assert report is not None, out[-4000:]
    accounts = {line.split()[0] for line in report.group(0).splitlines()[1:-1]}
    assert {"acme", "unattributed"} <= accounts, report.group(0)
    total_credits = float(report.group(0).splitlines()[-1].split()[-2])
    assert total_credits > 0, report.group(0)
    balance = out[report.end() :]
    remaining = re.search(r"^\s+remaining\s+([\d.]+)$", balance, re.MULTILINE)
    assert remaining is not None, balance
    assert 0 < float(remaining.group(1)) < 36_000, balance  # acme used some of its plan
    scratch = next(p for p in tmp_path.iterdir() if p.is_dir() and (p / "collector.db").exists())
    log = (scratch / "collector.log").read_text()
    assert "stopped" in log.splitlines()[-1], log[-2000:]  # `kill` stopped it in order
