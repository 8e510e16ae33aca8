"""Who may speak for an agent: the seam where mutual TLS binds agent ids to certificates.

The servicer first checks that the agent is enrolled and not revoked (the store knows), then
asks an ``Authenticator`` whether this peer may deliver records for that agent. With mutual
TLS (``tls.ca_file`` set) the collector uses ``CertificateBoundAgents``: the client
certificate's CN must be the agent id. Without it, ``AllowEnrolledAgents`` says yes to
everyone: the head signatures still prove that records come from the holder of the agent's
key, so a stranger can replay records but never forge or alter them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from creditmeter.collector.errors import NotAuthorized
from creditmeter.tls import peer_common_name


@dataclass(frozen=True)
class Peer:
    """The transport's view of the client, copied out of the grpc context so that
    authenticators do not depend on grpc.

    ``auth_properties`` is ``context.auth_context()``: under TLS it holds e.g.
    ``x509_common_name`` and ``x509_subject_alternative_name``; without TLS only
    ``transport_security_type`` (b"insecure").
    """

    address: str  # "ipv4:127.0.0.1:53412"
    auth_properties: Mapping[str, Sequence[bytes]] = field(default_factory=dict)


class Authenticator(Protocol):
    def authorize(self, agent_id: str, peer: Peer) -> None:
        """Returns if ``peer`` may speak for ``agent_id``; raises NotAuthorized otherwise."""
        ...


class AllowEnrolledAgents:
    """Any peer may speak for any enrolled agent (the servicer has checked enrolment)."""

    def authorize(self, agent_id: str, peer: Peer) -> None:
        return None


class CertificateBoundAgents:
    """Mutual TLS: a peer speaks only for the agent its client certificate names.

    The rule: the subject Common Name of the certificate gRPC verified during the handshake
    (against ``tls.ca_file``) equals the agent id of the stream's Hello, byte for byte. Then
    the head signatures, checked against the key enrolled for that id, bind the records to
    the agent's signing key as well: a stolen certificate without the key cannot forge
    records, and a stolen key without the certificate cannot deliver them.

    Agents and API clients are separate identities: a certificate whose CN is one of
    ``api_clients`` (api.clients) never speaks for an agent, even one enrolled under the
    same name.
    """

    def __init__(self, api_clients: frozenset[str] = frozenset()) -> None:
        self._api_clients = api_clients

    def authorize(self, agent_id: str, peer: Peer) -> None:
        """Raises NotAuthorized when the peer sent no certificate (not mutual TLS) or the
        certificate was issued for another agent (or has no single CN)."""
        name = peer_common_name(peer.auth_properties)
        if name is None:
            raise NotAuthorized(
                "no client certificate with a single subject CN: the collector requires "
                "mutual TLS (tls.cert_file and tls.key_file on the agent)",
                agent_id=agent_id,
            )
        if name in self._api_clients:
            raise NotAuthorized(
                f"the client certificate {name!r} is an API client's (api.clients), not an agent's",
                agent_id=agent_id,
            )
        if name != agent_id:
            raise NotAuthorized(
                f"the client certificate was issued for agent {name!r} (subject CN), "
                "not for the agent id the stream claims",
                agent_id=agent_id,
            )
