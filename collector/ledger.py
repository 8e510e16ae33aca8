"""The credit ledger: plans, accounts, credit entries, API charges, balances, closed periods.

Words and rules (amounts are integer µcredits, see prices.py for the rounding rule):

* A **plan** grants credits every billing period (defined in hours: 1 h = 3,600 credits, or
  in credits). Each **account** has a plan, changeable from a period on, and monthly
  **periods** from its anchor day (periods.py). Plan credits are valid for their period only.
* **Top-ups** (bought) and **grants** (given) are lots of credits valid from when they are
  made until their expiry (none: forever). **Adjustments** are signed, audited corrections in
  the period they are made in: > 0 gives credits back (a refund), < 0 charges more. Every
  entry records who, when and why; nothing is ever deleted or edited.
* A period's **charges** are its lines: busy µs per self-hosted model at its rate, requests
  per API model at its price, and late lines (below). ``used = charges − adjustments``;
  ``remaining = granted − used`` where ``granted`` is the plan grant plus the lots usable in
  the period. Charges consume the plan grant first (it expires with the period), then lots
  soonest expiry first (lots without expiry last); what a lot keeps is usable in later
  periods until it expires. Lots are matched to usage at period granularity: a lot counts
  in every period its validity overlaps. A negative remaining is the period's overage, for
  the invoice; it is not carried into the next period.
* **Closing** (``close_periods``, run by ``creditmeter-collector period close``) freezes a
  period, in order, once it has ended: its lines are stored with their credits at that
  moment's prices and never change again, and entries or plan changes dated inside it are
  refused. A record keeps landing in the period of its interval (rollups are by interval
  time), so usage of a closed period that arrives late shows as a **late line** in the
  first open period: the account's usage before that period, minus everything already
  charged in closed periods, per model.
* Usage before an account's first period (or labelled with an account never opened) is
  reported by ``report`` but charged to no balance.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation

from creditmeter.collector.clock import WallClock, wall_clock_us
from creditmeter.collector.errors import (
    EvidenceMismatch,
    InvalidRequest,
    PriceConflict,
    PricesChanged,
    UnknownAccount,
    UnknownPlan,
)
from creditmeter.collector.ledger_store import (
    Account,
    ApiCharge,
    EntryKind,
    LedgerEntry,
    LedgerStore,
    LineKind,
    ModelUsage,
    Plan,
    PlanChange,
    SignedStatement,
    Statement,
    StatementLine,
)
from creditmeter.collector.periods import (
    BillingPeriod,
    check_anchor_day,
    iso_text,
    next_period,
    period_containing,
    periods_between,
)
from creditmeter.collector.prices import (
    MICRO,
    PriceBook,
    PriceSchedule,
    PriceSpan,
    PriceVersion,
    as_schedule,
    content_digest,
    price_changes,
)
from creditmeter.collector.rollup import HOUR_US
from creditmeter.collector.statements import (
    BalanceFigures,
    Signer,
    gather_evidence,
    statement_document,
)
from creditmeter.labels import label_error

SECONDS_PER_HOUR = 3600
MAX_REASON_BYTES = 1024
MAX_CHARGE_COUNT = 1_000_000  # requests in one charge
MAX_AMOUNT_MICRO = 10**9 * MICRO  # a billion credits: anything larger is a typo
MIN_TIME_US = 1_577_836_800_000_000  # 2020-01-01: nothing was metered before
MAX_FUTURE_US = 86_400_000_000  # how far past the collector's clock a charge may be timed
# A record stored between reading the rollups and reading the records makes them disagree:
# a close is computed this many times before it is refused.
_CLOSE_ATTEMPTS = 3


@dataclass(frozen=True)
class Balance:
    """An account's credits in one period (``remaining`` < 0 is overage)."""

    account: str
    plan: str
    period: BillingPeriod
    closed: bool
    plan_grant_micro: int
    lot_credits_micro: int  # top-ups and grants usable in the period (what they kept so far)
    adjustments_micro: int  # net adjustments made in the period: > 0 credits given back
    lines: tuple[StatementLine, ...]

    @property
    def granted_micro(self) -> int:
        return self.plan_grant_micro + self.lot_credits_micro

    @property
    def usage_micro(self) -> int:
        return self._charged(LineKind.USAGE)

    @property
    def api_micro(self) -> int:
        return self._charged(LineKind.API)

    @property
    def late_micro(self) -> int:
        return self._charged(LineKind.LATE_USAGE) + self._charged(LineKind.LATE_API)

    @property
    def charged_micro(self) -> int:
        return sum(line.credits_micro for line in self.lines)

    @property
    def used_micro(self) -> int:
        return self.charged_micro - self.adjustments_micro

    @property
    def remaining_micro(self) -> int:
        return self.granted_micro - self.used_micro

    def _charged(self, kind: LineKind) -> int:
        return sum(line.credits_micro for line in self.lines if line.kind is kind)


