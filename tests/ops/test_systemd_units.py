"""The systemd units: systemd itself accepts them, and they keep what the daemons rely on.

``systemd-analyze verify`` exits 0 on most mistakes (an unknown directive, an unparsable
value, a misspelt section are "ignoring" warnings on stderr), so a unit passes here only when
verify exits 0 *and* says nothing about it. The broken copies below prove that check fails.
ExecStart names /opt/creditmeter/bin/…, absent here and verify refuses a missing binary, so
each unit is verified as a copy in tmp_path whose ExecStart points at a stub executable;
nothing else in the copy changes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

UNITS_DIR = Path(__file__).resolve().parents[2] / "systemd"
INSTALL_BIN = "/opt/creditmeter/bin/"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
DEADLINE_S = 60

pytestmark = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (package: systemd)"
)

UNITS = ("creditmeter-agent.service", "creditmeter-collector.service", "creditmeter-web.service")


@dataclass(frozen=True)
class Verdict:
    returncode: int
    complaints: list[str]  # stderr lines about this unit

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and not self.complaints


def _testable_copy(unit: str, tmp_path: Path, text: str | None = None) -> Path:
    """``unit`` (or ``text``) written to tmp_path with ExecStart on a stub that exists there."""
    text = (UNITS_DIR / unit).read_text(encoding="utf-8") if text is None else text
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("creditmeter-agent", "creditmeter-collector"):
        stub = bin_dir / name
        stub.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
        stub.chmod(0o755)
    copy = tmp_path / unit  # same file name: verify derives the unit name from it
    copy.write_text(text.replace(INSTALL_BIN, f"{bin_dir}/"), encoding="utf-8")
    return copy


def _verify(unit_file: Path) -> Verdict:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", "--recursive-errors=no", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=False,
    )
    # Lines about other units (the host's own, pulled in by After=) are not ours to judge.
    complaints = [line for line in result.stderr.splitlines() if unit_file.name in line]
    return Verdict(result.returncode, complaints)


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_accepts_the_unit_without_a_warning(unit: str, tmp_path: Path) -> None:
    verdict = _verify(_testable_copy(unit, tmp_path))
    assert verdict.clean, verdict


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (("RestartSec=5", "RestartSecs=5"), "Unknown key"),
        (("Restart=on-failure", "Restart=on-failuree"), "Failed to parse service restart"),
        (("RestartSec=5", "RestartSec=five"), "Failed to parse sec value"),
        (("[Service]", "[Servce]"), "Unknown section"),
        (("ExecStart=" + INSTALL_BIN, "ExecStart=/nonexistent/"), "not executable"),
    ],
)
@pytest.mark.parametrize("unit", UNITS)
def test_a_broken_unit_fails_the_check(
    unit: str, breakage: tuple[str, str], expected: str, tmp_path: Path
) -> None:
    original = (UNITS_DIR / unit).read_text(encoding="utf-8")
    old, new = breakage
    assert old in original
    broken = original.replace(old, new, 1)
    if new.startswith("ExecStart=/nonexistent/"):
        copy = tmp_path / unit  # written as is: the binary must stay missing
        copy.write_text(broken, encoding="utf-8")
    else:
        copy = _testable_copy(unit, tmp_path, broken)
    verdict = _verify(copy)
    assert not verdict.clean
    assert any(expected in line for line in verdict.complaints), verdict


# systemd's exposure score, times ten (0 best, 100 worst); today 1.3 and 2.3.
EXPOSURE_THRESHOLDS = {
    "creditmeter-collector.service": 20,
    "creditmeter-agent.service": 30,
    "creditmeter-web.service": 20,
}


def _exposure_within_threshold(unit_file: Path, threshold: int) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", f"--threshold={threshold}", "--no-pager",
         str(unit_file)],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=False,
    )  # fmt: skip


@pytest.mark.parametrize("unit", UNITS)
def test_hardening_stays_within_exposure_threshold(unit: str, tmp_path: Path) -> None:
    """A dropped hardening directive raises systemd's exposure score and fails this."""
    result = _exposure_within_threshold(_testable_copy(unit, tmp_path), EXPOSURE_THRESHOLDS[unit])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_weakened_unit_exceeds_the_threshold(unit: str, tmp_path: Path) -> None:
    hardening = ("Protect", "Private", "Restrict", "SystemCall", "Capability", "NoNewPrivileges")
    text = (UNITS_DIR / unit).read_text(encoding="utf-8")
    weakened = "\n".join(line for line in text.splitlines() if not line.startswith(hardening))
    result = _exposure_within_threshold(
        _testable_copy(unit, tmp_path, weakened), EXPOSURE_THRESHOLDS[unit]
    )
    assert result.returncode != 0
    assert "Overall exposure level" in result.stdout


def _directives(unit: str) -> dict[str, list[str]]:
    """Section.Key -> values in order (systemd keys may repeat)."""
    directives: dict[str, list[str]] = {}
    section = ""
    for raw in (UNITS_DIR / unit).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives.setdefault(f"{section}.{key}", []).append(value)
    return directives


COMMON = {
    "Service.Type": ["notify"],
    "Service.NotifyAccess": ["main"],
    "Service.WatchdogSec": ["30"],
    "Service.Restart": ["on-failure"],
    "Service.RestartPreventExitStatus": ["2"],  # config errors: creditmeter.config exits 2
    "Service.ConfigurationDirectory": ["creditmeter"],
    "Service.NoNewPrivileges": ["yes"],
    "Service.ProtectSystem": ["strict"],
    "Service.SystemCallFilter": ["@system-service", "~@privileged @resources"],
    "Service.RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"],
}


