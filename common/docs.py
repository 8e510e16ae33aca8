"""The documentation generated from the daemons' option declarations, so it cannot drift.

    python -m creditmeter.docs           # rewrite the generated files and README sections
    python -m creditmeter.docs --check   # exit 1 and name what is stale (the tests do this)

Generated: ``systemd/agent.toml.example`` and ``systemd/collector.toml.example`` (every
option commented out at its default, ready for /etc/creditmeter/), and the README's option
tables between ``<!-- BEGIN GENERATED … -->`` and ``<!-- END GENERATED … -->`` markers.
Everything outside the markers is written by hand and left alone.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from creditmeter.agent import settings as agent_settings
from creditmeter.collector import settings as collector_settings
from creditmeter.config import Options, render_example, render_reference

README = Path("README.md")


class DocsError(Exception):
    """A file the generator needs is missing or lacks its markers."""


@dataclass(frozen=True)
class Daemon:
    name: str  # "agent": names the markers and the example file
    options: Options
    config_path: Path  # where the example is installed

    @property
    def example(self) -> Path:
        return Path("systemd") / f"{self.name}.toml.example"

    def example_text(self) -> str:
        title = f"creditmeter-{self.name} configuration: install as {self.config_path}"
        return render_example(self.options, title=title)


DAEMONS = (
    Daemon("agent", agent_settings.OPTIONS, agent_settings.DEFAULT_CONFIG),
    Daemon("collector", collector_settings.OPTIONS, collector_settings.DEFAULT_CONFIG),
)


def begin_marker(daemon: Daemon) -> str:
    return f"<!-- BEGIN GENERATED: {daemon.name} options (python -m creditmeter.docs) -->"


def end_marker(daemon: Daemon) -> str:
    return f"<!-- END GENERATED: {daemon.name} options -->"


def render_readme(text: str, daemons: Sequence[Daemon] = DAEMONS) -> str:
    """``text`` with each daemon's reference table put between its markers."""
    for daemon in daemons:
        begin, end = re.escape(begin_marker(daemon)), re.escape(end_marker(daemon))
        pattern = re.compile(f"({begin}\n)(.*?)({end})", re.DOTALL)
        if len(pattern.findall(text)) != 1:
            raise DocsError(
                f"README.md needs exactly one pair of markers for the {daemon.name}: "
                f"{begin_marker(daemon)} … {end_marker(daemon)}"
            )
        text = pattern.sub(_between(render_reference(daemon.options)), text)
    return text


def _between(table: str) -> Callable[[re.Match[str]], str]:
    """A re.sub replacement that keeps both markers and puts ``table`` between them."""
    return lambda match: f"{match.group(1)}\n{table}\n{match.group(3)}"


def expected(root: Path, daemons: Sequence[Daemon] = DAEMONS) -> dict[Path, str]:
    """Every generated file (relative to ``root``) and the text it must have."""
    readme = root / README
    try:
        current = readme.read_text(encoding="utf-8")
    except OSError as exc:
        raise DocsError(f"{readme}: cannot read: {exc.strerror or exc}") from None
    files = {README: render_readme(current, daemons)}
    files.update({daemon.example: daemon.example_text() for daemon in daemons})
    return files


def stale(root: Path, daemons: Sequence[Daemon] = DAEMONS) -> list[Path]:
    """The generated files whose committed text differs from the declarations."""
    out_of_date = []
    for path, text in expected(root, daemons).items():
        file = root / path
        if not file.exists() or file.read_text(encoding="utf-8") != text:
            out_of_date.append(path)
    return out_of_date


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m creditmeter.docs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report stale files")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository")
    args = parser.parse_args(argv)
    try:
        if args.check:
            out_of_date = stale(args.root)
            for path in out_of_date:
                print(f"{path}: stale; run python -m creditmeter.docs", file=sys.stderr)
            return 1 if out_of_date else 0
        for path, text in expected(args.root).items():
            (args.root / path).write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    except DocsError as exc:
        print(f"creditmeter.docs: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
