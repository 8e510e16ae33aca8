"""Who may speak for an agent: the seam where mTLS will bind agent ids to certificates.

The servicer first checks that the agent is enrolled and not revoked (the store knows), then
asks an ``Authenticator`` whether this peer may deliver records for that agent. Until mTLS
lands, ``AllowEnrolledAgents`` says yes to everyone: the head signatures still prove that
records come from the holder of the agent's key, so a stranger can replay records but never
forge or alter them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


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
