"""A driver on the SDK for the SDK's own tests: the task's input (a map) says what to do."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import agent_shim
from agent_shim import Context, Task, TaskContext, TaskFailed, TtySize


class SdkTestDriver(agent_shim.Driver):
    software = "sdk-test-driver"

    async def setup(self, ctx: Context) -> None:
        await ctx.log("setup done")

    async def on_pause(self, ctx: Context) -> None:
        await ctx.log("on_pause")

    async def on_resume(self, ctx: Context, slept_ms: int) -> None:
        await ctx.log(f"on_resume slept_ms={slept_ms}")

    async def on_shutdown(self, ctx: Context, reason: str | None) -> None:
        marker = os.environ.get("SDK_TEST_MARKER")
        if marker:
            with open(marker, "w") as f:
                f.write(f"shutdown {reason}\n")

    async def on_task(self, task: Task, ctx: TaskContext) -> Any:
        spec = task.input if isinstance(task.input, dict) else {}
        if spec.get("events"):
            await ctx.progress("starting", done=0, total=2)
            await ctx.message("hello ", role="assistant")
            await ctx.message("world", role="assistant", final=True)
            call = await ctx.tool_call("search", {"q": "x"})
            await ctx.tool_result(call, ["r1"], is_error=False)
            await ctx.file_change("/work/a.txt", "created")
            await ctx.file_change("/work/b.txt", "renamed", from_path="/work/a.txt")
            await ctx.log("a log line", level="debug")
            await ctx.custom("metric", {"tokens": 42})
            await ctx.error("warning", "something worth reporting")
            await ctx.progress(done=2, total=2)
            return {"ok": True, "attempt": task.attempt}
        if "fail" in spec:
            raise TaskFailed(spec["fail"])
        if spec.get("boom"):
            raise RuntimeError("boom")
        if "sleep" in spec:
            start = time.monotonic()
            try:
                await ctx.sleep(spec["sleep"])
            except asyncio.CancelledError:
                await ctx.log(f"cancelled after {time.monotonic() - start:.3f} s")
                raise
            return "slept"
        if "block" in spec:  # not a safe point: pings are still answered meanwhile
            await asyncio.sleep(spec["block"])
            return "blocked"
        if "big" in spec:
            for i in range(spec["big"]):
                await ctx.custom("big", b"x" * spec["size"])
            return spec["big"]
        if "exec" in spec:
            e = spec["exec"]
            tty = TtySize(24, 80) if e.get("tty") else None
            proc = await ctx.exec(e["argv"], stdin="input" in e, tty=tty, timeout=e.get("timeout"))
            if "input" in e:
                await proc.write(e["input"].encode())
                await proc.close_stdin()
            streams = []
            async for stream, data in proc:
                streams.append(stream)
            result = await proc.wait(30)
            return {"code": result.code, "signal": result.signal, "timed_out": result.timed_out,
                    "streams": sorted(set(streams)), "pid": proc.pid}
        if "exec_collect" in spec:
            proc = await ctx.exec(spec["exec_collect"])
            result = await proc.wait(30)
            return {"stdout": result.stdout.decode(), "stderr": result.stderr.decode(),
                    "code": result.code}
        return task.input


if __name__ == "__main__":
    try:
        reason = SdkTestDriver().run()
    except agent_shim.ProtocolError as e:
        print(f"sdk-test-driver: {e}", file=sys.stderr)
        sys.exit(3)
    sys.exit(0)
