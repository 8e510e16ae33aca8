"""TLS between agent and collector: certificate files in, gRPC credentials out.

Both daemons name three PEM files in their configuration (``tls.ca_file``, ``tls.cert_file``,
``tls.key_file``). This module reads and checks them before gRPC sees them, so that an
operator gets "tls.key_file /etc/…/agent.key: does not belong to the certificate in
tls.cert_file" at startup instead of an opaque handshake failure on every connection.

Identity rule (documented in the README): a client certificate speaks for the agent id, or
names the API client, in its subject **Common Name**, exactly one CN, compared byte for byte.
``peer_common_name`` reads it from the certificate gRPC verified during the handshake.

Files are read again whenever they change (``ReloadingServerCredentials``) or whenever a
channel is made (the agent reconnects through ``client_credentials``), so certificates can
be rotated without restarting either daemon.

The daemons get their gRPC credentials here; ``collector.server`` and ``agent.shipper``
pass them on to gRPC.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

# A PEM file of certificates or a key is a few KiB; anything huge is the wrong file.
_MAX_PEM_BYTES = 1024 * 1024


class TlsError(Exception):
    """A TLS file is unusable. The message names the option, the file and the cause."""


@dataclass(frozen=True)
class TlsFiles:
    """The configured paths; ``None`` for a file not configured. ``section`` prefixes the
    option names in messages ("tls" gives "tls.cert_file")."""

    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    section: str = "tls"

    def paths(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.ca_file, self.cert_file, self.key_file) if p is not None)


@dataclass(frozen=True)
class TlsMaterial:
    """The files' bytes, checked: certificates parse, the key matches the leaf certificate,
    the leaf is within its validity period."""

    ca_pem: bytes | None
    cert_chain_pem: bytes | None
    key_pem: bytes | None
    leaf: x509.Certificate | None  # the first certificate of cert_chain_pem


def load_material(files: TlsFiles, *, now: datetime.datetime | None = None) -> TlsMaterial:
    """Reads and checks the files. Raises TlsError naming the option and the problem."""
    moment = now or datetime.datetime.now(datetime.UTC)
    ca_pem = _read_certificates(files, "ca_file", files.ca_file)[0] if files.ca_file else None
    if (files.cert_file is None) != (files.key_file is None):
        raise TlsError(f"{files.section}.cert_file and {files.section}.key_file go together")
    if files.cert_file is None or files.key_file is None:
        return TlsMaterial(ca_pem, None, None, None)
    chain_pem, chain = _read_certificates(files, "cert_file", files.cert_file)
    key_pem = _read(files, "key_file", files.key_file)
    leaf = chain[0]
    _check_key_matches(files, key_pem, leaf)
    _check_validity(files, leaf, moment)
    return TlsMaterial(ca_pem, chain_pem, key_pem, leaf)


def common_name(certificate: x509.Certificate) -> str | None:
    """The subject's Common Name; None unless there is exactly one (then it is ambiguous)."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def peer_common_name(auth_properties: Any) -> str | None:
    """The CN of the client certificate gRPC verified, from ``context.auth_context()``.

    None when the connection is not TLS or the client sent no certificate. The CN is read
    from the certificate itself (``x509_pem_cert``), not from gRPC's ``x509_common_name``,
    so that a subject with two CNs is refused rather than matched on either.
    """
    pems = auth_properties.get("x509_pem_cert") or ()
    if not pems:
        return None
    try:
        certificate = x509.load_pem_x509_certificate(bytes(pems[0]))
    except ValueError:
        return None
    return common_name(certificate)


def describe(certificate: x509.Certificate) -> str:
    """One line for logs: subject and expiry."""
    expires = certificate.not_valid_after_utc.isoformat(timespec="seconds")
    return f"{certificate.subject.rfc4514_string()} (expires {expires})"


# -- gRPC credentials ---------------------------------------------------------------------


def client_credentials(files: TlsFiles) -> Any:
    """grpc.ChannelCredentials from the files as they are now; raises TlsError.

    Without ``ca_file`` gRPC verifies the collector against its default roots (or
    ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``).
    """
    material = load_material(files)
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca_pem,
        private_key=material.key_pem,
        certificate_chain=material.cert_chain_pem,
    )


