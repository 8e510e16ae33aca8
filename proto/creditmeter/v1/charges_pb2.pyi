from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApiCharge(_message.Message):
    __slots__ = ("request_id", "account", "model", "count", "time_unix_us")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_US_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    account: str
    model: str
    count: int
    time_unix_us: int
    def __init__(self, request_id: _Optional[str] = ..., account: _Optional[str] = ..., model: _Optional[str] = ..., count: _Optional[int] = ..., time_unix_us: _Optional[int] = ...) -> None: ...

class RecordChargeRequest(_message.Message):
    __slots__ = ("charge",)
    CHARGE_FIELD_NUMBER: _ClassVar[int]
    charge: ApiCharge
    def __init__(self, charge: _Optional[_Union[ApiCharge, _Mapping]] = ...) -> None: ...

class RecordChargeResponse(_message.Message):
    __slots__ = ("credits_micro", "default_price")
    CREDITS_MICRO_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRICE_FIELD_NUMBER: _ClassVar[int]
    credits_micro: int
    default_price: bool
    def __init__(self, credits_micro: _Optional[int] = ..., default_price: _Optional[bool] = ...) -> None: ...
