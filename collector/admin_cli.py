"""The collector's credit commands: plans, accounts, credits, balances, periods, reports,
API charges and exports. ``main.py`` adds them to its parser with ``add_commands``::

    creditmeter-collector plan define NAME (--hours H | --credits C)
    creditmeter-collector plan list
    creditmeter-collector account open NAME --plan PLAN [--anchor-day D] [--since DATE]
    creditmeter-collector account set-plan NAME PLAN [--from DATE]
    creditmeter-collector account list
    creditmeter-collector top-up ACCOUNT CREDITS --reason WHY --key KEY [--expires DATE]
    creditmeter-collector grant ACCOUNT CREDITS --reason WHY --key KEY [--expires DATE]
    creditmeter-collector adjust ACCOUNT CREDITS --reason WHY --key KEY  (> 0 refunds, < 0 charges)
    creditmeter-collector entries ACCOUNT
    creditmeter-collector balance ACCOUNT [--at DATE] [--format table|json]
    creditmeter-collector period close (--account NAME | --all) [--through DATE]
    creditmeter-collector period list ACCOUNT
    creditmeter-collector statement export ACCOUNT DATE [--out FILE]   (creditmeter-verify FILE)
    creditmeter-collector statement key
    creditmeter-collector charge ACCOUNT MODEL REQUEST_ID --at TIME [--count N]
    creditmeter-collector prices set FILE --effective HOUR [--backdate]
    creditmeter-collector prices list
    creditmeter-collector prices show [--at TIME]
    creditmeter-collector report [--from DATE] [--to DATE] [--group-by account,model]
    creditmeter-collector export --format cloudevents|openmeter|stripe|lago [--customers F]
    creditmeter-collector report --per-job | --typical [--from DATE] [--to DATE] [--account A]
                                 [--account NAME] [--format table|csv|json]
    creditmeter-collector export --format cloudevents [--from DATE] [--to DATE]
                                 [--source NAME] [--out FILE]

Every command takes --db. Every command that prices (balance, period close, report, export,
charge) prices from the store's price book, as ``serve`` does: usage and requests by the
version in force at their time (prices.py; before the first version, 1 credit per busy
second and per request). ``prices set`` loads a version; nothing reads a price file. Commands that
change credits record who (--by, default the login name) and why. Periods close explicitly:
run ``period close --all`` daily (a timer); it closes the periods that ended more than
--grace-hours (default 24) ago, so that records still in agents' outboxes when a period ends
land before it is frozen.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from creditmeter.chain import BadKey
from creditmeter.collector.billing_export import (
    DEFAULT_EVENT_NAME,
    billables,
    lago_event,
    read_customers,
    stripe_event,
)
from creditmeter.collector.errors import ConfigError, InvalidRequest, UnknownAccount
from creditmeter.collector.export import DEFAULT_SOURCE, cloudevents, write_json_lines
from creditmeter.collector.jobs_report import job_credits, job_rows, typical, typical_rows
from creditmeter.collector.jobs_report import render as render_jobs
from creditmeter.collector.ledger import (
    Balance,
    Ledger,
    balance_document,
    credits_micro,
    micro_text,
)
from creditmeter.collector.ledger_store import (
    ApiCharge,
    LedgerEntry,
    LedgerSnapshot,
    LedgerStore,
    SignedStatement,
    as_ledger_store,
)
from creditmeter.collector.periods import iso_text, period_containing
from creditmeter.collector.prices import (
    BUILT_IN,
    PriceSchedule,
    PriceVersion,
    book_lines,
    content_digest,
    load_prices,
    price_changes,
)
from creditmeter.collector.query import ledger_handlers
from creditmeter.collector.reconcile import reconcile, reconcile_json, render_reconcile_table
from creditmeter.collector.report import (
    DEFAULT_GROUP_BY,
    Period,
    build_report,
    parse_group_by,
    parse_period,
    parse_time_us,
    render_csv,
    render_json,
    render_table,
    seconds_text,
)
from creditmeter.collector.rollup import HOUR_US
from creditmeter.collector.settings import admin_statement_key
from creditmeter.collector.statements import StatementSigner, bundle, load_signer
from creditmeter.collector.stores import open_store
from creditmeter.labels import printable

DEFAULT_GRACE_HOURS = 24
EXIT_OK = 0

log = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], int]


def add_commands(commands: Any, db: argparse.ArgumentParser) -> None:
    """Adds the credit commands to ``commands`` (main's subparsers); ``db`` is the parent
    parser that contributes --db."""
    who = argparse.ArgumentParser(add_help=False)
    who.add_argument("--by", default=_login_name(), help="who does this (default: login name)")
    _add_plan_commands(commands, db, who)
    _add_account_commands(commands, db, who)
    _add_price_commands(commands, db, who)
    _add_credit_commands(commands, db, who)
    _add_reading_commands(commands, db)


def serve_handlers(
    store: object, prices_path: Path | None, *, open_to_callers: bool = True
) -> list[Any]:
    """The Query and Charges handlers for ``serve``, pricing from the store's price book;
    none for a store without a ledger (the services then answer UNIMPLEMENTED).
    ``prices_path`` (the retired setting ``ledger.prices_file``) is migrated into the price
    book (``migrate_prices_file``)."""
    try:
        ledger_store = as_ledger_store(store)
    except ConfigError as exc:
        log.warning("not serving Query and Charges: %s", exc)
        return []
    ledger = Ledger(ledger_store)
    if prices_path is not None:
        migrate_prices_file(ledger_store, prices_path, ledger.now_us())
    if open_to_callers:
        log.info("serving Query and Charges, prices: %s", ledger.prices.source)
    else:
        log.info(
            "Query and Charges refuse every call: no api.token_file, no api.clients (prices: %s)",
            ledger.prices.source,
        )
    return ledger_handlers(ledger, ledger_store)


def migrate_prices_file(store: LedgerStore, path: Path, now_us: int) -> None:
    """``ledger.prices_file`` from before the price book. With no version stored, the file
    becomes the version in force since always (it priced everything until now, the closed
    periods' statements included). Once the book holds versions, the setting is ignored when
    its prices are those in force now, and refused when they differ: which one should bill
    is the operator's call, made with ``prices set``. Raises PriceFileError, ConfigError."""
    book = load_prices(path)
    schedule = PriceSchedule(store.price_versions())
    if not schedule.versions:
        store.add_price_version(
            PriceVersion(0, book, now_us, "ledger.prices_file"), since_always=True
        )
        log.warning(
            "imported ledger.prices_file %s into the price book, in force since always; "
            "remove the setting and load changes with: creditmeter-collector prices set",
            path,
        )
    elif content_digest(schedule.at(now_us)) == content_digest(book):
        log.warning("ledger.prices_file %s is ignored (the price book holds it): remove it", path)
    else:
        raise ConfigError(
            f"ledger.prices_file {path} differs from the prices in force in the price book; "
            "load it with: creditmeter-collector prices set FILE --effective HOUR, then "
            "remove the setting"
        )


# -- parsers ---------------------------------------------------------------------------------


def _add_plan_commands(commands: Any, db: argparse.ArgumentParser, who: Any) -> None:
    plan = commands.add_parser("plan", help="define and list plans")
    verbs = plan.add_subparsers(title="plan commands", required=True, metavar="VERB")
    define = verbs.add_parser("define", parents=[db, who], help="define a plan")
    define.add_argument("name", metavar="NAME")
    grant = define.add_mutually_exclusive_group(required=True)
    grant.add_argument("--hours", type=_decimal, help="compute hours a period (1 h = 3600 credits)")
    grant.add_argument("--credits", type=_decimal, help="credits a period")
    define.set_defaults(command=_plan_define)
    listing = verbs.add_parser("list", parents=[db], help="list plans")
    listing.set_defaults(command=_plan_list)


def _add_account_commands(commands: Any, db: argparse.ArgumentParser, who: Any) -> None:
    account = commands.add_parser("account", help="open accounts and change their plans")
    verbs = account.add_subparsers(title="account commands", required=True, metavar="VERB")
    opening = verbs.add_parser("open", parents=[db, who], help="open an account")
    opening.add_argument("name", metavar="NAME")
    opening.add_argument("--plan", required=True)
    opening.add_argument("--anchor-day", type=int, help="periods start on this day (1-31)")
    opening.add_argument("--since", metavar="DATE", help="first period contains DATE (now)")
    opening.set_defaults(command=_account_open)
    change = verbs.add_parser("set-plan", parents=[db, who], help="change an account's plan")
    change.add_argument("name", metavar="NAME")
    change.add_argument("plan", metavar="PLAN")
    change.add_argument("--from", dest="from_", metavar="DATE", help="from the period of DATE")
    change.set_defaults(command=_account_set_plan)
    listing = verbs.add_parser("list", parents=[db], help="list accounts")
    listing.set_defaults(command=_account_list)


_KEY_HELP = (
    "idempotency key, e.g. the purchase order: the same command again with the same key is "
    "a no-op; the same key with other content is refused"
)


def _add_price_commands(commands: Any, db: argparse.ArgumentParser, who: Any) -> None:
    prices = commands.add_parser("prices", help="the price book: versions of the price list")
    verbs = prices.add_subparsers(title="prices commands", required=True, metavar="VERB")
    setting = verbs.add_parser(
        "set", parents=[db, who], help="load a price list, in force from --effective on"
    )
    setting.add_argument("file", type=Path, metavar="FILE", help="price list TOML")
    setting.add_argument(
        "--effective",
        required=True,
        metavar="HOUR",
        help="a whole UTC hour (e.g. 2027-01-01T00:00Z), not before the current one",
    )
    setting.add_argument(
        "--backdate",
        action="store_true",
        help="allow an earlier hour: reprices usage already shown in open periods (closed "
        "periods never change)",
    )
    setting.set_defaults(command=_prices_set)
    listing = verbs.add_parser("list", parents=[db], help="every version: when, who, changes")
    listing.set_defaults(command=_prices_list)
    show = verbs.add_parser("show", parents=[db], help="the prices in force at a time")
    show.add_argument("--at", metavar="TIME", help="default: now")
    show.set_defaults(command=_prices_show)


def _add_credit_commands(commands: Any, db: argparse.ArgumentParser, who: Any) -> None:
    for name, help_text in (("top-up", "add bought credits"), ("grant", "give credits")):
        lot = commands.add_parser(name, parents=[db, who], help=help_text)
        lot.add_argument("account", metavar="ACCOUNT")
        lot.add_argument("credits", metavar="CREDITS")
        lot.add_argument("--reason", required=True)
        lot.add_argument("--key", required=True, help=_KEY_HELP)
        lot.add_argument("--expires", metavar="DATE", help="default: never")
        lot.set_defaults(command=_add_lot, kind=name)
    adjust = commands.add_parser(
        "adjust", parents=[db, who], help="correct credits: > 0 refunds, < 0 charges"
    )
    adjust.add_argument("account", metavar="ACCOUNT")
    adjust.add_argument("credits", metavar="CREDITS")
    adjust.add_argument("--reason", required=True)
    adjust.add_argument("--key", required=True, help=_KEY_HELP)
    adjust.set_defaults(command=_adjust)
    charge = commands.add_parser(
        "charge", parents=[db], help="record API requests (as the gateway does)"
    )
    charge.add_argument("account", metavar="ACCOUNT")
    charge.add_argument("model", metavar="MODEL")
    charge.add_argument("request_id", metavar="REQUEST_ID")
    charge.add_argument("--count", type=int, default=1)
    charge.add_argument("--at", required=True, metavar="TIME", help="when the request was made")
    charge.set_defaults(command=_charge)
    period = commands.add_parser("period", help="close billing periods")
    verbs = period.add_subparsers(title="period commands", required=True, metavar="VERB")
    close = verbs.add_parser("close", parents=[db, who], help="freeze ended periods")
    target = close.add_mutually_exclusive_group(required=True)
    target.add_argument("--account")
    target.add_argument("--all", action="store_true", help="every account")
    close.add_argument("--through", metavar="DATE", help="close periods ended by DATE")
    close.add_argument(
        "--grace-hours",
        type=int,
        default=DEFAULT_GRACE_HOURS,
        help="without --through: close periods ended this long ago",
    )
    close.add_argument(
        "--statement-key",
        type=Path,
        metavar="PEM",
        help="the key that signs statements (default: ledger.statement_key, see its reference)",
    )
    close.set_defaults(command=_period_close)
    listing = verbs.add_parser("list", parents=[db], help="closed periods of an account")
    listing.add_argument("account", metavar="ACCOUNT")
    listing.set_defaults(command=_period_list)
    statement = commands.add_parser("statement", help="signed statements of closed periods")
    verbs = statement.add_subparsers(title="statement commands", required=True, metavar="VERB")
    export = verbs.add_parser(
        "export", parents=[db], help="the bundle a customer checks with creditmeter-verify"
    )
    export.add_argument("account", metavar="ACCOUNT")
    export.add_argument("date", metavar="DATE", help="any time in the period")
    export.add_argument("--out", type=Path, help="write here (default: standard output)")
    export.set_defaults(command=_statement_export)
    key = verbs.add_parser(
        "key", parents=[db], help="the public key statements are signed with (publish it)"
    )
    key.add_argument("--statement-key", type=Path, metavar="PEM", help="as for period close")
    key.set_defaults(command=_statement_key)


def _add_reading_commands(commands: Any, db: argparse.ArgumentParser) -> None:
    entries = commands.add_parser("entries", parents=[db], help="an account's credit entries")
    entries.add_argument("account", metavar="ACCOUNT")
    entries.set_defaults(command=_entries)
    balance = commands.add_parser("balance", parents=[db], help="an account's credits")
    balance.add_argument("account", metavar="ACCOUNT")
    balance.add_argument("--at", metavar="DATE", help="the period containing DATE (now)")
    balance.add_argument("--format", choices=["table", "json"], default="table")
    balance.set_defaults(command=_balance)
    report = commands.add_parser("report", parents=[db], help="busy seconds, requests and credits")
    report.add_argument("--from", dest="from_", metavar="DATE", help="ISO date/datetime, UTC")
    report.add_argument("--to", metavar="DATE", help="ISO date/datetime, UTC, exclusive")
    report.add_argument(
        "--group-by",
        default=",".join(d.value for d in DEFAULT_GROUP_BY),
        metavar="FIELDS",
        help="comma-separated: account, model, day, host, gpu (default: account,model)",
    )
    report.add_argument("--account", help="only this account")
    view = report.add_mutually_exclusive_group()
    view.add_argument(
        "--reconcile",
        action="store_true",
        help="per GPU and day: held (allocation), device busy, billed, unattributed, gaps",
    )
    view.add_argument("--per-job", action="store_true", help="each job with its credits")
    view.add_argument(
        "--typical",
        action="store_true",
        help="per model: median and 90th-percentile credits of a job",
    )
    report.add_argument("--format", choices=["table", "csv", "json"], default="table")
    report.set_defaults(command=_report)
    export = commands.add_parser(
        "export", parents=[db], help="usage and API charges for a billing system"
    )
    export.add_argument(
        "--format",
        choices=["cloudevents", "openmeter", "stripe", "lago"],
        default="cloudevents",
        help="cloudevents (openmeter: the same), Stripe meter events, Lago events",
    )
    export.add_argument(
        "--customers",
        type=Path,
        metavar="FILE",
        help="stripe/lago: TOML [customers] account = id; default: the account name",
    )
    export.add_argument(
        "--event-name",
        default=DEFAULT_EVENT_NAME,
        help="stripe: the meter's event_name; lago: the billable metric's code",
    )
    export.add_argument("--from", dest="from_", metavar="DATE", help="ISO date/datetime, UTC")
    export.add_argument("--to", metavar="DATE", help="ISO date/datetime, UTC, exclusive")
    export.add_argument("--source", default=DEFAULT_SOURCE, help="CloudEvents source prefix")
    export.add_argument("--out", type=Path, help="write here instead of stdout")
    export.set_defaults(command=_export)


# -- commands --------------------------------------------------------------------------------


def _plan_define(args: argparse.Namespace) -> int:
    with _ledger(args, writing=True) as (ledger, store):
        existed = any(p.name == args.name for p in store.plans())
        plan = ledger.define_plan(args.name, by=args.by, hours=args.hours, credits=args.credits)
    repeat = " (defined already; nothing changed)" if existed else ""
    print(f"plan {plan.name}: {micro_text(plan.grant_micro)} credits a period{repeat}")
    return EXIT_OK


def _plan_list(args: argparse.Namespace) -> int:
    with _store(args, writing=False) as store:
        plans = store.plans()
    if not plans:
        print("no plans (define one: creditmeter-collector plan define NAME --hours H)")
        return EXIT_OK
    print("plan\tcredits a period\tdefined\tby")
    for plan in plans:
        print(
            f"{plan.name}\t{micro_text(plan.grant_micro)}\t{iso_text(plan.created_at_us)}\t"
            f"{plan.created_by}"
        )
    return EXIT_OK


def _account_open(args: argparse.Namespace) -> int:
    since_us = None if args.since is None else parse_time_us("--since", args.since)
    with _ledger(args, writing=True) as (ledger, store):
        existed = store.account(args.name) is not None
        account = ledger.open_account(
            args.name, args.plan, by=args.by, anchor_day=args.anchor_day, since_us=since_us
        )
    repeat = " (open already; nothing changed)" if existed else ""
    print(
        f"account {account.name}: plan {args.plan}, periods from day {account.anchor_day}, "
        f"first period {iso_text(account.first_period_start_us)}{repeat}"
    )
    return EXIT_OK


def _account_set_plan(args: argparse.Namespace) -> int:
    from_us = None if args.from_ is None else parse_time_us("--from", args.from_)
    with _ledger(args, writing=True) as (ledger, _):
        change = ledger.change_plan(args.name, args.plan, by=args.by, from_us=from_us)
    done = f"account {change.account}: plan {change.plan} from {iso_text(change.effective_us)}"
    print(f"nothing changed: {done} already" if change.unchanged else done)
    return EXIT_OK


def _account_list(args: argparse.Namespace) -> int:
    with _store(args, writing=False) as store:
        accounts = store.accounts()
    if not accounts:
        print("no accounts (open one: creditmeter-collector account open NAME --plan PLAN)")
        return EXIT_OK
    print("account\tperiods start on day\tfirst period\topened\tby")
    for account in accounts:
        print(
            f"{account.name}\t{account.anchor_day}\t{iso_text(account.first_period_start_us)}\t"
            f"{iso_text(account.created_at_us)}\t{account.created_by}"
        )
    return EXIT_OK


def _add_lot(args: argparse.Namespace) -> int:
    amount_micro = _amount_micro(args.credits, args.kind)
    expires_us = None if args.expires is None else parse_time_us("--expires", args.expires)
    with _ledger(args, writing=True) as (ledger, _):
        add = ledger.top_up if args.kind == "top-up" else ledger.grant
        entry = add(
            args.account,
            amount_micro,
            by=args.by,
            reason=args.reason,
            expires_us=expires_us,
            key=args.key,
        )
    print(_entry_text(entry))
    return EXIT_OK


def _adjust(args: argparse.Namespace) -> int:
    amount_micro = _amount_micro(args.credits, "adjustment")
    with _ledger(args, writing=True) as (ledger, _):
        entry = ledger.adjust(
            args.account, amount_micro, by=args.by, reason=args.reason, key=args.key
        )
    print(_entry_text(entry))
    return EXIT_OK


def _entries(args: argparse.Namespace) -> int:
    with _ledger(args, writing=False) as (ledger, store):
        ledger.account(args.account)  # UnknownAccount: exit 3, as balance
        entries = store.entries(args.account)
    if not entries:
        print(f"no entries for {args.account}")
    for entry in entries:
        print(_entry_text(entry))
    return EXIT_OK


def _charge(args: argparse.Namespace) -> int:
    at_us = parse_time_us("--at", args.at)
    charge = ApiCharge(args.request_id, args.account, args.model, args.count, at_us)
    with _ledger(args, writing=True) as (ledger, _):
        receipt = ledger.record_charge(charge)
    state = "charged" if receipt.new else "already charged (nothing changed)"
    print(f"{state}: {args.request_id} {micro_text(receipt.credits_micro)} credits")
    return EXIT_OK


def _prices_set(args: argparse.Namespace) -> int:
    book = load_prices(args.file)
    effective_us = parse_time_us("--effective", args.effective)
    with _ledger(args, writing=True) as (ledger, _):
        loaded = ledger.set_prices(book, effective_us, by=args.by, backdate=args.backdate)
    when = iso_text(loaded.version.effective_us)
    if loaded.unchanged:
        print(f"prices effective {when}: already loaded with this content (nothing changed)")
        return EXIT_OK
    print(f"prices effective {when}: loaded from {args.file} by {args.by}")
    for change in loaded.changes or ["(no price differs from the version before)"]:
        print(f"  {change}")
    return EXIT_OK


def _prices_list(args: argparse.Namespace) -> int:
    with _store(args, writing=False) as store:
        versions = PriceSchedule(store.price_versions()).versions
    if not versions:
        print("no price versions: built-in prices (1 credit per busy second and per request)")
        return EXIT_OK
    print("effective\tloaded\tby\tchanges")
    before = BUILT_IN
    for version in versions:
        changes = "; ".join(price_changes(before, version.book)) or "none"
        print(
            f"{iso_text(version.effective_us)}\t{iso_text(version.loaded_at_us)}\t"
            f"{printable(version.loaded_by)}\t{printable(changes)}"
        )
        before = version.book
    return EXIT_OK


def _prices_show(args: argparse.Namespace) -> int:
    with _ledger(args, writing=False) as (ledger, _):
        at_us = ledger.now_us() if args.at is None else parse_time_us("--at", args.at)
        effective_us, book = ledger.prices.version_at(at_us)
    origin = "built-in" if book is BUILT_IN else f"effective {iso_text(effective_us)}"
    print(f"prices in force at {iso_text(at_us)} ({origin}):")
    for line in book_lines(book):
        print(f"  {printable(line)}")
    return EXIT_OK


def _period_close(args: argparse.Namespace) -> int:
    with _ledger(args, writing=True) as (ledger, store):
        now_us = ledger.now_us()
        if args.through is not None:
            through_us = parse_time_us("--through", args.through)
            if through_us > now_us:
                raise ConfigError(
                    f"--through {iso_text(through_us)} is in the future: a period closes only "
                    f"once it has ended (now is {iso_text(now_us)})"
                )
        else:
            through_us = now_us - args.grace_hours * HOUR_US
        names = [a.name for a in store.accounts()] if args.all else [args.account]
        signer = _KeyFile(args)
        closed = 0
        for name in names:
            for statement in ledger.close_periods(name, through_us, by=args.by, signer=signer):
                closed += 1
                print(
                    f"closed {name} {iso_text(statement.start_us)} .. "
                    f"{iso_text(statement.end_us)}: {micro_text(statement.charged_micro)} credits"
                )
    if not closed:
        whose = "of any account" if args.all else f"of {args.account}"
        print(f"nothing to close: no open period {whose} ended by {iso_text(through_us)}")
    return EXIT_OK


class _KeyFile:
    """The statement key of ``period close``, read (or created) when a period first closes:
    a run that closes nothing leaves no key behind."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._path = args.statement_key or admin_statement_key(
            getattr(args, "config", None), args.db
        )
        self._signer: StatementSigner | None = None

    @property
    def signer(self) -> StatementSigner:
        if self._signer is None:
            try:
                self._signer, created = load_signer(self._path)
            except (OSError, BadKey) as exc:
                raise ConfigError(f"statement key {self._path}: {exc}") from exc
            if created:
                print(
                    f"statement key created: {self._path} (public key "
                    f"{self._signer.public_key_hex}); publish the public key: customers pin "
                    "it when they verify a statement"
                )
        return self._signer

    @property
    def public_key_hex(self) -> str:
        return self.signer.public_key_hex

    def sign(self, start_us: int, document: bytes) -> SignedStatement:
        return self.signer.sign(start_us, document)


def _statement_key(args: argparse.Namespace) -> int:
    print(_KeyFile(args).public_key_hex)
    return EXIT_OK


def _statement_export(args: argparse.Namespace) -> int:
    with _ledger(args, writing=False) as (ledger, store):
        account = ledger.account(args.account)  # UnknownAccount: exit 3
        period = period_containing(account.anchor_day, parse_time_us("DATE", args.date))
        document = bundle(store, args.account, period.start_us)
    text = json.dumps(document, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
    if args.out is None:
        sys.stdout.write(text)
        return EXIT_OK
    with _output(args.out) as out:
        out.write(text)
    print(f"wrote {args.out}: check it with creditmeter-verify {args.out}", file=sys.stderr)
    return EXIT_OK


def _period_list(args: argparse.Namespace) -> int:
    with _ledger(args, writing=False) as (ledger, store):
        ledger.account(args.account)  # UnknownAccount: exit 3
        statements = store.statements(args.account)
    if not statements:
        print(f"no closed periods of {args.account}")
        return EXIT_OK
    print("period\tplan\tcredits\tclosed\tby")
    for statement in statements:
        print(
            f"{iso_text(statement.start_us)} .. {iso_text(statement.end_us)}\t"
            f"{statement.plan}\t{micro_text(statement.charged_micro)}\t"
            f"{iso_text(statement.closed_at_us)}\t{statement.closed_by}"
        )
    return EXIT_OK


def _balance(args: argparse.Namespace) -> int:
    at_us = None if args.at is None else parse_time_us("--at", args.at)
    with _ledger(args, writing=False) as (ledger, _):
        balance = ledger.balance(args.account, at_us)
    render = balance_json if args.format == "json" else balance_table
    sys.stdout.write(render(balance))
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    if args.reconcile:
        return _reconcile(args)
    if args.per_job or args.typical:
        return _jobs(args)
    period = parse_period(args.from_, args.to)
    group_by = parse_group_by(args.group_by)
    store = open_store(args.db, create=False, migrate=False)
    try:
        ledger_store = as_ledger_store(store)
        prices = PriceSchedule(ledger_store.price_versions())
        report = build_report(store, period, group_by, prices, args.account)
        if (
            args.account is not None
            and not report.rows
            and ledger_store.account(args.account) is None
        ):
            raise UnknownAccount(f"no account {args.account!r} is open and no usage names it")
    finally:
        store.close()
    render = {"table": render_table, "csv": render_csv, "json": render_json}[args.format]
    sys.stdout.write(render(report))
    return EXIT_OK


def _jobs(args: argparse.Namespace) -> int:
    """``report --per-job`` and ``--typical``: records that start in [from, to)."""
    period = parse_period(args.from_, args.to)
    with _store(args, writing=False) as store:
        prices = PriceSchedule(store.price_versions())
        events = store.usage_events(period.from_us, period.to_us, args.account)
        jobs = job_credits(events, prices)
    table = typical_rows(typical(jobs)) if args.typical else job_rows(jobs)
    sys.stdout.write(render_jobs(*table, args.format))
    return EXIT_OK


def _reconcile(args: argparse.Namespace) -> int:
    if args.format == "csv":
        raise ConfigError("report --reconcile prints --format table or json")
    period = parse_period(args.from_, args.to)
    store = open_store(args.db, create=False, migrate=False)
    try:
        with store.snapshot() as snapshot:
            assert isinstance(snapshot, LedgerSnapshot)  # both stores' snapshots are
            bounds = (period.from_us, period.to_us)
            rows = reconcile(snapshot.device_totals(*bounds), snapshot.gpu_rollups(*bounds), period)
    finally:
        store.close()
    if args.format == "json":
        sys.stdout.write(json.dumps(reconcile_json(rows), indent=2) + "\n")
    else:
        sys.stdout.write(render_reconcile_table(rows))
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    period = parse_period(args.from_, args.to)
    customers = read_customers(args.customers) if args.customers else {}
    with _store(args, writing=False) as store:
        prices = PriceSchedule(store.price_versions())
        events = _events(args, store, prices, period, customers)
        if args.out is None:
            count = write_json_lines(events, sys.stdout)
        else:
            with _output(args.out) as out:
                count = write_json_lines(events, out)
    print(f"exported {count} events", file=sys.stderr)
    return EXIT_OK


def _events(
    args: argparse.Namespace,
    store: LedgerStore,
    prices: PriceSchedule,
    period: Period,
    customers: Mapping[str, str],
) -> Iterator[dict[str, object]]:
    if args.format in ("cloudevents", "openmeter"):
        return cloudevents(store, prices, period.from_us, period.to_us, args.source)
    shape = stripe_event if args.format == "stripe" else lago_event
    return (
        shape(b, customers, args.event_name)
        for b in billables(store, prices, period.from_us, period.to_us)
    )


# -- rendering -------------------------------------------------------------------------------


def balance_table(balance: Balance) -> str:
    state = "closed" if balance.closed else "open"
    lines = [
        f"account {balance.account}  plan {balance.plan}  period "
        f"{iso_text(balance.period.start_us)} .. {iso_text(balance.period.end_us)} ({state})",
    ]
    rows = [
        ("plan grant", balance.plan_grant_micro),
        ("top-ups and grants", balance.lot_credits_micro),
    ]
    for line in balance.lines:
        quantity = (
            f"{seconds_text(line.quantity)} busy s" if line.kind.is_busy else f"{line.quantity} req"
        )
        marker = ", default price" if line.default_price else ""
        rows.append((f"{line.kind.value} {line.model} ({quantity}{marker})", -line.credits_micro))
    rows.append(("adjustments", balance.adjustments_micro))
    rows.append(("remaining", balance.remaining_micro))
    width = max(len(label) for label, _ in rows)
    lines.extend(f"  {label.ljust(width)}  {micro_text(amount):>18}" for label, amount in rows)
    return "\n".join(lines) + "\n"


def balance_json(balance: Balance) -> str:
    return json.dumps(balance_document(balance), indent=2) + "\n"


def _entry_text(entry: LedgerEntry) -> str:
    expires = "never" if entry.expires_us is None else iso_text(entry.expires_us)
    text = (
        f"#{entry.entry_id} {entry.account} {entry.kind.value} {micro_text(entry.amount_micro)} "
        f"at {iso_text(entry.effective_us)} expires {expires} by {entry.created_by}: "
        f"{entry.reason}"
    )
    if entry.repeated:
        return f"nothing changed: key {entry.key!r} was done already, as {text}"
    return text


# -- plumbing --------------------------------------------------------------------------------


@contextmanager
def _store(args: argparse.Namespace, *, writing: bool) -> Iterator[LedgerStore]:
    """The ledger store of --db; reading commands neither create nor migrate it (they may
    run beside a collector of another version)."""
    store = open_store(args.db, create=writing, migrate=writing)
    try:
        yield as_ledger_store(store)
    finally:
        store.close()


@contextmanager
def _ledger(args: argparse.Namespace, *, writing: bool) -> Iterator[tuple[Ledger, LedgerStore]]:
    """A Ledger over --db, pricing from its price book. Its InvalidRequest (a malformed
    name, amount or date) becomes a ConfigError: on the command line that is a bad argument
    (exit 2)."""
    with _store(args, writing=writing) as store:
        try:
            yield Ledger(store), store
        except InvalidRequest as exc:
            raise ConfigError(str(exc)) from exc


def _amount_micro(text: str, what: str) -> int:
    try:
        return credits_micro(text, what)
    except InvalidRequest as exc:
        raise ConfigError(str(exc)) from exc


def _decimal(text: str) -> Decimal:
    """An argparse type: a decimal number, exactly as written."""
    try:
        return Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a decimal number") from None


@contextmanager
def _output(path: Path) -> Iterator[Any]:
    try:
        with path.open("w") as out:
            yield out
    except OSError as exc:
        raise ConfigError(f"--out {path}: {exc.strerror}") from exc


def _login_name() -> str:
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid, e.g. in a container
        return "unknown"