class ReloadingServerCredentials:
    """The collector's TLS credentials, re-read when a file changes.

    gRPC asks ``fetch`` at every new handshake; it compares the files' modification times
    and sizes (a few stat calls) and loads them again only when they changed. A file that is
    half-written or wrong during a rotation is logged and the previous certificates stay in
    use, so a bad rotation never takes the collector off the air.
    """

    def __init__(self, files: TlsFiles, *, require_client_cert: bool) -> None:
        if files.cert_file is None or files.key_file is None:
            raise TlsError(f"{files.section}.cert_file and {files.section}.key_file are required")
        if require_client_cert and files.ca_file is None:
            raise TlsError(f"{files.section}.ca_file is required to verify client certificates")
        self._files = files
        self._require_client_cert = require_client_cert
        self._lock = threading.Lock()
        self._stamp = _stamp(files)
        self.material = load_material(files)  # raises: a bad start is the operator's to fix

    def credentials(self) -> Any:
        """grpc.ServerCredentials for ``add_secure_port``."""
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self.material),
            self.fetch,
            require_client_authentication=self._require_client_cert,
        )

    def fetch(self) -> Any:
        """A new grpc.ServerCertificateConfiguration when the files changed, else None."""
        with self._lock:
            stamp = _stamp(self._files)
            if stamp == self._stamp:
                return None
            self._stamp = stamp
            try:
                material = load_material(self._files)
            except TlsError as exc:
                log.error("TLS files changed but cannot be used; keeping the previous: %s", exc)
                return None
            self.material = material
        assert material.leaf is not None
        log.info("TLS certificate reloaded: %s", describe(material.leaf))
        return _configuration(material)


def _configuration(material: TlsMaterial) -> Any:
    assert material.key_pem is not None and material.cert_chain_pem is not None
    return grpc.ssl_server_certificate_configuration(
        [(material.key_pem, material.cert_chain_pem)], root_certificates=material.ca_pem
    )


Stamp = tuple[tuple[int, int], ...]


def _stamp(files: TlsFiles) -> Stamp:
    stamps = []
    for path in files.paths():
        try:
            info = os.stat(path)
            stamps.append((info.st_mtime_ns, info.st_size))
        except OSError:
            stamps.append((-1, -1))  # gone for a moment during a rotation: load reports it
    return tuple(stamps)


# -- reading and checking -----------------------------------------------------------------


def _read(files: TlsFiles, option: str, path: Path) -> bytes:
    name = f"{files.section}.{option} {path}"
    try:
        with path.open("rb") as stream:
            data = stream.read(_MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise TlsError(f"{name}: cannot read: {exc.strerror or exc}") from None
    if len(data) > _MAX_PEM_BYTES:
        raise TlsError(f"{name}: larger than {_MAX_PEM_BYTES} bytes; not a PEM file")
    return data


def _read_certificates(
    files: TlsFiles, option: str, path: Path
) -> tuple[bytes, list[x509.Certificate]]:
    data = _read(files, option, path)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsError(
            f"{files.section}.{option} {path}: holds no PEM certificate "
            "(expected -----BEGIN CERTIFICATE-----)"
        ) from None
    return data, certificates


def _check_key_matches(files: TlsFiles, key_pem: bytes, leaf: x509.Certificate) -> None:
    name = f"{files.section}.key_file {files.key_file}"
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        # TypeError: the key is encrypted; the daemons start unattended, with no passphrase.
        raise TlsError(f"{name}: not an unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != leaf.public_key().public_bytes(der, public):
        raise TlsError(
            f"{name}: does not belong to the certificate in {files.section}.cert_file "
            f"{files.cert_file} ({leaf.subject.rfc4514_string()})"
        )


def _check_validity(files: TlsFiles, leaf: x509.Certificate, now: datetime.datetime) -> None:
    name = f"{files.section}.cert_file {files.cert_file}"
    if now < leaf.not_valid_before_utc:
        starts = leaf.not_valid_before_utc.isoformat(timespec="seconds")
        raise TlsError(f"{name}: not valid before {starts} (check the host's clock)")
    if now > leaf.not_valid_after_utc:
        ended = leaf.not_valid_after_utc.isoformat(timespec="seconds")
        raise TlsError(f"{name}: expired at {ended}")
