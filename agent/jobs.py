"""The job registry: which job each worker process is running, kept on disk.

Workers declare jobs through the local job API (``agent.jobapi``); the meter asks, when it
closes a process's window, which spans touched it (``spans_for``) and splits the busy time
along them (``agent.split``). Spans live in their own SQLite file (WAL, synchronous=FULL) so
that an agent restarted mid-job still knows the job is open, and the worker need not repeat
itself.

Identity: a job belongs to a process (host PID, create time), so a PID reused by another
process never inherits its jobs. Job ids are unique per agent for as long as the registry
remembers them (until pruned). Times are wall µs since the epoch of the host clock, the clock
the driver labels samples with.

*Written through*: ``prune_before(us)`` says every window up to ``us`` is written as records.
Records are immutable, so from then on no job can claim time before ``us``: starts, ends and
undelivered spans are clamped to it (and the clamp is reported).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from creditmeter.agent.errors import AgentError
from creditmeter.agent.split import Interval, JobSpan, weight_units
from creditmeter.files import create_private
from creditmeter.labels import check_job_labels

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MAX_UNDELIVERED_PER_PROCESS = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    model TEXT NOT NULL,
    pid INTEGER NOT NULL,
    create_time_us INTEGER NOT NULL,
    gpu_uuid TEXT NOT NULL,
    weight REAL NOT NULL,
    start_us INTEGER NOT NULL,
    end_us INTEGER,                    -- NULL while open
    declared_start_us INTEGER NOT NULL, -- as the worker sent it: retries compare on this
    declared_end_us INTEGER,           -- NULL while open, or when closed at process exit
    closed_at_exit INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_of_process ON jobs (pid, create_time_us, start_us);
CREATE INDEX IF NOT EXISTS open_jobs ON jobs (pid, create_time_us) WHERE end_us IS NULL;
CREATE INDEX IF NOT EXISTS ended_jobs ON jobs (end_us) WHERE end_us IS NOT NULL;
CREATE TABLE IF NOT EXISTS undelivered (
    pid INTEGER NOT NULL,
    create_time_us INTEGER NOT NULL,
    start_us INTEGER NOT NULL,
    end_us INTEGER NOT NULL,
    jobs INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS undelivered_of_process ON undelivered (pid, create_time_us);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class JobError(AgentError):
    """A job request the registry refused; the subclass says why."""


class InvalidJob(JobError):
    """The request itself is malformed: empty or overlong id or account, weight out of range."""


class JobConflict(JobError):
    """The job id is taken by a job with different content (another job reusing the id), or
    the job already ended at another time (e.g. closed when its process exited)."""


class JobNotFound(JobError):
    """No job with this id: it was never started, or it ended and was pruned."""


class TooManyJobs(JobError):
    """The process or the agent has as many open jobs as allowed.

    Operational cause: a worker that starts jobs and never ends them (a bug, or a crash path
    that skips EndJob while the process lives on). Their time stays with the open jobs.
    """


class JobStoreError(JobError):
    """The job database failed: disk full, file not writable, corrupted, or a schema from a
    newer agent. The job API answers UNAVAILABLE; the meter bills by process labels."""


class Clamp(enum.Enum):
    """Why a time was not taken as given (mirrors ClampReason in jobs.proto)."""

    NONE = 0
    FUTURE = 1
    PAST = 2
    ALREADY_WRITTEN = 3
    BEFORE_START = 4
    UNSET = 5


@dataclass(frozen=True, slots=True)
class Owner:
    """The process a job runs in: host PID and its create time (µs), as the meter keys it."""

    pid: int
    create_time_us: int


@dataclass(frozen=True, slots=True)
class Job:
    job_id: str
    account: str
    model: str
    owner: Owner
    gpu_uuid: str  # "": every GPU of the process
    weight: float
    start_us: int
    end_us: int | None  # None while open
    closed_at_exit: bool = False

    def span(self) -> JobSpan:
        return JobSpan(
            self.job_id, self.account, self.model, self.start_us, self.end_us, self.weight
        )


@dataclass(frozen=True, slots=True)
class Started:
    job: Job
    created: bool  # False: the same job was registered already (a retry); nothing changed
    clamp: Clamp


@dataclass(frozen=True, slots=True)
class Ended:
    job: Job
    changed: bool  # False: it had already ended at this time (a retry)
    clamp: Clamp


@dataclass(frozen=True, slots=True)
class WindowSpans:
    """What the splitter needs for one process's window."""

    jobs: tuple[JobSpan, ...]
    undelivered: tuple[Interval, ...]


