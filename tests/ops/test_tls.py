"""Transport security with real certificates: mutual TLS between agent and collector, the
agent id bound to the client certificate, and the API seam that guards every other service.

The collector here is the real server (create_server) on a real port with a real SQLite
store; clients are real gRPC channels with certificates made by ``certs.Authority``.
"""

from __future__ import annotations

import datetime
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from creditmeter.collector.access import (
    ApiAccess,
    ApiAuthenticator,
    Grant,
    Role,
    caller,
    load_access,
    read_token_file,
)
from creditmeter.collector.auth import Authenticator, CertificateBoundAgents
from creditmeter.collector.errors import ConfigError
from creditmeter.collector.server import IngestServer, create_server
from creditmeter.collector.sqlite_store import SQLiteStore
from creditmeter.collector.verifier import Verifier
from creditmeter.tls import (
    ReloadingServerCredentials,
    TlsError,
    TlsFiles,
    client_credentials,
    load_material,
)
from creditmeter.v1 import ingest_pb2_grpc
from tests.collector.records import T0_US, AgentChain, batch_request, hello

from .certs import SERVER_NAME, Authority, Pair

TIMEOUT_S = 10.0
NOW_US = T0_US + 86_400_000_000
TOKEN = "s3cret-token-for-the-billing-export"


@dataclass
class Pki:
    ca: Authority
    rogue: Authority  # another CA, trusted by nobody here
    server: Pair
    agent1: Pair
    agent2: Pair
    reporting: Pair  # an API client's certificate


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = Authority(tmp_path / "pki")
    rogue = Authority(tmp_path / "rogue", name="rogue CA")
    return Pki(
        ca, rogue, ca.server(), ca.client("agent-1"), ca.client("agent-2"), ca.client("reporting")
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "collector.db", clock_us=lambda: NOW_US)
    yield opened
    opened.close()


@pytest.fixture
def agents(store: SQLiteStore) -> dict[str, AgentChain]:
    enrolled = {name: AgentChain(name) for name in ("agent-1", "agent-2")}
    for agent in enrolled.values():
        store.enroll_agent(agent.agent_id, agent.public_key_hex)
    return enrolled


@dataclass
class Served:
    server: IngestServer
    address: str
    refused: list[str]  # methods the API seam refused


@pytest.fixture
def serve(store: SQLiteStore) -> Iterator[Any]:
    started: list[Served] = []

    def start(
        files: TlsFiles,
        *,
        authenticator: Authenticator | None = None,
        api_auth: ApiAuthenticator | None = None,
    ) -> Served:
        tls = ReloadingServerCredentials(files, require_client_cert=files.ca_file is not None)
        refused: list[str] = []
        server, port = create_server(
            "127.0.0.1:0",
            store,
            verifier=Verifier(clock_us=lambda: NOW_US),
            authenticator=authenticator,
            credentials=tls.credentials(),
            api_auth=api_auth,
            on_api_refused=lambda method, error: refused.append(method),
        )
        server.grpc_server.add_generic_rpc_handlers((_probe_service(),))
        server.start()
        served = Served(server, f"127.0.0.1:{port}", refused)
        started.append(served)
        return served

    yield start
    for served in started:
        served.server.stop(0)


def mutual(pki: Pki) -> TlsFiles:
    return TlsFiles(pki.ca.ca_file, pki.server.cert_file, pki.server.key_file)


def channel(address: str, ca: Authority, client: Pair | None = None) -> grpc.Channel:
    files = TlsFiles(ca.ca_file, client and client.cert_file, client and client.key_file)
    return grpc.secure_channel(
        address,
        client_credentials(files),
        options=[("grpc.ssl_target_name_override", SERVER_NAME)],
    )


