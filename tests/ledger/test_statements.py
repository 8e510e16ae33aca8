"""Signed statements and their bundles: closing a period signs what it sums, and a customer
checks a bundle with creditmeter-verify alone, seeing no other tenant's usage.

The bundles here come from real signed chains through the real verifier and store (both
backends); each tamper test changes one part of a good bundle and names what the verifier
must say.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from creditmeter import chain, verify
from creditmeter.collector.errors import EvidenceMismatch, NoStatement
from creditmeter.collector.ledger import Ledger
from creditmeter.collector.ledger_store import ApiCharge, LineKind
from creditmeter.collector.statements import (
    STATEMENT_CONTEXT,
    StatementSigner,
    bundle,
    canonical_json,
    seq_ranges,
)
from creditmeter.collector.verifier import Verifier
from creditmeter.v1 import usage_pb2
from tests.collector.records import WINDOW_US, AgentChain, device_books, labelled, signed_batch

from .conftest import DAY_US, HOUR_US, JULY_1_US, JUNE_1_US, Clock, LedgerTestStore

Bundle = dict[str, Any]
JUNE_5_US = JUNE_1_US + 4 * DAY_US
SECRET = "globex-secret-model"  # the other tenant's model: must appear in no acme bundle


@pytest.fixture
def signer() -> StatementSigner:
    return StatementSigner(chain.generate_key())


@pytest.fixture
def agent(store: LedgerTestStore) -> AgentChain:
    one = AgentChain("host-a")
    store.enroll_agent(one.agent_id, one.public_key_hex)
    return one


def deliver(
    store: LedgerTestStore,
    clock: Clock,
    agent: AgentChain,
    mutations: list[Callable[[Any], None]],
    *,
    span: bool = True,
) -> None:
    """One batch of records, in order, as the agent sends it."""
    first = len(agent.records) + 1
    for mutate in mutations:
        agent.append(mutate)
    batch = signed_batch(agent.agent_id, agent.key, agent.records[first - 1 :], span=span)
    store.ingest(agent.agent_id, Verifier(clock_us=clock).verify(batch, agent.key.public_key()))


def interleaved(start_us: int, windows: int) -> list[Callable[[Any], None]]:
    """acme and globex on one GPU, window after window, with the GPU's books between."""
    out: list[Callable[[Any], None]] = []
    for n in range(windows):
        at_us = start_us + n * WINDOW_US
        out.append(labelled("acme", "sdxl", 4_000_000 + n, at_us))
        out.append(labelled("globex", SECRET, 3_000_000, at_us))
        out.append(device_books(7_000_000 + n))
    return out


@pytest.fixture
def june(
    ledger: Ledger, store: LedgerTestStore, clock: Clock, agent: AgentChain, acme: str
) -> Ledger:
    """acme's June: shared segments with globex, a charge, a top-up and a refund."""
    ledger.open_account("globex", "pro", by="ops", anchor_day=1, since_us=JUNE_1_US)
    deliver(store, clock, agent, interleaved(JUNE_5_US, 3))
    deliver(store, clock, agent, interleaved(JUNE_5_US + HOUR_US, 2))
    ledger.record_charge(ApiCharge("req-1", "acme", "gpt-4o", 3, JUNE_5_US))
    ledger.record_charge(ApiCharge("req-g", "globex", "gpt-4o", 9, JUNE_5_US))
    ledger.top_up("acme", 5_000_000, by="ops", reason="card", expires_us=None, key="t1")
    ledger.adjust("acme", 1_500_000, by="ops", reason="refund", key="a1")
    clock.now_us = JULY_1_US + DAY_US
    return ledger


def close_june(ledger: Ledger, signer: StatementSigner) -> None:
    (statement,) = ledger.close_periods("acme", JULY_1_US, by="ops", signer=signer)
    assert statement.start_us == JUNE_1_US


@pytest.fixture
def good(june: Ledger, store: LedgerTestStore, signer: StatementSigner) -> Bundle:
    close_june(june, signer)
    return bundle(store, "acme", JUNE_1_US)


def problems(document: Bundle, collector_key_hex: str | None = None) -> list[str]:
    return verify.verify(document, collector_key_hex)[1].problems