class JobSpanSource(Protocol):
    """What the meter's record path needs of the registry (JobRegistry satisfies it)."""

    def spans_for(
        self,
        pid: int,
        create_time_us: int,
        window_start_us: int,
        window_end_us: int,
        *,
        gpu_uuid: str | None = None,
    ) -> WindowSpans: ...

    def close_process(self, pid: int, create_time_us: int, exit_us: int) -> list[str]: ...

    def prune_before(self, us: int) -> int: ...


class JobRegistry:
    """Job spans per process, in SQLite. Thread-safe: the job API and the meter share it."""

    def __init__(
        self,
        path: Path,
        *,
        max_open_per_process: int = 256,
        max_open_total: int = 8192,
    ) -> None:
        """Opens (creating if needed) the database at ``path``. Raises JobStoreError."""
        self._max_open_per_process = max_open_per_process
        self._max_open_total = max_open_total
        self._lock = threading.Lock()
        self._db = _connect(path)
        self._written_through_us = self._load_written_through()

    # -- the job API's side -----------------------------------------------------------------

    def start(
        self,
        job_id: str,
        account: str,
        model: str,
        owner: Owner,
        *,
        start_us: int,
        declared_start_us: int | None = None,
        gpu_uuid: str = "",
        weight: float = 1.0,
    ) -> Started:
        """Registers a job open from ``start_us``.

        ``declared_start_us`` is the time as the worker sent it (before the API clamped it to
        the agent's clock); a retry is recognised by it. Raises InvalidJob, JobConflict (same
        id, other content), TooManyJobs, JobStoreError.
        """
        _check_job(job_id, account, model, weight)
        declared = start_us if declared_start_us is None else declared_start_us
        with self._write() as db:
            start, clamp = self._not_written(start_us)
            existing = _job_row(db, job_id)
            if existing is not None:
                return Started(
                    self._same_start(existing, account, model, owner, gpu_uuid, weight, declared),
                    False,
                    Clamp.NONE,
                )
            self._check_room(db, owner)
            db.execute(
                "INSERT INTO jobs (job_id, account, model, pid, create_time_us, gpu_uuid,"
                " weight, start_us, declared_start_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    account,
                    model,
                    owner.pid,
                    owner.create_time_us,
                    gpu_uuid,
                    weight,
                    start,
                    declared,
                ),
            )
        job = Job(job_id, account, model, owner, gpu_uuid, weight, start, None)
        return Started(job, True, clamp)

    def end(self, job_id: str, end_us: int, *, declared_end_us: int | None = None) -> Ended:
        """Ends a job at ``end_us`` (never before its start, nor before the written-through
        time). Raises InvalidJob (empty id), JobNotFound, JobConflict (ended at another
        time), JobStoreError."""
        if not job_id:
            raise InvalidJob("empty job id")
        declared = end_us if declared_end_us is None else declared_end_us
        with self._write() as db:
            row = _job_row(db, job_id)
            if row is None:
                raise JobNotFound(f"no job {job_id!r}: never started, or ended and pruned")
            job = _job_of(row)
            if job.end_us is not None:
                return Ended(self._same_end(job, row, declared), False, Clamp.NONE)
            end, clamp = self._not_written(end_us)
            if end < job.start_us:
                end, clamp = job.start_us, Clamp.BEFORE_START
            db.execute(
                "UPDATE jobs SET end_us = ?, declared_end_us = ? WHERE job_id = ?",
                (end, declared, job_id),
            )
        return Ended(dataclasses.replace(job, end_us=end), True, clamp)

    def record_undelivered(self, owner: Owner, start_us: int, end_us: int, jobs: int) -> bool:
        """Notes time in which the process ran jobs it could not deliver (see jobs.proto).

        Overlapping notes merge. Returns False when nothing is left of the span once clamped
        to the written-through time (its records are written already). Raises JobStoreError.
        """
        with self._write() as db:
            start, _ = self._not_written(start_us)
            end = max(start, end_us)
            if end <= start:
                return False
            rows = db.execute(
                "SELECT rowid, start_us, end_us, jobs FROM undelivered"
                " WHERE pid = ? AND create_time_us = ? AND start_us <= ? AND end_us >= ?",
                (owner.pid, owner.create_time_us, end, start),
            ).fetchall()
            if self._undelivered_count(db, owner) - len(rows) >= MAX_UNDELIVERED_PER_PROCESS:
                # A worker flapping between reachable and not for a long time: its notes stop
                # here; the time is still billed by its labels, only without the flag.
                log.warning("pid %d: too many undelivered-job notes; ignoring one", owner.pid)
                return False
            for rowid, s, e, n in rows:
                start, end, jobs = min(start, s), max(end, e), jobs + n
                db.execute("DELETE FROM undelivered WHERE rowid = ?", (rowid,))
            db.execute(
                "INSERT INTO undelivered (pid, create_time_us, start_us, end_us, jobs)"
                " VALUES (?, ?, ?, ?, ?)",
                (owner.pid, owner.create_time_us, start, end, jobs),
            )
        return True

    # -- the meter's side -------------------------------------------------------------------

    def spans_for(
        self,
        pid: int,
        create_time_us: int,
        window_start_us: int,
        window_end_us: int,
        *,
        gpu_uuid: str | None = None,
    ) -> WindowSpans:
        """The process's jobs and undelivered spans that touch [window_start_us, window_end_us].

        With ``gpu_uuid``, jobs declared for another GPU are left out (jobs declared without
        one count on every GPU). Raises JobStoreError.
        """
        with self._read() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE pid = ? AND create_time_us = ? AND start_us <= ?"
                " AND (end_us IS NULL OR end_us >= ?) ORDER BY job_id",
                (pid, create_time_us, window_end_us, window_start_us),
            ).fetchall()
            late = db.execute(
                "SELECT start_us, end_us FROM undelivered WHERE pid = ? AND create_time_us = ?"
                " AND start_us <= ? AND end_us >= ? ORDER BY start_us",
                (pid, create_time_us, window_end_us, window_start_us),
            ).fetchall()
        jobs = [_job_of(r) for r in rows]
        return WindowSpans(
            jobs=tuple(j.span() for j in jobs if gpu_uuid is None or j.gpu_uuid in ("", gpu_uuid)),
            undelivered=tuple(Interval(s, e) for s, e in late),
        )

    def close_process(self, pid: int, create_time_us: int, exit_us: int) -> list[str]:
        """Ends the open jobs of a process that exited, at ``exit_us``; their ids.

        Call it once the process's final record is written: a worker killed mid-job never
        sends EndJob. Raises JobStoreError.
        """
        with self._write() as db:
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT job_id FROM jobs WHERE pid = ? AND create_time_us = ?"
                    " AND end_us IS NULL ORDER BY job_id",
                    (pid, create_time_us),
                )
            ]
            db.execute(
                "UPDATE jobs SET end_us = MAX(start_us, ?), closed_at_exit = 1"
                " WHERE pid = ? AND create_time_us = ? AND end_us IS NULL",
                (exit_us, pid, create_time_us),
            )
        return ids

    def reap(self, alive: Callable[[Owner], bool], now_us: int) -> list[str]:
        """Closes, at ``now_us``, open jobs of processes ``alive`` says are gone.

        For processes the meter never saw (no GPU work): they get no final record, so
        close_process would never be called for them. Raises JobStoreError.
        """
        closed: list[str] = []
        for owner in self.open_owners():
            if not alive(owner):
                closed += self.close_process(owner.pid, owner.create_time_us, now_us)
        return closed

    def open_owners(self) -> list[Owner]:
        """Processes with at least one open job."""
        with self._read() as db:
            rows = db.execute(
                "SELECT DISTINCT pid, create_time_us FROM jobs WHERE end_us IS NULL"
                " ORDER BY pid, create_time_us"
            ).fetchall()
        return [Owner(p, c) for p, c in rows]

    def prune_before(self, us: int) -> int:
        """Every window up to ``us`` is written: forgets jobs and notes ended by then, and
        refuses time before ``us`` from now on. Returns how many jobs were forgotten.
        Raises JobStoreError."""
        with self._write() as db:
            through = max(self._written_through_us, us)
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('written_through_us', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (through,),
            )
            pruned = db.execute(
                "DELETE FROM jobs WHERE end_us IS NOT NULL AND end_us <= ?", (us,)
            ).rowcount
            db.execute("DELETE FROM undelivered WHERE end_us <= ?", (us,))
        self._written_through_us = through
        return int(pruned)

    @property
    def written_through_us(self) -> int:
        return self._written_through_us

    def job(self, job_id: str) -> Job | None:
        with self._read() as db:
            row = _job_row(db, job_id)
        return None if row is None else _job_of(row)

    def open_count(self) -> int:
        with self._read() as db:
            return int(db.execute("SELECT COUNT(*) FROM jobs WHERE end_us IS NULL").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- helpers ----------------------------------------------------------------------------

    def _not_written(self, us: int) -> tuple[int, Clamp]:
        if us < self._written_through_us:
            return self._written_through_us, Clamp.ALREADY_WRITTEN
        return us, Clamp.NONE

    def _check_room(self, db: sqlite3.Connection, owner: Owner) -> None:
        mine = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE pid = ? AND create_time_us = ? AND end_us IS NULL",
            (owner.pid, owner.create_time_us),
        ).fetchone()[0]
        if mine >= self._max_open_per_process:
            raise TooManyJobs(
                f"pid {owner.pid} has {mine} open jobs (max {self._max_open_per_process}):"
                " does the worker end its jobs?"
            )
        total = db.execute("SELECT COUNT(*) FROM jobs WHERE end_us IS NULL").fetchone()[0]
        if total >= self._max_open_total:
            raise TooManyJobs(f"{total} open jobs on this agent (max {self._max_open_total})")

    def _same_start(
        self,
        row: sqlite3.Row,
        account: str,
        model: str,
        owner: Owner,
        gpu_uuid: str,
        weight: float,
        declared_start_us: int,
    ) -> Job:
        job = _job_of(row)
        same = (
            job.account == account
            and job.model == model
            and job.owner == owner
            and job.gpu_uuid == gpu_uuid
            and job.weight == weight
            and row["declared_start_us"] == declared_start_us
        )
        if not same:
            raise JobConflict(
                f"job id {job.job_id!r} is taken by another job (pid {job.owner.pid},"
                f" account {job.account!r}, declared start {row['declared_start_us']})"
            )
        return job

    def _same_end(self, job: Job, row: sqlite3.Row, declared_end_us: int) -> Job:
        if job.closed_at_exit:
            raise JobConflict(f"job {job.job_id!r} was closed when its process exited")
        if row["declared_end_us"] != declared_end_us:
            raise JobConflict(
                f"job {job.job_id!r} already ended (declared end {row['declared_end_us']})"
            )
        return job

    def _undelivered_count(self, db: sqlite3.Connection, owner: Owner) -> int:
        return int(
            db.execute(
                "SELECT COUNT(*) FROM undelivered WHERE pid = ? AND create_time_us = ?",
                (owner.pid, owner.create_time_us),
            ).fetchone()[0]
        )

    def _load_written_through(self) -> int:
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'written_through_us'").fetchone()
        return int(row[0]) if row else 0

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, committed (fsynced) before returning; our errors only."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise JobStoreError(f"job database: {exc}") from exc

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise JobStoreError(f"job database: {exc}") from exc


