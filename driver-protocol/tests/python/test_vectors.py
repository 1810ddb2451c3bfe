"""Cross-check the golden vectors with an independent MessagePack implementation.

Every file in ``driver-protocol/tests/vectors/`` is decoded here with the ``msgpack`` package
from PyPI (not with the Rust crate that wrote it):

* valid vectors: the length prefix equals the body length, ``unpackb(body)`` equals the
  file's ``value`` (``{"$bin": "<hex>"}`` stands for ``bin``), ``packb(value)`` gives the body
  back byte for byte (so the key order and the integer widths are the canonical ones), and the
  ``type`` is the file's;
* invalid vectors: Python rejects or flags them the way the file says a receiver must.

Run: ``python -m pytest -q driver-protocol/tests/python`` in a venv with ``msgpack`` and
``pytest`` installed (``.ci/run`` does this).
"""

import hashlib
import hmac
import json
import pathlib

import msgpack
import pytest

VECTORS = pathlib.Path(__file__).resolve().parent.parent / "vectors"
DIRECTIONS = ["driver_to_shim", "shim_to_driver", "control_to_shim", "shim_to_control", "event"]
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
MAX_DEPTH = 64


def from_json(value):
    """The file's JSON with ``{"$bin": hex}`` turned into ``bytes``."""
    if isinstance(value, dict):
        if list(value) == ["$bin"]:
            return bytes.fromhex(value["$bin"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def split_frame(frame):
    """(announced length, body) of a frame."""
    assert len(frame) >= 4, "frame shorter than its 4-byte header"
    return int.from_bytes(frame[:4], "big"), frame[4:]


def depth(value):
    """Nesting depth of arrays and maps; a scalar is 0, the message's own map is 1."""
    if isinstance(value, dict):
        return 1 + max((max(depth(k), depth(v)) for k, v in value.items()), default=0)
    if isinstance(value, (list, tuple)):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def known_types(direction):
    # `<type>.json`, and `<type>.<variant>.json` for more samples of a type.
    return {p.stem.split(".")[0] for p in (VECTORS / direction).glob("*.json")}


VALID = sorted(p for d in DIRECTIONS for p in (VECTORS / d).glob("*.json"))
INVALID = sorted((VECTORS / "invalid").glob("*.json"))


def test_there_are_vectors():
    assert len(VALID) >= 70 and len(INVALID) >= 6
    for d in DIRECTIONS:
        assert "hello" in known_types(d) or d == "event"


@pytest.mark.parametrize("path", VALID, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_valid_vector(path):
    vec = load(path)
    assert vec["direction"] == path.parent.name
    # `<type>.json`, or `<type>.<variant>.json` for another sample of the type.
    assert vec["type"] == path.stem.split(".")[0]
    frame = bytes.fromhex(vec["frame"])
    length, body = split_frame(frame)
    assert length == len(body)
    assert 0 < length <= DEFAULT_MAX_FRAME

    expected = from_json(vec["value"])
    decoded = msgpack.unpackb(body, raw=False, strict_map_key=True)
    assert decoded == expected
    assert isinstance(decoded, dict)
    assert decoded["type"] == vec["type"]
    assert depth(decoded) <= MAX_DEPTH
    # Our encoder's output is the canonical one: same key order, smallest integer widths.
    assert msgpack.packb(expected, use_bin_type=True) == body

    if vec["type"] == "event" and vec["direction"] == "shim_to_control":
        inner = decoded["event"]
        assert inner["type"] in known_types("event")
        assert isinstance(decoded["seq"], int) and decoded["seq"] >= 1


def test_auth_worked_example():
    """The auth vectors are the spec's worked example: token b"secret"."""
    token = b"secret"
    shim_nonce = from_json(load(VECTORS / "shim_to_control/hello.json")["value"])["nonce"]
    control_nonce = from_json(load(VECTORS / "control_to_shim/hello.json")["value"])["nonce"]
    assert shim_nonce == b"\x01" * 32 and control_nonce == b"\x02" * 32

    def proof(role, peer_nonce, own_nonce):
        msg = b"agent-shim-auth-v1\0" + role + b"\0" + peer_nonce + own_nonce
        return hmac.new(token, msg, hashlib.sha256).digest()

    control_mac = from_json(load(VECTORS / "control_to_shim/auth.json")["value"])["mac"]
    shim_mac = from_json(load(VECTORS / "shim_to_control/auth.json")["value"])["mac"]
    assert control_mac == proof(b"control", shim_nonce, control_nonce)
    assert shim_mac == proof(b"shim", control_nonce, shim_nonce)


def reject_reason(frame, direction):
    """What a receiver written in Python concludes about a frame: "ok", "unknown" or a code.

    A minimal receiver: header checked before the body is read, exactly one map value with a
    string ``type``, no nesting deeper than MAX_DEPTH; the message's fields are checked only
    for the vectors that name one (``field``).
    """
    length, rest = split_frame(frame)
    if length > DEFAULT_MAX_FRAME:
        return "frame_too_large"
    body = rest[:length]
    assert len(body) == length, "vector frame is truncated"
    if length == 0:
        return "malformed"
    try:
        msg = msgpack.unpackb(body, raw=False)  # raises ExtraData on trailing bytes
    except (msgpack.ExtraData, ValueError, msgpack.UnpackException):
        return "malformed"
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        return "malformed"
    if depth(msg) > MAX_DEPTH:
        return "malformed"
    if msg["type"] not in known_types(direction):
        return "unknown"
    return "ok"


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_vector(path):
    vec = load(path)
    frame = bytes.fromhex(vec["frame"])
    verdict = reject_reason(frame, vec["direction"])
    if "field" in vec:
        # Well-formed MessagePack with a type valid in this direction, but the named field is
        # missing or not the unsigned integer / enum string the message needs: the receiver's
        # schema (not MessagePack) rejects it.
        assert verdict == "ok"
        msg = msgpack.unpackb(frame[4:], raw=False)
        assert vec["field"] not in msg or not isinstance(msg[vec["field"]], int)
        verdict = vec["error"]
    assert verdict == vec["error"]
    if vec["error"] == "unknown":
        msg = msgpack.unpackb(frame[4:], raw=False)
        assert msg["type"] == vec["type"]
        assert msg.get("id") == vec["id"]
