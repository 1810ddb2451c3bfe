"""Framing and message checks (docs/PROTOCOL.md §2-§4): a u32 big-endian length, then one
MessagePack map with a string ``type``; every field of a known type checked."""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import msgpack

from .errors import ConnectionClosed, ProtocolError

PROTOCOL = "agent-shim"
VERSIONS = [1]
MAX_FRAME = 16 * 1024 * 1024
HANDSHAKE_MAX_FRAME = 16 * 1024
MAX_DEPTH = 64
HEADER = struct.Struct(">I")

Message = Dict[str, Any]
Check = Callable[[Any], bool]


def _uint(bits: int) -> Check:
    # `type(v) is int` rejects bool (a subclass of int) and floats.
    return lambda v: type(v) is int and 0 <= v < (1 << bits)


def _int32(v: Any) -> bool:
    return type(v) is int and -(1 << 31) <= v < (1 << 31)


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _bin(v: Any) -> bool:
    return isinstance(v, bytes)


def _map(v: Any) -> bool:
    return isinstance(v, dict)


def _any(_v: Any) -> bool:
    return True


def _list_of(check: Check) -> Check:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _one_of(*names: str) -> Check:
    return lambda v: v in names


U16, U32, U64 = _uint(16), _uint(32), _uint(64)
REQ, OPT = True, False
Schema = Mapping[str, Mapping[str, Tuple[Check, bool]]]

_HELLO = {
    "protocol": (_str, REQ),
    "versions": (_list_of(U32), REQ),
    "role": (_str, REQ),
    "software": (_str, REQ),
    "software_version": (_str, REQ),
    "capabilities": (_list_of(_str), OPT),
    "agent_id": (_str, OPT),
    "nonce": (_bin, OPT),
    "limits": (_map, OPT),
    "cgroups": (_str, OPT),
    "instance": (U64, OPT),
}
_ERROR = {
    "re": (U64, OPT),
    "code": (_str, REQ),
    "message": (_str, REQ),
    "task_id": (_str, OPT),
    "first_available": (U64, OPT),
}
_EXEC_STARTED = {"re": (U64, REQ), "exec_id": (U64, REQ), "pid": (U32, REQ)}

#: What a shim may send a driver (PROTOCOL.md §9.1, §9.3).
SHIM_TO_DRIVER: Schema = {
    "hello": _HELLO,
    "ok": {"re": (U64, REQ)},
    "error": _ERROR,
    "ping": {"id": (U64, REQ)},
    "pong": {"re": (U64, REQ)},
    "task": {
        "task_id": (_str, REQ),
        "input": (_any, REQ),
        "output_schema": (_any, OPT),
        "timeout_ms": (U64, OPT),
        "attempt": (U32, OPT),
    },
    "cancel": {"id": (U64, REQ), "task_id": (_str, REQ), "grace_ms": (U64, OPT)},
    "pause": {"id": (U64, REQ), "timeout_ms": (U64, OPT)},
    "resume": {"id": (U64, REQ), "slept_ms": (U64, OPT)},
    "shutdown": {"id": (U64, REQ), "grace_ms": (U64, OPT), "reason": (_str, OPT)},
    "exec_started": _EXEC_STARTED,
    "exec_output": {
        "exec_id": (U64, REQ),
        "stream": (_one_of("stdout", "stderr", "pty"), REQ),
        "data": (_bin, REQ),
    },
    "exec_exit": {
        "exec_id": (U64, REQ),
        "code": (_int32, OPT),
        "signal": (_str, OPT),
        "timed_out": (_bool, OPT),
        "truncated": (_bool, OPT),
        "duration_ms": (U64, REQ),
        "oom_killed": (_bool, OPT),
    },
}

#: What a shim may send a control plane (PROTOCOL.md §9.1, §9.5, and `lagged`).
SHIM_TO_CONTROL: Schema = {
    "hello": _HELLO,
    "auth": {"mac": (_bin, REQ)},
    "ok": {"re": (U64, REQ)},
    "error": _ERROR,
    "pong": {"re": (U64, REQ)},
    "exec_started": _EXEC_STARTED,
    "status_reply": {
        "re": (U64, REQ),
        "state": (_str, REQ),
        "driver_pid": (U32, OPT),
        "restarts": (U32, REQ),
        "uptime_ms": (U64, REQ),
        "last_exit": (_map, OPT),
        "children": (U32, REQ),
        "reaped": (U64, REQ),
        "tasks_queued": (U32, REQ),
        "task_running": (_str, OPT),
        "execs_running": (U32, REQ),
        "buffered_events": (U64, REQ),
        "buffered_bytes": (U64, REQ),
        "last_seq": (U64, REQ),
        "rss_bytes": (U64, REQ),
        "idle_since_ms": (U64, OPT),
        "cgroups": (_str, OPT),
    },
    "event": {"seq": (U64, REQ), "event": (_map, REQ)},
    "lagged": {"missed": (U64, REQ), "next_seq": (U64, REQ)},
    # exec registry (PROTOCOL.md §8.10, §9.9)
    "exec_list": {"re": (U64, REQ), "execs": (_list_of(_map), REQ)},
    "exec_attached": {
        "re": (U64, REQ),
        "exec_id": (U64, REQ),
        "from_offset": (U64, REQ),
        "first_offset": (U64, REQ),
        "end_offset": (U64, REQ),
        "running": (_bool, REQ),
    },
    "attach_output": {
        "exec_id": (U64, REQ),
        "stream": (_one_of("stdout", "stderr", "pty"), REQ),
        "offset": (U64, REQ),
        "data": (_bin, REQ),
    },
    "attach_lagged": {"exec_id": (U64, REQ), "missed": (U64, REQ), "next_offset": (U64, REQ)},
    "attach_exit": SHIM_TO_DRIVER["exec_exit"],
    # files (PROTOCOL.md §8.11, §9.10); an entry's own fields are checked where it is read
    "fs_stat_reply": {"re": (U64, REQ), "entry": (_map, REQ)},
    "fs_list_reply": {"re": (U64, REQ), "entries": (_list_of(_map), REQ), "more": (_bool, OPT)},
    "fs_data": {"re": (U64, REQ), "offset": (U64, REQ), "data": (_bin, OPT), "eof": (_bool, OPT)},
    "fs_write_ready": {"re": (U64, REQ), "handle": (U64, REQ), "offset": (U64, REQ)},
}


