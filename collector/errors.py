"""Errors the collector raises on purpose. Foreign exceptions never cross a seam.

Every error names what is wrong (agent, seq, field where known) and carries the gRPC status
it maps to, so that the servicer translates it without knowing why it was raised and an
agent's operator can read the cause from the status details alone. ``Status`` is our own
enum rather than ``grpc.StatusCode`` so that the verifier and the stores do not import grpc.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class Status(enum.Enum):
    """The gRPC status an error ends a stream with (same names as ``grpc.StatusCode``)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class CollectorError(Exception):
    """Base of every error the collector raises on purpose.

    ``str()`` gives "agent A seq N field F: problem", leaving out the parts not known (a
    record too broken to have a seq is named by its position in the batch instead).
    """

    status: ClassVar[Status] = Status.INTERNAL

    def __init__(
        self,
        problem: str,
        *,
        agent_id: str | None = None,
        seq: int | None = None,
        field: str | None = None,
        index: int | None = None,
    ) -> None:
        super().__init__(problem)
        self.problem = problem
        self.agent_id = agent_id
        self.seq = seq
        self.field = field
        self.index = index  # position of the record in its batch, when one is to blame

    def __str__(self) -> str:
        where = []
        if self.agent_id is not None:
            where.append(f"agent {self.agent_id!r}")
        if self.seq is not None:
            where.append(f"seq {self.seq}")
        elif self.index is not None:
            where.append(f"record #{self.index + 1} of the batch")
        if self.field is not None:
            where.append(f"field {self.field}")
        return f"{' '.join(where)}: {self.problem}" if where else self.problem


class ConfigError(CollectorError):
    """A command-line argument, store URL or setting is missing or malformed."""


class ListenError(CollectorError):
    """The server cannot listen on the address: malformed, not local, or already in use
    (another collector still running?)."""


# -- what an agent sent: INVALID_ARGUMENT ----------------------------------------------------


class RejectedBatch(CollectorError):
    """A batch is not acceptable as sent; nothing of it is stored.

    Retrying the same bytes fails the same way: the agent (or something between it and the
    collector) produced or altered them, and its operator has to look.
    """

    status = Status.INVALID_ARGUMENT


class MalformedMessage(RejectedBatch):
    """A stream message is not a parseable IngestRequest, or not the one expected now
    (the stream must open with Hello, and say Hello once)."""


class MalformedRecord(RejectedBatch):
    """A record's bytes do not parse as a UsageRecord, or exceed the record size limit."""


class InsaneField(RejectedBatch):
    """A record parses but a field is impossible: negative time, end before start, busy
    longer than the interval, a timestamp far in the future or before 2020, an unknown enum
    value, a missing GPU uuid or an overlong label. Usually an agent bug or a bad clock."""


class RollupOverflow(RejectedBatch):
    """The batch would carry a rollup sum beyond a signed 64-bit integer: more busy time in
    one hour than any GPUs could do, so a flood from a compromised agent. Nothing of it
    is stored."""


class BrokenChain(RejectedBatch):
    """Inside one batch, seqs are not consecutive or a prev_hash does not link to the
    previous record: records were dropped, reordered or altered after chaining."""


class BadBatchSignature(RejectedBatch):
    """The batch's head signature does not verify under the agent's enrolled key: the
    records were altered after signing, or signed by another key than the enrolled one."""


class AgentMismatch(RejectedBatch):
    """A batch or record names another agent than the stream's Hello."""


class BatchTooLarge(CollectorError):
    """A batch holds more records than the collector accepts in one message."""

    status = Status.RESOURCE_EXHAUSTED


class TooManyStreams(CollectorError):
    """The collector already serves its configured maximum of concurrent streams; the agent
    retries later (or another collector behind the load balancer takes it).

    UNAVAILABLE rather than RESOURCE_EXHAUSTED: agents answer RESOURCE_EXHAUSTED by sending
    smaller batches, which would not help here."""

    status = Status.UNAVAILABLE


# -- what does not fit the stored chain: FAILED_PRECONDITION ---------------------------------


class ChainConflict(CollectorError):
    """A batch does not fit the agent's stored chain; nothing of it is stored."""

    status = Status.FAILED_PRECONDITION


class SeqConflict(ChainConflict):
    """A seq already stored arrives with different bytes. The stored record stays: either
    the agent's outbox was rewritten (restored from an old backup, two agents sharing one
    identity) or someone is tampering. Needs an operator."""


class ChainHole(ChainConflict):
    """The batch starts beyond the stored head: records in between never arrived. The
    agent resumes from the Ack it got for its Hello; an agent that lost its outbox cannot
    fill the hole and needs an operator."""


class ChainFork(ChainConflict):
    """The batch's first new record continues a different chain than the stored one (its
    prev_hash is not the stored head's hash): two outboxes speak for one agent id."""


# -- who is speaking: UNAUTHENTICATED --------------------------------------------------------


class NotAuthenticated(CollectorError):
    """The peer may not deliver records for this agent."""

    status = Status.UNAUTHENTICATED


class UnknownAgent(NotAuthenticated):
    """No agent of this id is enrolled: run ``creditmeter-collector enroll`` first."""


class AgentRevoked(NotAuthenticated):
    """The agent was revoked; its records are no longer accepted. Revocation is final for
    the id: enroll the host again under a new agent id."""


