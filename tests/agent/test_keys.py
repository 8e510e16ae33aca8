"""The signing key file: created private, never replaced by accident, refused when exposed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from creditmeter import chain
from creditmeter.agent import keys
from creditmeter.agent.main import main as agent_main


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_generate_writes_a_private_key_that_load_reads(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "agent.pem"
    public_hex = keys.generate(path)
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    key = keys.load(path)
    assert chain.public_key_hex(key) == public_hex
    assert len(public_hex) == 64
    head = chain.record_hash(b"record")
    chain.verify_head(chain.load_public_key_hex(public_hex), head, chain.sign_head(key, head))


def test_generate_is_private_even_under_a_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        keys.generate(tmp_path / "agent.pem")
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "agent.pem") == 0o600


def test_an_existing_key_is_not_replaced_unless_told(tmp_path: Path) -> None:
    path = tmp_path / "agent.pem"
    first = keys.generate(path)
    with pytest.raises(keys.KeyFileExists, match="--force"):
        keys.generate(path)
    assert chain.public_key_hex(keys.load(path)) == first
    second = keys.generate(path, overwrite=True)
    assert second != first
    assert chain.public_key_hex(keys.load(path)) == second
    assert mode_of(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.pem"]  # no temporary left


def test_a_missing_key_names_the_path_and_keygen(tmp_path: Path) -> None:
    path = tmp_path / "absent.pem"
    with pytest.raises(keys.KeyFileMissing) as raised:
        keys.load(path)
    assert str(path) in str(raised.value)
    assert "creditmeter-agent keygen" in str(raised.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "agent.pem"
    keys.generate(path)
    os.chmod(path, mode)
    with pytest.raises(keys.KeyFileInsecure) as raised:
        keys.load(path)
    assert str(path) in str(raised.value)
    assert f"mode {mode:04o}" in str(raised.value)


def test_a_key_of_another_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.pem"
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, other)
    os.close(fd)
    with pytest.raises(keys.KeyFileInvalid, match="Ed25519") as raised:
        keys.load(path)
    assert str(path) in str(raised.value)


def test_keygen_prints_the_public_key_and_the_enroll_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agent.pem"
    assert keys.keygen_main(["--key", str(path), "--agent-id", "gpu-host-7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    public_hex = chain.public_key_hex(keys.load(path))
    assert lines[0] == public_hex
    assert lines[-1] == f"creditmeter-collector enroll gpu-host-7 {public_hex}"


def test_keygen_refuses_to_replace_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agent.pem"
    keys.generate(path)
    before = path.read_bytes()
    assert keys.keygen_main(["--key", str(path)]) == 1
    assert "exists already" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_keygen_writes_where_the_configuration_says_and_prints_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nid = "gpu-host-9"\nstate_dir = "{state}"\n')
    assert agent_main(["keygen", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    public_hex = chain.public_key_hex(keys.load(state / "signing-key.pem"))
    assert lines == [
        public_hex,
        f"# wrote the private key to {state / 'signing-key.pem'} (mode 0600); keep it on "
        "this host only",
        "# enroll this agent by running on the collector host:",
        f"creditmeter-collector enroll gpu-host-9 {public_hex}",
    ]
    assert agent_main(["keygen", "--config", str(config)]) == 1  # never over a key
    assert "exists already" in capsys.readouterr().err
