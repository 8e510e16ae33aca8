from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MeasurementSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEASUREMENT_SOURCE_UNSPECIFIED: _ClassVar[MeasurementSource]
    MEASUREMENT_SOURCE_NVML_PROCESS_UTIL: _ClassVar[MeasurementSource]
    MEASUREMENT_SOURCE_GPM_MIG_INSTANCE: _ClassVar[MeasurementSource]
    MEASUREMENT_SOURCE_GPM_MIG_SHARED: _ClassVar[MeasurementSource]
    MEASUREMENT_SOURCE_NONE: _ClassVar[MeasurementSource]
    MEASUREMENT_SOURCE_NVML_DEVICE_UTIL: _ClassVar[MeasurementSource]
    MEASUREMENT_SOURCE_NVML_PROCESS_EVIDENCE: _ClassVar[MeasurementSource]

class EvidenceSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVIDENCE_SOURCE_UNSPECIFIED: _ClassVar[EvidenceSource]
    EVIDENCE_SOURCE_NONE: _ClassVar[EvidenceSource]
    EVIDENCE_SOURCE_PROCESSES_UTILIZATION_INFO: _ClassVar[EvidenceSource]
    EVIDENCE_SOURCE_PROCESS_UTILIZATION: _ClassVar[EvidenceSource]
    EVIDENCE_SOURCE_ACCOUNTING_STATS: _ClassVar[EvidenceSource]

class Quality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUALITY_UNSPECIFIED: _ClassVar[Quality]
    QUALITY_EXACT: _ClassVar[Quality]
    QUALITY_APPORTIONED: _ClassVar[Quality]
    QUALITY_UNATTRIBUTED: _ClassVar[Quality]
    QUALITY_PROCESS_EVIDENCE: _ClassVar[Quality]
    QUALITY_KEY_ROTATION: _ClassVar[Quality]

class UnattributedReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNATTRIBUTED_REASON_UNSPECIFIED: _ClassVar[UnattributedReason]
    UNATTRIBUTED_REASON_NO_PROCESS: _ClassVar[UnattributedReason]
    UNATTRIBUTED_REASON_UNKNOWN_PROCESS: _ClassVar[UnattributedReason]
    UNATTRIBUTED_REASON_NO_EVIDENCE: _ClassVar[UnattributedReason]
    UNATTRIBUTED_REASON_PROCESSES_UNLISTED: _ClassVar[UnattributedReason]

