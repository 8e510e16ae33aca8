"""The credit commands, in-process through main(), on a real database of each store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from creditmeter.collector.main import main
from tests.collector.backends import Backend

from .conftest import DAY_US, JUNE_1_US, Feeder, LedgerTestStore


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def verify_cli(bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """creditmeter-verify as a customer runs it: its own process, no database."""
    command = [sys.executable, "-m", "creditmeter.verify", str(bundle), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def db(backend: Backend) -> list[str]:
    return ["--db", backend.url]


@pytest.fixture
def prices_file(tmp_path: Path) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text('[self_hosted]\nsdxl = 1\n[api]\n"gpt-4o" = 4\n')
    return path


def test_an_account_from_plan_to_closed_period(
    capsys: pytest.CaptureFixture[str],
    db: list[str],
    store: LedgerTestStore,
    feeder: Feeder,
    prices_file: Path,
    tmp_path: Path,
) -> None:
    assert run(capsys, "plan", "define", *db, "basic", "--hours", "5", "--by", "ops")[:2] == (
        0,
        "plan basic: 18000.000000 credits a period\n",
    )
    code, out, _ = run(
        capsys,
        "account",
        "open",
        *db,
        "acme",
        "--plan",
        "basic",
        "--since",
        "2025-06-01",
        "--anchor-day",
        "1",
        "--by",
        "ops",
    )
    assert (code, out) == (
        0,
        "account acme: plan basic, periods from day 1, first period 2025-06-01T00:00:00Z\n",
    )
    feeder.send(2, start_us=JUNE_1_US + 9 * DAY_US)  # 15 credits of sdxl on June 10
    load = [
        "prices",
        "set",
        *db,
        str(prices_file),
        "--effective",
        "2025-06-01T00:00Z",
        "--by",
        "ops",
    ]
    code, _, err = run(capsys, *load)
    assert code == 2 and "is before the current hour" in err  # June 2025 is long past
    code, out, _ = run(capsys, *load, "--backdate")
    assert (code, out) == (
        0,
        f"prices effective 2025-06-01T00:00:00Z: loaded from {prices_file} by ops\n"
        "  sdxl: default -> 1 credits/busy s\n"
        "  gpt-4o: default -> 4 credits/request\n",
    )
    code, out, _ = run(capsys, *load, "--backdate")  # a retry changes nothing
    assert (code, out) == (
        0,
        "prices effective 2025-06-01T00:00:00Z: already loaded with this content (nothing "
        "changed)\n",
    )
    code, out, _ = run(
        capsys, "charge", *db, "acme", "gpt-4o", "req-1", "--at", "2025-06-10T12:00Z"
    )
    assert (code, out) == (0, "charged: req-1 4.000000 credits\n")
    code, out, _ = run(
        capsys, "charge", *db, "acme", "gpt-4o", "req-1", "--at", "2025-06-10T12:00Z"
    )
    assert out == "already charged (nothing changed): req-1 4.000000 credits\n"
    adjust = ["adjust", *db, "acme", "2.5", "--reason", "slow job", "--by", "alice"]
    code, out, _ = run(capsys, *adjust, "--key", "ticket-77")
    assert code == 0 and "adjustment 2.500000" in out and "by alice: slow job" in out
    code, again, _ = run(capsys, *adjust, "--key", "ticket-77")  # a retry moves nothing
    assert (code, again) == (0, f"nothing changed: key 'ticket-77' was done already, as {out}")

    code, out, _ = run(capsys, "balance", *db, "acme", "--at", "2025-06-20", "--format", "json")
    balance = json.loads(out)
    assert (balance["plan_grant"], balance["used"], balance["remaining"]) == (
        "18000.000000",
        "19.000000",
        "17981.000000",
    )  # the adjustment was made today, in another period: June has none
    assert [(line["kind"], line["model"], line["credits"]) for line in balance["lines"]] == [
        ("api", "gpt-4o", "4.000000"),
        ("usage", "sdxl", "15.000000"),
    ]

    code, out, _ = run(capsys, "report", *db, "--group-by", "day,model", "--format", "csv")
    assert out.splitlines()[1:] == [
        "2025-06-10,gpt-4o,0.000000,1,4.000000,1,false",
        "2025-06-10,sdxl,15.000000,0,15.000000,2,false",
    ]

    events_path = tmp_path / "events.jsonl"
    code, _, err = run(capsys, "export", *db, "--from", "2025-06-01", "--out", str(events_path))
    assert (code, err) == (0, "exported 3 events\n")
    assert [json.loads(line)["id"] for line in events_path.read_text().splitlines()] == [
        "agent-1:1",
        "agent-1:2",
        "req-1",
    ]

    code, out, _ = run(
        capsys,
        "period",
        "close",
        *db,
        "--account",
        "acme",
        "--through",
        "2025-07-01",
        "--by",
        "ops",
        "--statement-key",
        str(tmp_path / "statement-key.pem"),
    )
    key_hex = run(
        capsys, "statement", "key", *db, "--statement-key", str(tmp_path / "statement-key.pem")
    )[1].strip()
    assert out.splitlines() == [
        f"statement key created: {tmp_path / 'statement-key.pem'} (public key {key_hex}); "
        "publish the public key: customers pin it when they verify a statement",
        "closed acme 2025-06-01T00:00:00Z .. 2025-07-01T00:00:00Z: 19.000000 credits",
    ]
    assert (tmp_path / "statement-key.pem").stat().st_mode & 0o777 == 0o600
    bundle_path = tmp_path / "acme-june.json"
    code, out, err = run(
        capsys, "statement", "export", *db, "acme", "2025-06-20", "--out", str(bundle_path)
    )
    assert (code, out) == (0, "")
    assert err == f"wrote {bundle_path}: check it with creditmeter-verify {bundle_path}\n"
    checked = verify_cli(bundle_path, "--collector-key", key_hex)
    assert (checked.returncode, checked.stderr) == (0, "")
    assert checked.stdout.startswith("OK: statement of acme for 2025-06-01T00:00:00Z .. ")
    assert "2 records from 1 agents, 1 API charges, 19.000000 credits charged" in checked.stdout
    tampered = json.loads(bundle_path.read_text())
    tampered["statement"]["document"] = tampered["statement"]["document"].replace(
        '"plan":"basic"', '"plan":"gold"'
    )
    bundle_path.write_text(json.dumps(tampered))
    checked = verify_cli(bundle_path)
    assert checked.returncode == 1
    assert checked.stdout.splitlines()[1:] == [
        "  statement: its signature does not verify under the collector key"
    ]
    assert verify_cli(tmp_path / "missing.json").returncode == 2
    code, out, _ = run(capsys, "period", "list", *db, "acme")
    assert out.splitlines()[0] == "period\tplan\tcredits\tclosed\tby"
    assert out.splitlines()[1].startswith(
        "2025-06-01T00:00:00Z .. 2025-07-01T00:00:00Z\tbasic\t19.0"
    )
    code, out, _ = run(capsys, "entries", *db, "acme")
    assert out.startswith("#1 acme adjustment 2.500000 at ")


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["plan", "define", "p"], "one of the arguments --hours --credits is required"),
        (["plan", "define", "p", "--hours", "x"], "'x' is not a decimal number"),
        (["adjust", "acme", "1"], "the following arguments are required: --reason, --key"),
        (["top-up", "acme", "1", "--reason", "x"], "the following arguments are required: --key"),
        (["report", "--group-by", "colour"], "--group-by 'colour' is not one of"),
        (["prices", "set", "/no/such/prices.toml", "--effective", "2027-01-01"], "price file"),
        (["balance", "acme", "--prices", "p.toml"], "unrecognized arguments: --prices"),
        (["top-up", "acme", "1.0000001", "--reason", "x", "--key", "k"], "more than 6 decimal"),
    ],
)
def test_bad_arguments_are_one_line(
    capsys: pytest.CaptureFixture[str],
    db: list[str],
    store: LedgerTestStore,
    argv: list[str],
    problem: str,
) -> None:
    verb_at = 2 if argv[0] in ("plan", "account", "period", "prices") else 1
    code, out, err = run(capsys, *argv[:verb_at], *db, *argv[verb_at:])
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and problem in err, err


def test_ledger_refusals_fail_with_a_reason(
    capsys: pytest.CaptureFixture[str], db: list[str], store: LedgerTestStore
) -> None:
    code, _, err = run(capsys, "balance", *db, "nobody")
    assert code == 3 and "no account 'nobody' is open" in err
    code, _, err = run(capsys, "account", "open", *db, "acme", "--plan", "none")
    assert code == 3 and "no plan 'none' is defined" in err


def test_commands_that_change_nothing_say_so_and_unknown_names_exit_3(
    capsys: pytest.CaptureFixture[str], db: list[str], store: LedgerTestStore, tmp_path: Path
) -> None:
    assert run(capsys, "plan", "list", *db)[:2] == (
        0,
        "no plans (define one: creditmeter-collector plan define NAME --hours H)\n",
    )
    assert run(capsys, "plan", "define", *db, "basic", "--hours", "5", "--by", "ops")[0] == 0
    assert run(capsys, "plan", "define", *db, "basic", "--hours", "5", "--by", "ops")[:2] == (
        0,
        "plan basic: 18000.000000 credits a period (defined already; nothing changed)\n",
    )
    code, out, _ = run(capsys, "plan", "list", *db)
    assert out.splitlines()[0] == "plan\tcredits a period\tdefined\tby"
    assert out.splitlines()[1].startswith("basic\t18000.000000\t")
    opening = ["acme", "--plan", "basic", "--since", "2025-06-01", "--by", "ops"]
    assert run(capsys, "account", "open", *db, *opening)[0] == 0
    code, out, _ = run(capsys, "account", "open", *db, *opening)
    assert code == 0 and out.endswith(" (open already; nothing changed)\n")
    code, out, _ = run(capsys, "account", "list", *db)
    assert out.splitlines() == [
        "account\tperiods start on day\tfirst period\topened\tby",
        out.splitlines()[1],
    ]
    assert out.splitlines()[1].startswith("acme\t1\t2025-06-01T00:00:00Z\t")
    key = ["--statement-key", str(tmp_path / "key.pem")]
    close = ["period", "close", *db, "--account", "acme", "--by", "ops", *key]
    assert run(capsys, *close, "--through", "2025-06-15")[:2] == (
        0,
        "nothing to close: no open period of acme ended by 2025-06-15T00:00:00Z\n",
    )
    code, _, err = run(capsys, *close, "--through", "2999-01-01")
    assert code == 2 and "--through 2999-01-01T00:00:00Z is in the future" in err
    assert run(capsys, "period", "list", *db, "acme")[:2] == (0, "no closed periods of acme\n")
    assert run(capsys, "entries", *db, "acme")[:2] == (0, "no entries for acme\n")
    for argv in (
        ["period", "list", *db, "nosuch"],
        ["entries", *db, "nosuch"],
        ["balance", *db, "nosuch"],
        ["report", *db, "--account", "nosuch"],
    ):
        code, out, err = run(capsys, *argv)
        assert (code, out) == (3, ""), argv
        assert "no account 'nosuch'" in err and err.count("\n") == 1, err