@dataclass(frozen=True)
class CreditCheck:
    remaining_micro: int
    sufficient: bool


@dataclass(frozen=True)
class ChargeReceipt:
    new: bool  # False: the same charge was stored before (a retry)
    credits_micro: int  # at the current price list
    default_price: bool


@dataclass
class _Lot:
    entry: LedgerEntry
    remaining_micro: int

    def usable_in(self, period: BillingPeriod) -> bool:
        expires_us = self.entry.expires_us
        return self.entry.effective_us < period.end_us and (
            expires_us is None or expires_us > period.start_us
        )

    @property
    def order(self) -> tuple[bool, int, int]:
        expires_us = self.entry.expires_us
        return (expires_us is None, expires_us or 0, self.entry.entry_id)


@dataclass(frozen=True)
class PricesLoaded:
    version: PriceVersion  # as stored (the earlier one when ``unchanged``)
    unchanged: bool  # a retry: this content was loaded for this hour before
    changes: list[str]  # against the version in force the hour before


@dataclass
class _Billed:
    """Quantities charged in closed periods so far, per (model, price version): what late
    lines subtract."""

    busy_us: dict[tuple[str, int], int] = field(default_factory=dict)
    requests: dict[tuple[str, int], int] = field(default_factory=dict)

    def add(self, lines: Iterable[StatementLine]) -> None:
        for line in lines:
            into = self.busy_us if line.kind.is_busy else self.requests
            key = (line.model, line.price_from_us)
            into[key] = into.get(key, 0) + line.quantity


