"""The price list: what a busy second of a self-hosted model and a request to an API model
cost, and the one rounding rule that turns busy µs into µcredits.

Money is integer µcredits (1 credit = 1,000,000 µcredits) everywhere: storage, sums,
comparisons. Prices have at most 6 decimal places, so a price is an integer number of
µcredits (per busy second, or per request) and nothing is ever a binary float.

The rounding rule (the only one): the credits of an aggregate of busy time, for one
(account, model) over one billing period (or one model within one report row), are
``round_half_even(busy_us × µcredits_per_busy_second / 1,000,000)`` µcredits, rounded once
from the aggregate's integer busy µs. The aggregate's busy µs is an
integer sum over its records, which does not depend on their order, batching, retries or
duplicates (those are never stored twice), so neither do its credits; an account's credits
are the sum of its (model) aggregates. At a rate of a whole number of credits per second
(the default 1.0) busy_us × rate is already a whole number of µcredits and nothing is
rounded at all; at other rates an aggregate is off from the exact value by at most half a
µcredit. API requests cost count × price, which is always exact.

Price file (TOML; tomllib reads its floats as Decimal, so 0.1 means exactly 0.1)::

    # for models not listed under [self_hosted]; reports flag them "default"
    default_credits_per_busy_second = 1.0
    # for API models not listed under [api]
    default_credits_per_request = 1

    [self_hosted]            # credits per busy second (never per wall second)
    sdxl = 1.0
    "llama-3-70b" = 2.5

    [api]                    # credits per request
    "gpt-4o" = 4

The price book is kept in the store as versions (``prices set FILE --effective TIME``), each
in force from a whole UTC hour until the next; every reader (balances, reports, exports,
the Query and Charges APIs) prices usage and requests by the version in force at their
time (``PriceSchedule``). A record counts wholly in the hour its window starts in (as the
hourly rollups count it), so a change splits usage exactly at its hour: every busy µs is
priced by one version, never two, never none. Before the first version the built-in prices
apply (1 credit per busy second and per request). Closed periods keep the credits frozen
at their close, and no version may take effect inside one.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from creditmeter.collector.errors import PriceFileError
from creditmeter.collector.periods import iso_text

MICRO = 1_000_000  # µcredits per credit, and µs per second
MAX_PRICE_CREDITS = Decimal(1_000_000)  # per busy second or per request: anything above is a typo
DEFAULT_CREDITS_PER_BUSY_SECOND = Decimal(1)
DEFAULT_CREDITS_PER_REQUEST = Decimal(1)
_TOP_LEVEL_KEYS = frozenset(
    {"default_credits_per_busy_second", "default_credits_per_request", "self_hosted", "api"}
)


@dataclass(frozen=True, slots=True)
class Price:
    """µcredits per busy second (self-hosted) or per request (API); ``default``: the model is
    not in the price list and pays the default."""

    micro: int
    default: bool

    @property
    def credits(self) -> Decimal:
        return Decimal(self.micro).scaleb(-6).normalize()


@dataclass(frozen=True)
class PriceBook:
    default_busy_second_micro: int = int(DEFAULT_CREDITS_PER_BUSY_SECOND * MICRO)
    default_request_micro: int = int(DEFAULT_CREDITS_PER_REQUEST * MICRO)
    busy_second_micro: dict[str, int] = field(default_factory=dict)  # per self-hosted model
    request_micro: dict[str, int] = field(default_factory=dict)  # per API model
    source: str = "built-in defaults"  # where the prices came from, for reports

    def busy_second_price(self, model: str) -> Price:
        micro = self.busy_second_micro.get(model)
        return Price(self.default_busy_second_micro, True) if micro is None else Price(micro, False)

    def request_price(self, model: str) -> Price:
        micro = self.request_micro.get(model)
        return Price(self.default_request_micro, True) if micro is None else Price(micro, False)

    def busy_credits_micro(self, model: str, busy_us: int) -> int:
        """µcredits for an aggregate of busy µs of one model (the rounding rule above)."""
        return busy_credits_micro(busy_us, self.busy_second_price(model).micro)

    def request_credits_micro(self, model: str, requests: int) -> int:
        return requests * self.request_price(model).micro


def busy_credits_micro(busy_us: int, micro_per_busy_second: int) -> int:
    """round_half_even(busy_us × micro_per_busy_second / 10⁶), in integers."""
    quotient, remainder = divmod(busy_us * micro_per_busy_second, MICRO)
    if remainder * 2 > MICRO or (remainder * 2 == MICRO and quotient % 2):
        quotient += 1
    return quotient


def exact_busy_credits_text(busy_us: int, micro_per_busy_second: int) -> str:
    """busy_us × price as exact decimal credits (up to 12 places), unrounded: for exports,
    whose consumers sum per-record values themselves."""
    return _plain(Decimal(busy_us * micro_per_busy_second).scaleb(-12))


def exact_micro_text(millionths: int) -> str:
    """Millionths (µcredits, µs) as the shortest exact decimal: 7_500_000 -> "7.5"."""
    return _plain(Decimal(millionths).scaleb(-6))


def _plain(value: Decimal) -> str:
    # format "f": normalize() alone would write 10 as "1E+1".
    return f"{value.normalize():f}"


def load_prices(path: Path) -> PriceBook:
    """Reads a price file. Raises PriceFileError naming the file, the key and the problem."""
    try:
        document = tomllib.loads(path.read_text(), parse_float=Decimal)
    except OSError as exc:
        raise PriceFileError(f"price file {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PriceFileError(f"price file {path}: not valid TOML ({exc})") from exc
    return parse_prices(document, str(path))


def parse_prices(document: dict[str, object], source: str) -> PriceBook:
    unknown = sorted(document.keys() - _TOP_LEVEL_KEYS)
    if unknown:
        raise PriceFileError(
            f"{source}: unknown key {unknown[0]!r} (expected {', '.join(sorted(_TOP_LEVEL_KEYS))})"
        )
    busy = _model_prices(document, "self_hosted", source)
    requests = _model_prices(document, "api", source)
    both = sorted(busy.keys() & requests.keys())
    if both:
        raise PriceFileError(
            f"{source}: model {both[0]!r} is priced both per busy second [self_hosted] and "
            "per request [api]; a model is one or the other"
        )
    return PriceBook(
        default_busy_second_micro=_price_micro(
            document.get("default_credits_per_busy_second", DEFAULT_CREDITS_PER_BUSY_SECOND),
            "default_credits_per_busy_second",
            source,
        ),
        default_request_micro=_price_micro(
            document.get("default_credits_per_request", DEFAULT_CREDITS_PER_REQUEST),
            "default_credits_per_request",
            source,
        ),
        busy_second_micro=busy,
        request_micro=requests,
        source=source,
    )


def _model_prices(document: dict[str, object], table: str, source: str) -> dict[str, int]:
    prices = document.get(table, {})
    if not isinstance(prices, dict):
        raise PriceFileError(f"{source}: [{table}] must be a table of model = price")
    out = {}
    for model, value in prices.items():
        if not model:
            raise PriceFileError(f"{source}: [{table}] names an empty model")
        out[model] = _price_micro(value, f"{table}.{model!r}", source)
    return out


def _price_micro(value: object, key: str, source: str) -> int:
    """A price as integer µcredits; refuses anything that is not an exact, finite,
    non-negative number with at most 6 decimal places."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise PriceFileError(f"{source}: {key}: expected a number, got {value!r}")
    try:
        price = Decimal(value)
    except InvalidOperation:
        raise PriceFileError(f"{source}: {key}: {value!r} is not a number") from None
    if not price.is_finite() or price < 0:
        raise PriceFileError(f"{source}: {key}: {value} is not a finite price >= 0")
    if price > MAX_PRICE_CREDITS:
        raise PriceFileError(f"{source}: {key}: {value} is above {MAX_PRICE_CREDITS} credits")
    micro = price * MICRO
    if micro != micro.to_integral_value():
        raise PriceFileError(
            f"{source}: {key}: {value} has more than 6 decimal places (credits are kept "
            "to the µcredit)"
        )
    return int(micro)


