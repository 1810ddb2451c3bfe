"""The control client against the real shim: transports, the HMAC handshake, typed
commands, events acknowledged and resumed exactly once, reconnects, exec."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from agent_shim import (
    AuthenticationError,
    Client,
    RemoteError,
    ShimTimeout,
    read_token,
    token_from_env,
)
from agent_shim.control import parse_address
from agent_shim.sync import SyncClient
from conftest import echo_driver_cmd, free_port, skip_or_fail
from helpers import connect, run, until_done, until_type


def test_token_files_lose_their_trailing_newlines(tmp_path, monkeypatch):
    path = tmp_path / "t"
    path.write_bytes(b"abc\r\n")
    assert read_token(path) == b"abc"
    path.write_bytes(b"a\nb\n\n")
    assert read_token(path) == b"a\nb"
    path.write_bytes(b"\n")
    with pytest.raises(ValueError, match="empty token"):
        read_token(path)
    monkeypatch.setenv("AGENT_SHIM_TOKEN", "xyz\n")
    assert token_from_env() == b"xyz"
    monkeypatch.delenv("AGENT_SHIM_TOKEN")
    assert token_from_env() is None


def test_addresses_parse_and_tcp_needs_a_token():
    assert parse_address("unix:/a/b") == ("unix", "/a/b")
    assert parse_address("tcp:127.0.0.1:7000") == ("tcp", ("127.0.0.1", 7000))
    assert parse_address("tcp:[::1]:7000") == ("tcp", ("::1", 7000))
    assert parse_address("vsock:3:1024") == ("vsock", (3, 1024))
    for bad in ["", "unix:", "tcp:host", "tcp:h:99999", "vsock:x:1", "http://x"]:
        with pytest.raises(ValueError):
            parse_address(bad)
    with pytest.raises(ValueError, match="need a token"):
        Client("tcp:127.0.0.1:1")
    with pytest.raises(ValueError, match="consumer"):
        Client("unix:/x", consumer="bad name!")


def test_typed_commands_over_unix(shim_factory):
    shim = shim_factory(echo_driver_cmd())

    async def go():
        async with await connect(shim) as c:
            assert c.agent_id
            assert await c.ping() < 5
            stream = c.events()
            await until_type(stream, "driver_ready")
            status = await c.status()
            assert status.state == "ready" and status.driver_pid and status.raw["re"]
            await c.submit_task("t1", {"text": "x", "delay_ms": 5000})
            await c.submit_task("t1", {"text": "x", "delay_ms": 5000})  # idempotent by task_id
            await until_type(stream, "task_accepted", task_id="t1")
            await c.cancel_task("t1")
            _, done = await until_done(stream, "t1")
            assert done.get("status") == "cancelled"
            with pytest.raises(RemoteError) as e:
                await c.cancel_task("never-submitted")
            assert e.value.code == "not_found"
            with pytest.raises(RemoteError) as e:
                await c.resume()
            assert e.value.code == "invalid_state"
            # With a time: refused the same way, before the clock is touched (this host's).
            with pytest.raises(RemoteError) as e:
                await c.resume(unix_ms=1_735_689_600_000)
            assert e.value.code == "invalid_state"
            await c.pause()
            await until_type(stream, "paused")
            await c.resume()
            await until_type(stream, "state_changed", to="ready")
            await c.signal("TERM")
            await until_type(stream, "driver_exited")
            await until_type(stream, "driver_ready")
            await c.restart_driver()
            await until_type(stream, "driver_ready")
            await c.set_driver(echo_driver_cmd(), {"ECHO_EXIT_CODE": "0"})
            await until_type(stream, "driver_ready")
            with pytest.raises(RemoteError) as e:
                await c.set_driver([])
            assert e.value.code == "invalid"

    run(go())


def test_tcp_with_the_hmac_handshake_and_wrong_tokens(shim_factory):
    port = free_port()
    shim = shim_factory(echo_driver_cmd(), listen=f"tcp:127.0.0.1:{port}")

    async def go():
        async with await connect(shim) as c:
            assert (await c.status()).state in ("starting", "ready")
        with pytest.raises(AuthenticationError):
            await Client.connect(shim.address, token=b"wrong", connect_timeout=5)
        # A client with a token refuses a shim that does not authenticate, and the other
        # way round (on unix only: tcp needs a token).

    run(go())


def test_a_client_without_a_token_is_refused_clearly(shim_factory):
    shim = shim_factory(echo_driver_cmd())

    async def go():
        with pytest.raises(AuthenticationError):
            await Client.connect(shim.address, connect_timeout=5)

    run(go())


def test_a_token_client_refuses_a_shim_without_authentication(shim_factory):
    shim = shim_factory(echo_driver_cmd(), token=None)

    async def go():
        with pytest.raises(AuthenticationError, match="downgrade"):
            await Client.connect(shim.address, token=b"t", connect_timeout=5)
        async with await Client.connect(shim.address) as c:  # insecure unix is fine
            await c.ping()

    run(go())


def test_vsock(shim_factory):
    family = getattr(socket, "AF_VSOCK", None)
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
        probe.bind((1, socket.VMADDR_PORT_ANY))
        probe.close()
    except (TypeError, OSError) as e:
        skip_or_fail("vsock", f"no vsock loopback transport (CID 1): {e}")
    port = 20000 + os.getpid() % 10000
    shim = shim_factory(echo_driver_cmd(), listen=f"vsock:1:{port}")

    async def go():
        async with await connect(shim) as c:
            await c.ping()

    run(go())


def test_events_resume_exactly_once_from_a_persisted_cursor(shim_factory):
    shim = shim_factory(echo_driver_cmd())
    seen: list[int] = []

    async def first_run() -> int:
        c = await connect(shim)
        stream = c.events(after=0)
        await c.submit_task("t1", "one two three four five")
        cursor = 0
        while True:
            ev = await stream.next(20)
            seen.append(ev.seq)
            cursor = ev.seq  # "persisted"
            if ev.type == "message_chunk" and ev.get("text") == "three":
                break
        # A crash: no goodbye, no final ack; the cursor is what survives.
        c._conn.writer.transport.abort()
        await c.close()
        return cursor

    async def second_run(cursor: int) -> None:
        async with await connect(shim) as c:
            stream = c.events(after=cursor)
            while True:
                ev = await stream.next(20)
                seen.append(ev.seq)
                if ev.type == "task_done":
                    break

    cursor = run(first_run())
    run(second_run(cursor))
    assert seen == list(range(1, len(seen) + 1)), seen  # no gap, no duplicate


class Proxy:
    """A TCP proxy the test can cut: every connection through it is dropped at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.conns: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.conns += [w, uw]

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            try:
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                b.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    def cut(self) -> None:
        for w in self.conns:
            w.transport.abort()
        self.conns.clear()

    def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


