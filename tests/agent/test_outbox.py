"""The outbox: numbering, chain, segments, durability, bounds, acks, failures, opening."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
from contextlib import closing
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from outbox_helpers import AGENT_ID, ManualClock, draft, drafts, open_outbox, parse

from creditmeter import chain
from creditmeter.agent.errors import AgentError
from creditmeter.agent.outbox import (
    AckBeyondHead,
    AckMismatch,
    Outbox,
    OutboxFull,
    OutboxOpenError,
    OutboxWriteError,
    RecordsGone,
)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return chain.generate_key()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.db"


def all_records(outbox: Outbox) -> list[bytes]:
    batch = outbox.batch_after(outbox.pruned_through, 1_000_000)
    assert batch is not None
    return list(batch.records)


def test_append_numbers_chains_and_signs(path: Path, key: Ed25519PrivateKey) -> None:
    given = drafts(3)
    with open_outbox(path, key) as outbox:
        assert outbox.append(given) == [1, 2, 3]
        batch = outbox.batch_after(0, 100)
    assert batch is not None
    records = [parse(data) for data in batch.records]
    assert [r.seq for r in records] == [1, 2, 3]
    assert {r.agent_id for r in records} == {AGENT_ID}
    assert [r.busy_us for r in records] == [1, 2, 3]
    assert records[0].prev_hash == bytes(32)
    assert records[1].prev_hash == chain.record_hash(batch.records[0])
    assert records[2].prev_hash == chain.record_hash(batch.records[1])
    assert batch.head_hash == chain.record_hash(batch.records[2])
    chain.verify_head(key.public_key(), batch.head_hash, batch.signature)
    assert [d.seq for d in given] == [0, 0, 0]  # the caller's drafts are left alone


def test_drafts_must_not_carry_chain_fields(path: Path, key: Ed25519PrivateKey) -> None:
    numbered = draft()
    numbered.seq = 7
    foreign = draft()
    foreign.agent_id = "another-host"
    with open_outbox(path, key) as outbox:
        for bad in (numbered, foreign):
            with pytest.raises(ValueError, match="must not carry"):
                outbox.append([bad])
        assert outbox.last_seq == 0


def test_segments_end_with_signatures_and_batches_end_at_segment_ends(
    path: Path, key: Ed25519PrivateKey
) -> None:
    # Segments of at most 2: one append of 5 records is signed at seqs 2, 4 and 5.
    with open_outbox(path, key, max_segment=2) as outbox:
        outbox.append(drafts(5))
        spans = {}
        for after, limit in [(0, 3), (0, 4), (0, 1), (2, 10), (4, 1)]:
            batch = outbox.batch_after(after, limit)
            assert batch is not None
            chain.verify_head(key.public_key(), batch.head_hash, batch.signature)
            hashes = [chain.record_hash(r) for r in batch.records]
            chain.verify_span(key.public_key(), hashes, batch.span_signature)
            assert [parse(r).seq for r in batch.records] == list(
                range(batch.first_seq, batch.last_seq + 1)
            )
            spans[(after, limit)] = (batch.first_seq, batch.last_seq)
        assert outbox.batch_after(5, 10) is None
    assert spans == {
        (0, 3): (1, 2),  # 3 would split the second segment
        (0, 4): (1, 4),
        (0, 1): (1, 2),  # a segment larger than the limit still goes, whole
        (2, 10): (3, 5),
        (4, 1): (5, 5),
    }


def test_every_append_ends_a_segment(path: Path, key: Ed25519PrivateKey) -> None:
    with open_outbox(path, key, max_segment=256) as outbox:
        outbox.append(drafts(2))
        outbox.append(drafts(1))
        first = outbox.batch_after(0, 2)
        assert first is not None
        assert (first.first_seq, first.last_seq) == (1, 2)


def test_seq_and_chain_survive_reopen(path: Path, key: Ed25519PrivateKey) -> None:
    with open_outbox(path, key) as outbox:
        outbox.append(drafts(2))
        second = all_records(outbox)[1]
    with open_outbox(path, key) as outbox:
        assert (outbox.last_seq, outbox.acked_seq, outbox.depth()) == (2, 0, 2)
        assert outbox.append([draft()]) == [3]
        third = parse(all_records(outbox)[2])
    assert third.prev_hash == chain.record_hash(second)


def test_ack_prunes_and_the_head_survives_in_meta(path: Path, key: Ed25519PrivateKey) -> None:
    with open_outbox(path, key) as outbox:
        outbox.append(drafts(3))
        third = all_records(outbox)[2]
        assert outbox.ack(3, chain.record_hash(third)) == 3
        assert (outbox.acked_seq, outbox.depth(), outbox.pruned_through) == (3, 0, 3)
        assert outbox.batch_after(3, 10) is None
    with closing(sqlite3.connect(path)) as db, db:
        assert db.execute("SELECT count(*) FROM records").fetchone() == (0,)
    db.close()
    with open_outbox(path, key) as outbox:
        assert (outbox.last_seq, outbox.acked_seq) == (3, 3)
        assert outbox.append([draft()]) == [4]
        fourth = parse(all_records(outbox)[0])
    assert fourth.seq == 4
    assert fourth.prev_hash == chain.record_hash(third)


def test_keep_acked_retains_the_newest_acked_records(path: Path, key: Ed25519PrivateKey) -> None:
    with open_outbox(path, key, keep_acked=2, max_segment=1) as outbox:
        outbox.append(drafts(5))
        fifth = all_records(outbox)[4]
        outbox.ack(5, chain.record_hash(fifth))
        assert outbox.pruned_through == 3
        again = outbox.batch_after(3, 10)
        assert again is not None
        assert (again.first_seq, again.last_seq) == (4, 5)
        with pytest.raises(RecordsGone, match="3"):
            outbox.batch_after(2, 10)


def test_state_is_written_with_the_records(path: Path, key: Ed25519PrivateKey) -> None:
    with open_outbox(path, key) as outbox:
        assert outbox.state() == {}
        outbox.append(drafts(1), {"meter": b"cursor-1", "other": b"x"})
        outbox.append([], {"meter": b"cursor-2"})  # state alone, no records
    with open_outbox(path, key) as outbox:
        assert outbox.state() == {"meter": b"cursor-2", "other": b"x"}
        assert outbox.last_seq == 1


def test_outbox_full_writes_nothing(path: Path, key: Ed25519PrivateKey) -> None:
    with open_outbox(path, key, max_records=5) as outbox:
        outbox.append(drafts(3), {"meter": b"a"})
        with pytest.raises(OutboxFull) as raised:
            outbox.append(drafts(3), {"meter": b"b"})
        assert (raised.value.depth, raised.value.max_records) == (3, 5)
        assert isinstance(raised.value, AgentError)
        assert (outbox.last_seq, outbox.state()) == (3, {"meter": b"a"})
        assert outbox.append(drafts(2)) == [4, 5]
        outbox.ack(5, chain.record_hash(all_records(outbox)[4]))
        assert outbox.append(drafts(5)) == [6, 7, 8, 9, 10]


def test_a_failed_write_changes_nothing_and_the_outbox_stays_usable(
    path: Path, key: Ed25519PrivateKey
) -> None:
    # 64 KiB caps the file (SQLite max_page_count): a real SQLITE_FULL, as on a full disk.
    with open_outbox(path, key, max_db_bytes=64 * 1024) as outbox:
        outbox.append(drafts(10), {"meter": b"before"})
        before = all_records(outbox)
        with pytest.raises(OutboxWriteError, match="full") as raised:
            outbox.append(drafts(2000), {"meter": b"lost"})
        assert str(path) in str(raised.value)
        assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
        assert (outbox.last_seq, outbox.depth()) == (10, 10)
        assert outbox.state() == {"meter": b"before"}
        assert all_records(outbox) == before
        assert outbox.append([draft()]) == [11]
        eleventh = parse(all_records(outbox)[10])
        assert eleventh.prev_hash == chain.record_hash(before[9])
    with open_outbox(path, key) as outbox:
        assert outbox.last_seq == 11
        assert all_records(outbox)[:10] == before


def test_ack_with_another_hash_is_refused_and_changes_nothing(
    path: Path, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    with open_outbox(path, key) as outbox:
        outbox.append(drafts(3))
        before = all_records(outbox)
        with caplog.at_level(logging.ERROR), pytest.raises(AckMismatch, match="seq 2"):
            outbox.ack(2, b"\x01" * 32)
        assert (outbox.acked_seq, outbox.depth()) == (0, 3)
        assert all_records(outbox) == before
    assert any(
        r.levelno == logging.ERROR and "different bytes" in r.message for r in caplog.records
    )


def test_ack_beyond_the_last_seq_is_refused(path: Path, key: Ed25519PrivateKey) -> None:
    with open_outbox(path, key) as outbox:
        outbox.append(drafts(2))
        with pytest.raises(AckBeyondHead, match="seq 9"):
            outbox.ack(9, b"\x00" * 32)
        assert outbox.acked_seq == 0


def test_repeated_and_older_acks_change_nothing(path: Path, key: Ed25519PrivateKey) -> None:
    with open_outbox(path, key) as outbox:
        outbox.append(drafts(3))
        hashes = [chain.record_hash(r) for r in all_records(outbox)]
        assert outbox.ack(2, hashes[1]) == 2
        assert outbox.ack(2, hashes[1]) == 0
        assert outbox.ack(1, hashes[0]) == 0  # pruned: cannot be checked, changes nothing
        assert outbox.ack(0, b"") == 0
        assert outbox.acked_seq == 2
        with pytest.raises(AckMismatch):
            outbox.ack(2, hashes[0])


def test_depth_and_age_of_the_oldest_unacked_record(path: Path, key: Ed25519PrivateKey) -> None:
    clock = ManualClock()
    with open_outbox(path, key, clock=clock) as outbox:
        assert (outbox.depth(), outbox.oldest_unacked_age_s()) == (0, 0.0)
        outbox.append(drafts(2))
        clock.advance(5.0)
        outbox.append(drafts(1))
        clock.advance(2.5)
        assert outbox.depth() == 3
        assert outbox.oldest_unacked_age_s() == pytest.approx(7.5)
        outbox.ack(2, chain.record_hash(all_records(outbox)[1]))
        assert outbox.oldest_unacked_age_s() == pytest.approx(2.5)
        batch = outbox.batch_after(2, 10)
        assert batch is not None
        assert batch.oldest_created_unix_s == pytest.approx(clock.wall_s - 2.5)


def test_waiters_wake_when_records_are_appended(path: Path, key: Ed25519PrivateKey) -> None:
    with open_outbox(path, key) as outbox:
        assert outbox.wait_for_records(0, timeout_s=0.01) is False
        woke = threading.Event()
        seen: list[int] = []
        outbox.add_append_listener(seen.append)

        def waiter() -> None:
            if outbox.wait_for_records(0, timeout_s=30.0):
                woke.set()

        thread = threading.Thread(target=waiter)
        thread.start()
        outbox.append(drafts(2))
        assert woke.wait(10.0)
        thread.join()
        assert seen == [2]
        outbox.remove_append_listener(seen.append)
        outbox.append(drafts(1))
        assert seen == [2]
        assert outbox.wait_for_records(2, timeout_s=0.0) is True


def test_concurrent_appends_and_acks_keep_the_chain(path: Path, key: Ed25519PrivateKey) -> None:
    with open_outbox(path, key, max_segment=3) as outbox:

        def meter() -> None:
            for i in range(50):
                outbox.append(drafts(4, first_busy_us=i * 4 + 1))

        thread = threading.Thread(target=meter)
        thread.start()
        delivered: list[bytes] = []
        acked = 0
        while acked < 200:
            if not outbox.wait_for_records(acked, timeout_s=10.0):
                raise AssertionError("no records appended")
            batch = outbox.batch_after(acked, 7)
            assert batch is not None and batch.first_seq == acked + 1
            delivered.extend(batch.records)
            outbox.ack(batch.last_seq, batch.head_hash)
            acked = batch.last_seq
        thread.join()
    records = [parse(r) for r in delivered]
    assert [r.seq for r in records] == list(range(1, 201))
    assert sorted(r.busy_us for r in records) == list(range(1, 201))
    assert all(records[i].prev_hash == chain.record_hash(delivered[i - 1]) for i in range(1, 200))


# -- files -------------------------------------------------------------------------------------


def test_directory_and_files_are_private(path: Path, key: Ed25519PrivateKey) -> None:
    with open_outbox(path, key) as outbox:
        outbox.append(drafts(1))
        wal = path.with_name(path.name + "-wal")
        assert stat.S_IMODE(os.stat(wal).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_file_that_is_not_a_database_is_named(path: Path, key: Ed25519PrivateKey) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not sqlite " * 100)
    with pytest.raises(OutboxOpenError) as raised:
        open_outbox(path, key)
    assert str(path) in str(raised.value)
    assert "not a SQLite database" in str(raised.value)


def test_a_database_of_another_application_is_refused(path: Path, key: Ed25519PrivateKey) -> None:
    path.parent.mkdir(parents=True)
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
    db.close()
    with pytest.raises(OutboxOpenError, match="not an outbox"):
        open_outbox(path, key)


def test_the_outbox_of_another_agent_is_refused(path: Path, key: Ed25519PrivateKey) -> None:
    with open_outbox(path, key, agent_id="host-a") as outbox:
        outbox.append(drafts(1))
    with pytest.raises(OutboxOpenError) as raised:
        open_outbox(path, key, agent_id="host-b")
    assert str(path) in str(raised.value)
    assert "'host-a', not 'host-b'" in str(raised.value)


def test_a_second_process_cannot_open_the_outbox(path: Path, key: Ed25519PrivateKey) -> None:
    with open_outbox(path, key), pytest.raises(OutboxOpenError, match="another process"):
        open_outbox(path, key)


def test_a_damaged_head_is_named(path: Path, key: Ed25519PrivateKey) -> None:
    with open_outbox(path, key) as outbox:
        outbox.append(drafts(2))
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("DELETE FROM records WHERE seq = 2")
    db.close()
    with pytest.raises(OutboxOpenError, match="damaged"):
        open_outbox(path, key)


def test_reopening_with_another_key_warns_about_unacked_records(
    path: Path, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    with open_outbox(path, key) as outbox:
        outbox.append(drafts(2))
    with caplog.at_level(logging.WARNING), open_outbox(path, chain.generate_key()):
        pass
    assert any("signed with another key" in r.message for r in caplog.records)


def test_a_closed_outbox_refuses_work(path: Path, key: Ed25519PrivateKey) -> None:
    outbox = open_outbox(path, key)
    outbox.close()
    outbox.close()
    with pytest.raises(AgentError, match="closed"):
        outbox.append(drafts(1))