# -- the price book: versions in the store -------------------------------------------------


@dataclass(frozen=True, slots=True)
class PriceVersion:
    """A price list in force from ``effective_us`` (a whole UTC hour) until the next
    version's. ``digest`` identifies its content (``content_digest``)."""

    effective_us: int
    book: PriceBook
    loaded_at_us: int
    loaded_by: str

    @property
    def digest(self) -> str:
        return content_digest(self.book)


def canonical_text(book: PriceBook) -> str:
    """The content of a price list as canonical JSON (sorted keys, µcredits): what the
    store keeps and what its digest covers; the file's name and layout are not part of it."""
    return json.dumps(
        {
            "default_busy_second_micro": book.default_busy_second_micro,
            "default_request_micro": book.default_request_micro,
            "busy_second_micro": dict(sorted(book.busy_second_micro.items())),
            "request_micro": dict(sorted(book.request_micro.items())),
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def content_digest(book: PriceBook) -> str:
    return hashlib.sha256(canonical_text(book).encode()).hexdigest()


def book_from_canonical(text: str, source: str) -> PriceBook:
    """The inverse of canonical_text. Raises PriceFileError for text it did not write."""
    try:
        fields = json.loads(text)
        book = PriceBook(
            default_busy_second_micro=int(fields["default_busy_second_micro"]),
            default_request_micro=int(fields["default_request_micro"]),
            busy_second_micro={str(k): int(v) for k, v in fields["busy_second_micro"].items()},
            request_micro={str(k): int(v) for k, v in fields["request_micro"].items()},
            source=source,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PriceFileError(f"{source}: stored prices unreadable ({exc!r})") from exc
    return book


def price_changes(before: PriceBook, after: PriceBook) -> list[str]:
    """What a new version changes, one line each ("sdxl: 1 -> 1.2 credits/busy s")."""
    changes = []
    for what, old, new in (
        (
            "default per busy second",
            before.default_busy_second_micro,
            after.default_busy_second_micro,
        ),
        ("default per request", before.default_request_micro, after.default_request_micro),
    ):
        if old != new:
            changes.append(f"{what}: {exact_micro_text(old)} -> {exact_micro_text(new)}")
    for unit, old_prices, new_prices in (
        ("credits/busy s", before.busy_second_micro, after.busy_second_micro),
        ("credits/request", before.request_micro, after.request_micro),
    ):
        for model in sorted(old_prices.keys() | new_prices.keys()):
            was, now = old_prices.get(model), new_prices.get(model)
            if was != now:
                changes.append(f"{model}: {_price_text(was)} -> {_price_text(now)} {unit}")
    return changes


def book_lines(book: PriceBook) -> list[str]:
    """A price list as text, one price a line."""
    lines = [
        f"default: {exact_micro_text(book.default_busy_second_micro)} credits/busy s",
        f"default: {exact_micro_text(book.default_request_micro)} credits/request",
    ]
    lines += [
        f"{model}: {exact_micro_text(micro)} credits/busy s"
        for model, micro in sorted(book.busy_second_micro.items())
    ]
    lines += [
        f"{model}: {exact_micro_text(micro)} credits/request"
        for model, micro in sorted(book.request_micro.items())
    ]
    return lines


def _price_text(micro: int | None) -> str:
    return "default" if micro is None else exact_micro_text(micro)


BUILT_IN = PriceBook()  # before the first version: 1 credit per busy second and per request


@dataclass(frozen=True, slots=True)
class PriceSpan:
    """[from_us, to_us) of a reader's range priced by one version (to_us None: unbounded)."""

    from_us: int
    to_us: int | None
    effective_us: int  # the version's; 0 before the first version (the built-in prices)
    book: PriceBook


class PriceSchedule:
    """Every price version, in effective order: which one prices a moment, and how a range
    splits at the changes. Usage counts in the hour its record starts in (rollup.py), and
    versions start on whole hours, so every record and every rollup hour is priced by
    exactly one version: the one in force at its start."""

    def __init__(self, versions: Sequence[PriceVersion] = (), label: str = "") -> None:
        self.versions = tuple(sorted(versions, key=lambda v: v.effective_us))
        self._label = label  # what ``source`` says instead (a fixed book: its file)

    def at(self, time_us: int) -> PriceBook:
        return self.version_at(time_us)[1]

    def version_at(self, time_us: int) -> tuple[int, PriceBook]:
        """(effective_us, book) of the version in force at ``time_us``."""
        index = bisect.bisect_right([v.effective_us for v in self.versions], time_us)
        if index == 0:
            return 0, BUILT_IN
        version = self.versions[index - 1]
        return version.effective_us, version.book

    def spans(self, from_us: int | None, to_us: int | None) -> list[PriceSpan]:
        """[from_us, to_us) cut at every version change inside it. An unbounded start is
        the epoch: nothing was metered before it, and versions start at 0 or later."""
        start_us = max(0, from_us) if from_us is not None else 0
        cuts = [
            v.effective_us
            for v in self.versions
            if v.effective_us > start_us and (to_us is None or v.effective_us < to_us)
        ]
        bounds: list[int | None] = [start_us, *cuts, to_us]
        spans = []
        for start, end in itertools.pairwise(bounds):
            assert start is not None  # only the last bound may be None
            effective_us, book = self.version_at(start)
            spans.append(PriceSpan(start, end, effective_us, book))
        return spans

    @property
    def source(self) -> str:
        """For report headers: which versions exist."""
        if self._label:
            return self._label
        if not self.versions:
            return BUILT_IN.source
        count = len(self.versions)
        latest = self.versions[-1].effective_us
        return (
            f"price book ({count} version{'s' * (count > 1)}, the latest from {iso_text(latest)})"
        )


def as_schedule(prices: PriceBook | PriceSchedule | None) -> PriceSchedule:
    """A reader's prices: a schedule as it is, a lone book in force since always (tests,
    benchmarks), None the built-in prices."""
    if isinstance(prices, PriceBook):
        return PriceSchedule([PriceVersion(0, prices, 0, prices.source)], label=prices.source)
    return prices if prices is not None else PriceSchedule()
