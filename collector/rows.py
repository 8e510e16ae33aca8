"""A verified record as a row: the layout the verifier produces and the stores insert.

A row holds the evidence and what finds it: the record's bytes exactly as received, its
(agent_id, seq) key, and its start for exports by time range. Every other field lives in
the bytes only. Reports read the rollups that ingest keeps in the same transaction, the
audit and exports parse the bytes; a second copy of each field in columns would cost a
third of the ingest time (binding 23 parameters a record instead of 4, measured) and could
disagree with the bytes it came from.

Plain tuples rather than a NamedTuple or dataclass: one is built per record on the ingest
hot path, and the stores hand them to the database driver as they are.
"""

from __future__ import annotations

from typing import Final

# One record as the store's INSERT parameters, in column order (ROW_COLUMNS). The record is
# a bytearray because Python 3.11's sqlite3 binds bytearray directly but sends bytes
# through its adapter lookup, which costs more than the copy (measured: ~1 µs a value).
RecordRow = tuple[
    str,  # agent_id
    int,  # seq
    int,  # start_us: start_unix_us of the record
    bytearray,  # record: the serialized UsageRecord exactly as received
]
ROW_COLUMNS = ("agent_id", "seq", "start_us", "record")
# Positions in a RecordRow (Final: mypy then knows each element's type).
AGENT_ID: Final = 0
SEQ: Final = 1
START_US: Final = 2
RECORD: Final = 3
