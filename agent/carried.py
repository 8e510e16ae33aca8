"""The Python packages ``bin/gpu-selftest`` runs on, on a bare GPU host, and wheels carried
there for them.

A lent GPU host has nvidia-ml-py, psutil and protobuf at its image's versions, with no
network to install others. The generated code in creditmeter.v1 refuses a protobuf runtime
older than the protoc that generated it (protobuf's cross-version runtime guarantee: gencode
7.35.1 on runtime 6.33.6 raises VersionError at import), and the selftest's meter imports
it, so an older runtime there would end the one run a lent host allows in a traceback.
Wheels carried beside the checkout (``--wheels DIR``, fetched here with ``--fetch-wheels
DIR``) are unpacked and put before the host's packages; what the run used is said in one
line, and a package missing or too old is named in one line, never a traceback.

Imports nothing of protobuf, nvidia-ml-py or psutil until asked: it decides which ones load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

# The distributions the selftest imports, by the module each provides.
NEEDED = {"protobuf": "google.protobuf", "nvidia-ml-py": "pynvml", "psutil": "psutil"}
# Fetched as pure-Python wheels (py3-none-any), which run on any host's CPython; psutil is
# compiled, and any version the host has serves.
FETCHED = ("protobuf", "nvidia-ml-py")
GENCODE_VERSION = re.compile(rb"^# Protobuf Python Version: (\S+)$", re.MULTILINE)
IMPLEMENTATION_VARIABLE = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"


class CarriedError(Exception):
    """A wheel that cannot be unpacked (not a zip file, a path leaving its folder)."""


@dataclass(frozen=True)
class Package:
    name: str  # distribution name
    version: str | None  # None: not importable here
    carried: bool  # from a carried wheel, not the host's own packages
    problem: str = ""  # why it cannot serve: it does not import, or another copy loaded


def gencode_version(pb2: Path) -> str:
    """The protobuf version the generated module ``pb2`` was made by (its header says)."""
    found = GENCODE_VERSION.search(pb2.read_bytes())
    if found is None:
        raise CarriedError(f"{pb2}: no '# Protobuf Python Version:' line")
    return found.group(1).decode()


def unpack(wheels: Path, into: Path) -> list[str]:
    """Unpacks every wheel in ``wheels`` into ``into``, which goes first on sys.path, and
    returns their distribution names. A carried protobuf without its compiled part (the
    pure-Python wheel) runs as pure Python: the host's compiled part may be another
    version's."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        raise CarriedError(f"{wheels}: no wheels (*.whl) there")
    names = []
    for wheel in found:
        try:
            with zipfile.ZipFile(wheel) as z:
                _check_members(wheel, z.namelist())
                z.extractall(into)
        except zipfile.BadZipFile as exc:
            raise CarriedError(f"{wheel}: not a wheel ({exc})") from exc
        names.append(_distribution(wheel))
    sys.path.insert(0, str(into))
    importlib.invalidate_caches()
    if "protobuf" in names and not (into / "google" / "_upb").is_dir():
        os.environ[IMPLEMENTATION_VARIABLE] = "python"
    return names


def _check_members(wheel: Path, members: list[str]) -> None:
    for name in members:
        if name.startswith("/") or ".." in Path(name).parts:
            raise CarriedError(f"{wheel}: member {name!r} would land outside the folder")


def _distribution(wheel: Path) -> str:
    """A wheel's distribution name, normalized as pip spells it (nvidia_ml_py: nvidia-ml-py)."""
    return wheel.name.split("-", 1)[0].replace("_", "-").lower()


def packages(carried: list[str], into: Path | None) -> list[Package]:
    """Imports each needed package and says which version loaded, and from where."""
    out = []
    for name, module in NEEDED.items():
        try:
            loaded = importlib.import_module(module)
        except ImportError as exc:
            out.append(Package(name, None, False, str(exc)))
            continue
        origin = Path(getattr(loaded, "__file__", "") or "")
        is_carried = into is not None and origin.is_relative_to(into)
        if name in carried and not is_carried:
            problem = f"the carried wheel is shadowed by {origin}"
            out.append(Package(name, _version(name), False, problem))
            continue
        out.append(Package(name, _version(name), is_carried))
    return out


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def environment_line(found: list[Package]) -> str:
    """What the selftest runs on: Python, and each package's version and origin."""
    parts = [f"Python {platform.python_version()}"]
    for p in found:
        if p.version is None:
            parts.append(f"{p.name} missing")
            continue
        notes = ["carried"] if p.carried else []
        if p.name == "protobuf":
            notes.append(_protobuf_implementation())
        parts.append(f"{p.name} {p.version}" + (f" ({', '.join(notes)})" if notes else ""))
    return "; ".join(parts)


def _protobuf_implementation() -> str:
    from google.protobuf.internal import api_implementation

    return str(api_implementation.Type())


def problem(found: list[Package], gencode: str) -> str | None:
    """Why the selftest cannot run on these packages, in one line, or None. The generated
    code is imported here: its own check is the one that counts."""
    for p in found:
        if p.problem:
            return f"{p.name}: {p.problem}; {_carry_hint(gencode)}"
    try:
        importlib.import_module("creditmeter.v1.usage_pb2")
    except Exception as exc:  # VersionError, or older runtimes failing otherwise (TypeError)
        have = next(p.version for p in found if p.name == "protobuf")
        return (
            f"protobuf {have} cannot load the generated code (made by protobuf {gencode}): "
            f"{type(exc).__name__}; {_carry_hint(gencode)}"
        )
    return None


def _carry_hint(gencode: str) -> str:
    return (
        f"carry protobuf=={gencode} and nvidia-ml-py as wheels: bin/gpu-selftest "
        "--fetch-wheels DIR where pip works, then bin/gpu-selftest --wheels DIR here"
    )


def fetch(into: Path, gencode: str, python_version: str) -> int:
    """Downloads the pure-Python wheels of protobuf (the generated code's version) and
    nvidia-ml-py (this Python's, the one the tests ran with) into ``into``; pip's status."""
    pins = {"protobuf": gencode, "nvidia-ml-py": _version("nvidia-ml-py")}
    if pins["nvidia-ml-py"] == "unknown":
        print("gpu-selftest: nvidia-ml-py is not installed in this Python", file=sys.stderr)
        return 2
    argv = [
        *(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"),
        *("--implementation", "py", "--platform", "any", "--python-version", python_version),
        *("-d", str(into)),
        *(f"{name}=={pins[name]}" for name in FETCHED),
    ]
    return subprocess.run(argv, check=False).returncode
