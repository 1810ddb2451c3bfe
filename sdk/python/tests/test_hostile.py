"""Hostile peers: malformed frames, oversized length prefixes, silent and dead peers. The
SDK raises a clear exception within a bound every time; it never hangs."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Awaitable, Callable

import msgpack
import pytest

import agent_shim
from agent_shim import (
    AuthenticationError,
    Client,
    ConnectionClosed,
    ProtocolError,
    ShimTimeout,
)
from helpers import run

HELLO = {"type": "hello", "protocol": "agent-shim", "versions": [1], "role": "shim",
         "software": "fake-shim", "software_version": "0"}


def frame(msg: object) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def fake_shim(tmp_path, behaviour: Behaviour) -> tuple[str, asyncio.AbstractServer]:
    path = str(tmp_path / "fake.sock")

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await behaviour(r, w)
        except (ConnectionError, OSError):
            pass

    server = await asyncio.start_unix_server(handle, path)
    return f"unix:{path}", server


async def expect_fast(coro: Awaitable[object], exc: type[BaseException], within: float) -> BaseException:
    start = time.monotonic()
    with pytest.raises(exc) as e:
        await coro
    took = time.monotonic() - start
    assert took < within, f"took {took:.2f} s"
    return e.value


# --- the control client ----------------------------------------------------------------------


@pytest.mark.parametrize("reply, code", [
    (b"\xff\xff\xff\xff" + b"\xde\xad\xbe\xef" * 3, "frame_too_large"),
    (struct.pack(">I", 3) + b"\x93\x01\x02", "malformed"),  # not a map
    (struct.pack(">I", 0), "malformed"),  # empty
    (frame({"type": 5}), "malformed"),
    (frame({"type": "hello", "protocol": "agent-shim"}), "malformed"),  # fields missing
    (frame(dict(HELLO, protocol="other")), "malformed"),
    (frame(dict(HELLO, role="driver")), "invalid"),
    (frame(dict(HELLO, versions=[7])), "unsupported_version"),
    (frame({"type": "ping", "id": 1}), "invalid_state"),
])
def test_control_handshake_with_a_bad_shim_raises_protocol_error(tmp_path, reply, code):
    async def behaviour(r, w):
        w.write(reply)
        await w.drain()
        await asyncio.sleep(30)

    async def go():
        addr, server = await fake_shim(tmp_path, behaviour)
        async with server:
            e = await expect_fast(Client.connect(addr, connect_timeout=5), ProtocolError, 5)
            assert e.code == code, e

    run(go())


def test_control_a_silent_peer_times_out(tmp_path):
    async def behaviour(r, w):
        await asyncio.sleep(60)  # accepts, never answers

    async def go():
        addr, server = await fake_shim(tmp_path, behaviour)
        async with server:
            await expect_fast(Client.connect(addr, connect_timeout=1), ShimTimeout, 4)

    run(go())


def test_control_a_peer_that_closes_at_once_or_mid_frame(tmp_path):
    async def closes(r, w):
        w.close()

    async def mid_frame(r, w):
        w.write(frame(HELLO)[:10])
        await w.drain()
        w.close()

    async def go():
        for behaviour in (closes, mid_frame):
            addr, server = await fake_shim(tmp_path, behaviour)
            async with server:
                await expect_fast(Client.connect(addr, connect_timeout=1), (ShimTimeout, ProtocolError), 4)

    run(go())


def test_control_a_shim_whose_proof_is_wrong_is_refused(tmp_path):
    async def behaviour(r, w):
        w.write(frame(dict(HELLO, nonce=b"\x01" * 32)))
        w.write(frame({"type": "auth", "mac": b"\x00" * 32}))
        await w.drain()
        await asyncio.sleep(30)

    async def go():
        addr, server = await fake_shim(tmp_path, behaviour)
        async with server:
            e = await expect_fast(Client.connect(addr, token=b"t", connect_timeout=5), AuthenticationError, 5)
            assert "proof" in str(e)

    run(go())


@pytest.mark.parametrize("garbage", [
    b"\xff\xff\xff\xff",
    struct.pack(">I", 4) + b"\xc1\xc1\xc1\xc1",  # never-used msgpack byte
    frame({"type": "event", "seq": "one", "event": {"type": "log"}}),
    frame({"type": "event", "seq": 1, "event": {"no": "type"}}),
    frame({"type": "status_reply", "re": 1}),
])
def test_control_garbage_after_the_handshake_ends_every_wait(tmp_path, garbage):
    async def behaviour(r, w):
        w.write(frame(HELLO))
        await w.drain()
        await r.readexactly(4)  # the client's hello
        await asyncio.sleep(0.3)
        w.write(garbage)
        await w.drain()
        await asyncio.sleep(30)

    async def go():
        addr, server = await fake_shim(tmp_path, behaviour)
        async with server:
            c = await Client.connect(addr, reconnect=False, connect_timeout=5)
            stream = c.events()
            await expect_fast(c.status(), ConnectionClosed, 5)
            await expect_fast(stream.next(), ConnectionClosed, 5)
            await c.close()

    run(go())


def test_control_a_peer_that_goes_silent_is_probed_and_dropped(tmp_path):
    async def behaviour(r, w):
        w.write(frame(HELLO))
        await w.drain()
        await asyncio.sleep(60)  # reads nothing, answers nothing (a frozen or cut peer)

    async def go():
        addr, server = await fake_shim(tmp_path, behaviour)
        async with server:
            c = await Client.connect(addr, reconnect=False, keepalive=0.3, request_timeout=0.5)
            stream = c.events()
            await expect_fast(stream.next(), ConnectionClosed, 5)
            await c.close()

    run(go())


# --- the driver SDK ---------------------------------------------------------------------------


class Quiet(agent_shim.Driver):
    handshake_timeout = 1.0

    async def on_task(self, task, ctx):
        return None


def serve_against(peer: Callable[[socket.socket], None], driver: agent_shim.Driver | None = None) -> object:
    """Runs a driver against a fake shim on a socketpair; returns run()'s result or error."""
    ours, theirs = socket.socketpair()
    import threading

    t = threading.Thread(target=peer, args=(theirs,), daemon=True)
    t.start()
    try:
        return run((driver or Quiet()).serve(ours), bound=10)
    finally:
        t.join(10)
        theirs.close()


