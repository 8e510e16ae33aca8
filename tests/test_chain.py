"""The record chain's hashing, signing and key encodings."""

from __future__ import annotations

import pytest

from creditmeter import chain


def test_head_signature_verifies_only_for_its_hash_and_key() -> None:
    key = chain.generate_key()
    head = chain.record_hash(b"record bytes")
    sig = chain.sign_head(key, head)
    chain.verify_head(key.public_key(), head, sig)
    with pytest.raises(chain.BadSignature):
        chain.verify_head(key.public_key(), chain.record_hash(b"other bytes"), sig)
    with pytest.raises(chain.BadSignature):
        chain.verify_head(chain.generate_key().public_key(), head, sig)


def test_span_signature_covers_every_hash_in_order() -> None:
    key = chain.generate_key()
    hashes = [chain.record_hash(bytes([n])) for n in range(4)]
    sig = chain.sign_span(key, hashes)
    chain.verify_span(key.public_key(), hashes, sig)
    for other in (hashes[:3], hashes[::-1], [*hashes[:2], chain.record_hash(b"x"), hashes[3]]):
        with pytest.raises(chain.BadSignature):
            chain.verify_span(key.public_key(), other, sig)
    with pytest.raises(chain.BadSignature):  # a head signature is never a span's
        chain.verify_span(key.public_key(), hashes[-1:], chain.sign_head(key, hashes[-1]))
    with pytest.raises(chain.ChainError, match="32 bytes"):
        chain.span_digest([b"short"])


def test_head_hash_must_be_32_bytes() -> None:
    with pytest.raises(chain.ChainError, match="32 bytes"):
        chain.head_message(b"short")


def test_keys_round_trip_through_their_encodings() -> None:
    key = chain.generate_key()
    loaded = chain.load_private_key_pem(chain.private_key_pem(key))
    assert chain.public_key_hex(loaded) == chain.public_key_hex(key)
    public = chain.load_public_key_hex(chain.public_key_hex(key))
    head = chain.record_hash(b"x")
    chain.verify_head(public, head, chain.sign_head(loaded, head))


@pytest.mark.parametrize(
    ("text", "problem"),
    [("zz", "not hex"), ("abcd", "32 bytes"), ("", "32 bytes")],
)
def test_bad_public_keys_are_named(text: str, problem: str) -> None:
    with pytest.raises(chain.BadKey, match=problem):
        chain.load_public_key_hex(text)


def test_a_non_ed25519_private_key_is_refused() -> None:
    with pytest.raises(chain.BadKey, match="not a PEM"):
        chain.load_private_key_pem(b"-----BEGIN NOTHING-----")
