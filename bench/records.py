"""Realistic signed record chains for the delivery benchmarks, made as the agent makes them."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from creditmeter import chain
from creditmeter.v1 import ingest_pb2, usage_pb2

T0_US = 1_793_491_200_000_000  # 2026-11-01T00:00:00Z
WINDOW_US = 10_000_000
ACCOUNTS = [f"account-{i:03d}" for i in range(200)]
MODELS = ["sdxl", "flux-dev", "flux-schnell", "esrgan-4x", "llama-3-70b", "whisper-large"]


def usage(agent_id: str, seq: int, prev_hash: bytes, rng: random.Random) -> bytes:
    """One process's 10 s window on one of 8 GPUs, serialized. Each GPU's worker serves one
    model and a customer at a time, for about 100 s (ten windows) each, as inference does."""
    gpu = seq % 8
    window = seq // 8
    start_us = T0_US + window * WINDOW_US
    record = usage_pb2.UsageRecord(
        agent_id=agent_id,
        seq=seq,
        prev_hash=prev_hash,
        host=f"{agent_id}.gpu.example",
        start_unix_us=start_us,
        end_unix_us=start_us + WINDOW_US,
        gpu=usage_pb2.GpuRef(
            uuid=f"GPU-{gpu:08x}-1111-2222-3333-{abs(hash(agent_id)) % 10**12:012d}",
            index=gpu,
            name="NVIDIA H100 80GB HBM3",
        ),
        process=usage_pb2.ProcessRef(
            pid=10_000 + gpu, create_time_us=T0_US - 3_600_000_000, name="python3"
        ),
        attribution=usage_pb2.Attribution(
            account=ACCOUNTS[(gpu * 31 + window // 10) % len(ACCOUNTS)],
            model=MODELS[gpu % len(MODELS)],
            job_id=f"job-{seq}",
            source=usage_pb2.ATTRIBUTION_SOURCE_JOB_API,
        ),
        busy_us=rng.randrange(0, WINDOW_US),
        wall_us=WINDOW_US,
        peak_memory_bytes=rng.randrange(1 << 30, 80 << 30),
        energy_mj=rng.randrange(100_000, 7_000_000),
        source=usage_pb2.MEASUREMENT_SOURCE_NVML_PROCESS_UTIL,
    )
    return record.SerializeToString()


@dataclass
class Chain:
    """One agent's records, made and signed in batches as its outbox would."""

    agent_id: str
    key: Ed25519PrivateKey = field(default_factory=chain.generate_key)
    seq: int = 0
    head: bytes = chain.GENESIS_HASH
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    @property
    def public_key_hex(self) -> str:
        return chain.public_key_hex(self.key)

    def batch(self, size: int) -> ingest_pb2.RecordBatch:
        records = []
        for _ in range(size):
            self.seq += 1
            data = usage(self.agent_id, self.seq, self.head, self.rng)
            self.head = chain.record_hash(data)
            records.append(data)
        signature = chain.sign_head(self.key, self.head)
        return ingest_pb2.RecordBatch(agent_id=self.agent_id, records=records, signature=signature)
