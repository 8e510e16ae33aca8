"""Per-record signatures against one signature per chain head, both sides, batch of 1000.

The chain (SHA-256 of each record, linked by prev_hash) makes one Ed25519 signature over the
last record's hash cover every record of the batch; signing each record instead costs one
signature per record at the agent and one verification per record at the collector.
"""

from __future__ import annotations

import time

from bench.common import Result, median
from bench.records import Chain
from creditmeter import chain

BATCH = 1000


def _per_record(records: list[bytes], rounds: int) -> tuple[float, float]:
    key = chain.generate_key()
    public = key.public_key()
    sign_s, verify_s = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        sigs = [chain.sign_head(key, chain.record_hash(r)) for r in records]
        sign_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for r, sig in zip(records, sigs, strict=True):
            chain.verify_head(public, chain.record_hash(r), sig)
        verify_s.append(time.perf_counter() - start)
    return median(sign_s), median(verify_s)


def _chain_head(records: list[bytes], rounds: int) -> tuple[float, float]:
    key = chain.generate_key()
    public = key.public_key()
    sign_s, verify_s = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        head = chain.GENESIS_HASH
        for r in records:
            head = chain.record_hash(r)
        sig = chain.sign_head(key, head)
        sign_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        head = chain.GENESIS_HASH
        for r in records:
            head = chain.record_hash(r)
        chain.verify_head(public, head, sig)
        verify_s.append(time.perf_counter() - start)
    return median(sign_s), median(verify_s)


def run(quick: bool = False) -> tuple[list[Result], str]:
    records = list(Chain("bench-agent").batch(BATCH).records)
    rounds = 3 if quick else 7
    rec_sign, rec_verify = _per_record(records, rounds)
    head_sign, head_verify = _chain_head(records, rounds)
    results = [
        Result(
            "signing",
            "collector verification, chain head (records/s)",
            BATCH / head_verify,
            "rec/s",
            "per-record signatures",
            BATCH / rec_verify,
        ),
        Result(
            "signing",
            "agent signing, chain head (records/s)",
            BATCH / head_sign,
            "rec/s",
            "per-record signatures",
            BATCH / rec_sign,
        ),
    ]
    detail = (
        f"batch of {BATCH}: per-record signatures verify at {BATCH / rec_verify:,.0f} rec/s "
        f"(sign {BATCH / rec_sign:,.0f}); one chain-head signature verifies at "
        f"{BATCH / head_verify:,.0f} rec/s (sign {BATCH / head_sign:,.0f}). Chosen: chain head."
    )
    return results, detail