class Ledger:
    """Business rules over a LedgerStore and its price book; see the module docstring.

    Prices come from the store's price book, read whenever something is priced, so a
    version loaded by ``prices set`` is in force for every reader at once. ``prices``
    fixes them instead (tests and benchmarks): a PriceBook is a book in force since always.
    """

    def __init__(
        self,
        store: LedgerStore,
        prices: PriceBook | PriceSchedule | None = None,
        clock_us: WallClock = wall_clock_us,
    ) -> None:
        self._store = store
        if isinstance(prices, PriceBook):
            prices = as_schedule(prices)
        self._fixed_prices = prices
        self._clock_us = clock_us

    @property
    def prices(self) -> PriceSchedule:
        if self._fixed_prices is not None:
            return self._fixed_prices
        return PriceSchedule(self._store.price_versions())

    def set_prices(
        self, book: PriceBook, effective_us: int, *, by: str, backdate: bool = False
    ) -> PricesLoaded:
        """Loads ``book`` as the version in force from ``effective_us`` (a whole UTC hour,
        not before the current hour unless ``backdate``, never inside a closed period).
        Loading the same content for the same hour again changes nothing. Raises
        InvalidRequest, PeriodClosed, or PriceConflict (that hour holds other prices)."""
        check_name("author", by)
        if effective_us < 0 or effective_us % HOUR_US:
            raise InvalidRequest(
                f"prices take effect on a whole UTC hour, not {iso_text(effective_us)}: usage "
                "is priced by the hour its record starts in"
            )
        now_us = self._clock_us()
        if not backdate and effective_us < now_us - now_us % HOUR_US:
            raise InvalidRequest(
                f"{iso_text(effective_us)} is before the current hour: those prices would "
                "reprice usage already shown in balances (--backdate to mean it)"
            )
        before = self.prices.at(effective_us - 1)
        version = PriceVersion(effective_us, book, now_us, by)
        stored, new = self._store.add_price_version(version)
        if not new:
            if content_digest(stored.book) != content_digest(book):
                raise PriceConflict(
                    f"prices effective {iso_text(effective_us)} were loaded by "
                    f"{stored.loaded_by} at {iso_text(stored.loaded_at_us)} with other "
                    "prices; versions never change: load the correction at another hour"
                )
            return PricesLoaded(stored, True, [])
        return PricesLoaded(stored, False, price_changes(before, book))

    def now_us(self) -> int:
        return self._clock_us()

    # -- plans and accounts ----------------------------------------------------------------

    def define_plan(
        self, name: str, *, by: str, hours: Decimal | None = None, credits: Decimal | None = None
    ) -> Plan:
        """A plan granting ``hours`` of compute (3,600 credits an hour) or ``credits`` per
        period. Raises InvalidRequest unless exactly one is given, exact to the µcredit."""
        check_name("plan", name)
        if (hours is None) == (credits is None):
            raise InvalidRequest(f"plan {name!r}: give its grant in hours or in credits")
        grant = hours * SECONDS_PER_HOUR if hours is not None else credits
        assert grant is not None
        grant_micro = credits_micro(grant, f"plan {name!r} grant")
        if grant_micro <= 0:
            raise InvalidRequest(f"plan {name!r}: its grant must be more than 0 credits a period")
        plan = Plan(name, grant_micro, self._clock_us(), by)
        return self._store.define_plan(plan)

    def open_account(
        self,
        name: str,
        plan: str,
        *,
        by: str,
        anchor_day: int | None = None,
        since_us: int | None = None,
    ) -> Account:
        """Opens an account on ``plan``. Its periods start on ``anchor_day`` (default: the
        day of ``since_us``, itself by default now); its first period is the one containing
        ``since_us``. Raises InvalidRequest, UnknownPlan, or LedgerError (name taken)."""
        check_name("account", name)
        now_us = self._clock_us()
        since_us = now_us if since_us is None else since_us
        if anchor_day is None:
            anchor_day = int(iso_text(since_us)[8:10])
        check_anchor_day(anchor_day)
        first = period_containing(anchor_day, since_us)
        return self._store.open_account(Account(name, anchor_day, first.start_us, now_us, by), plan)

    def change_plan(
        self, account: str, plan: str, *, by: str, from_us: int | None = None
    ) -> PlanChange:
        """From the period containing ``from_us`` (default now) on, ``account`` has ``plan``.
        Raises UnknownAccount, UnknownPlan or PeriodClosed."""
        opened = self.account(account)
        now_us = self._clock_us()
        period = period_containing(opened.anchor_day, now_us if from_us is None else from_us)
        change = PlanChange(account, plan, period.start_us, now_us, by)
        changes = self._store.plan_changes(account)
        if changes and _plan_at(changes, period.start_us) == plan:
            return replace(change, unchanged=True)  # a retry, or a change already made
        self._store.change_plan(change)
        return change

    def account(self, name: str) -> Account:
        """Raises UnknownAccount."""
        account = self._store.account(name)
        if account is None:
            raise UnknownAccount(f"no account {name!r} is open")
        return account

    # -- credits ---------------------------------------------------------------------------

    def top_up(
        self,
        account: str,
        amount_micro: int,
        *,
        by: str,
        reason: str,
        expires_us: int | None,
        key: str | None = None,
    ) -> LedgerEntry:
        return self._add_entry(account, EntryKind.TOP_UP, amount_micro, by, reason, expires_us, key)

    def grant(
        self,
        account: str,
        amount_micro: int,
        *,
        by: str,
        reason: str,
        expires_us: int | None,
        key: str | None = None,
    ) -> LedgerEntry:
        return self._add_entry(account, EntryKind.GRANT, amount_micro, by, reason, expires_us, key)

    def adjust(
        self, account: str, amount_micro: int, *, by: str, reason: str, key: str | None = None
    ) -> LedgerEntry:
        """A signed correction in the current period: > 0 refunds credits, < 0 charges."""
        return self._add_entry(account, EntryKind.ADJUSTMENT, amount_micro, by, reason, None, key)

    def _add_entry(
        self,
        account: str,
        kind: EntryKind,
        amount_micro: int,
        by: str,
        reason: str,
        expires_us: int | None,
        key: str | None,
    ) -> LedgerEntry:
        """Stores the entry, or with ``key`` stored already for the same content returns
        the stored one (``repeated``: nothing moved). Raises InvalidRequest (amount, reason,
        expiry, key), UnknownAccount, PeriodClosed or KeyReused."""
        if kind is EntryKind.ADJUSTMENT:
            if amount_micro == 0 or abs(amount_micro) > MAX_AMOUNT_MICRO:
                raise InvalidRequest(f"an adjustment must be non-zero and at most {_max()}")
        elif not 0 < amount_micro <= MAX_AMOUNT_MICRO:
            raise InvalidRequest(f"a {kind.value} must be more than 0 and at most {_max()}")
        if not reason.strip() or len(reason.encode()) > MAX_REASON_BYTES:
            raise InvalidRequest(f"a {kind.value} needs a reason of 1-{MAX_REASON_BYTES} bytes")
        check_name("author", by)
        if key is not None:
            check_name("idempotency key", key)
        now_us = self._clock_us()
        if expires_us is not None and expires_us <= now_us:
            raise InvalidRequest(f"expiry {iso_text(expires_us)} is not in the future")
        entry = LedgerEntry(
            account, kind, amount_micro, now_us, expires_us, reason, by, now_us, key=key
        )
        return self._store.add_entry(entry)

    # -- API charges -----------------------------------------------------------------------

    def record_charge(self, charge: ApiCharge) -> ChargeReceipt:
        """Stores an API charge (durable when this returns). Raises InvalidRequest for a
        malformed charge and ChargeConflict for a request id stored with other content."""
        check_name("request id", charge.request_id)
        check_name("account", charge.account)
        check_name("model", charge.model)
        if not 1 <= charge.count <= MAX_CHARGE_COUNT:
            raise InvalidRequest(f"count {charge.count} is not in 1-{MAX_CHARGE_COUNT}")
        now_us = self._clock_us()
        if not MIN_TIME_US <= charge.time_us <= now_us + MAX_FUTURE_US:
            raise InvalidRequest(
                f"time {charge.time_us} µs is before 2020 or more than a day ahead of the "
                "collector's clock (0: it must be set, so that a retry is the same charge)"
            )
        # Money no balance would ever show is silent money: the account must be open, and
        # the charge inside its periods.
        opened = self.account(charge.account)
        if charge.time_us < opened.first_period_start_us:
            raise InvalidRequest(
                f"time {iso_text(charge.time_us)} is before account {charge.account!r} has "
                f"periods (from {iso_text(opened.first_period_start_us)})"
            )
        new = self._store.record_charge(charge, now_us)
        price = self.prices.at(charge.time_us).request_price(charge.model)
        return ChargeReceipt(new, charge.count * price.micro, price.default)

    # -- balances --------------------------------------------------------------------------

    def balance(self, account: str, at_us: int | None = None) -> Balance:
        """The account's credits in the period containing ``at_us`` (default now). Raises
        UnknownAccount, or InvalidRequest for a time before the account's first period."""
        opened = self.account(account)
        at_us = self._clock_us() if at_us is None else at_us
        target = period_containing(opened.anchor_day, at_us)
        if target.start_us < opened.first_period_start_us:
            raise InvalidRequest(
                f"account {account!r} has no period before {iso_text(opened.first_period_start_us)}"
            )
        return self._walk(opened, target)

    def check_credits(self, account: str, required_micro: int) -> CreditCheck:
        """Whether ``account`` has ``required_micro`` left now."""
        if not 0 <= required_micro <= MAX_AMOUNT_MICRO:
            raise InvalidRequest(f"required credits must be 0 to {_max()}")
        remaining_micro = self.balance(account).remaining_micro
        return CreditCheck(remaining_micro, remaining_micro >= required_micro)

    def _walk(
        self, account: Account, target: BillingPeriod, closing: Statement | None = None
    ) -> Balance:
        """Runs the account's periods up to ``target``, consuming lots period by period;
        ``closing`` counts as stored (the statement about to be)."""
        statements = {s.start_us: s for s in self._store.statements(account.name)}
        if closing is not None:
            statements[closing.start_us] = closing
        plans = {plan.name: plan for plan in self._store.plans()}
        changes = self._store.plan_changes(account.name)
        entries = self._store.entries(account.name)
        lots = [
            _Lot(entry, entry.amount_micro)
            for entry in entries
            if entry.kind is not EntryKind.ADJUSTMENT
        ]
        adjustments = [entry for entry in entries if entry.kind is EntryKind.ADJUSTMENT]
        first_open_us = max((s.end_us for s in statements.values()), default=None)
        first_open_us = account.first_period_start_us if first_open_us is None else first_open_us
        billed = _Billed()
        for closed in statements.values():
            billed.add(closed.lines)
        balance = None
        for period in periods_between(account.anchor_day, account.first_period_start_us, target):
            statement = statements.get(period.start_us)
            if statement is not None:
                plan, grant_micro, lines = (
                    statement.plan,
                    statement.plan_grant_micro,
                    statement.lines,
                )
            else:
                plan = _plan_at(changes, period.start_us)
                grant_micro = _grant_micro(plans, plan)
                late = period.start_us == first_open_us
                lines = self._period_lines(account, period, billed if late else None)
            usable = sorted((lot for lot in lots if lot.usable_in(period)), key=lambda x: x.order)
            lot_micro = sum(lot.remaining_micro for lot in usable)
            adjusted_micro = sum(
                a.amount_micro for a in adjustments if period.contains(a.effective_us)
            )
            balance = Balance(
                account.name,
                plan,
                period,
                statement is not None,
                grant_micro,
                lot_micro,
                adjusted_micro,
                lines,
            )
            _consume(usable, balance.used_micro - grant_micro)
        assert balance is not None  # target is at or after the first period
        return balance

    # -- closing ---------------------------------------------------------------------------

    def close_periods(
        self,
        account: str,
        through_us: int,
        *,
        by: str,
        signer: Signer | None = None,
    ) -> list[Statement]:
        """Closes, in order, every open period of ``account`` that ended by ``through_us``
        (never one that has not ended yet). Returns the new statements. With ``signer``,
        each is stored with its signed statement document and evidence (statements.py);
        raises EvidenceMismatch when the records do not add up to the lines twice over."""
        opened = self.account(account)
        check_name("author", by)
        now_us = self._clock_us()
        through_us = min(through_us, now_us)
        statements = self._store.statements(account)
        billed = _Billed()
        for statement in statements:
            billed.add(statement.lines)
        start_us = statements[-1].end_us if statements else opened.first_period_start_us
        period = period_containing(opened.anchor_day, start_us)
        changes = self._store.plan_changes(account)
        plans = {plan.name: plan for plan in self._store.plans()}
        closed: list[Statement] = []
        while period.end_us <= through_us:
            plan = _plan_at(changes, period.start_us)
            for attempt in range(_CLOSE_ATTEMPTS):
                schedule = self.prices
                lines = self._period_lines(opened, period, billed, schedule)
                statement = Statement(
                    account,
                    period.start_us,
                    period.end_us,
                    plan,
                    _grant_micro(plans, plan),
                    lines,
                    now_us,
                    by,
                    price_versions=self._versions_seen(schedule, period),
                )
                try:
                    signed = self._signed(
                        signer, opened, statement, [*statements, *closed], schedule
                    )
                    self._store.close_period(statement, signed)
                    break
                except (EvidenceMismatch, PricesChanged):
                    if attempt == _CLOSE_ATTEMPTS - 1:
                        raise
            billed.add(lines)
            closed.append(statement)
            period = next_period(opened.anchor_day, period)
        return closed

    def _versions_seen(
        self, schedule: PriceSchedule, period: BillingPeriod
    ) -> tuple[int, ...] | None:
        """The store's price versions a close priced with (None with fixed prices): the
        store refuses the close if a version was loaded inside the period meanwhile."""
        if self._fixed_prices is not None:
            return None
        return tuple(v.effective_us for v in schedule.versions if v.effective_us < period.end_us)

    def _signed(
        self,
        signer: Signer | None,
        account: Account,
        statement: Statement,
        before: Sequence[Statement],
        schedule: PriceSchedule,
    ) -> SignedStatement | None:
        """The statement's signed document (None without a signer)."""
        if signer is None:
            return None
        period = BillingPeriod(statement.start_us, statement.end_us)
        evidence = gather_evidence(
            self._store,
            account,
            period,
            schedule,
            statement.lines,
            before,
            self._store.signed_statements(account.name),
        )
        balance = self._walk(account, period, closing=statement)
        figures = BalanceFigures(
            balance.lot_credits_micro,
            balance.adjustments_micro,
            balance.charged_micro,
            balance.used_micro,
            balance.remaining_micro,
        )
        entries = self._store.entries(account.name)
        document = statement_document(
            statement,
            figures,
            entries,
            schedule.versions,
            evidence,
            self._store,
            signer.public_key_hex,
        )
        return signer.sign(statement.start_us, document)

    def _period_lines(
        self,
        account: Account,
        period: BillingPeriod,
        billed: _Billed | None,
        schedule: PriceSchedule | None = None,
    ) -> tuple[StatementLine, ...]:
        """The lines of an open period, each priced by the version in force over its hours;
        with ``billed`` (the first open period) also the late lines of the closed ones."""
        schedule = self.prices if schedule is None else schedule
        lines: list[StatementLine] = []
        for span in schedule.spans(period.start_us, period.end_us):
            own = self._store.model_usage(account.name, *_bounds(span))
            lines += _lines(own, span, LineKind.USAGE, LineKind.API)
        if billed is not None and period.start_us > account.first_period_start_us:
            for span in schedule.spans(account.first_period_start_us, period.start_us):
                before = self._store.model_usage(account.name, *_bounds(span))
                key = span.effective_us
                late = {
                    model: ModelUsage(
                        usage.busy_us - billed.busy_us.get((model, key), 0),
                        usage.requests - billed.requests.get((model, key), 0),
                    )
                    for model, usage in before.items()
                }
                lines += _lines(late, span, LineKind.LATE_USAGE, LineKind.LATE_API)
        return tuple(sorted(lines, key=_line_order))


