"""The price list file and the rounding rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from creditmeter.collector.errors import PriceFileError
from creditmeter.collector.prices import (
    Price,
    PriceBook,
    busy_credits_micro,
    exact_busy_credits_text,
    load_prices,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    return path


def test_a_price_file_is_read_exactly(tmp_path: Path) -> None:
    book = load_prices(
        write(
            tmp_path,
            """
default_credits_per_busy_second = 0.1
default_credits_per_request = 2
[self_hosted]
sdxl = 1.0
"llama-3-70b" = "2.5"
[api]
"gpt-4o" = 4
""",
        )
    )
    assert book.busy_second_price("sdxl") == Price(1_000_000, False)
    assert book.busy_second_price("llama-3-70b") == Price(2_500_000, False)
    assert book.busy_second_price("other") == Price(100_000, True)  # 0.1 exactly, not a float
    assert book.request_price("gpt-4o") == Price(4_000_000, False)
    assert book.request_price("claude") == Price(2_000_000, True)
    assert book.source == str(tmp_path / "prices.toml")


def test_without_a_price_list_everything_costs_1_credit() -> None:
    book = PriceBook()
    assert book.busy_credits_micro("anything", 7_500_000) == 7_500_000
    assert book.request_credits_micro("anything", 3) == 3_000_000


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[self_hosted]\nsdxl = -1", "self_hosted.'sdxl': -1 is not a finite price >= 0"),
        ("[self_hosted]\nsdxl = 0.0000001", "more than 6 decimal places"),
        ("[self_hosted]\nsdxl = 'cheap'", "'cheap' is not a number"),
        ("[self_hosted]\nsdxl = true", "expected a number"),
        ("[self_hosted]\nsdxl = inf", "not a finite price"),
        ("[self_hosted]\nsdxl = 2e6", "above 1000000 credits"),
        ("[self_hosted]\nx = 1\n[api]\nx = 1", "model 'x' is priced both"),
        ("rate = 1", "unknown key 'rate'"),
        ("self_hosted = 1", "[self_hosted] must be a table"),
        ("[self_hosted\n", "not valid TOML"),
    ],
)
def test_a_bad_price_file_is_named(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(PriceFileError, match=r"prices\.toml") as caught:
        load_prices(write(tmp_path, text))
    assert problem in str(caught.value)


def test_a_missing_price_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PriceFileError, match="No such file"):
        load_prices(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("busy_us", "micro_per_second", "credits_micro"),
    [
        (7_500_000, 1_000_000, 7_500_000),  # rate 1: busy µs are µcredits, nothing rounded
        (3, 500_000, 2),  # 1.5 -> 2 (half to even)
        (5, 500_000, 2),  # 2.5 -> 2
        (7, 500_000, 4),  # 3.5 -> 4
        (1, 333_333, 0),  # 0.333333
        (2, 999_999, 2),  # 1.999998
        (0, 2_500_000, 0),
    ],
)
def test_busy_credits_round_half_even_once(
    busy_us: int, micro_per_second: int, credits_micro: int
) -> None:
    assert busy_credits_micro(busy_us, micro_per_second) == credits_micro


def test_exported_credits_are_exact() -> None:
    assert exact_busy_credits_text(5, 500_000) == "0.0000025"
    assert exact_busy_credits_text(10_000_000, 1_000_000) == "10"  # not "1E+1"
