"""The demo (``./dev demo``): a collector and an agent on a simulated GPU host, then credits.

Everything runs as it would in production, as separate processes over a real socket: the
collector on SQLite, an agent key generated and enrolled, the agent metering a simulated host
(several accounts and models, idle gaps, two processes sharing a GPU, one unlabelled process)
30 simulated minutes accelerated 60×, then the collector's report beside the simulator's
ground truth.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

from creditmeter.simnvml import ManualClock, Scenario, SimClock, SimHost
from creditmeter.simnvml.anchor import AnchorFile

ACCOUNT_VAR, MODEL_VAR = "CREDITMETER_ACCOUNT", "CREDITMETER_MODEL"
UNATTRIBUTED = "unattributed"
START_TIMEOUT_S = 30.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="creditmeter.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="demo", help="shipped scenario name or .toml path")
    parser.add_argument("--speed", type=float, default=60.0, help="simulated s per real s")
    parser.add_argument("--dir", type=Path, default=Path("demo-run"), help="working folder")
    parser.add_argument(
        "--web", action="store_true", help="then keep the credits pages serving until Ctrl-C"
    )
    args = parser.parse_args(argv)
    scenario = Scenario.load(args.scenario)
    run_dir = args.dir.resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "agent").mkdir(parents=True)
    demo = Demo(run_dir, args.scenario, scenario, args.speed)
    try:
        report = demo.run()
        print_comparison(report, truth_by_account_model(scenario, run_dir / "clock.anchor"))
        url, tenant, token, staff = demo.open_web(report)
        print(f"\ncredits pages: {url}")
        print(f"  log in as {tenant} with the token {token}")
        print(f"  or as billing staff with {staff}")
        if args.web:
            print("serving until Ctrl-C ...")
            demo.serve_until_interrupted()
    finally:
        demo.stop_all()
    return 0


def bin_path(name: str) -> str:
    """The console script installed beside this interpreter."""
    found = Path(sys.executable).parent / name
    return str(found) if found.exists() else name


class Demo:
    def __init__(self, run_dir: Path, scenario_ref: str, scenario: Scenario, speed: float) -> None:
        self.dir = run_dir
        self.scenario_ref = scenario_ref  # what the agent is told: a shipped name or a path
        self.scenario = scenario
        self.speed = speed
        self.db = f"sqlite:///{run_dir / 'collector.db'}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.anchor = run_dir / "clock.anchor"

    def run(self) -> dict[str, object]:
        port = self.start_collector()
        agent_id = "demo-gpu-host"
        public_hex = self.keygen(agent_id)
        self.collector_cli("enroll", agent_id, public_hex)
        print(f"enrolled agent {agent_id}; collector on 127.0.0.1:{port}")
        # The simulated host's timeline stands at t=0 until the agent is metering, so no
        # process starts before it however slow the machine; a restart joins the timeline.
        AnchorFile(self.anchor).open_or_create(self.speed, None, held=True)
        clock = SimClock.shared(self.anchor, self.speed)
        agent = self.start_agent(agent_id, port)
        self.wait_for_log("agent", "metering as agent")
        AnchorFile(self.anchor).release()
        self.wait_for_scenario(clock)
        print("scenario done; stopping the agent (it closes its windows and drains)")
        agent.send_signal(signal.SIGTERM)
        if agent.wait(timeout=60) != 0:
            raise SystemExit(f"the agent exited with {agent.returncode}; see {self.dir}/agent.log")
        out = self.collector_cli("report", "--format", "json")
        return dict(json.loads(out))

    def start_collector(self) -> int:
        port_file = self.dir / "collector.port"
        self.spawn(
            "collector",
            [
                bin_path("creditmeter-collector"),
                "serve",
                "--db",
                self.db,
                "--listen",
                "127.0.0.1:0",
                "--port-file",
                str(port_file),
                "--metrics-listen",
                "127.0.0.1:0",
            ],
        )
        return self.wait_for_port(port_file, "collector")

    def open_web(self, report: dict[str, object]) -> tuple[str, str, str, str]:
        """Opens the report's accounts on a plan, starts ``creditmeter-collector web`` with a
        token per account and one for staff; returns (URL, an account, its token, the
        staff token)."""
        rows = report["rows"]
        assert isinstance(rows, list)
        accounts = sorted({str(r["account"]) for r in rows} - {UNATTRIBUTED})
        self.collector_cli("plan", "define", "pro", "--hours", "10", "--by", "demo")
        month = time.strftime("%Y-%m-01", time.gmtime())
        for account in accounts:
            self.collector_cli("account", "open", account, "--plan", "pro", "--since", month)
        tokens = {account: secrets.token_urlsafe(18) for account in [*accounts, "staff"]}
        token_file = self.dir / "web-tokens"
        token_file.write_text(
            "".join(
                f"{name} {token} reader{'' if name == 'staff' else ' ' + name}\n"
                for name, token in tokens.items()
            )
        )
        token_file.chmod(0o600)
        port_file = self.dir / "web.port"
        self.spawn(
            "web",
            [
                bin_path("creditmeter-collector"),
                "web",
                "--db",
                self.db,
                "--listen",
                "127.0.0.1:0",
                "--port-file",
                str(port_file),
                "--set",
                f"api.token_file={token_file}",
            ],
        )
        port = self.wait_for_port(port_file, "web")
        return f"http://127.0.0.1:{port}/", accounts[0], tokens[accounts[0]], tokens["staff"]

    def wait_for_port(self, port_file: Path, name: str) -> int:
        self.wait_until(name, lambda: port_file.exists() and bool(port_file.read_text().strip()))
        return int(port_file.read_text())

    def wait_for_log(self, name: str, line: str) -> None:
        log = self.dir / f"{name}.log"
        self.wait_until(name, lambda: line in log.read_text(errors="replace"))

    def wait_until(self, name: str, done: Callable[[], bool]) -> None:
        """Until ``done``, for at most START_TIMEOUT_S; a daemon that exits ends the demo."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if done():
                return
            self.check_alive()
            time.sleep(0.05)
        raise SystemExit(f"{name} did not start; see {self.dir / name}.log")

    def serve_until_interrupted(self) -> None:
        try:
            while True:
                self.check_alive()
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("\nstopping")

    def keygen(self, agent_id: str) -> str:
        key = self.dir / "agent" / "signing-key.pem"
        command = [
            bin_path("creditmeter-agent"),
            "keygen",
            "--key",
            str(key),
            "--agent-id",
            agent_id,
        ]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        return out.split()[0]

    def collector_cli(self, *args: str) -> str:
        command = [bin_path("creditmeter-collector"), *args, "--db", self.db]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip()}")
        return done.stdout

    def start_agent(self, agent_id: str, port: int) -> subprocess.Popen[bytes]:
        settings = {
            "agent.id": agent_id,
            "agent.host": "gpu-host-1",
            "agent.state_dir": str(self.dir / "agent"),
            "nvml.backend": "simulated",
            "nvml.scenario": self.scenario_ref,
            "nvml.speed": str(self.speed),
            "nvml.clock_anchor": str(self.anchor),
            "metrics.listen": "127.0.0.1:0",
            "collector.address": f"127.0.0.1:{port}",
        }
        args = [bin_path("creditmeter-agent"), "run"]
        for key, value in settings.items():
            args += ["--set", f"{key}={value}"]
        return self.spawn("agent", args)

    def wait_for_scenario(self, clock: SimClock) -> None:
        end_s = scenario_end_s(self.scenario) + 15  # then a window closes and exits drain
        real_s = end_s / self.speed
        print(f"metering {end_s:.0f} simulated seconds at {self.speed:g}x ({real_s:.0f} s) ...")
        while clock.monotonic() < end_s:
            self.check_alive()
            time.sleep(min(0.5, (end_s - clock.monotonic()) / self.speed))

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.dir / f"{name}.log").open("wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() not in (None, 0):
                name = Path(str(proc.args[0])).name  # type: ignore[index]
                raise SystemExit(f"{name} exited with {proc.returncode}; see {self.dir}")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def scenario_end_s(scenario: Scenario) -> float:
    ends = [p.exit_us or p.start_us for p in scenario.processes]
    ends += [s.end_us for p in scenario.processes for s in p.busy]
    return max(ends, default=0) / 1e6


def truth_by_account_model(
    scenario: Scenario, anchor_file: Path
) -> dict[tuple[str, str], Fraction]:
    """What the simulated processes really computed, per account and model."""
    start_wall_s = AnchorFile(anchor_file).read().start_wall_us / 1e6
    host = SimHost(scenario, ManualClock(start_wall_s))
    totals: dict[tuple[str, str], Fraction] = defaultdict(Fraction)
    end_s = scenario_end_s(scenario) + 1
    for truth in host.truth(until_s=end_s).values():
        key = (truth.labels.get(ACCOUNT_VAR, "") or UNATTRIBUTED, truth.labels.get(MODEL_VAR, ""))
        totals[key] += truth.busy_us / 1_000_000
    return dict(totals)


def print_comparison(report: dict[str, object], truth: dict[tuple[str, str], Fraction]) -> None:
    rows = report["rows"]
    assert isinstance(rows, list)
    print()
    header = (
        f"{'account':<14}{'model':<14}{'measured s':>13}{'truth s':>13}{'error s':>10}"
        f"{'credits':>13}"
    )
    print(header)
    print("-" * len(header))
    seen = set()
    for row in rows:
        key = (row["account"], row["model"])
        seen.add(key)
        measured = Decimal(row["busy_seconds"])
        true_s = truth.get(key, Fraction(0))
        error = float(measured) - float(true_s)
        print(
            f"{key[0]:<14}{key[1]:<14}{measured:>13.3f}{float(true_s):>13.3f}{error:>+10.3f}"
            f"{Decimal(row['credits']):>13.3f}"
        )
    for key, true_s in sorted(truth.items()):
        if key not in seen and true_s:
            print(f"{key[0]:<14}{key[1]:<14}{'missing':>13}{float(true_s):>13.3f}")
    totals = report.get("totals", {})
    if isinstance(totals, dict):
        print("-" * len(header))
        print(
            f"{'total':<28}{Decimal(totals['busy_seconds']):>13.3f}"
            f"{float(sum(truth.values())):>13.3f}{'':>10}{Decimal(totals['credits']):>13.3f}"
        )
    print("\n1 credit = 1 busy GPU second (rate 1.0); idle time costs nothing.")


if __name__ == "__main__":
    sys.exit(main())
