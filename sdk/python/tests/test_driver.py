"""The driver SDK under the real shim, watched through the control client."""

from __future__ import annotations

import asyncio
import time

from helpers import connect, run, until_done, until_type


def test_every_event_kind_and_the_output(shim_factory):
    shim = shim_factory()

    async def go():
        async with await connect(shim) as c:
            stream = c.events()
            await until_type(stream, "driver_ready")
            await c.submit_task("t1", {"events": True})
            events, done = await until_done(stream, "t1")
            kinds = [e.type for e in events]
            assert kinds == ["progress", "message_chunk", "message_chunk", "tool_call", "tool_result",
                             "file_change", "file_change", "log", "custom", "error", "progress"], kinds
            assert events[1].body == {"type": "message_chunk", "task_id": "t1", "text": "hello ",
                                      "role": "assistant", "final": False}
            assert events[2].get("final") is True
            assert events[3].get("call_id") == events[4].get("call_id")
            assert events[4].get("output") == ["r1"]
            assert events[6].get("from") == "/work/a.txt" and events[6].get("change") == "renamed"
            assert events[7].get("stream") == "driver" and events[7].get("level") == "debug"
            assert events[8].get("data") == {"tokens": 42}
            assert done.get("status") == "succeeded"
            assert done.get("output") == {"ok": True, "attempt": 1}

    run(go())


def test_raising_fails_the_task_with_the_message(shim_factory):
    shim = shim_factory()

    async def go():
        async with await connect(shim) as c:
            stream = c.events()
            await c.submit_task("f1", {"fail": "no model"})
            _, done = await until_done(stream, "f1")
            assert (done.get("status"), done.get("error")) == ("failed", "no model")
            assert "output" not in done.body
            await c.submit_task("f2", {"boom": True})
            _, done = await until_done(stream, "f2")
            assert (done.get("status"), done.get("error")) == ("failed", "RuntimeError: boom")
            # The driver lives on and takes the next task.
            await c.submit_task("f3", "plain")
            _, done = await until_done(stream, "f3")
            assert done.get("output") == "plain"

    run(go())


def test_cancel_arrives_as_cancelled_error_within_the_grace(shim_factory):
    shim = shim_factory(args=["--cancel-grace", "5s"])

    async def go():
        async with await connect(shim) as c:
            stream = c.events()
            # The driver up first: a task cancelled while still queued ends without it.
            await until_type(stream, "driver_ready")
            await c.submit_task("c1", {"sleep": 30})
            await until_type(stream, "task_accepted", task_id="c1")
            await asyncio.sleep(0.3)
            start = time.monotonic()
            await c.cancel_task("c1", grace_ms=5000)
            events, done = await until_done(stream, "c1")
            took = time.monotonic() - start
            assert done.get("status") == "cancelled", done
            assert any(e.type == "log" and e.get("text", "").startswith("cancelled after") for e in events)
            assert took < 2.0, f"the cancel took {took:.2f} s"

    run(go())


def test_pause_and_resume_hooks_at_a_safe_point(shim_factory):
    shim = shim_factory()

    async def go():
        async with await connect(shim) as c:
            stream = c.events()
            await until_type(stream, "driver_ready")
            await c.submit_task("p1", {"sleep": 1.0})
            await until_type(stream, "task_accepted", task_id="p1")
            await asyncio.sleep(0.2)
            await c.pause()
            await until_type(stream, "log", text="on_pause")
            await until_type(stream, "paused")
            status = await c.status()
            assert status.state == "paused"
            await asyncio.sleep(0.3)
            await c.resume()
            ev = await until_type(stream, "log")
            assert ev.get("text", "").startswith("on_resume slept_ms="), ev
            assert int(ev.get("text").split("=")[1]) >= 250
            # The task then finishes the rest of its wait.
            _, done = await until_done(stream, "p1")
            assert done.get("output") == "slept"

    run(go())