def read_frames(sock: socket.socket, n: int) -> list[dict]:
    sock.settimeout(5)
    out = []
    buf = b""
    while len(out) < n:
        while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            buf += chunk
        (length,) = struct.unpack(">I", buf[:4])
        out.append(msgpack.unpackb(buf[4:4 + length], raw=False))
        buf = buf[4 + length:]
    return out


@pytest.mark.parametrize("garbage, code", [
    (b"\xff\xff\xff\xff\xde\xad", "frame_too_large"),
    (struct.pack(">I", 2) + b"\x91\x01", "malformed"),
    (frame({"type": "task", "task_id": 7, "input": 1}), "malformed"),
])
def test_driver_a_bad_frame_is_answered_and_raised(garbage, code):
    got: list[dict] = []

    def peer(sock):
        sock.sendall(frame(HELLO))
        got.extend(read_frames(sock, 2))  # hello, ready
        sock.sendall(garbage)
        got.extend(read_frames(sock, 1))  # the error

    start = time.monotonic()
    with pytest.raises(ProtocolError) as e:
        serve_against(peer)
    assert e.value.code == code
    assert time.monotonic() - start < 5
    assert [m["type"] for m in got] == ["hello", "ready", "error"] and got[2]["code"] == code


def test_driver_a_shim_that_never_says_hello_times_out():
    def peer(sock):
        sock.settimeout(5)
        while sock.recv(4096):  # reads the driver's hello, says nothing, until it hangs up
            pass

    start = time.monotonic()
    with pytest.raises(ShimTimeout):
        serve_against(peer)
    assert time.monotonic() - start < 3


def test_driver_a_dead_shim_ends_the_driver_even_mid_task():
    class Slow(agent_shim.Driver):
        async def on_task(self, task, ctx):
            await asyncio.sleep(60)

    def peer(sock):
        sock.sendall(frame(HELLO))
        read_frames(sock, 2)
        sock.sendall(frame({"type": "task", "task_id": "t", "input": None}))
        time.sleep(0.2)
        sock.close()  # the shim dies

    start = time.monotonic()
    assert serve_against(peer, Slow()) == "closed"
    assert time.monotonic() - start < 5


def test_driver_a_shim_that_stops_mid_frame_is_malformed():
    def peer(sock):
        sock.sendall(frame(HELLO))
        read_frames(sock, 2)
        sock.sendall(struct.pack(">I", 100) + b"\x81")
        sock.shutdown(socket.SHUT_WR)
        time.sleep(0.5)

    with pytest.raises(ProtocolError) as e:
        serve_against(peer)
    assert e.value.code == "malformed"


def test_driver_without_agent_shim_fd_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("AGENT_SHIM_FD", raising=False)
    with pytest.raises(ValueError, match="AGENT_SHIM_FD is not set"):
        Quiet().run()
    monkeypatch.setenv("AGENT_SHIM_FD", "999")
    with pytest.raises(ValueError, match="not an open socket"):
        Quiet().run()