def test_reconnect_with_backoff_resumes_without_gap_or_duplicate(shim_factory):
    port = free_port()
    shim = shim_factory(echo_driver_cmd(), listen=f"tcp:127.0.0.1:{port}")

    async def go():
        proxy = Proxy(port)
        proxy_port = await proxy.start()
        try:
            token = read_token(shim.token_file)
            async with await Client.connect(f"tcp:127.0.0.1:{proxy_port}", token=token,
                                            backoff=(0.05, 0.5)) as c:
                stream = c.events()
                await c.submit_task("t1", {"text": "a b c d e f g h", "delay_ms": 100})
                seqs = []
                cuts = 0
                while True:
                    ev = await stream.next(20)
                    seqs.append(ev.seq)
                    if ev.type == "message_chunk" and cuts < 3:
                        proxy.cut()  # mid-task; the shim keeps buffering
                        cuts += 1
                    if ev.type == "task_done":
                        break
                assert c.reconnects >= 3
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
                # Requests work on the new connection too.
                assert (await c.status()).state == "ready"
        finally:
            proxy.close()

    run(go())


def test_large_events_never_wait_for_an_ack_count(shim_factory):
    # 24 events of 1 MiB through an 8 MiB replay buffer: an ack only every 64 events would
    # stall the shim (buffer full) while the client waits for the 64th event.
    from conftest import driver_cmd

    shim = shim_factory(driver_cmd("sdk_test_driver.py"), args=["--event-buffer-bytes", "8388608"])

    async def go():
        async with await connect(shim) as c:
            stream = c.events()
            await c.submit_task("big", {"big": 24, "size": 1 << 20})
            events, done = await until_done(stream, "big", timeout=15)
            assert len(events) == 24 and done.get("output") == 24

    run(go())


