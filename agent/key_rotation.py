"""``creditmeter-agent rotate-key``: hands the agent's record chain to a new signing key.

The old key endorses the new one inside the chain: a key rotation record (quality
KEY_ROTATION) carries the new public key and the old key's signature over the agent id, the
record's seq and prev_hash, and the new key (creditmeter.chain.rotation_message). The
collector accepts batches signed by the new key from that record on, and its audit verifies
across the change; nothing is enrolled again.

Steps, each durable before the next, so that a crash anywhere leaves a state the next start
(``finish_pending``) completes or undoes:

1. the new key is written beside the key file (``<key>.next``, mode 0600);
2. the rotation record is appended to the outbox, in one commit with the outbox's own key
   history: from here on the chain belongs to the new key;
3. ``<key>.next`` is renamed over the key file: the old private key is gone.

Run it with the agent stopped (like ``outbox repair``): the daemon holds the outbox.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from creditmeter import chain
from creditmeter.agent import keys
from creditmeter.agent.outbox import Outbox

log = logging.getLogger(__name__)


def pending_path(key_path: Path) -> Path:
    """Where a rotation's new key waits until the outbox has committed the rotation."""
    return key_path.with_name(key_path.name + ".next")


def rotate(key_path: Path, outbox: Outbox, host: str) -> tuple[int, str]:
    """Rotates to a new key (module docstring); returns the rotation record's seq and the
    new public key in hex. Raises SigningKeyError or an OutboxError, leaving the old key in
    force."""
    finish_pending(key_path, outbox)
    pending = pending_path(key_path)
    public_hex = keys.generate(pending, overwrite=True)
    new_key = keys.load(pending)
    try:
        seq = outbox.rotate(new_key, host)
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    _install(pending, key_path)
    return seq, public_hex


def finish_pending(key_path: Path, outbox: Outbox) -> str | None:
    """Completes a rotation a crash interrupted: the outbox committed it, so the new key
    replaces the old in the key file and the outbox signs with it; a new key the outbox
    never took is removed. Returns what was done (for the log), None when nothing waited.
    Raises SigningKeyError when the key file and the outbox's chain disagree otherwise."""
    pending = pending_path(key_path)
    done = None
    if pending.exists():
        new_key = keys.load(pending)
        if outbox.rotated_to == chain.raw_public_key(new_key):
            _install(pending, key_path)
            outbox.use_key(new_key)
            done = f"completed the key rotation to {chain.public_key_hex(new_key)}"
        else:
            pending.unlink()
            done = "removed a new key from a key rotation that never reached the outbox"
        log.warning("%s: %s", key_path, done)
    rotated_to = outbox.rotated_to
    current = chain.raw_public_key(outbox.signing_key)
    if rotated_to is not None and rotated_to != current:
        raise keys.SigningKeyError(
            f"{key_path}: holds key {current.hex()}, but the outbox's chain was handed to key "
            f"{rotated_to.hex()} by a key rotation: restore that key file"
        )
    return done


def _install(pending: Path, key_path: Path) -> None:
    try:
        os.replace(pending, key_path)
    except OSError as exc:
        raise keys.SigningKeyError(f"{key_path}: cannot install the rotated key: {exc}") from exc
    keys.fsync_dir(key_path.parent)
