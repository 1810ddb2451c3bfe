"""Consumers and observers (the sessions of PROTOCOL.md §8.7) through the control client,
against the real shim. These need a shim with sessions: `.ci/run` runs this file once the
shim has them (until then it is left out with --ignore)."""

from __future__ import annotations

import asyncio

import pytest

from agent_shim import ConnectionClosed, Lagged, RemoteError
from conftest import driver_cmd
from helpers import connect, run, until_done, until_type


def test_the_shim_advertises_its_limits(shim_factory):
    shim = shim_factory()

    async def go():
        async with await connect(shim, consumer="a") as c:
            limits = c.hello["limits"]
            for name in ("max_events", "max_bytes", "max_frame", "ack_every", "ack_delay_ms"):
                assert isinstance(limits[name], int) and limits[name] > 0, (name, limits)

    run(go())


def test_each_named_consumer_has_its_own_cursor(shim_factory):
    shim = shim_factory()

    async def go():
        # "audit" is registered (it subscribes, takes one event without finishing it, leaves).
        async with await connect(shim, consumer="audit") as b:
            assert (await b.events(after=0).next(10)).seq == 1
        async with await connect(shim, consumer="billing") as a:
            sa = a.events(after=0)
            await a.submit_task("t1", {"events": True})
            _, done_a = await until_done(sa, "t1")
        # "audit" comes back from its cursor, 0: billing's acks did not take its events away.
        async with await connect(shim, consumer="audit") as b:
            sb = b.events(after=0)
            first = await sb.next(10)
            assert first.seq == 1
            _, done_b = await until_done(sb, "t1")
            assert done_b.seq == done_a.seq
        # billing resumes after its own cursor: nothing it processed comes again.
        async with await connect(shim, consumer="billing") as a:
            sa = a.events(after=done_a.seq)
            await a.submit_task("t2", "x")
            ev = await sa.next(10)
            assert ev.seq == done_a.seq + 1

    run(go())


def test_an_observer_from_now_sees_only_live_events(shim_factory):
    shim = shim_factory()

    async def go():
        async with await connect(shim, consumer="main") as c:
            s = c.events(after=0)
            await until_type(s, "driver_ready")
            status = await c.status()
            async with await connect(shim, consumer=None) as obs:  # an observer
                so = obs.events(after=None)
                await asyncio.sleep(0.2)
                await c.submit_task("t1", "live")
                ev = await so.next(10)
                assert ev.seq > status.last_seq
                _, done = await until_done(so, "t1")
                assert done.get("output") == "live"

    run(go())


def test_an_observer_that_falls_behind_is_told_and_goes_on(shim_factory):
    shim = shim_factory(driver_cmd("sdk_test_driver.py"), args=["--event-buffer", "64"])

    async def go():
        lagged: list[Lagged] = []
        async with await connect(shim, consumer="main") as c:
            s = c.events(after=0)
            # The observer reads nothing for a while (a queue of 1 stops its socket reads).
            obs = await connect(shim, consumer=None, queue_size=1)
            so = obs.events(after=None, on_lagged=lagged.append)
            await asyncio.sleep(0.2)
            await c.submit_task("big", {"big": 400, "size": 16384})
            await until_done(s, "big", timeout=30)
            seqs = []
            while True:
                ev = await so.next(10)
                seqs.append(ev.seq)
                if ev.type == "task_done":
                    break
            assert lagged and so.missed == sum(x.missed for x in lagged)
            assert seqs == sorted(set(seqs)), "no duplicates, in order"
            after = lagged[-1].next_seq
            assert after in seqs
            await obs.close()

    run(go())


def test_a_cursor_older_than_the_buffer_is_a_gap(shim_factory):
    shim = shim_factory(driver_cmd("sdk_test_driver.py"), args=["--event-buffer", "32"])

    async def go():
        async with await connect(shim, consumer="main") as c:
            s = c.events(after=0)
            await c.submit_task("many", {"big": 100, "size": 10})
            await until_done(s, "many", timeout=30)
        async with await connect(shim, consumer=None) as obs:
            with pytest.raises(RemoteError) as e:
                await obs.events(after=1).next(10)
            assert e.value.code == "gap" and e.value.first_available > 2

    run(go())


def test_a_newer_connection_of_the_same_consumer_replaces_the_older(shim_factory):
    shim = shim_factory()

    async def go():
        old = await connect(shim, consumer="worker")
        so = old.events(after=0)
        await until_type(so, "driver_ready")
        async with await connect(shim, consumer="worker") as new:
            await new.ping()
            with pytest.raises(ConnectionClosed, match="replaced"):
                while True:
                    await so.next(10)
            assert old.reconnects == 0  # a replaced consumer does not fight back
        await old.close()

    run(go())


def test_forget_consumer(shim_factory):
    shim = shim_factory()

    async def go():
        async with await connect(shim, consumer="temp") as c:
            await c.events(after=0).next(10)
        async with await connect(shim, consumer="admin") as c:
            await c.forget_consumer("temp")
            with pytest.raises(RemoteError) as e:
                await c.forget_consumer("never-seen")
            assert e.value.code == "not_found"

    run(go())


def test_an_observer_reconnects_where_it_was_without_duplicates(shim_factory):
    from conftest import echo_driver_cmd, free_port
    from agent_shim import Client, read_token
    from test_control import Proxy

    port = free_port()
    shim = shim_factory(echo_driver_cmd(), listen=f"tcp:127.0.0.1:{port}")

    async def go():
        proxy = Proxy(port)
        proxy_port = await proxy.start()
        try:
            token = read_token(shim.token_file)
            async with await connect(shim, consumer="main") as c:
                s = c.events(after=0)
                obs = await Client.connect(f"tcp:127.0.0.1:{proxy_port}", token=token, consumer=None,
                                           backoff=(0.05, 0.5))
                so = obs.events(after=(await c.status()).last_seq)
                await c.submit_task("t1", {"text": "a b c d e f", "delay_ms": 100})
                seqs = []
                cuts = 0
                while True:
                    ev = await so.next(20)
                    seqs.append(ev.seq)
                    if ev.type == "message_chunk" and cuts < 2:
                        proxy.cut()
                        cuts += 1
                    if ev.type == "task_done":
                        break
                await until_done(s, "t1")
                assert obs.reconnects >= 2
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
                await obs.close()
        finally:
            proxy.close()

    run(go())
