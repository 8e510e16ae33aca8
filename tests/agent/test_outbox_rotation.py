"""The agent's side of a key rotation: the outbox appends the endorsed rotation record and
signs with the new key after it, batches pending from before go with their old-key head
signatures, and a rotation a crash interrupted is completed (or undone) at the next start.
The records come out exactly as the collector's verifier takes them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from outbox_helpers import AGENT_ID, drafts, open_outbox, parse

from creditmeter import chain
from creditmeter.agent import key_rotation, keys
from creditmeter.agent.outbox import Outbox
from creditmeter.collector.verifier import KeyRing, Verifier
from creditmeter.v1 import ingest_pb2, usage_pb2


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    path = tmp_path / "signing-key.pem"
    keys.generate(path)
    return path


def as_sent(batch: Outbox, first: int, limit: int) -> ingest_pb2.RecordBatch:
    """The outbox's batch after ``first - 1`` as the shipper sends it."""
    out = batch.batch_after(first - 1, limit)
    assert out is not None
    return ingest_pb2.RecordBatch(
        agent_id=AGENT_ID,
        records=out.records,
        signature=out.signature,
        span_signature=out.span_signature,
    )


def test_a_rotation_is_endorsed_in_the_chain_and_verifies_at_the_collector(
    tmp_path: Path, key_path: Path
) -> None:
    old = keys.load(key_path)
    with open_outbox(tmp_path / "outbox.db", old, max_segment=2) as outbox:
        outbox.append(drafts(3))  # pending: segments end at 2 and 3
        seq, new_hex = key_rotation.rotate(key_path, outbox, "host-1")
        outbox.append(drafts(2))
        assert seq == 4
        assert chain.public_key_hex(keys.load(key_path)) == new_hex
        assert not key_rotation.pending_path(key_path).exists()
        rotation = parse(outbox.batch_after(3, 1).records[0])  # type: ignore[union-attr]
        assert rotation.quality == usage_pb2.QUALITY_KEY_ROTATION
        assert rotation.key_rotation.new_public_key.hex() == new_hex
        ring = KeyRing.single(chain.public_key_hex(old))
        verifier = Verifier()
        before = as_sent(outbox, 1, 2)  # ends before the rotation: the old head signature
        assert before.span_signature == b""
        assert verifier.verify(before, ring).signing_key_hex == chain.public_key_hex(old)
        across = as_sent(outbox, 3, 10)  # 3..6: from the old key through the rotation
        verified = verifier.verify(across, ring)
        assert verified.signing_key_hex == new_hex
        assert verified.key_steps == ((4, chain.public_key_hex(old), new_hex),)


def test_a_restart_after_a_committed_rotation_finishes_it(tmp_path: Path, key_path: Path) -> None:
    """A crash after the outbox took the rotation, before the key file was replaced."""
    old = keys.load(key_path)
    pending = key_rotation.pending_path(key_path)
    keys.generate(pending)
    new = keys.load(pending)
    with open_outbox(tmp_path / "outbox.db", old) as outbox:
        outbox.rotate(new, "host-1")
    with open_outbox(tmp_path / "outbox.db", keys.load(key_path)) as outbox:
        done = key_rotation.finish_pending(key_path, outbox)
        assert done is not None and done.startswith("completed the key rotation")
        assert chain.raw_public_key(outbox.signing_key) == chain.raw_public_key(new)
    assert keys.load(key_path).private_bytes_raw() == new.private_bytes_raw()
    assert not pending.exists()


def test_a_rotation_that_never_reached_the_outbox_is_undone(tmp_path: Path, key_path: Path) -> None:
    old = keys.load(key_path)
    pending = key_rotation.pending_path(key_path)
    keys.generate(pending)
    with open_outbox(tmp_path / "outbox.db", old) as outbox:
        done = key_rotation.finish_pending(key_path, outbox)
        assert done == "removed a new key from a key rotation that never reached the outbox"
    assert not pending.exists()
    assert keys.load(key_path).private_bytes_raw() == old.private_bytes_raw()


def test_a_key_file_the_chain_was_handed_away_from_is_refused(
    tmp_path: Path, key_path: Path
) -> None:
    old = keys.load(key_path)
    with open_outbox(tmp_path / "outbox.db", old) as outbox:
        key_rotation.rotate(key_path, outbox, "host-1")
    os.unlink(key_path)
    keys.generate(key_path)  # neither the old key nor the rotated one
    with (
        open_outbox(tmp_path / "outbox.db", keys.load(key_path)) as outbox,
        pytest.raises(keys.SigningKeyError, match="was handed to key"),
    ):
        key_rotation.finish_pending(key_path, outbox)
