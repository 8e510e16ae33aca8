"""The agent's signing key: an Ed25519 private key in a PEM (PKCS#8) file with mode 0600.

The collector knows the matching public key (32 raw bytes in hex) from enrollment:
``creditmeter-agent keygen`` writes the key and prints the ``creditmeter-collector enroll``
command to run on the collector. Encodings live in ``creditmeter.chain``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from creditmeter import chain
from creditmeter.agent.errors import AgentError

DEFAULT_KEY_PATH: Final = "/var/lib/creditmeter-agent/signing-key.pem"  # the unit's StateDirectory=
_PRIVATE_MODE: Final = 0o600
_MAX_KEY_FILE_BYTES: Final = 64 * 1024  # a PEM Ed25519 key is ~120 bytes


class SigningKeyError(AgentError):
    """The signing key cannot be written or used; the message names the path."""


class KeyFileMissing(SigningKeyError):
    """No key at the path: not generated yet (``creditmeter-agent keygen``), or a wrong path."""


class KeyFileExists(SigningKeyError):
    """keygen refuses to replace a key: the collector has its public key enrolled."""


class KeyFileInsecure(SigningKeyError):
    """Group or others may access the key file: anyone who reads it can forge records."""


class KeyFileInvalid(SigningKeyError):
    """The file is not a PEM Ed25519 private key (another key type, or damaged)."""


def generate(path: str | os.PathLike[str], *, overwrite: bool = False) -> str:
    """Write a new key to ``path`` (mode 0600, fsynced); return its public key in hex.

    Refuses to replace an existing key unless ``overwrite``: the collector would refuse
    every record signed with the new key until it is enrolled again.
    """
    file = Path(path)
    key = chain.generate_key()
    _make_private_dir(file.parent)
    if overwrite:
        _replace(file, chain.private_key_pem(key))
    else:
        _create(file, chain.private_key_pem(key))
    fsync_dir(file.parent)
    return chain.public_key_hex(key)


def load(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read the key at ``path``, refusing it if group or others can access the file."""
    file = Path(path)
    try:
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise KeyFileMissing(
            f"{file}: no signing key; create one with `creditmeter-agent keygen --key {file}`"
        ) from exc
    except OSError as exc:
        raise SigningKeyError(f"{file}: cannot open the signing key: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as handle:
        # fstat the open file: the mode checked is the mode of the bytes read.
        info = os.fstat(handle.fileno())
        _check_private(file, info)
        data = handle.read(_MAX_KEY_FILE_BYTES)
    try:
        return chain.load_private_key_pem(data)
    except chain.BadKey as exc:
        raise KeyFileInvalid(f"{file}: {exc}") from exc


def keygen_main(
    argv: list[str],
    *,
    parents: tuple[argparse.ArgumentParser, ...] = (),
    defaults: Callable[[argparse.Namespace], tuple[Path, str]] | None = None,
) -> int:
    """``creditmeter-agent keygen``: write a key and print how to enroll it. Exit status.

    ``parents`` add options (the agent's --config and --set); ``defaults`` gives the key
    path and agent id the configuration names, for the arguments left unset."""
    parser = argparse.ArgumentParser(
        prog="creditmeter-agent keygen",
        description="Create the agent's Ed25519 signing key and print its public key.",
        parents=list(parents),
    )
    parser.add_argument(
        "--key",
        default=None,
        help=f"private key file to create (default: agent.key_file, else {DEFAULT_KEY_PATH})",
    )
    if defaults is None:  # else the configuration's own --agent-id flag sets agent.id
        parser.add_argument("--agent-id", default=None, help="agent id (default: host name)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing key, when it is lost to the chain: the collector's operator "
        "must then approve the new one (enroll ID KEY --replace); to change a key you still "
        "hold, use rotate-key",
    )
    args = parser.parse_args(argv)
    key_path, agent_id = (
        defaults(args) if defaults is not None else (Path(DEFAULT_KEY_PATH), socket.gethostname())
    )
    key_path = Path(args.key) if args.key is not None else key_path
    agent_id = getattr(args, "agent_id", None) or agent_id
    try:
        public_hex = generate(key_path, overwrite=args.force)
    except SigningKeyError as exc:
        print(f"creditmeter-agent keygen: {exc}", file=sys.stderr)
        return 1
    print(public_hex)
    print(f"# wrote the private key to {key_path} (mode 0600); keep it on this host only")
    print("# enroll this agent by running on the collector host:")
    print(f"creditmeter-collector enroll {agent_id} {public_hex}")
    return 0


# -- files ------------------------------------------------------------------------------------


def _check_private(file: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise SigningKeyError(f"{file}: not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise KeyFileInsecure(
            f"{file}: mode {mode:04o} lets group or others access the signing key; anyone "
            f"who can read it can sign usage records as this agent. Run `chmod 600 {file}` "
            "(and generate a new key if others may have read it)"
        )


def _make_private_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SigningKeyError(f"{directory}: cannot create the key directory: {exc}") from exc


def _create(file: Path, pem: bytes) -> None:
    """O_EXCL: never replaces a key, even one created concurrently."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(file, flags, _PRIVATE_MODE)
    except FileExistsError as exc:
        raise KeyFileExists(
            f"{file}: a signing key exists already; keep it, rotate it (creditmeter-agent "
            "rotate-key), or pass --force to replace it (then the collector must approve the "
            "new key: enroll ID KEY --replace)"
        ) from exc
    except OSError as exc:
        raise SigningKeyError(f"{file}: cannot create the signing key: {exc.strerror}") from exc
    _write_and_sync(fd, file, pem, cleanup=file)


def _replace(file: Path, pem: bytes) -> None:
    """Write a fresh file beside the old one and rename it over: never a half-written key."""
    temporary = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, _PRIVATE_MODE)
    except OSError as exc:
        raise SigningKeyError(f"{temporary}: cannot create the signing key: {exc}") from exc
    _write_and_sync(fd, temporary, pem, cleanup=temporary)
    try:
        os.replace(temporary, file)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise SigningKeyError(f"{file}: cannot replace the signing key: {exc}") from exc


def _write_and_sync(fd: int, file: Path, data: bytes, *, cleanup: Path) -> None:
    try:
        # The umask may have narrowed the mode further; make it exactly 0600 regardless.
        os.fchmod(fd, _PRIVATE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        cleanup.unlink(missing_ok=True)
        raise SigningKeyError(f"{file}: cannot write the signing key: {exc}") from exc
    os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make the new directory entry durable, not only the file's bytes."""
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