def document_of(one: Bundle) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(one["statement"]["document"])
    return parsed


def resigned(one: Bundle, signer: StatementSigner, change: Callable[[Any], None]) -> Bundle:
    """The bundle with its statement changed and signed again by ``signer``: a collector
    that lies consistently about what it summed."""
    forged = copy.deepcopy(one)
    document = document_of(forged)
    change(document)
    data = canonical_json(document)
    forged["statement"]["document"] = data.decode()
    forged["statement"]["signature_hex"] = signer.key.sign(STATEMENT_CONTEXT + data).hex()
    return forged


# -- what a good bundle holds ----------------------------------------------------------------


def test_a_closed_period_verifies_from_its_bundle_alone(
    good: Bundle, signer: StatementSigner, june: Ledger
) -> None:
    summary, report = verify.verify(good, signer.public_key_hex)
    assert report.problems == []
    balance = june.balance("acme", JUNE_1_US)
    assert summary.startswith("statement of acme for 2025-06-01T00:00:00Z .. 2025-07-01T00:00:00Z")
    assert f"{balance.charged_micro // 10**6}." in summary
    assert "5 records from 1 agents, 1 API charges" in summary
    document = document_of(good)
    assert document["balance"]["remaining_micro"] == balance.remaining_micro
    assert [line["kind"] for line in document["lines"]] == ["api", "usage"]
    assert [e["kind"] for e in document["entries"]] == ["top_up", "adjustment"]


def test_a_bundle_reveals_no_other_tenants_usage(good: Bundle) -> None:
    text = json.dumps(good)
    assert "globex" not in text and SECRET not in text and "req-g" not in text
    leaves = [leaf for segment in good["segments"] for leaf in segment["records"]]
    # Each window: acme's record in full, globex's and the GPU's books as hashes only.
    assert sum("record_b64" in leaf for leaf in leaves) == 5
    assert sum("hash_hex" in leaf for leaf in leaves) == 10


def test_the_statement_names_what_it_summed(good: Bundle, agent: AgentChain) -> None:
    (evidence,) = document_of(good)["usage"]
    assert evidence["agent_id"] == agent.agent_id
    assert evidence["public_key_hex"] == agent.public_key_hex
    assert evidence["seqs"] == [[1, 1], [4, 4], [7, 7], [10, 10], [13, 13]]
    assert [(first, last) for first, last, _ in evidence["segments"]] == [(1, 9), (10, 15)]


def test_seq_ranges_run_length_code_sorted_seqs() -> None:
    assert seq_ranges([1, 2, 3, 7, 9, 10]) == [[1, 3], [7, 7], [9, 10]]
    assert seq_ranges([]) == []


# -- tampering: every part of a bundle -------------------------------------------------------


def _set_line_credits(document: dict[str, Any]) -> None:
    document["lines"][1]["credits_micro"] += 1


TAMPERS: dict[str, tuple[Callable[[Bundle], None], str]] = {
    "document": (
        lambda b: b["statement"].update(
            document=b["statement"]["document"].replace('"plan":"pro"', '"plan":"max"')
        ),
        "statement: its signature does not verify under the collector key",
    ),
    "statement signature": (
        lambda b: b["statement"].update(signature_hex="00" * 64),
        "statement: its signature does not verify under the collector key",
    ),
    "collector key": (
        lambda b: b["statement"].update(
            collector_public_key_hex=chain.public_key_hex(chain.generate_key())
        ),
        "statement: the bundle's collector key is not the one the statement names",
    ),
    "own record": (
        lambda b: b["segments"][0]["records"][0].update(
            record_b64=_edited_record(b["segments"][0]["records"][0]["record_b64"])
        ),
        "agent host-a segment 1..9: the span signature does not verify under the agent's key",
    ),
    "other record's hash": (
        lambda b: b["segments"][0]["records"][1].update(hash_hex="ab" * 32),
        "agent host-a segment 1..9: the span signature does not verify under the agent's key",
    ),
    "segment signature": (
        lambda b: b["segments"][1].update(signature_hex="11" * 64),
        "segments: the bundle's segments are not the ones the statement lists",
    ),
    "a record left out": (
        lambda b: b["segments"][1]["records"].pop(),
        "agent host-a segment 10..15: holds 5 records, not 6",
    ),
    "an own record hidden as a hash": (
        lambda b: b["segments"][0]["records"].__setitem__(
            3, {"seq": 4, "hash_hex": _leaf_hash(b["segments"][0]["records"][3])}
        ),
        "agent host-a: summed records 4 are not in the bundle",
    ),
    "agent key": (
        lambda b: b["agent_public_keys"].update(
            {"host-a": chain.public_key_hex(chain.generate_key())}
        ),
        "agents: the bundle's agent keys are not the ones the statement names",
    ),
}