def _too_deep(value: Any) -> bool:
    """Whether arrays/maps nest deeper than MAX_DEPTH; the body's own map is level 1."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > MAX_DEPTH:
                return True
            children = item if isinstance(item, list) else [*item.keys(), *item.values()]
            stack.extend((child, depth + 1) for child in children)
    return False


def decode_body(body: bytes, schema: Schema) -> Message:
    """Decodes and checks one frame body; returns the message or raises ProtocolError."""
    try:
        # raw=False: str -> str (invalid UTF-8 raises); bin -> bytes. strict_map_key=False:
        # maps nested in `any` fields may have other keys. Trailing bytes raise ExtraData.
        msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except msgpack.ExtraData as e:
        unpacked = e.unpacked if isinstance(e.unpacked, dict) else {}
        re = unpacked.get("id") if U64(unpacked.get("id")) else None
        raise ProtocolError("malformed", "bytes after the end of the message map", re) from None
    except Exception as e:  # anything else the decoder rejects
        raise ProtocolError("malformed", f"not one MessagePack value: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("malformed", "the body is not a map")
    if not all(isinstance(key, str) for key in msg):
        raise ProtocolError("malformed", "a key of the body is not a string")
    request_id = msg.get("id") if U64(msg.get("id")) else None
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("malformed", "no string `type`", request_id)
    if _too_deep(msg):
        raise ProtocolError("malformed", f"nested deeper than {MAX_DEPTH} levels", request_id)
    for name, (check, required) in schema.get(kind, {}).items():
        # nil stands for "absent", except in a field of type `any`, where it is a value.
        present = name in msg and (msg[name] is not None or check is _any)
        if not present:
            if required:
                raise ProtocolError("malformed", f"{kind}: missing field `{name}`", request_id)
            msg.pop(name, None)
        elif not check(msg[name]):
            raise ProtocolError("malformed", f"{kind}: bad field `{name}`", request_id)
    if kind == "event" and not isinstance(msg["event"].get("type"), str):
        raise ProtocolError("malformed", "event: the event has no string `type`")
    return msg


def encode(msg: Mapping[str, Any], max_frame: int = MAX_FRAME) -> bytes:
    """One whole frame (header included). Raises ValueError over the peer's limit."""
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > max_frame:
        raise ValueError(
            f"a {msg.get('type')} of {len(body)} bytes is over the frame limit ({max_frame})"
        )
    out: bytes = HEADER.pack(len(body)) + body
    return out


async def read_frame(
    reader: asyncio.StreamReader, schema: Schema, max_frame: int
) -> Optional[Tuple[Message, int]]:
    """Reads one message and its body size; None at end of stream between frames.

    Raises ProtocolError for a bad frame (length checked before the body is read) and
    ConnectionClosed when the stream fails.
    """
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ProtocolError("malformed", "the stream ended inside a frame header") from None
    except (ConnectionError, OSError) as e:
        raise ConnectionClosed(f"cannot read: {e}") from None
    (length,) = HEADER.unpack(header)
    if length > max_frame:
        raise ProtocolError("frame_too_large", f"a frame of {length} bytes (limit {max_frame})")
    if length == 0:
        raise ProtocolError("malformed", "an empty frame")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("malformed", "the stream ended inside a frame") from None
    except (ConnectionError, OSError) as e:
        raise ConnectionClosed(f"cannot read: {e}") from None
    return decode_body(body, schema), length


def error_frame(code: str, message: str, re: Optional[int] = None) -> bytes:
    msg: Message = {"type": "error", "code": code, "message": message}
    if re is not None:
        msg["re"] = re
    return encode(msg)


def check_hello(hello: Message, role: str) -> int:
    """Checks the peer's hello (§5); returns the negotiated version or raises ProtocolError."""
    if hello["type"] == "error":
        raise ProtocolError(
            str(hello.get("code")), f"the shim refused us: {hello.get('message')}"
        )
    if hello["type"] != "hello":
        raise ProtocolError("invalid_state", f"expected hello, got {hello['type']}")
    if hello["protocol"] != PROTOCOL:
        raise ProtocolError("malformed", f"protocol {hello['protocol']!r} is not {PROTOCOL!r}")
    if hello["role"] != role:
        raise ProtocolError("invalid", f"expected a {role!r}, not a {hello['role']!r}")
    common: set[int] = set(hello["versions"]) & set(VERSIONS)
    if not common:
        raise ProtocolError(
            "unsupported_version", f"the peer speaks {hello['versions']}, we speak {VERSIONS}"
        )
    return max(common)


def limit(hello: Message, name: str, default: int) -> int:
    """An advertised limit from the shim's hello (`limits` map), else the default."""
    limits = hello.get("limits")
    value = limits.get(name) if isinstance(limits, dict) else None
    return int(value) if type(value) is int and value > 0 else default