def deliver(ch: grpc.Channel, claimed_id: str, agent: AgentChain) -> tuple[list[int], Any]:
    """Hello as ``claimed_id`` and one batch of ``agent``'s records: (acked seqs, status)."""
    stub = ingest_pb2_grpc.IngestStub(ch)  # type: ignore[no-untyped-call]
    acks: list[int] = []
    requests = [hello(claimed_id), batch_request(agent.extend(3))]
    try:
        for response in stub.Stream(iter(requests), timeout=TIMEOUT_S):
            acks.append(response.ack.acked_seq)
    except grpc.RpcError as exc:
        return acks, exc.code()
    return acks, grpc.StatusCode.OK


def stored(store: SQLiteStore) -> int:
    with closing(sqlite3.connect(store.path)) as conn, conn:
        count: int = conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    return count


# -- agents ---------------------------------------------------------------------------------


def test_mutual_tls_accepts_an_agent_with_its_own_certificate(
    pki: Pki, serve: Any, store: SQLiteStore, agents: dict[str, AgentChain]
) -> None:
    served = serve(mutual(pki), authenticator=CertificateBoundAgents())
    with channel(served.address, pki.ca, pki.agent1) as ch:
        assert deliver(ch, "agent-1", agents["agent-1"]) == ([0, 3], grpc.StatusCode.OK)
    assert stored(store) == 3


@pytest.mark.parametrize(
    "case", ["client cert from another CA", "no client certificate", "server from another CA"]
)
def test_a_connection_without_the_right_certificates_is_refused(
    case: str, pki: Pki, serve: Any, store: SQLiteStore, agents: dict[str, AgentChain]
) -> None:
    served = serve(mutual(pki), authenticator=CertificateBoundAgents())
    if case == "client cert from another CA":
        ch = channel(served.address, pki.ca, pki.rogue.client("agent-1"))
    elif case == "no client certificate":
        ch = channel(served.address, pki.ca)
    else:  # the agent trusts only the rogue CA, which did not issue the collector's cert
        ch = channel(served.address, pki.rogue, pki.agent1)
    with ch:
        acks, code = deliver(ch, "agent-1", agents["agent-1"])
    assert (acks, code) == ([], grpc.StatusCode.UNAVAILABLE)  # the handshake failed
    assert stored(store) == 0


def test_one_agents_certificate_cannot_speak_for_another(
    pki: Pki, serve: Any, store: SQLiteStore, agents: dict[str, AgentChain]
) -> None:
    served = serve(mutual(pki), authenticator=CertificateBoundAgents())
    # agent-2's certificate, agent-1's id and agent-1's correctly signed records.
    requests = [hello("agent-1"), batch_request(agents["agent-1"].extend(3))]
    code, details = refused_stream(served.address, pki.ca, pki.agent2, requests)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "issued for agent 'agent-2'" in details
    assert stored(store) == 0


def refused_stream(address: str, ca: Any, cert: Any, requests: list[Any]) -> tuple[Any, str]:
    """(status, details) of an Ingest stream the collector ends with an error."""
    with channel(address, ca, cert) as ch:
        stub = ingest_pb2_grpc.IngestStub(ch)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Stream(iter(requests), timeout=TIMEOUT_S))
    return refused.value.code(), refused.value.details() or ""


def test_the_certificate_alone_is_not_enough_the_records_need_the_agents_key(
    pki: Pki, serve: Any, store: SQLiteStore, agents: dict[str, AgentChain]
) -> None:
    """agent-1's certificate with records signed by another key: the signature check."""
    served = serve(mutual(pki), authenticator=CertificateBoundAgents())
    impostor = AgentChain("agent-1")  # same id, a key the collector never enrolled
    with channel(served.address, pki.ca, pki.agent1) as ch:
        acks, code = deliver(ch, "agent-1", impostor)
    assert (acks, code) == ([0], grpc.StatusCode.INVALID_ARGUMENT)
    assert stored(store) == 0


def test_server_certificate_is_reloaded_when_its_files_change(
    pki: Pki, serve: Any, agents: dict[str, AgentChain]
) -> None:
    served = serve(mutual(pki), authenticator=CertificateBoundAgents())
    renewed = pki.ca.server(stem="collector", name="renewed.test")  # same files, new cert
    options = [("grpc.ssl_target_name_override", "renewed.test")]
    files = TlsFiles(pki.ca.ca_file, pki.agent1.cert_file, pki.agent1.key_file)
    with grpc.secure_channel(served.address, client_credentials(files), options=options) as ch:
        health = health_pb2_grpc.HealthStub(ch)  # type: ignore[no-untyped-call]
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert renewed.certificate.subject.rfc4514_string() == "CN=renewed.test"