# -- helpers ---------------------------------------------------------------------------------


def _line_order(line: StatementLine) -> tuple[bool, str, bool, int]:
    """A period's own lines, then its late ones; per model busy time, then requests, then
    by price version."""
    return (line.kind.is_late, line.model, not line.kind.is_busy, line.price_from_us)


def _bounds(span: PriceSpan) -> tuple[int, int]:
    assert span.to_us is not None  # spans of a period: bounded
    return span.from_us, span.to_us


def _lines(
    usage: dict[str, ModelUsage], span: PriceSpan, busy_kind: LineKind, api_kind: LineKind
) -> list[StatementLine]:
    """One line per model and kind with something to charge (idle models have none), at
    the span's prices: a model's busy µs in the span are rounded once (prices.py)."""
    prices, key = span.book, span.effective_us
    lines = []
    for model in sorted(usage):
        quantities = usage[model]
        if quantities.busy_us > 0:
            price = prices.busy_second_price(model)
            credits = prices.busy_credits_micro(model, quantities.busy_us)
            lines.append(
                StatementLine(busy_kind, model, quantities.busy_us, credits, price.default, key)
            )
        if quantities.requests > 0:
            price = prices.request_price(model)
            credits = quantities.requests * price.micro
            lines.append(
                StatementLine(api_kind, model, quantities.requests, credits, price.default, key)
            )
    return lines


