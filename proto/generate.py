"""Regenerate the Python stubs from the .proto sources (the source of truth).

    ./dev genproto            write proto/creditmeter/v1/*_pb2*.py and *.pyi
    ./dev genproto --check    exit 1 when the checked-in stubs differ from fresh output

The stubs are checked in so that an installed package needs no compiler; grpcio-tools is
pinned in pyproject.toml so that the output is byte-for-byte reproducible, and a test runs
``--check`` so that a .proto edited without regenerating fails CI.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent  # proto/
PACKAGE = Path("creditmeter") / "v1"


def sources() -> list[Path]:
    return sorted((ROOT / PACKAGE).glob("*.proto"))


def generate(out: Path) -> None:
    include = Path(protoc.__file__).resolve().parent / "_proto"
    for source in sources():
        rel = source.relative_to(ROOT)
        args = [
            "protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(rel),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {rel}")


def generated_names(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*_pb2*.py*")}


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        fresh, current = out / PACKAGE, ROOT / PACKAGE
        names = generated_names(fresh) | generated_names(current)
        stale = sorted(
            n
            for n in names
            if not (fresh / n).exists()
            or not (current / n).exists()
            or not filecmp.cmp(fresh / n, current / n, shallow=False)
        )
    if stale:
        print("stale generated stubs (run ./dev genproto): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    for old in (ROOT / PACKAGE).glob("*_pb2*.py*"):
        old.unlink()
    generate(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
