"""``./dev bench [NAME ...] [--quick]``: run benchmarks; ``./dev bench report``: run them all
and write one markdown report (bench/results/report.md) with medians, baselines, ratios and
the machine they ran on.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import Result, machine, markdown

# name -> module; each module has run(quick: bool) -> (list[Result], str)
BENCHES = {
    "accuracy": "bench.accuracy",
    "agent_cost": "bench.agent_cost",
    "signing": "bench.signing",
    "ingest": "bench.ingest",
    "latency": "bench.latency",
    "jobapi": "bench.jobapi",
    "ledger": "bench.ledger",
    "account_reads": "bench.account_reads",
    "web": "bench.web",
    "pg_ingest": "bench.pg_ingest",
    "soak": "bench.soak",
}
# Run short in the report, so that the whole report fits in 15 minutes on 2 cores: the full
# soak alone is 10 minutes (run it with `./dev bench soak`).
SHORT_IN_REPORT = {"soak"}
RESULTS = Path(__file__).resolve().parent / "results"

Runner = Callable[[bool], tuple[list[Result], str]]


def runner(name: str) -> Runner:
    module = importlib.import_module(BENCHES[name])
    run: Runner = module.run
    return run


def run_one(name: str, quick: bool) -> tuple[list[Result], str, float]:
    start = time.monotonic()
    print(f"== {name} ...", flush=True)
    results, detail = runner(name)(quick)
    took = time.monotonic() - start
    print(f"   {detail}\n   ({took:.0f} s)", flush=True)
    return results, detail, took


def report(quick: bool) -> str:
    sections, results = [], []
    for name in BENCHES:
        try:
            found, detail, took = run_one(name, quick or name in SHORT_IN_REPORT)
        except Exception as exc:  # one failing benchmark must not hide the others' figures
            detail, found, took = f"FAILED: {type(exc).__name__}: {exc}", [], 0.0
            print(f"   {detail}", flush=True)
        results.extend(found)
        sections.append(f"- **{name}** ({took:.0f} s): {detail}")
    text = "\n".join(
        [
            "# creditmeter benchmarks",
            "",
            f"Machine: {machine()}",
            "",
            f"Run {'(quick) ' if quick else ''}at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}. "
            "Every figure is a median over repeats unless it names a percentile; ratios are "
            "against the baseline measured in the same run.",
            "",
            markdown(results),
            "",
            "## Details",
            "",
            *sections,
            "",
        ]
    )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"report, or any of: {', '.join(BENCHES)}")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller runs")
    args = parser.parse_args(argv)
    names = args.names or ["report"]
    if names == ["report"]:
        text = report(args.quick)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "report.md").write_text(text)
        print(text)
        print(f"written to {RESULTS / 'report.md'}")
        return 0
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    results = []
    for name in names:
        found, _, _ = run_one(name, args.quick)
        results.extend(found)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