def _edited_record(record_b64: str) -> str:
    import base64

    rec = usage_pb2.UsageRecord.FromString(base64.b64decode(record_b64))
    rec.busy_us += 1_000_000
    return base64.b64encode(rec.SerializeToString()).decode()


def _leaf_hash(leaf: dict[str, Any]) -> str:
    import base64

    return chain.record_hash(base64.b64decode(leaf["record_b64"])).hex()


@pytest.mark.parametrize("part", sorted(TAMPERS))
def test_tampering_with_any_part_is_named(good: Bundle, part: str) -> None:
    tamper, expected = TAMPERS[part]
    forged = copy.deepcopy(good)
    tamper(forged)
    found = problems(forged)
    assert expected in found, found


def test_a_statement_signed_by_another_key_fails_against_the_published_key(
    good: Bundle, signer: StatementSigner
) -> None:
    impostor = StatementSigner(chain.generate_key())

    def rekey(document: dict[str, Any]) -> None:
        document["collector_public_key_hex"] = impostor.public_key_hex

    forged = resigned(good, impostor, rekey)
    forged["statement"]["collector_public_key_hex"] = impostor.public_key_hex
    assert problems(forged) == []  # self-consistent: only a pinned key tells
    assert problems(forged, signer.public_key_hex) == [
        f"statement: signed by collector key {impostor.public_key_hex}, not the pinned key"
    ]


def test_a_collector_that_signs_wrong_lines_is_caught_by_the_records(
    good: Bundle, signer: StatementSigner
) -> None:
    usage_line = document_of(good)["lines"][1]
    forged = resigned(good, signer, _set_line_credits)
    found = problems(forged, signer.public_key_hex)
    credits = usage_line["credits_micro"]
    assert found[0] == (
        f"line usage sdxl (prices from 1970-01-01T00:00:00Z): the statement says "
        f"{usage_line['quantity']} for {verify._credits(credits + 1)} credits, the records and "
        f"charges give {usage_line['quantity']} for {verify._credits(credits)} credits"
    )
    assert any(p.startswith("balance: charged is") for p in found)


def test_a_collector_that_sums_a_record_twice_or_another_tenants_is_caught(
    good: Bundle, signer: StatementSigner
) -> None:
    def claim_globex(document: dict[str, Any]) -> None:
        document["usage"][0]["seqs"].append([2, 2])  # globex's record of the first window

    forged = resigned(good, signer, claim_globex)
    assert "agent host-a: summed records 2 are not in the bundle" in problems(forged)


def test_wrong_balance_arithmetic_is_caught(good: Bundle, signer: StatementSigner) -> None:
    def inflate(document: dict[str, Any]) -> None:
        document["balance"]["used_micro"] += 7

    found = problems(resigned(good, signer, inflate))
    assert len(found) == 1 and found[0].startswith("balance: used is")


# -- what gets summed --------------------------------------------------------------------------


def test_late_usage_is_summed_once_by_the_next_statement(
    good: Bundle, june: Ledger, store: LedgerTestStore, clock: Clock, agent: AgentChain
) -> None:
    deliver(store, clock, agent, interleaved(JUNE_5_US + 2 * HOUR_US, 1))  # June, arrived late
    deliver(store, clock, agent, interleaved(JULY_1_US + HOUR_US, 1))
    clock.now_us = JULY_1_US + 32 * DAY_US
    signer = StatementSigner(chain.generate_key())
    (july,) = june.close_periods("acme", JULY_1_US + 31 * DAY_US, by="ops", signer=signer)
    assert {line.kind for line in july.lines} == {LineKind.USAGE, LineKind.LATE_USAGE}
    july_bundle = bundle(store, "acme", JULY_1_US)
    summary, report = verify.verify(july_bundle)
    assert report.problems == [] and "2 records from 1 agents" in summary
    assert document_of(july_bundle)["usage"][0]["seqs"] == [[16, 16], [19, 19]]


