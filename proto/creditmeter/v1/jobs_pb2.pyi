from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClampReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLAMP_REASON_NONE: _ClassVar[ClampReason]
    CLAMP_REASON_FUTURE: _ClassVar[ClampReason]
    CLAMP_REASON_PAST: _ClassVar[ClampReason]
    CLAMP_REASON_ALREADY_WRITTEN: _ClassVar[ClampReason]
    CLAMP_REASON_BEFORE_START: _ClassVar[ClampReason]
    CLAMP_REASON_UNSET: _ClassVar[ClampReason]
CLAMP_REASON_NONE: ClampReason
CLAMP_REASON_FUTURE: ClampReason
CLAMP_REASON_PAST: ClampReason
CLAMP_REASON_ALREADY_WRITTEN: ClampReason
CLAMP_REASON_BEFORE_START: ClampReason
CLAMP_REASON_UNSET: ClampReason

class Caller(_message.Message):
    __slots__ = ("pid", "pid_namespace")
    PID_FIELD_NUMBER: _ClassVar[int]
    PID_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    pid: int
    pid_namespace: int
    def __init__(self, pid: _Optional[int] = ..., pid_namespace: _Optional[int] = ...) -> None: ...

class Undelivered(_message.Message):
    __slots__ = ("jobs", "start_us", "end_us")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    START_US_FIELD_NUMBER: _ClassVar[int]
    END_US_FIELD_NUMBER: _ClassVar[int]
    jobs: int
    start_us: int
    end_us: int
    def __init__(self, jobs: _Optional[int] = ..., start_us: _Optional[int] = ..., end_us: _Optional[int] = ...) -> None: ...

class StartJobRequest(_message.Message):
    __slots__ = ("job_id", "account", "model", "caller", "gpu_uuid", "weight", "start_us", "undelivered")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    START_US_FIELD_NUMBER: _ClassVar[int]
    UNDELIVERED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    account: str
    model: str
    caller: Caller
    gpu_uuid: str
    weight: float
    start_us: int
    undelivered: Undelivered
    def __init__(self, job_id: _Optional[str] = ..., account: _Optional[str] = ..., model: _Optional[str] = ..., caller: _Optional[_Union[Caller, _Mapping]] = ..., gpu_uuid: _Optional[str] = ..., weight: _Optional[float] = ..., start_us: _Optional[int] = ..., undelivered: _Optional[_Union[Undelivered, _Mapping]] = ...) -> None: ...

class StartJobResponse(_message.Message):
    __slots__ = ("host_pid", "start_us", "clamped")
    HOST_PID_FIELD_NUMBER: _ClassVar[int]
    START_US_FIELD_NUMBER: _ClassVar[int]
    CLAMPED_FIELD_NUMBER: _ClassVar[int]
    host_pid: int
    start_us: int
    clamped: ClampReason
    def __init__(self, host_pid: _Optional[int] = ..., start_us: _Optional[int] = ..., clamped: _Optional[_Union[ClampReason, str]] = ...) -> None: ...

class EndJobRequest(_message.Message):
    __slots__ = ("job_id", "caller", "end_us", "undelivered")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    END_US_FIELD_NUMBER: _ClassVar[int]
    UNDELIVERED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    caller: Caller
    end_us: int
    undelivered: Undelivered
    def __init__(self, job_id: _Optional[str] = ..., caller: _Optional[_Union[Caller, _Mapping]] = ..., end_us: _Optional[int] = ..., undelivered: _Optional[_Union[Undelivered, _Mapping]] = ...) -> None: ...

class EndJobResponse(_message.Message):
    __slots__ = ("end_us", "clamped")
    END_US_FIELD_NUMBER: _ClassVar[int]
    CLAMPED_FIELD_NUMBER: _ClassVar[int]
    end_us: int
    clamped: ClampReason
    def __init__(self, end_us: _Optional[int] = ..., clamped: _Optional[_Union[ClampReason, str]] = ...) -> None: ...
