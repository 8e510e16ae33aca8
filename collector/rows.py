"""A verified record as a row: the layout the verifier produces and the stores insert.

Plain tuples rather than a NamedTuple or dataclass: one is built per record on the ingest
hot path, and the stores hand them to the database driver as they are.
"""

from __future__ import annotations

from typing import Final

ENERGY_ABSENT = -1  # energy_mj in a row when the GPU has no energy counter (stored as NULL)

# One record as the store's INSERT parameters, in column order (ROW_COLUMNS). Blobs are
# bytearrays because Python 3.11's sqlite3 binds bytearray directly but sends bytes (and
# None) through its adapter lookup, which costs more than the copy (measured: ~1 µs a value
# on the target machine). energy_mj is ENERGY_ABSENT rather than None for the same reason.
RecordRow = tuple[
    str,  # agent_id
    int,  # seq
    bytearray,  # hash: SHA-256 of record
    bytearray,  # record: the serialized UsageRecord exactly as received
    int,  # start_us
    int,  # end_us
    str,  # host
    str,  # gpu_uuid
    int,  # gpu_index
    str,  # gpu_parent_uuid
    int,  # pid
    int,  # create_time_us
    str,  # process_name
    str,  # account ("" = unattributed)
    str,  # model
    str,  # job_id
    int,  # attribution_source (AttributionSource)
    int,  # busy_us
    int,  # wall_us
    int,  # energy_mj, ENERGY_ABSENT when the record has none
    int,  # gap_us: sum of the record's gaps
    int,  # source (MeasurementSource)
    int,  # received_at_us
]
ROW_COLUMNS = (
    "agent_id",
    "seq",
    "hash",
    "record",
    "start_us",
    "end_us",
    "host",
    "gpu_uuid",
    "gpu_index",
    "gpu_parent_uuid",
    "pid",
    "create_time_us",
    "process_name",
    "account",
    "model",
    "job_id",
    "attribution_source",
    "busy_us",
    "wall_us",
    "energy_mj",
    "gap_us",
    "source",
    "received_at_us",
)
# Positions in a RecordRow, for readers that need a few columns (Final: mypy then knows
# each element's type).
SEQ: Final = 1
HASH: Final = 2
RECORD: Final = 3
START_US: Final = 4
ACCOUNT: Final = 13
MODEL: Final = 14
BUSY_US: Final = 17
WALL_US: Final = 18
ENERGY_MJ: Final = 19
RECEIVED_AT_US: Final = 22
