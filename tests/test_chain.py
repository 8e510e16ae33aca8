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
