"""The record chain: how a record's bytes are hashed, linked and signed.

Each agent's records form a hash chain: record n carries ``prev_hash`` = SHA-256 of the bytes
of record n-1 (32 zero bytes for n = 1). The agent signs the *head* of each segment it
writes: one Ed25519 signature over the hash of the segment's last record covers, through the
chain, every record before it.

Each batch it sends also carries a *span* signature: over the digest of the hashes of all
its records, in order (``span_digest``). It covers the same records, but a third party can
check one record of a span given only the hashes of the others: a customer's statement
bundle proves the customer's records without revealing other tenants' (``creditmeter.verify``
re-implements these bytes with the standard library; tests/test_chain.py holds both to
agree). Per-record signatures were measured against this
(``./dev bench signing``): verifying one signature costs as much as hashing and parsing
several hundred records, so per-record signatures would cap ingest far below the target.

The agent and the collector both import this module; nothing else defines these bytes.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS_HASH = bytes(32)  # prev_hash of seq 1
HASH_SIZE = 32  # bytes
# Domain separation: a signature made for a chain head can never be replayed as anything else.
_HEAD_CONTEXT = b"creditmeter.v1 chain head\x00"
_SPAN_CONTEXT = b"creditmeter.v1 span\x00"
_ROTATION_CONTEXT = b"creditmeter.v1 key rotation\x00"


class ChainError(Exception):
    """A record, key or signature does not fit the chain."""


class BadSignature(ChainError):
    """The signature does not verify under the agent's enrolled public key.

    Raised when records were altered after signing, or signed with another agent's key.
    """


class BadKey(ChainError):
    """A key file or string is not an Ed25519 key in the expected encoding."""


def record_hash(record_bytes: bytes) -> bytes:
    """SHA-256 of a record's serialized bytes: what the next record's prev_hash must be."""
    return hashlib.sha256(record_bytes).digest()


def head_message(head_hash: bytes) -> bytes:
    """The bytes that are signed for a chain head."""
    if len(head_hash) != HASH_SIZE:
        raise ChainError(f"chain head hash must be {HASH_SIZE} bytes, got {len(head_hash)}")
    return _HEAD_CONTEXT + head_hash


def sign_head(key: Ed25519PrivateKey, head_hash: bytes) -> bytes:
    return key.sign(head_message(head_hash))


def verify_head(public_key: Ed25519PublicKey, head_hash: bytes, signature: bytes) -> None:
    """Raises BadSignature unless ``signature`` was made by the key's owner over this head."""
    try:
        public_key.verify(signature, head_message(head_hash))
    except InvalidSignature as exc:
        raise BadSignature("chain head signature does not verify") from exc


def span_digest(record_hashes: list[bytes]) -> bytes:
    """SHA-256 over the hashes of consecutive records, in seq order."""
    digest = hashlib.sha256()
    for one in record_hashes:
        if len(one) != HASH_SIZE:
            raise ChainError(f"a record hash must be {HASH_SIZE} bytes, got {len(one)}")
        digest.update(one)
    return digest.digest()


def sign_span(key: Ed25519PrivateKey, record_hashes: list[bytes]) -> bytes:
    return key.sign(_SPAN_CONTEXT + span_digest(record_hashes))


def verify_span(public_key: Ed25519PublicKey, record_hashes: list[bytes], signature: bytes) -> None:
    """Raises BadSignature unless ``signature`` was made by the key's owner over exactly
    these record hashes, in this order."""
    try:
        public_key.verify(signature, _SPAN_CONTEXT + span_digest(record_hashes))
    except InvalidSignature as exc:
        raise BadSignature("span signature does not verify") from exc


def rotation_message(agent_id: str, seq: int, prev_hash: bytes, new_public_key: bytes) -> bytes:
    """What the old key signs to hand the chain to ``new_public_key`` at record ``seq``:
    ``prev_hash`` covers, through the chain, every record before it."""
    name = agent_id.encode()
    if len(prev_hash) != HASH_SIZE or len(new_public_key) != 32:
        raise ChainError("a rotation names a 32-byte prev_hash and a 32-byte public key")
    return (
        _ROTATION_CONTEXT
        + len(name).to_bytes(2, "big")
        + name
        + seq.to_bytes(8, "big")
        + prev_hash
        + new_public_key
    )


def sign_rotation(
    key: Ed25519PrivateKey, agent_id: str, seq: int, prev_hash: bytes, new_public_key: bytes
) -> bytes:
    return key.sign(rotation_message(agent_id, seq, prev_hash, new_public_key))


def verify_rotation(
    public_key: Ed25519PublicKey,
    agent_id: str,
    seq: int,
    prev_hash: bytes,
    new_public_key: bytes,
    endorsement: bytes,
) -> None:
    """Raises BadSignature unless ``public_key``'s owner endorsed this rotation."""
    try:
        public_key.verify(endorsement, rotation_message(agent_id, seq, prev_hash, new_public_key))
    except InvalidSignature as exc:
        raise BadSignature("key rotation endorsement does not verify") from exc


def raw_public_key(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    return bytes.fromhex(public_key_hex(key))


# -- keys ---------------------------------------------------------------------------------
# Public keys travel as the 32 raw bytes in hex (what `enroll` takes on its command line);
# private keys live in PEM (PKCS#8) files with mode 0600.


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key_pem(data: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise BadKey(f"not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BadKey(f"expected an Ed25519 private key, got {type(key).__name__}")
    return key


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_public_key_hex(text: str) -> Ed25519PublicKey:
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError as exc:
        raise BadKey("public key is not hex") from exc
    if len(raw) != 32:
        raise BadKey(f"an Ed25519 public key is 32 bytes (64 hex digits), got {len(raw)} bytes")
    return Ed25519PublicKey.from_public_bytes(raw)