def test_pings_are_answered_while_a_task_blocks(shim_factory):
    # A ping every 100 ms, hung after 3 misses: a 2 s task that awaits (not at a safe point)
    # must not be taken for a hung driver.
    shim = shim_factory(args=["--ping-interval", "100ms", "--ping-misses", "3"])

    async def go():
        async with await connect(shim) as c:
            stream = c.events()
            await c.submit_task("b1", {"block": 2.0})
            events, done = await until_done(stream, "b1")
            assert done.get("output") == "blocked"
            status = await c.status()
            assert status.restarts == 0, status

    run(go())


def test_exec_with_stdin_a_pty_and_a_timeout(shim_factory):
    shim = shim_factory()

    async def go():
        async with await connect(shim) as c:
            stream = c.events()
            await c.submit_task("e1", {"exec_collect": ["sh", "-c", "echo out; echo err >&2; exit 3"]})
            _, done = await until_done(stream, "e1")
            assert done.get("output") == {"stdout": "out\n", "stderr": "err\n", "code": 3}
            await c.submit_task("e2", {"exec": {"argv": ["cat"], "input": "piped"}})
            _, done = await until_done(stream, "e2")
            assert done.get("output")["code"] == 0 and done.get("output")["streams"] == ["stdout"]
            await c.submit_task("e3", {"exec": {"argv": ["sh", "-c", "test -t 1 && echo tty"], "tty": True}})
            _, done = await until_done(stream, "e3")
            assert done.get("output")["code"] == 0 and done.get("output")["streams"] == ["pty"]
            start = time.monotonic()
            await c.submit_task("e4", {"exec": {"argv": ["sleep", "30"], "timeout": 0.5}})
            _, done = await until_done(stream, "e4")
            assert done.get("output")["timed_out"] is True, done
            assert time.monotonic() - start < 10
            await c.submit_task("e5", {"exec_collect": ["no-such-program-here"]})
            _, done = await until_done(stream, "e5")
            assert done.get("status") == "failed" and "not_found" in done.get("error"), done

    run(go())


def test_shutdown_is_clean_and_runs_the_hook(shim_factory, tmp_path):
    marker = tmp_path / "marker"
    shim = shim_factory(env={"SDK_TEST_MARKER": str(marker)})

    async def go():
        async with await connect(shim) as c:
            stream = c.events()
            await until_type(stream, "driver_ready")
            await c.shutdown(grace_ms=3000, reason="test over")
            ev = await until_type(stream, "driver_exited")
            assert ev.get("code") == 0, ev

    run(go())
    assert shim.wait() == 0
    assert marker.read_text() == "shutdown test over\n"


def test_a_large_output_over_the_frame_limit_fails_the_task_cleanly(shim_factory):
    shim = shim_factory()

    async def go():
        async with await connect(shim) as c:
            stream = c.events()
            await c.submit_task("big", {"big": 1, "size": 17 * 1024 * 1024})
            _, done = await until_done(stream, "big")
            assert done.get("status") == "failed" and "frame limit" in done.get("error"), done
            await c.submit_task("after", "still here")
            _, done = await until_done(stream, "after")
            assert done.get("output") == "still here"

    run(go())


def test_the_echo_driver_on_the_sdk_under_the_real_shim(shim_factory):
    from conftest import echo_driver_cmd

    shim = shim_factory(echo_driver_cmd())

    async def go():
        async with await connect(shim) as c:
            stream = c.events()
            ready = await until_type(stream, "driver_ready")
            assert ready.get("pid")
            await c.submit_task("t1", {"text": "a b", "exec": ["echo", "hi"]})
            events, done = await until_done(stream, "t1")
            kinds = [e.type for e in events]
            assert kinds == ["tool_call", "tool_result", "message_chunk", "progress", "message_chunk", "progress"]
            assert events[1].get("output")["stdout"] == "hi\n"
            assert done.get("output") == "a b"

    run(go())