def check_name(what: str, name: str) -> None:
    """Raises InvalidRequest unless ``name`` is a non-empty lawful label (common/labels.py:
    the law records are held to, so that an account here is one a record can name)."""
    if not name:
        raise InvalidRequest(f"{what} is empty")
    error = label_error(what, name)
    if error is not None:
        raise InvalidRequest(str(error))


def credits_micro(amount: Decimal | str, what: str) -> int:
    """Credits (a Decimal or its text, e.g. "12.5") as µcredits. Raises InvalidRequest for
    anything that is not a finite number exact to the µcredit."""
    try:
        value = Decimal(amount)
    except InvalidOperation:
        raise InvalidRequest(f"{what}: {amount!r} is not a number of credits") from None
    if not value.is_finite():
        raise InvalidRequest(f"{what}: {amount} is not a number of credits")
    micro = value * MICRO
    if micro != micro.to_integral_value():
        raise InvalidRequest(f"{what}: {amount} has more than 6 decimal places")
    if abs(micro) > MAX_AMOUNT_MICRO:
        raise InvalidRequest(f"{what}: {amount} is more than {_max()}")
    return int(micro)


def balance_document(balance: Balance) -> dict[str, object]:
    """An account's balance as JSON values: what ``balance --format json`` prints and the
    web API answers (credits as exact decimal text)."""
    return {
        "account": balance.account,
        "plan": balance.plan,
        "period": {
            "start": iso_text(balance.period.start_us),
            "end": iso_text(balance.period.end_us),
            "closed": balance.closed,
        },
        "plan_grant": micro_text(balance.plan_grant_micro),
        "top_ups_and_grants": micro_text(balance.lot_credits_micro),
        "lines": [
            {
                "kind": line.kind.value,
                "model": line.model,
                "quantity": line.quantity,
                "credits": micro_text(line.credits_micro),
                "default_price": line.default_price,
            }
            for line in balance.lines
        ],
        "adjustments": micro_text(balance.adjustments_micro),
        "granted": micro_text(balance.granted_micro),
        "used": micro_text(balance.used_micro),
        "remaining": micro_text(balance.remaining_micro),
    }


