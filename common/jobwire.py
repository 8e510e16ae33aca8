"""The job API's wire: length-prefixed frames on a Unix stream socket.

The agent must know which process is calling (SO_PEERCRED), and grpcio exposes no peer
credentials on a Unix socket: its auth context stays empty and LocalServerCredentials(UDS)
never reads SO_PEERCRED (grpc/grpc#15511, grpc/grpc#28755). So the job API speaks this
small protocol, carrying the same protobuf messages (creditmeter.v1.jobs) and status names
as gRPC would:

    request:  u32 length | u8 method | StartJobRequest or EndJobRequest bytes
    response: u32 length | u8 status | u16 details length | details (UTF-8) | response bytes

Lengths are big-endian and count what follows them; a frame is at most ``MAX_FRAME_BYTES``.
One connection carries any number of requests, one at a time, each answered in order.
Status values are gRPC's code numbers (0 OK, 5 NOT_FOUND, 7 PERMISSION_DENIED, ...).

This module imports nothing but the standard library: the worker's client uses it too.
"""

from __future__ import annotations

import socket
import struct
import time

MAX_FRAME_BYTES = 16 * 1024  # a job request is < 1 KiB: anything larger is garbage
START_JOB, END_JOB = 1, 2
METHODS = {START_JOB: "StartJob", END_JOB: "EndJob"}

# gRPC's status codes by number (grpc/doc/statuscodes.md), the ones the job API answers.
STATUS_NAMES = {
    0: "OK",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    13: "INTERNAL",
    14: "UNAVAILABLE",
}
STATUS_CODES = {name: code for code, name in STATUS_NAMES.items()}

_LENGTH = struct.Struct(">I")
_HEAD = struct.Struct(">BH")


class FrameError(Exception):
    """The peer broke the protocol (a frame too long or cut short) or went away: the
    connection cannot be used again."""


class Closed(FrameError):
    """The peer closed the connection between two frames (the normal end)."""


def request_frame(method: int, payload: bytes) -> bytes:
    return _LENGTH.pack(1 + len(payload)) + bytes([method]) + payload


def response_frame(status: str, details: str, payload: bytes) -> bytes:
    text = details.encode("utf-8", "replace")[:1024]
    body = _HEAD.pack(STATUS_CODES[status], len(text)) + text + payload
    return _LENGTH.pack(len(body)) + body


def parse_request(body: bytes) -> tuple[int, bytes]:
    """(method, payload) of a request body; raises FrameError for an empty one."""
    if not body:
        raise FrameError("an empty request frame")
    return body[0], body[1:]


def parse_response(body: bytes) -> tuple[str, str, bytes]:
    """(status name, details, payload) of a response body; raises FrameError."""
    if len(body) < _HEAD.size:
        raise FrameError("a response frame shorter than its header")
    code, size = _HEAD.unpack_from(body)
    end = _HEAD.size + size
    if end > len(body) or code not in STATUS_NAMES:
        raise FrameError(f"a malformed response frame (status {code}, details {size} bytes)")
    return STATUS_NAMES[code], body[_HEAD.size : end].decode("utf-8", "replace"), body[end:]


def read_frame(sock: socket.socket, idle_s: float | None, frame_s: float) -> bytes:
    """One frame's body. Waits up to ``idle_s`` for it to begin (None: for ever), then
    ``frame_s`` for the rest, so that a peer that trickles bytes cannot hold a thread.
    Raises Closed when the peer closed before a frame, FrameError for anything else, and
    TimeoutError when no frame began in ``idle_s``."""
    sock.settimeout(idle_s)
    first = sock.recv(_LENGTH.size)
    if not first:
        raise Closed("the peer closed the connection")
    deadline = time.monotonic() + frame_s
    head = first + _read_exactly(sock, _LENGTH.size - len(first), deadline)
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"a frame of {length} bytes, more than {MAX_FRAME_BYTES}")
    return _read_exactly(sock, length, deadline)


def _read_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    parts: list[bytes] = []
    while size:
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            raise FrameError("a frame arrived too slowly")
        sock.settimeout(left_s)
        try:
            chunk = sock.recv(min(size, 65536))
        except TimeoutError:
            raise FrameError("a frame arrived too slowly") from None
        if not chunk:
            raise FrameError("the peer closed the connection inside a frame")
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)
