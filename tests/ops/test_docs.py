"""The generated documentation matches the option declarations, and the generator notices
when it does not (so the README and the example files can never drift)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from creditmeter import config
from creditmeter.agent import settings as agent_settings
from creditmeter.collector import settings as collector_settings
from creditmeter.docs import (
    DAEMONS,
    README,
    Daemon,
    DocsError,
    begin_marker,
    end_marker,
    expected,
    main,
    render_readme,
    stale,
)

ROOT = Path(__file__).resolve().parents[2]


def test_committed_docs_match_the_declarations() -> None:
    assert stale(ROOT) == [], "run: python -m creditmeter.docs (or bin/gendocs)"


@pytest.mark.parametrize("daemon", DAEMONS, ids=lambda d: d.name)
def test_every_option_is_documented_once_in_its_readme_section(daemon: Daemon) -> None:
    readme = (ROOT / README).read_text(encoding="utf-8")
    section = readme.split(begin_marker(daemon))[1].split(end_marker(daemon))[0]
    for option in daemon.options:
        assert section.count(f"| `{option.name}` |") == 1, option.name


@pytest.mark.parametrize("daemon", DAEMONS, ids=lambda d: d.name)
def test_the_example_loads_to_the_defaults(daemon: Daemon, tmp_path: Path) -> None:
    """Uncommenting every line of the example changes nothing: it shows the true defaults."""
    text = (ROOT / daemon.example).read_text(encoding="utf-8")
    uncommented = "\n".join(
        line[1:] if line.startswith("#") and "=" in line and not line.startswith("# ") else line
        for line in text.splitlines()
    )
    tomllib.loads(uncommented)  # valid TOML
    file = tmp_path / "example.toml"
    file.write_text(uncommented)
    loaded = config.load(daemon.options, file)
    assert all(source == str(file) for source in loaded.sources.values())
    assert dict(loaded.items()) == {o.name: o.default for o in daemon.options}


def test_a_changed_declaration_makes_the_docs_stale(tmp_path: Path) -> None:
    for path in (README, *(d.example for d in DAEMONS)):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, tmp_path / path)
    assert stale(tmp_path) == []
    changed = dataclasses.replace(agent_settings.POLL_INTERVAL, doc="How often to poll.")
    poll = agent_settings.POLL_INTERVAL
    options = tuple(changed if o is poll else o for o in agent_settings.OPTIONS)
    daemons = (dataclasses.replace(DAEMONS[0], options=options), DAEMONS[1])
    assert stale(tmp_path, daemons) == [README, DAEMONS[0].example]
    for path, text in expected(tmp_path, daemons).items():
        (tmp_path / path).write_text(text)
    assert stale(tmp_path, daemons) == []
    assert "How often to poll." in (tmp_path / README).read_text()


def test_the_check_exits_1_and_regeneration_fixes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "systemd").mkdir()
    (tmp_path / README).write_text((ROOT / README).read_text().replace("`store.url`", "`x`"))
    assert main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "README.md: stale" in err and "collector.toml.example: stale" in err
    assert main(["--root", str(tmp_path)]) == 0
    assert main(["--check", "--root", str(tmp_path)]) == 0


def test_missing_markers_are_named() -> None:
    with pytest.raises(DocsError, match="markers for the agent"):
        render_readme("# a README without markers\n")


def test_the_module_runs_as_a_script() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "creditmeter.docs", "--check", "--root", str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_collector_flags_are_declared_options() -> None:
    names = {o.name for o in collector_settings.OPTIONS}
    assert {o.name for o in collector_settings.FLAGS.values()} <= names