class LabelProblem(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_PROBLEM_UNSPECIFIED: _ClassVar[LabelProblem]
    LABEL_PROBLEM_TOO_LONG: _ClassVar[LabelProblem]
    LABEL_PROBLEM_FORBIDDEN_CHARACTER: _ClassVar[LabelProblem]
    LABEL_PROBLEM_NOT_NFC: _ClassVar[LabelProblem]
    LABEL_PROBLEM_RESERVED: _ClassVar[LabelProblem]

class LabelName(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_NAME_UNSPECIFIED: _ClassVar[LabelName]
    LABEL_NAME_ACCOUNT: _ClassVar[LabelName]
    LABEL_NAME_MODEL: _ClassVar[LabelName]
    LABEL_NAME_JOB: _ClassVar[LabelName]

class GapReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GAP_REASON_UNSPECIFIED: _ClassVar[GapReason]
    GAP_REASON_RING_OVERFLOW: _ClassVar[GapReason]
    GAP_REASON_GPU_LOST: _ClassVar[GapReason]
    GAP_REASON_NVML_ERROR: _ClassVar[GapReason]
    GAP_REASON_NO_UTILIZATION_SIGNAL: _ClassVar[GapReason]
    GAP_REASON_AGENT_DOWN: _ClassVar[GapReason]
    GAP_REASON_CLOCK_STEP: _ClassVar[GapReason]
    GAP_REASON_OUTBOX_DAMAGED: _ClassVar[GapReason]
    GAP_REASON_DEVICE_UNLISTED: _ClassVar[GapReason]

class AttributionSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTRIBUTION_SOURCE_UNSPECIFIED: _ClassVar[AttributionSource]
    ATTRIBUTION_SOURCE_JOB_API: _ClassVar[AttributionSource]
    ATTRIBUTION_SOURCE_ENVIRONMENT: _ClassVar[AttributionSource]
    ATTRIBUTION_SOURCE_NONE: _ClassVar[AttributionSource]
MEASUREMENT_SOURCE_UNSPECIFIED: MeasurementSource
MEASUREMENT_SOURCE_NVML_PROCESS_UTIL: MeasurementSource
MEASUREMENT_SOURCE_GPM_MIG_INSTANCE: MeasurementSource
MEASUREMENT_SOURCE_GPM_MIG_SHARED: MeasurementSource
MEASUREMENT_SOURCE_NONE: MeasurementSource
MEASUREMENT_SOURCE_NVML_DEVICE_UTIL: MeasurementSource
MEASUREMENT_SOURCE_NVML_PROCESS_EVIDENCE: MeasurementSource
EVIDENCE_SOURCE_UNSPECIFIED: EvidenceSource
EVIDENCE_SOURCE_NONE: EvidenceSource
EVIDENCE_SOURCE_PROCESSES_UTILIZATION_INFO: EvidenceSource
EVIDENCE_SOURCE_PROCESS_UTILIZATION: EvidenceSource
EVIDENCE_SOURCE_ACCOUNTING_STATS: EvidenceSource
QUALITY_UNSPECIFIED: Quality
QUALITY_EXACT: Quality
QUALITY_APPORTIONED: Quality
QUALITY_UNATTRIBUTED: Quality
QUALITY_PROCESS_EVIDENCE: Quality
QUALITY_KEY_ROTATION: Quality
UNATTRIBUTED_REASON_UNSPECIFIED: UnattributedReason
UNATTRIBUTED_REASON_NO_PROCESS: UnattributedReason
UNATTRIBUTED_REASON_UNKNOWN_PROCESS: UnattributedReason
UNATTRIBUTED_REASON_NO_EVIDENCE: UnattributedReason
UNATTRIBUTED_REASON_PROCESSES_UNLISTED: UnattributedReason
LABEL_PROBLEM_UNSPECIFIED: LabelProblem
LABEL_PROBLEM_TOO_LONG: LabelProblem
LABEL_PROBLEM_FORBIDDEN_CHARACTER: LabelProblem
LABEL_PROBLEM_NOT_NFC: LabelProblem
LABEL_PROBLEM_RESERVED: LabelProblem
LABEL_NAME_UNSPECIFIED: LabelName
LABEL_NAME_ACCOUNT: LabelName
LABEL_NAME_MODEL: LabelName
LABEL_NAME_JOB: LabelName
GAP_REASON_UNSPECIFIED: GapReason
GAP_REASON_RING_OVERFLOW: GapReason
GAP_REASON_GPU_LOST: GapReason
GAP_REASON_NVML_ERROR: GapReason
GAP_REASON_NO_UTILIZATION_SIGNAL: GapReason
GAP_REASON_AGENT_DOWN: GapReason
GAP_REASON_CLOCK_STEP: GapReason
GAP_REASON_OUTBOX_DAMAGED: GapReason
GAP_REASON_DEVICE_UNLISTED: GapReason
ATTRIBUTION_SOURCE_UNSPECIFIED: AttributionSource
ATTRIBUTION_SOURCE_JOB_API: AttributionSource
ATTRIBUTION_SOURCE_ENVIRONMENT: AttributionSource
ATTRIBUTION_SOURCE_NONE: AttributionSource

class RefusedLabel(_message.Message):
    __slots__ = ("label", "problem")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    label: LabelName
    problem: LabelProblem
    def __init__(self, label: _Optional[_Union[LabelName, str]] = ..., problem: _Optional[_Union[LabelProblem, str]] = ...) -> None: ...

class Gap(_message.Message):
    __slots__ = ("duration_us", "reason")
    DURATION_US_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    duration_us: int
    reason: GapReason
    def __init__(self, duration_us: _Optional[int] = ..., reason: _Optional[_Union[GapReason, str]] = ...) -> None: ...

class Unattributed(_message.Message):
    __slots__ = ("reason", "busy_us")
    REASON_FIELD_NUMBER: _ClassVar[int]
    BUSY_US_FIELD_NUMBER: _ClassVar[int]
    reason: UnattributedReason
    busy_us: int
    def __init__(self, reason: _Optional[_Union[UnattributedReason, str]] = ..., busy_us: _Optional[int] = ...) -> None: ...

class KeyRotation(_message.Message):
    __slots__ = ("new_public_key", "endorsement")
    NEW_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ENDORSEMENT_FIELD_NUMBER: _ClassVar[int]
    new_public_key: bytes
    endorsement: bytes
    def __init__(self, new_public_key: _Optional[bytes] = ..., endorsement: _Optional[bytes] = ...) -> None: ...

class DeviceBooks(_message.Message):
    __slots__ = ("device_busy_us", "attributed_busy_us", "unattributed", "gaps")
    DEVICE_BUSY_US_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTED_BUSY_US_FIELD_NUMBER: _ClassVar[int]
    UNATTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    GAPS_FIELD_NUMBER: _ClassVar[int]
    device_busy_us: int
    attributed_busy_us: int
    unattributed: _containers.RepeatedCompositeFieldContainer[Unattributed]
    gaps: _containers.RepeatedCompositeFieldContainer[Gap]
    def __init__(self, device_busy_us: _Optional[int] = ..., attributed_busy_us: _Optional[int] = ..., unattributed: _Optional[_Iterable[_Union[Unattributed, _Mapping]]] = ..., gaps: _Optional[_Iterable[_Union[Gap, _Mapping]]] = ...) -> None: ...

class GpuRef(_message.Message):
    __slots__ = ("uuid", "index", "name", "parent_uuid", "gpu_instance_id", "compute_instance_id")
    UUID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARENT_UUID_FIELD_NUMBER: _ClassVar[int]
    GPU_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    index: int
    name: str
    parent_uuid: str
    gpu_instance_id: int
    compute_instance_id: int
    def __init__(self, uuid: _Optional[str] = ..., index: _Optional[int] = ..., name: _Optional[str] = ..., parent_uuid: _Optional[str] = ..., gpu_instance_id: _Optional[int] = ..., compute_instance_id: _Optional[int] = ...) -> None: ...

class ProcessRef(_message.Message):
    __slots__ = ("pid", "create_time_us", "name", "container_id", "pod_uid")
    PID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    POD_UID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    create_time_us: int
    name: str
    container_id: str
    pod_uid: str
    def __init__(self, pid: _Optional[int] = ..., create_time_us: _Optional[int] = ..., name: _Optional[str] = ..., container_id: _Optional[str] = ..., pod_uid: _Optional[str] = ...) -> None: ...

class Attribution(_message.Message):
    __slots__ = ("account", "model", "job_id", "source", "fallback", "refused")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    account: str
    model: str
    job_id: str
    source: AttributionSource
    fallback: bool
    refused: _containers.RepeatedCompositeFieldContainer[RefusedLabel]
    def __init__(self, account: _Optional[str] = ..., model: _Optional[str] = ..., job_id: _Optional[str] = ..., source: _Optional[_Union[AttributionSource, str]] = ..., fallback: _Optional[bool] = ..., refused: _Optional[_Iterable[_Union[RefusedLabel, _Mapping]]] = ...) -> None: ...

class UsageRecord(_message.Message):
    __slots__ = ("agent_id", "seq", "prev_hash", "host", "start_unix_us", "end_unix_us", "gpu", "process", "attribution", "busy_us", "wall_us", "peak_memory_bytes", "energy_mj", "gaps", "source", "final", "quality", "evidence", "device", "key_rotation")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    BUSY_US_FIELD_NUMBER: _ClassVar[int]
    WALL_US_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENERGY_MJ_FIELD_NUMBER: _ClassVar[int]
    GAPS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    KEY_ROTATION_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    seq: int
    prev_hash: bytes
    host: str
    start_unix_us: int
    end_unix_us: int
    gpu: GpuRef
    process: ProcessRef
    attribution: Attribution
    busy_us: int
    wall_us: int
    peak_memory_bytes: int
    energy_mj: int
    gaps: _containers.RepeatedCompositeFieldContainer[Gap]
    source: MeasurementSource
    final: bool
    quality: Quality
    evidence: EvidenceSource
    device: DeviceBooks
    key_rotation: KeyRotation
    def __init__(self, agent_id: _Optional[str] = ..., seq: _Optional[int] = ..., prev_hash: _Optional[bytes] = ..., host: _Optional[str] = ..., start_unix_us: _Optional[int] = ..., end_unix_us: _Optional[int] = ..., gpu: _Optional[_Union[GpuRef, _Mapping]] = ..., process: _Optional[_Union[ProcessRef, _Mapping]] = ..., attribution: _Optional[_Union[Attribution, _Mapping]] = ..., busy_us: _Optional[int] = ..., wall_us: _Optional[int] = ..., peak_memory_bytes: _Optional[int] = ..., energy_mj: _Optional[int] = ..., gaps: _Optional[_Iterable[_Union[Gap, _Mapping]]] = ..., source: _Optional[_Union[MeasurementSource, str]] = ..., final: _Optional[bool] = ..., quality: _Optional[_Union[Quality, str]] = ..., evidence: _Optional[_Union[EvidenceSource, str]] = ..., device: _Optional[_Union[DeviceBooks, _Mapping]] = ..., key_rotation: _Optional[_Union[KeyRotation, _Mapping]] = ...) -> None: ...
