from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LineKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LINE_KIND_UNSPECIFIED: _ClassVar[LineKind]
    LINE_KIND_USAGE: _ClassVar[LineKind]
    LINE_KIND_API: _ClassVar[LineKind]
    LINE_KIND_LATE_USAGE: _ClassVar[LineKind]
    LINE_KIND_LATE_API: _ClassVar[LineKind]

class Dimension(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIMENSION_UNSPECIFIED: _ClassVar[Dimension]
    DIMENSION_ACCOUNT: _ClassVar[Dimension]
    DIMENSION_MODEL: _ClassVar[Dimension]
    DIMENSION_DAY: _ClassVar[Dimension]
    DIMENSION_HOST: _ClassVar[Dimension]
    DIMENSION_GPU: _ClassVar[Dimension]
LINE_KIND_UNSPECIFIED: LineKind
LINE_KIND_USAGE: LineKind
LINE_KIND_API: LineKind
LINE_KIND_LATE_USAGE: LineKind
LINE_KIND_LATE_API: LineKind
DIMENSION_UNSPECIFIED: Dimension
DIMENSION_ACCOUNT: Dimension
DIMENSION_MODEL: Dimension
DIMENSION_DAY: Dimension
DIMENSION_HOST: Dimension
DIMENSION_GPU: Dimension

class GetBalanceRequest(_message.Message):
    __slots__ = ("account", "at_unix_us")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    account: str
    at_unix_us: int
    def __init__(self, account: _Optional[str] = ..., at_unix_us: _Optional[int] = ...) -> None: ...

class BalanceLine(_message.Message):
    __slots__ = ("kind", "model", "quantity", "credits_micro", "default_price")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    CREDITS_MICRO_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRICE_FIELD_NUMBER: _ClassVar[int]
    kind: LineKind
    model: str
    quantity: int
    credits_micro: int
    default_price: bool
    def __init__(self, kind: _Optional[_Union[LineKind, str]] = ..., model: _Optional[str] = ..., quantity: _Optional[int] = ..., credits_micro: _Optional[int] = ..., default_price: _Optional[bool] = ...) -> None: ...

class Balance(_message.Message):
    __slots__ = ("account", "plan", "period_start_unix_us", "period_end_unix_us", "period_closed", "plan_grant_micro", "lot_credits_micro", "adjustments_micro", "charged_micro", "used_micro", "remaining_micro", "lines")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    PERIOD_CLOSED_FIELD_NUMBER: _ClassVar[int]
    PLAN_GRANT_MICRO_FIELD_NUMBER: _ClassVar[int]
    LOT_CREDITS_MICRO_FIELD_NUMBER: _ClassVar[int]
    ADJUSTMENTS_MICRO_FIELD_NUMBER: _ClassVar[int]
    CHARGED_MICRO_FIELD_NUMBER: _ClassVar[int]
    USED_MICRO_FIELD_NUMBER: _ClassVar[int]
    REMAINING_MICRO_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    account: str
    plan: str
    period_start_unix_us: int
    period_end_unix_us: int
    period_closed: bool
    plan_grant_micro: int
    lot_credits_micro: int
    adjustments_micro: int
    charged_micro: int
    used_micro: int
    remaining_micro: int
    lines: _containers.RepeatedCompositeFieldContainer[BalanceLine]
    def __init__(self, account: _Optional[str] = ..., plan: _Optional[str] = ..., period_start_unix_us: _Optional[int] = ..., period_end_unix_us: _Optional[int] = ..., period_closed: _Optional[bool] = ..., plan_grant_micro: _Optional[int] = ..., lot_credits_micro: _Optional[int] = ..., adjustments_micro: _Optional[int] = ..., charged_micro: _Optional[int] = ..., used_micro: _Optional[int] = ..., remaining_micro: _Optional[int] = ..., lines: _Optional[_Iterable[_Union[BalanceLine, _Mapping]]] = ...) -> None: ...

class CheckCreditsRequest(_message.Message):
    __slots__ = ("account", "required_micro")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_MICRO_FIELD_NUMBER: _ClassVar[int]
    account: str
    required_micro: int
    def __init__(self, account: _Optional[str] = ..., required_micro: _Optional[int] = ...) -> None: ...

class CheckCreditsResponse(_message.Message):
    __slots__ = ("remaining_micro", "sufficient")
    REMAINING_MICRO_FIELD_NUMBER: _ClassVar[int]
    SUFFICIENT_FIELD_NUMBER: _ClassVar[int]
    remaining_micro: int
    sufficient: bool
    def __init__(self, remaining_micro: _Optional[int] = ..., sufficient: _Optional[bool] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("from_unix_us", "to_unix_us", "group_by", "account")
    FROM_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    TO_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    from_unix_us: int
    to_unix_us: int
    group_by: _containers.RepeatedScalarFieldContainer[Dimension]
    account: str
    def __init__(self, from_unix_us: _Optional[int] = ..., to_unix_us: _Optional[int] = ..., group_by: _Optional[_Iterable[_Union[Dimension, str]]] = ..., account: _Optional[str] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("account", "model", "day", "host", "gpu", "busy_us", "requests", "credits_micro", "records", "default_price")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DAY_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    BUSY_US_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CREDITS_MICRO_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRICE_FIELD_NUMBER: _ClassVar[int]
    account: str
    model: str
    day: str
    host: str
    gpu: str
    busy_us: int
    requests: int
    credits_micro: int
    records: int
    default_price: bool
    def __init__(self, account: _Optional[str] = ..., model: _Optional[str] = ..., day: _Optional[str] = ..., host: _Optional[str] = ..., gpu: _Optional[str] = ..., busy_us: _Optional[int] = ..., requests: _Optional[int] = ..., credits_micro: _Optional[int] = ..., records: _Optional[int] = ..., default_price: _Optional[bool] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("rows", "busy_us", "requests", "credits_micro")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BUSY_US_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CREDITS_MICRO_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    busy_us: int
    requests: int
    credits_micro: int
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., busy_us: _Optional[int] = ..., requests: _Optional[int] = ..., credits_micro: _Optional[int] = ...) -> None: ...