class NotAuthorized(NotAuthenticated):
    """The peer's client certificate (its subject CN) names another agent than the one its
    Hello claims, or it presented none where mutual TLS binds agents to certificates."""


class PermissionDenied(CollectorError):
    """An API caller proved who it is, but its role or its accounts do not cover what it
    asked for (a tenant token asking about another account, a reader charging). The same
    answer whether or not the account exists, so that a scope reveals nothing outside it."""

    status = Status.PERMISSION_DENIED


# -- enrolment ------------------------------------------------------------------------------


class EnrollmentError(CollectorError):
    """An enroll or revoke request conflicts with what is stored (another key already
    enrolled under the id, a revoked id enrolled again, revoking an unknown id)."""

    status = Status.FAILED_PRECONDITION


# -- quarantine ------------------------------------------------------------------------------


class NotQuarantined(CollectorError):
    """The record named is not in quarantine, or was released already."""

    status = Status.NOT_FOUND


class StillInsane(CollectorError):
    """A quarantined record still breaks the verifier's checks: release it once a fixed
    collector accepts what it says (the message names the field)."""

    status = Status.FAILED_PRECONDITION


# -- the store: UNAVAILABLE / INTERNAL -------------------------------------------------------


class StoreError(CollectorError):
    """The database failed underneath a request. Nothing of the request was committed."""

    status = Status.UNAVAILABLE


class NoDatabase(StoreError):
    """A command that only reads found no database where it was pointed (it never creates
    one): a wrong --db, or a collector that never ran there."""

    status = Status.NOT_FOUND


class StoreBusy(StoreError):
    """The database stayed locked by another writer (another collector process, a CLI
    enroll) for longer than the busy timeout. Retrying later succeeds."""


class BudgetMoved(StoreError):
    """Another stream of the same agent stored records while this batch was checked, so
    the GPU budgets it was checked against are no longer the stored ones. Nothing of the
    batch was stored; resending it succeeds."""


class KeyMoved(StoreError):
    """The agent's signing key changed (a rotation stored by another stream, or an
    operator's replacement) after this stream read it. Nothing of the batch was stored;
    the agent's next stream reads the keys again."""


class StoreClosed(StoreError):
    """The store was closed (the collector is shutting down)."""


class SchemaTooNew(StoreError):
    """The database was migrated by a newer collector than this one; running older code on
    it could misread or corrupt it. Upgrade the collector (or point it at another file)."""

    status = Status.INTERNAL


class StoreCorrupt(StoreError):
    """Stored data contradicts itself (a head without its record, an unparseable enrolled
    key). Found by a request that needed the data; ``creditmeter-collector audit`` finds
    all of it."""

    status = Status.INTERNAL


# -- the ledger: credits, accounts, plans, API charges ---------------------------------------


class InvalidRequest(CollectorError):
    """A ledger request (an API charge, a balance query, an amount) is malformed: an empty or
    overlong name, a count or amount out of range, a time before 2020 or in the future."""

    status = Status.INVALID_ARGUMENT


class PriceFileError(ConfigError):
    """The price list (TOML) is unreadable or names an impossible price; the collector keeps
    none of it, so fix the file and start again."""


class LedgerError(CollectorError):
    """A ledger request conflicts with what is stored; nothing of it was stored."""

    status = Status.FAILED_PRECONDITION


class UnknownAccount(LedgerError):
    """No account of this name was opened (``creditmeter-collector account open``). Usage
    labelled with it is still stored and reported, only it has no balance."""

    status = Status.NOT_FOUND


class UnknownPlan(LedgerError):
    """No plan of this name was defined (``creditmeter-collector plan define``)."""

    status = Status.NOT_FOUND


class PeriodClosed(LedgerError):
    """The request would change a billing period that was closed (an entry or plan change
    dated inside it). Closed periods never change: date it now, in the open period."""


class EvidenceMismatch(LedgerError):
    """The records and charges a statement would sum do not add up to its lines: a record
    stored between the two reads (closing again helps), or rollups that disagree with the
    records (run ``creditmeter-collector audit``). Nothing was closed."""


class PricesChanged(LedgerError):
    """A price version was loaded for the period while it was being closed (``prices set
    --backdate`` at the same moment). Nothing was closed: close it again, with the prices
    now in force."""


class NoStatement(LedgerError):
    """The period has no signed statement: it is still open (``period close``), or it was
    closed before the collector signed statements."""

    status = Status.NOT_FOUND


class DuplicateCharge(CollectorError):
    """An API charge with this request id and the same content is already stored: a retry.
    Nothing changed; the gateway treats it as success."""

    status = Status.ALREADY_EXISTS


class KeyReused(LedgerError):
    """A top-up, grant or adjustment's idempotency key is stored already for other content
    (account, kind, amount, expiry or reason). The stored entry is kept: a key names one
    change, so a new change needs a new key."""


class PriceConflict(LedgerError):
    """A price version effective at this hour is stored already with other prices. Versions
    never change once loaded (usage may have been priced by them): load the correction
    effective at another hour."""


class ChargeConflict(LedgerError):
    """An API charge with this request id but other content (account, model, count or time)
    is already stored. The stored one is kept: the gateway reused a request id."""
