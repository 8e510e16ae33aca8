"""``creditmeter-agent``'s entry point: ``selftest`` runs on a bare GPU host, so it is
dispatched before the daemon's modules (gRPC, signing, SQLite) are imported at all."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["selftest"]:
        from creditmeter.agent import selftest

        return selftest.main(args[1:])
    from creditmeter.agent import main as daemon

    return daemon.main(args)


def main_entry() -> None:
    from creditmeter.files import exit_quietly_on_broken_pipe

    exit_quietly_on_broken_pipe(main)


if __name__ == "__main__":
    main_entry()