def _connect(path: Path) -> sqlite3.Connection:
    try:
        create_private(path)  # job spans name accounts: not for every local user
        with ExitStack() as on_failure:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # Closed on any failure, not left to the garbage collector in the traceback.
            on_failure.callback(db.close)
            _prepare(db, path)
            on_failure.pop_all()
    except (sqlite3.Error, OSError) as exc:
        raise JobStoreError(f"cannot open the job database {path}: {exc}") from exc
    return db


def _prepare(db: sqlite3.Connection, path: Path) -> None:
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode = WAL")
    # FULL: a job acknowledged to the worker survives a power loss, not only a crash.
    db.execute("PRAGMA synchronous = FULL")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise JobStoreError(
            f"{path}: schema version {version} is newer than this agent's ({SCHEMA_VERSION})"
        )
    db.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")


def _check_job(job_id: str, account: str, model: str, weight: float) -> None:
    try:
        check_job_labels(job_id, account, model)  # the collector's label law, exactly
    except ValueError as exc:
        raise InvalidJob(str(exc)) from None
    try:
        weight_units(weight)
    except ValueError as exc:
        raise InvalidJob(str(exc)) from exc


def _job_row(db: sqlite3.Connection, job_id: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = db.execute(
        "SELECT * FROM jobs WHERE job_id = ?", (job_id,)
    ).fetchone()
    return row


def _job_of(row: sqlite3.Row) -> Job:
    return Job(
        job_id=row["job_id"],
        account=row["account"],
        model=row["model"],
        owner=Owner(row["pid"], row["create_time_us"]),
        gpu_uuid=row["gpu_uuid"],
        weight=row["weight"],
        start_us=row["start_us"],
        end_us=row["end_us"],
        closed_at_exit=bool(row["closed_at_exit"]),
    )