def micro_text(amount_micro: int) -> str:
    """Exact decimal credits: 7_500_000 -> "7.500000"."""
    sign = "-" if amount_micro < 0 else ""
    whole, fraction = divmod(abs(amount_micro), MICRO)
    return f"{sign}{whole}.{fraction:06d}"


def _max() -> str:
    return f"{MAX_AMOUNT_MICRO // MICRO:,} credits"


def _plan_at(changes: Sequence[PlanChange], time_us: int) -> str:
    """The plan in force at ``time_us``: the last change made for the latest period start
    at or before it (changes are ordered by effective time, then by when they were made)."""
    plan = changes[0].plan
    for change in changes:
        if change.effective_us <= time_us:
            plan = change.plan
    return plan


def _grant_micro(plans: dict[str, Plan], name: str) -> int:
    plan = plans.get(name)
    if plan is None:
        raise UnknownPlan(f"plan {name!r} of an account is not defined (database edited?)")
    return plan.grant_micro


def _consume(lots: Sequence[_Lot], beyond_plan_micro: int) -> None:
    """Takes what the plan grant did not cover from ``lots`` (ordered soonest expiry first)."""
    for lot in lots:
        if beyond_plan_micro <= 0:
            return
        taken = min(lot.remaining_micro, beyond_plan_micro)
        lot.remaining_micro -= taken
        beyond_plan_micro -= taken