def test_agent_unit_keeps_what_the_agent_needs() -> None:
    d = _directives("creditmeter-agent.service")
    # 75: outside the host's PID namespace (ForeignPidNamespace), which no restart mends.
    for key, value in {**COMMON, "Service.RestartPreventExitStatus": ["2 75"]}.items():
        assert d.get(key) == value, key
    assert d["Service.ExecStart"] == [
        "/opt/creditmeter/bin/creditmeter-agent run --config /etc/creditmeter/agent.toml"
        " $CREDITMETER_AGENT_ARGS"
    ]
    assert d["Service.EnvironmentFile"] == ["-/etc/default/creditmeter-agent"]
    assert d["Service.StateDirectory"] == ["creditmeter-agent"]
    assert d["Service.RuntimeDirectory"] == ["creditmeter"]
    assert d["Service.RuntimeDirectoryMode"] == ["0750"]
    assert "nvidia-persistenced.service" in d["Unit.After"]
    assert d["Unit.Wants"] == ["network-online.target"]
    # The GPUs must stay reachable: no PrivateDevices, an explicit NVIDIA allow-list.
    assert "Service.PrivateDevices" not in d
    assert d["Service.DevicePolicy"] == ["closed"]
    assert "/dev/nvidiactl rw" in d["Service.DeviceAllow"]
    assert "char-nvidia-frontend rw" in d["Service.DeviceAllow"]
    # Other users' /proc entries stay visible for attribution.
    assert "Service.ProtectProc" not in d and "Service.ProcSubset" not in d
    caps = "CAP_SYS_PTRACE CAP_DAC_READ_SEARCH"
    assert d["Service.CapabilityBoundingSet"] == d["Service.AmbientCapabilities"] == [caps]
    assert int(d["Service.TimeoutStopSec"][0]) >= 30


def test_collector_unit_is_fully_hardened() -> None:
    d = _directives("creditmeter-collector.service")
    for key, value in COMMON.items():
        assert d.get(key) == value, key
    assert d["Service.ExecStart"] == [
        "/opt/creditmeter/bin/creditmeter-collector serve --config"
        " /etc/creditmeter/collector.toml $CREDITMETER_COLLECTOR_ARGS"
    ]
    assert d["Service.EnvironmentFile"] == ["-/etc/default/creditmeter-collector"]
    assert d["Service.StateDirectory"] == ["creditmeter-collector"]
    for key in ("PrivateDevices", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectKernelLogs", "ProtectControlGroups", "RestrictNamespaces",
                "LockPersonality", "MemoryDenyWriteExecute"):  # fmt: skip
        assert d[f"Service.{key}"] == ["yes"], key
    assert d["Service.ProtectHome"] == ["yes"]
    assert d["Service.CapabilityBoundingSet"] == [""]
    assert d["Service.UMask"] == ["0077"]
    assert d["Service.User"] != ["root"]
    assert int(d["Service.TimeoutStopSec"][0]) >= 30


def test_web_unit_is_hardened_like_the_collector() -> None:
    web, collector = (
        _directives("creditmeter-web.service"),
        _directives("creditmeter-collector.service"),
    )
    assert web["Service.ExecStart"] == [
        "/opt/creditmeter/bin/creditmeter-collector web --config"
        " /etc/creditmeter/collector.toml $CREDITMETER_WEB_ARGS"
    ]
    assert web["Service.Type"] == ["exec"]  # uvicorn sends no sd_notify READY
    assert web["Service.User"] == collector["Service.User"]
    assert "Service.StateDirectory" not in web  # the collector's unit owns it
    same = [k for k in collector if k.startswith("Service.") and (
        k.split(".")[1].startswith(("Protect", "Private", "Restrict", "SystemCall", "Capability"))
        or k in ("Service.NoNewPrivileges", "Service.MemoryDenyWriteExecute", "Service.UMask")
    )]  # fmt: skip
    assert same and all(web.get(k) == collector[k] for k in same), [
        k for k in same if web.get(k) != collector[k]
    ]


@pytest.mark.parametrize(
    ("unit", "daemon"),
    [
        ("creditmeter-agent.service", "creditmeter-agent"),
        ("creditmeter-collector.service", "creditmeter-collector"),
        ("creditmeter-web.service", "creditmeter-collector"),
    ],
)
def test_execstart_is_accepted_by_the_daemons_cli(unit: str, daemon: str, tmp_path: Path) -> None:
    """The unit's arguments parse, and the file it names is read: proven with a file whose
    one mistake the daemon names (exit 2) before it would touch GPUs, stores or ports."""
    (exec_start,) = _directives(unit)["Service.ExecStart"]
    words = [word for word in exec_start.split() if not word.startswith("$")]
    assert words[0] == INSTALL_BIN + daemon
    config = tmp_path / Path(words[words.index("--config") + 1]).name
    config.write_text("[log]\nlevle = 'debug'\n", encoding="utf-8")
    words[words.index("--config") + 1] = str(config)
    done = subprocess.run(
        [str(Path(sys.executable).parent / daemon), *words[1:]],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert f"{config}: log.levle: unknown key; did you mean log.level?" in done.stderr