# -- the API seam ---------------------------------------------------------------------------

WHO = "/creditmeter.test.Probe/Who"
WHO_ALL = "/creditmeter.test.Probe/WhoStream"


def _probe_service() -> Any:
    """Stands in for the Query/admin services: answers with the admitted caller()."""

    def who(request: bytes, context: Any) -> bytes:
        return caller().name.encode()

    def who_stream(request: bytes, context: Any) -> Iterator[bytes]:
        yield caller().name.encode()
        yield b"again " + caller().name.encode()

    return grpc.method_handlers_generic_handler(
        "creditmeter.test.Probe",
        {
            "Who": grpc.unary_unary_rpc_method_handler(who),
            "WhoStream": grpc.unary_stream_rpc_method_handler(who_stream),
        },
    )


def call_who(ch: grpc.Channel, token: str | None = None) -> tuple[Any, bytes]:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    try:
        return grpc.StatusCode.OK, ch.unary_unary(WHO)(b"", metadata=metadata, timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code(), (exc.details() or "").encode()


@pytest.fixture
def api_server(pki: Pki, serve: Any) -> Served:
    access = ApiAccess(
        {"billing-export": (TOKEN, Grant(Role.ADMIN))}, {"reporting": Grant(Role.ADMIN)}
    )
    agents = CertificateBoundAgents(access.client_names)
    served: Served = serve(mutual(pki), authenticator=agents, api_auth=access)
    return served


def test_an_api_clients_certificate_never_speaks_for_an_agent(
    api_server: Served, pki: Pki, store: SQLiteStore
) -> None:
    """Even once an agent named like the API client is enrolled: separate identities."""
    reporting = AgentChain("reporting")
    store.enroll_agent(reporting.agent_id, reporting.public_key_hex)
    requests = [hello("reporting"), batch_request(reporting.extend(2))]
    code, details = refused_stream(api_server.address, pki.ca, pki.reporting, requests)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "an API client's (api.clients), not an agent's" in details
    assert stored(store) == 0


def test_a_peer_that_may_not_speak_for_an_id_learns_nothing_of_it(
    pki: Pki, serve: Any, store: SQLiteStore
) -> None:
    """agent-2's certificate asking about an unknown and a revoked id: the same answer."""
    served = serve(mutual(pki), authenticator=CertificateBoundAgents())
    gone = AgentChain("gone-agent")
    store.enroll_agent(gone.agent_id, gone.public_key_hex)
    store.revoke_agent(gone.agent_id)
    answers = []
    for agent_id in ("never-enrolled", "gone-agent"):
        code, details = refused_stream(served.address, pki.ca, pki.agent2, [hello(agent_id)])
        answers.append((code, details.replace(agent_id, "ID")))
    assert answers[0] == answers[1]
    assert answers[0][0] == grpc.StatusCode.UNAUTHENTICATED
    assert "issued for agent 'agent-2'" in answers[0][1]


def test_api_admits_a_listed_token_or_client_certificate(api_server: Served, pki: Pki) -> None:
    with channel(api_server.address, pki.ca, pki.agent1) as ch:
        assert call_who(ch, TOKEN) == (grpc.StatusCode.OK, b"token:billing-export")
        streamed = list(
            ch.unary_stream(WHO_ALL)(
                b"", metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=TIMEOUT_S
            )
        )
        assert streamed == [b"token:billing-export", b"again token:billing-export"]
    with channel(api_server.address, pki.ca, pki.reporting) as ch:
        assert call_who(ch) == (grpc.StatusCode.OK, b"cert:reporting")
    assert api_server.refused == []


def test_api_refuses_a_caller_without_an_api_credential(api_server: Served, pki: Pki) -> None:
    with channel(api_server.address, pki.ca, pki.agent1) as ch:
        code, details = call_who(ch)  # an agent's certificate is not an API credential
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert b"'agent-1' is not listed in api.clients" in details
        code, details = call_who(ch, "not-the-token-at-all")
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = call_who(ch, "")
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open to probes, with no credential.
        health = health_pb2_grpc.HealthStub(ch)  # type: ignore[no-untyped-call]
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with (
        channel(api_server.address, pki.ca, pki.agent2) as ch,
        pytest.raises(grpc.RpcError) as streamed,
    ):
        list(ch.unary_stream(WHO_ALL)(b"", timeout=TIMEOUT_S))
    assert streamed.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert api_server.refused == [WHO, WHO, WHO, WHO_ALL]


def test_without_api_credentials_configured_every_api_call_is_refused(pki: Pki, serve: Any) -> None:
    served = serve(mutual(pki), authenticator=CertificateBoundAgents())  # api_auth: None
    with channel(served.address, pki.ca, pki.reporting) as ch:
        code, details = call_who(ch, TOKEN)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert b"not one of api.token_file" in details


def test_token_file_lines_and_mistakes(tmp_path: Path) -> None:
    good = tmp_path / "tokens"
    good.write_text(
        f"# name token role accounts\nbilling-export {TOKEN}  # the nightly export\n\n"
        f"globex {TOKEN}b charger globex big%20co\nboard {TOKEN}c reader\n"
    )
    assert read_token_file(good) == {
        "billing-export": (TOKEN, Grant(Role.ADMIN)),  # no role: the format before roles
        "globex": (f"{TOKEN}b", Grant(Role.CHARGER, frozenset({"globex", "big co"}))),
        "board": (f"{TOKEN}c", Grant(Role.READER)),
    }
    access = load_access(good, ("reporting reader acme",))
    assert access.clients == {"reporting": Grant(Role.READER, frozenset({"acme"}))}
    for text, problem in [
        ("just-one-word-here-0123456789\n", "line 1: expected NAME TOKEN ROLE"),
        (f"a {TOKEN} owner\n", "line 1: role 'owner' is not one of reader, charger, admin"),
        (f"a {TOKEN} admin acme\n", "line 1: an admin is never scoped to accounts"),
        (f"a {TOKEN} reader unattributed\n", "line 1: .*reserved account name"),
        (f"a {TOKEN} reader a%00b\n", "line 1: account"),
        ("a short\n", "line 1: token shorter than 16 characters"),
        (f"a {TOKEN}\na {TOKEN}x\n", "line 2: name 'a' appears twice"),
    ]:
        bad = tmp_path / "bad"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=problem):
            read_token_file(bad)
    with pytest.raises(ConfigError, match="cannot read: No such file"):
        read_token_file(tmp_path / "missing")


# -- the files ------------------------------------------------------------------------------


def test_unusable_tls_files_are_named_with_their_option(pki: Pki, tmp_path: Path) -> None:
    def problem(files: TlsFiles) -> str:
        with pytest.raises(TlsError) as raised:
            load_material(files)
        return str(raised.value)

    ca, server, agent = pki.ca.ca_file, pki.server, pki.agent1
    mismatched = TlsFiles(ca, server.cert_file, agent.key_file)
    assert f"tls.key_file {agent.key_file}: does not belong to the certificate" in problem(
        mismatched
    )
    assert "tls.cert_file and tls.key_file go together" in problem(
        TlsFiles(ca, server.cert_file, None)
    )
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    assert f"tls.ca_file {not_pem}: holds no PEM certificate" in problem(
        TlsFiles(not_pem, None, None)
    )
    missing = tmp_path / "missing.pem"
    assert f"tls.cert_file {missing}: cannot read" in problem(TlsFiles(ca, missing, agent.key_file))
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)
    with pytest.raises(TlsError, match="expired at"):
        load_material(TlsFiles(ca, agent.cert_file, agent.key_file), now=later)
