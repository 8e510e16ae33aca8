"""The quarantine's command line (the same code for both stores: SQLite here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from creditmeter.collector.main import main
from creditmeter.collector.store import Store
from creditmeter.collector.verifier import Verifier

from .records import AgentChain
from .test_quarantine import with_held_third


def test_the_command_line_lists_and_releases(
    store: Store, agent: AgentChain, verifier: Verifier, capsys: pytest.CaptureFixture[str],
    db_path: Path,
) -> None:  # fmt: skip
    with_held_third(agent)
    store.ingest(agent.agent_id, verifier.verify(agent.batch(1, 5), agent.key.public_key()))
    url = f"sqlite://{db_path}"
    assert main(["quarantine", "list", "--db", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("agent-1 seq 3: field busy_us: ") and out.count("\n") == 1
    assert main(["quarantine", "release", "--db", url, "agent-1", "3"]) == 1  # still fails
    assert "seq 3: field busy_us" in capsys.readouterr().err
    assert main(["quarantine", "release", "--db", url, "agent-1", "2"]) == 3  # not held
    assert "not in quarantine" in capsys.readouterr().err
    assert main(["quarantine", "list", "--db", url]) == 0
    assert "seq 3" in capsys.readouterr().out
