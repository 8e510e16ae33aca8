"""The label law: what an account, model, job id or any other label may be, for every part of
creditmeter alike (the agent's environment labels and job API, the worker client, the
verifier, the ledger). One law, so that the agent never writes a record the collector
refuses: a record refused for a label would block that host's whole chain.

A label is
- at most ``MAX_LABEL_BYTES`` bytes of UTF-8 (PostgreSQL columns and reports are sized by
  bytes: 200 × "é" is 200 characters but 400 bytes);
- printable (``str.isprintable``): no control characters (NUL, ESC, newline), no format
  characters (bidi overrides such as U+202E, zero-width joiners), no surrogates, private-use
  or unassigned code points, and no separator but the ASCII space. Reports and CSV print
  labels: a newline or a U+202E in an account forges lines;
- in Unicode NFC form: "é" composed and decomposed are never two accounts (the agent
  normalises what a tenant set; the collector refuses what is not normalised);
- for an account, not a reserved name ("unattributed": what reports call usage without one).

The empty string is no label (unattributed usage), never refused here.
"""

from __future__ import annotations

import unicodedata
from enum import IntEnum

MAX_LABEL_BYTES = 256
RESERVED_ACCOUNTS = frozenset({"unattributed"})  # compared case-folded


class LabelProblem(IntEnum):
    """Why a label was refused; the values are usage.proto's LabelProblem."""

    TOO_LONG = 1
    FORBIDDEN_CHARACTER = 2
    NOT_NFC = 3
    RESERVED = 4


class LabelError(ValueError):
    """A label that breaks the law: ``field`` names it, ``problem`` says how. The message
    never repeats the label itself (it may be long, or forge log lines)."""

    def __init__(self, field: str, problem: LabelProblem, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.problem = problem


def label_error(field: str, value: str) -> LabelError | None:
    """The error ``value`` breaks the law with as the label ``field``, or None."""
    if not value.isprintable():
        position = next(i for i, char in enumerate(value) if not char.isprintable())
        return LabelError(
            field,
            LabelProblem.FORBIDDEN_CHARACTER,
            f"character {position} is U+{ord(value[position]):04X}, which no label may hold "
            "(control, format, separator or unassigned)",
        )
    # Printable means no surrogate, so the encoding cannot fail.
    size = len(value) if value.isascii() else len(value.encode("utf-8"))
    if size > MAX_LABEL_BYTES:
        return LabelError(
            field, LabelProblem.TOO_LONG, f"{size} bytes of UTF-8, more than {MAX_LABEL_BYTES}"
        )
    if not value.isascii() and not unicodedata.is_normalized("NFC", value):
        return LabelError(field, LabelProblem.NOT_NFC, "not in Unicode NFC form")
    if field.endswith("account") and value.casefold() in RESERVED_ACCOUNTS:
        return LabelError(field, LabelProblem.RESERVED, f"{value!r} is a reserved account name")
    return None


def check_label(field: str, value: str) -> str:
    """``value`` if it is a lawful label; raises LabelError otherwise."""
    error = label_error(field, value)
    if error is not None:
        raise error
    return value


def lawful_label(field: str, value: str) -> str:
    """What a tenant set, normalised to NFC and then checked (raises LabelError): the agent
    takes labels this way, so that only what no normalising can fix is refused."""
    return check_label(field, value if value.isascii() else unicodedata.normalize("NFC", value))


def check_job_labels(job_id: str, account: str, model: str) -> None:
    """What a worker declares with a job (StartJob): a job id and an account, both
    required, and a model, each under the law. Raises ValueError (LabelError for a label
    that breaks the law)."""
    for field, value in (("job_id", job_id), ("account", account)):
        if not value:
            raise ValueError(f"{field}: is empty; a job needs one")
    check_label("job_id", job_id)
    check_label("account", account)
    check_label("model", model)


def lawful_text(value: str) -> str:
    """Text no tenant chose as a label but any process can set (its name, comm) made
    lawful: forbidden characters become U+FFFD, NFC, and cut to the byte limit on a
    character boundary. For what is shown, never for what identifies an account."""
    if not value.isprintable():
        value = "".join(c if c.isprintable() else "\ufffd" for c in value)
    if not value.isascii():
        value = unicodedata.normalize("NFC", value)
        value = value.encode("utf-8")[:MAX_LABEL_BYTES].decode("utf-8", errors="ignore")
        while not unicodedata.is_normalized("NFC", value):  # the cut split a sequence
            value = value[:-1]
        return value
    return value[:MAX_LABEL_BYTES]


def printable(value: str, limit: int = 64) -> str:
    """``value`` for a log line or an error message: characters the law forbids escaped
    (\\n, \\x1b, \\u202e) and cut to ``limit`` characters."""
    shown = value[:limit]
    if not shown.isprintable():
        shown = "".join(
            c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in shown
        )
    return shown + ("…" if len(value) > limit else "")
