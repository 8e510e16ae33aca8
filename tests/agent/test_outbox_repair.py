"""Records damaged on the agent's disk before delivery (issue 13, finding 7): found at start
by record, repaired without re-signing anything, the damaged bytes kept as evidence, and a
chain the collector accepts afterwards, with the lost span reported as a gap."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from outbox_helpers import AGENT_ID, draft, open_outbox

from creditmeter import chain
from creditmeter.agent import keys
from creditmeter.agent.main import main
from creditmeter.agent.outbox import Outbox
from creditmeter.agent.outbox_repair import Damage, damage, repair
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import ingest_pb2, usage_pb2

COLLECTOR_NOW_US = 1_800_000_000_000_000
GPUS = ("GPU-0000", "GPU-0001")


def written(path: Path, key: Ed25519PrivateKey, count: int = 12, acked: int = 4) -> None:
    """``count`` records over two GPUs in segments of 3, the first ``acked`` acknowledged."""
    with open_outbox(path, key, max_segment=3, keep_acked=100) as outbox:
        for n in range(count):
            record = draft(1_000 + n)
            record.gpu.uuid = GPUS[n % 2]
            record.start_unix_us += n * 10_000_000
            record.end_unix_us += n * 10_000_000
            outbox.append([record])
        batch = outbox.batch_after(0, acked)
        assert batch is not None and batch.last_seq == acked
        outbox.ack(acked, batch.head_hash)


def corrupt(path: Path, seq: int, column: str, change: Callable[[bytes], bytes]) -> None:
    """What a failing disk does to one stored record (the outbox closed: it holds a lock)."""
    with closing(sqlite3.connect(path)) as conn, conn:
        (value,) = conn.execute(f"SELECT {column} FROM records WHERE seq = ?", (seq,)).fetchone()
        conn.execute(f"UPDATE records SET {column} = ? WHERE seq = ?", (change(bytes(value)), seq))


def flip(data: bytes) -> bytes:
    return data[:5] + bytes([data[5] ^ 0x10]) + data[6:]


def delivered(outbox: Outbox) -> list[usage_pb2.UsageRecord]:
    """What the collector's verifier makes of every unacknowledged record, sent as the
    shipper sends them; raises if it refuses a batch or would quarantine a record."""
    verifier = Verifier(clock_us=lambda: COLLECTOR_NOW_US)
    public_key = outbox_key.public_key()
    out, acked = [], outbox.acked_seq
    prev = outbox.acked_hash
    while (batch := outbox.batch_after(acked, 100)) is not None:
        sent = ingest_pb2.RecordBatch(
            agent_id=AGENT_ID, records=list(batch.records), signature=batch.signature
        )
        checked = verifier.verify(sent, public_key).records
        assert checked.quarantined == () and checked.first_prev_hash == prev
        out += [usage_pb2.UsageRecord.FromString(r) for r in batch.records]
        acked, prev = batch.last_seq, batch.head_hash
    return out


outbox_key = chain.generate_key()


@pytest.mark.parametrize(
    ("column", "change", "problem"),
    [
        ("data", flip, "its bytes no longer match the hash stored with them"),
        ("signature", flip, "the signature over it does not verify"),
        ("data", lambda _: b"\xff\xff\xff", "its bytes no longer match"),
    ],
)
def test_damage_is_found_by_record_and_repaired_without_signing_it_again(
    tmp_path: Path, column: str, change: Callable[[bytes], bytes], problem: str
) -> None:
    path = tmp_path / "outbox.db"
    written(path, outbox_key)
    damaged_seq = 9 if column == "signature" else 7  # seqs 3, 6, 9, 12 end segments
    with closing(sqlite3.connect(path)) as conn:
        original = conn.execute(
            "SELECT data, hash, signature FROM records WHERE seq = ?", (damaged_seq,)
        ).fetchone()
    corrupt(path, damaged_seq, column, change)
    with open_outbox(path, outbox_key, max_segment=3) as outbox:
        found = damage(outbox, outbox_key.public_key())
        assert [d.seq for d in found] == [damaged_seq] and problem in found[0].problem
        found, moved, gaps = repair(outbox, outbox_key.public_key())
        assert (moved, gaps) == (12 - damaged_seq + 1, 2)  # two GPUs lost time
        assert damage(outbox, outbox_key.public_key()) == []
        records = delivered(outbox)
    # The records before the damage go as they were; then one gap per GPU for the rest.
    assert [r.seq for r in records] == list(range(5, damaged_seq + 2))
    gaps = records[-2:]
    assert {g.gpu.uuid for g in gaps} == set(GPUS)
    for g in gaps:
        assert g.busy_us == 0 and [x.reason for x in g.gaps] == [
            usage_pb2.GAP_REASON_OUTBOX_DAMAGED
        ]
        assert g.gaps[0].duration_us == g.end_unix_us - g.start_unix_us > 0
    # The damaged bytes, and the intact ones after them, are kept unchanged as evidence.
    with closing(sqlite3.connect(path)) as conn:
        kept = conn.execute("SELECT seq, problem FROM damaged_records ORDER BY seq").fetchall()
        evidence = conn.execute(
            "SELECT data, hash, signature FROM damaged_records WHERE seq = ?", (damaged_seq,)
        ).fetchone()
    assert [seq for seq, _ in kept] == list(range(damaged_seq, 13))
    assert kept[0][1] == found[0].problem and kept[-1][1] == "follows a damaged record in the chain"
    assert evidence[1] == original[1]  # the hash as written: the record was not re-signed


def test_a_sound_outbox_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    written(path, outbox_key)
    with open_outbox(path, outbox_key, max_segment=3) as outbox:
        assert damage(outbox, outbox_key.public_key()) == []
        assert repair(outbox, outbox_key.public_key()) == ([], 0, 0)
        assert outbox.last_seq == 12


def test_a_record_out_of_the_chain_is_named(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    written(path, outbox_key)
    with closing(sqlite3.connect(path)) as conn, conn:  # another record's bytes and hash
        data, digest = conn.execute("SELECT data, hash FROM records WHERE seq = 5").fetchone()
        conn.execute("UPDATE records SET data = ?, hash = ? WHERE seq = 8", (data, digest))
    with open_outbox(path, outbox_key, max_segment=3) as outbox:
        assert damage(outbox, outbox_key.public_key()) == [
            Damage(8, "its bytes say seq 5"),
            Damage(9, "it does not link to the record before it"),
        ]


# -- the command, as an operator runs it ---------------------------------------------------------


def test_outbox_check_and_repair_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys.generate(tmp_path / "signing-key.pem")
    key = keys.load(tmp_path / "signing-key.pem")
    written(tmp_path / "outbox.db", key)
    corrupt(tmp_path / "outbox.db", 10, "data", flip)
    config = ["--set", f"agent.state_dir={tmp_path}", "--set", f"agent.id={AGENT_ID}"]

    assert main(["outbox", "check", *config]) == 1
    out, err = capsys.readouterr()
    assert out == "seq 10: its bytes no longer match the hash stored with them\n"
    assert "1 of 8 unacknowledged records damaged" in err and "outbox repair" in err

    assert main(["outbox", "repair", *config]) == 0
    out, _ = capsys.readouterr()
    assert "set 3 records aside from seq 10 on" in out and "wrote 2 gap record(s)" in out

    assert main(["outbox", "check", *config]) == 0
    assert "none damaged" in capsys.readouterr().out
    assert main(["outbox", "repair", *config]) == 0
    assert "nothing changed" in capsys.readouterr().out
