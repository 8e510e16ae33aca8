"""The label law (common/labels.py), and that the agent and the collector keep the same one:
whatever a tenant sets, the agent never writes a record the collector refuses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from creditmeter.agent.gpu import Device, ProcessInfo
from creditmeter.agent.procfs import lawful_labels
from creditmeter.agent.records import draft
from creditmeter.agent.usage import ProcessKey, WindowUsage
from creditmeter.collector.verifier import Verifier
from creditmeter.labels import (
    RESERVED_ACCOUNTS,
    LabelError,
    LabelProblem,
    check_job_labels,
    check_label,
    label_error,
    lawful_label,
    lawful_text,
    printable,
)
from creditmeter.v1 import usage_pb2
from tests.collector.records import T0_US, WINDOW_US, AgentChain

NOW_US = T0_US + 3600 * 1_000_000
LAWFUL = ["acme", "é" * 128, "Müller GmbH", "model v2.1 (sdxl)", "x" * 256, "😀" * 64, "日本語"]
REFUSED = [
    ("x" * 257, LabelProblem.TOO_LONG),
    ("é" * 129, LabelProblem.TOO_LONG),  # 129 characters, 258 bytes
    ("😀" * 65, LabelProblem.TOO_LONG),
    ("ac\x00me", LabelProblem.FORBIDDEN_CHARACTER),
    ("a\x1b[31mb", LabelProblem.FORBIDDEN_CHARACTER),
    ("acme\nTOTAL 0", LabelProblem.FORBIDDEN_CHARACTER),
    ("abc\u202edef", LabelProblem.FORBIDDEN_CHARACTER),  # right-to-left override
    ("a\u200bb", LabelProblem.FORBIDDEN_CHARACTER),  # zero-width space
    ("a\u00a0b", LabelProblem.FORBIDDEN_CHARACTER),  # no-break space
    ("\ud800", LabelProblem.FORBIDDEN_CHARACTER),  # lone surrogate
    ("e\u0301", LabelProblem.NOT_NFC),  # é decomposed
]


@pytest.mark.parametrize("value", LAWFUL)
def test_lawful_labels_pass(value: str) -> None:
    assert check_label("attribution.account", value) == value


@pytest.mark.parametrize(("value", "problem"), REFUSED)
def test_unlawful_labels_are_refused_saying_why_without_echoing_them(
    value: str, problem: LabelProblem
) -> None:
    error = label_error("attribution.model", value)
    assert isinstance(error, LabelError) and error.problem is problem
    assert str(error).startswith("attribution.model: ")
    assert value not in str(error) or len(value) < 3


def test_an_account_may_not_take_a_reserved_name_but_a_model_may() -> None:
    for name in ("unattributed", "Unattributed", "UNATTRIBUTED"):
        error = label_error("account", name)
        assert error is not None and error.problem is LabelProblem.RESERVED
        assert label_error("model", name) is None
    # the verifier's fast path compares ASCII accounts of this length only
    assert {len(name) for name in RESERVED_ACCOUNTS} == {len("unattributed")}


def test_the_agent_normalises_before_it_judges() -> None:
    assert lawful_label("account", "e\u0301") == "é"
    with pytest.raises(LabelError):
        lawful_label("account", "é" * 129)


def test_environment_labels_keep_the_lawful_and_name_the_refused() -> None:
    labels, refused = lawful_labels({"account": "x" * 293, "model": "sdxl", "job": "a\nb"})
    assert labels == {"model": "sdxl"}
    assert refused == (
        ("account", LabelProblem.TOO_LONG),
        ("job", LabelProblem.FORBIDDEN_CHARACTER),
    )


@pytest.mark.parametrize(
    ("job_id", "account", "model"),
    [("", "acme", "m"), ("j", "", "m"), ("😀" * 128, "acme", "m"), ("j", "é" * 200, "m"),
     ("j", "ac\x00me", "m"), ("j", "acme", "m\u202e")],
)  # fmt: skip
def test_a_job_breaking_the_law_is_refused(job_id: str, account: str, model: str) -> None:
    with pytest.raises(ValueError, match=r"^(job_id|account|model): "):
        check_job_labels(job_id, account, model)


def test_process_names_are_made_lawful_not_refused() -> None:
    assert lawful_text("py\nthon\x1b") == "py\ufffdthon\ufffd"
    long = lawful_text("é" * 200)
    assert long == "é" * 128 and label_error("process.name", long) is None
    assert lawful_text("python3") == "python3"


def test_printable_escapes_what_the_law_forbids() -> None:
    assert printable("a\nb\x1bc\u202e") == "a\\nb\\x1bc\\u202e"
    assert printable("x" * 100, limit=4) == "xxxx…"


# -- the agent never writes what the collector refuses ------------------------------------

DEVICE = Device(0, "GPU-8f3c2a1e-0000-4000-8000-000000000017", "NVIDIA H100", False)


def agent_record(env: dict[str, str], name: str) -> usage_pb2.UsageRecord:
    labels, refused = lawful_labels(env)
    info = ProcessInfo(4242, 1.0, name, labels, refused_labels=refused)
    usage = WindowUsage(
        ProcessKey(DEVICE.uuid, 4242, 1_000_000), DEVICE, info, T0_US, T0_US + WINDOW_US,
        5_000_000, WINDOW_US, None, None, (), usage_pb2.MEASUREMENT_SOURCE_NVML_DEVICE_UTIL,
        False, (), usage_pb2.QUALITY_EXACT, usage_pb2.EVIDENCE_SOURCE_NONE,
    )  # fmt: skip
    return draft(usage, "gpu-host-17")


def verified(rec: usage_pb2.UsageRecord) -> int:
    def as_the_agent_wrote(r: usage_pb2.UsageRecord) -> None:
        r.attribution.CopyFrom(rec.attribution)
        r.process.name = rec.process.name

    agent = AgentChain()
    batch = agent.extend(1, as_the_agent_wrote)
    checked = Verifier(clock_us=lambda: NOW_US).verify(batch, agent.key.public_key())
    assert checked.records.quarantined == ()  # held back would be refused, in effect
    return len(checked.records.rows)


@settings(max_examples=300, deadline=None)
@given(
    env=st.dictionaries(st.sampled_from(["account", "model", "job"]), st.text(max_size=300)),
    name=st.text(max_size=40),
)
def test_no_environment_label_makes_a_record_the_collector_refuses(
    env: dict[str, str], name: str
) -> None:
    rec = agent_record(env, name)
    assert verified(rec) == 1
    refused = {r.label for r in rec.attribution.refused}
    if "account" in env and usage_pb2.LABEL_NAME_ACCOUNT in refused:
        assert rec.attribution.account == ""  # unattributed, with the reason on the record


@settings(max_examples=300, deadline=None)
@given(job_id=st.text(max_size=140), account=st.text(max_size=140), model=st.text(max_size=140))
def test_every_job_the_agent_accepts_makes_records_the_collector_accepts(
    job_id: str, account: str, model: str
) -> None:
    try:
        check_job_labels(job_id, account, model)
    except ValueError:
        return
    rec = agent_record({"account": account, "model": model, "job": job_id}, "python3")
    assert (rec.attribution.account, rec.attribution.job_id) == (account, job_id)
    assert verified(rec) == 1