def test_exec_from_the_control_plane(shim_factory):
    shim = shim_factory(echo_driver_cmd())

    async def go():
        async with await connect(shim) as c:
            stream = c.events()  # first: every event (but the execs') stays for the caller
            proc = await c.exec(["sh", "-c", "echo out; echo err >&2; exit 4"])
            result = await proc.wait(20)
            assert (result.code, result.stdout, result.stderr) == (4, b"out\n", b"err\n")
            proc = await c.exec(["cat"], stdin=True)
            await proc.write(b"hello ")
            await proc.write(b"world")
            await proc.close_stdin()
            chunks = [data async for _, data in proc]
            assert b"".join(chunks) == b"hello world"
            assert (await proc.wait(20)).code == 0
            proc = await c.exec(["sleep", "30"])
            await proc.signal("KILL")
            assert (await proc.wait(20)).signal == "SIGKILL"
            with pytest.raises(RemoteError) as e:
                await c.exec(["definitely-not-a-program"])
            assert e.value.code == "not_found"
            # The events the execs passed over are still there for the caller; the execs'
            # own went to their processes.
            seen = []
            while not seen or seen[-1].type != "driver_ready":
                seen.append(await stream.next(10))
            assert not any(e.type.startswith("exec_") for e in seen), seen

    run(go())


def test_exec_alone_passes_over_other_events_and_never_stalls(shim_factory):
    # 12 MiB of output through an 8 MiB replay buffer, with driver events on the way (a
    # restart): nobody reads events, so those are acknowledged as read, and the acks of the
    # exec's output are never held back behind them.
    shim = shim_factory(echo_driver_cmd())

    async def go():
        async with await connect(shim) as c:
            await c.restart_driver()
            proc = await c.exec(["sh", "-c", "head -c 12582912 /dev/zero"], timeout=60)
            total = 0
            async for _, data in proc:
                total += len(data)
            assert total == 12582912
            assert (await proc.wait(20)).code == 0

    run(go())


def test_the_sync_facade(shim_factory):
    shim = shim_factory(echo_driver_cmd())
    with SyncClient(shim.address, token=read_token(shim.token_file), timeout=20) as c:
        assert c.ping() < 5
        result = c.run(["echo", "sync"], timeout=10)
        assert result.stdout == b"sync\n"
        c.submit_task("s1", "hi there")
        for ev in c.events(after=0, timeout=20):
            if ev.type == "task_done":
                assert ev.get("output") == "hi there"
                break
        assert c.status().state == "ready"


def test_a_shim_that_goes_away_ends_waits_with_an_error(shim_factory):
    shim = shim_factory(echo_driver_cmd())

    async def go():
        c = await connect(shim, reconnect_timeout=1.0, backoff=(0.05, 0.2))
        stream = c.events()
        await until_type(stream, "driver_ready")
        shim.proc.kill()  # the shim dies: nobody will ever answer again
        shim.proc.wait(10)
        with pytest.raises(Exception) as e:
            while True:
                await stream.next(10)
        assert not isinstance(e.value, ShimTimeout), e.value
        with pytest.raises(Exception):
            await c.status()
        await c.close()

    run(go(), bound=30)


def test_acks_follow_within_the_delay_without_a_count_or_a_close(shim_factory):
    shim = shim_factory(echo_driver_cmd())

    async def go():
        async with await connect(shim) as c:
            stream = c.events()
            await c.submit_task("t1", "a few words")
            await until_done(stream, "t1")
            assert (await c.status()).buffered_events > 0
            with pytest.raises(ShimTimeout):
                await stream.next(0.6)  # the task_done counts as processed; 200 ms later: ack
            status = await c.status()
            assert status.buffered_events == 0, status

    run(go())