def test_a_head_signed_segment_closes_but_cannot_be_proven(
    ledger: Ledger,
    store: LedgerTestStore,
    clock: Clock,
    agent: AgentChain,
    acme: str,
    signer: StatementSigner,
) -> None:
    deliver(store, clock, agent, interleaved(JUNE_5_US, 1), span=False)
    clock.now_us = JULY_1_US + DAY_US
    close_june(ledger, signer)
    found = problems(bundle(store, "acme", JUNE_1_US))
    assert found[:2] == [
        "agent host-a segment ending at seq 3: signed by its head only (an agent from before "
        "span signatures); its records cannot be checked without other tenants' records",
        "agent host-a: summed records 1 are not in the bundle",
    ]


def test_records_that_disagree_with_the_rollups_refuse_the_close(
    june: Ledger, store: LedgerTestStore, signer: StatementSigner, backend: Any
) -> None:
    backend.execute("UPDATE rollups_hourly SET busy_us = busy_us + 1")
    with pytest.raises(EvidenceMismatch, match="the records and charges sum to"):
        june.close_periods("acme", JULY_1_US, by="ops", signer=signer)
    assert store.statements("acme") == []


def test_an_open_period_has_no_bundle(june: Ledger, store: LedgerTestStore) -> None:
    with pytest.raises(NoStatement, match="no signed statement for the period starting"):
        bundle(store, "acme", JUNE_1_US)


def test_unsigned_closes_keep_working(june: Ledger, store: LedgerTestStore) -> None:
    """Without a signer (the API's tests, older callers) a period closes as before."""
    (statement,) = june.close_periods("acme", JULY_1_US, by="ops")
    assert statement.charged_micro > 0 and store.signed_statements("acme") == []


# -- the verifier stands alone -----------------------------------------------------------------


def test_the_verifier_imports_nothing_of_creditmeter_protobuf_or_a_database() -> None:
    probe = (
        "import sys, creditmeter.verify; print(sorted(m for m in sys.modules if "
        "m.split('.')[0] in ('creditmeter', 'google', 'grpc', 'psycopg', 'sqlite3')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "['creditmeter', 'creditmeter.verify']"


def test_a_copy_of_the_verifier_file_checks_a_bundle(good: Bundle, tmp_path: Path) -> None:
    """What an auditor does: copy one file, run it with Python and cryptography."""
    script = tmp_path / "verify.py"
    shutil.copy(Path(verify.__file__), script)
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(good))
    out = subprocess.run(
        [sys.executable, str(script), str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=tmp_path,
    )
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.startswith("OK: statement of acme")


def test_a_statement_verifies_across_a_key_rotation(
    ledger: Ledger,
    store: LedgerTestStore,
    clock: Clock,
    agent: AgentChain,
    acme: str,
    signer: StatementSigner,
) -> None:
    deliver(store, clock, agent, interleaved(JUNE_5_US, 2))
    agent.rotate(JUNE_5_US + HOUR_US)  # seq 7, endorsed by the key before
    for mutate in interleaved(JUNE_5_US + 2 * HOUR_US, 2):
        agent.append(mutate)
    stored = store.get_agent(agent.agent_id)
    assert stored is not None
    batch = signed_batch(agent.agent_id, agent.key, agent.records[6:])  # the rotation on
    store.ingest(agent.agent_id, Verifier(clock_us=clock).verify(batch, stored.ring))
    clock.now_us = JULY_1_US + DAY_US
    close_june(ledger, signer)
    one = bundle(store, "acme", JUNE_1_US)
    (evidence,) = document_of(one)["usage"]
    assert [(after, how) for after, _, how in evidence["keys"]] == [
        (0, "enrolled"),
        (7, "rotated"),
    ]
    assert problems(one, signer.public_key_hex) == []
