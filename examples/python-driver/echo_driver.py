#!/usr/bin/env python3
"""python-echo-driver: a complete agent-shim driver whose "agent" echoes its task back,
written on the `agent_shim` SDK (sdk/python).

It behaves exactly like the Rust `echo-driver` (examples/README.md specifies both), and the
end-to-end tests steer it through the task's `input`. The SDK does the protocol: framing,
the handshake, `ready`, ping, cancel (as asyncio.CancelledError), pause at the safe points
(`ctx.sleep`), resume, shutdown, exec and bad frames. What is left here is the agent.

Run it under the shim, which passes the link's fd number in AGENT_SHIM_FD:

    agent-shim ... -- python3 echo_driver.py

Exit codes: 0 after end of stream or `shutdown` (then ECHO_EXIT_CODE, default 0), 2 when
AGENT_SHIM_FD is missing or bad, 3 after a bad `hello` or a bad frame from the shim, and the
task's `crash` code when asked to crash.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import sys
import threading
from typing import Any, Optional

try:
    import agent_shim
except ImportError:  # run from a checkout without `pip install ./sdk/python`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "sdk" / "python" / "src"))
    import agent_shim

from agent_shim import ConnectionClosed, ProtocolError, RemoteError, Task, TaskContext, TaskFailed
from agent_shim.driver import shim_socket

NAME = "echo-driver"  # how we sign our lines on stdout/stderr
EXIT_NO_SOCKET = 2
EXIT_PROTOCOL = 3
EXIT_CODE_VAR = "ECHO_EXIT_CODE"

# What the `garbage` flag writes: a 4 GiB length prefix, then junk.
GARBAGE = bytes.fromhex("ffffffff" + "deadbeef" * 3)


def _uint64(v: Any) -> bool:
    return type(v) is int and 0 <= v < (1 << 64)


def _int32(v: Any) -> bool:
    return type(v) is int and -(1 << 31) <= v < (1 << 31)


class Spec:
    """What a task's `input` asks of the echo driver (examples/README.md)."""

    def __init__(self, value: Any) -> None:
        self.text = ""
        self.delay_s = 0.0
        self.exec: Optional[list[str]] = None
        self.has_output = False
        self.output: Any = None
        self.fail: Optional[str] = None
        self.crash: Optional[int] = None
        self.hang = self.ignore_cancel = self.garbage = False
        if isinstance(value, str):
            self.text = value
            return
        if not isinstance(value, dict):
            raise TaskFailed("input must be a string or a map")
        for key, v in value.items():  # unknown and non-string keys are ignored
            if key in ("text", "fail"):
                if not isinstance(v, str):
                    raise TaskFailed(f"input key {key!r} must be a string")
                setattr(self, key, v)
            elif key == "delay_ms":
                if not _uint64(v):
                    raise TaskFailed("input key 'delay_ms' must be an unsigned integer")
                self.delay_s = v / 1000.0
            elif key == "exec":
                if not isinstance(v, list) or not all(isinstance(a, str) for a in v):
                    raise TaskFailed("input key 'exec' must be an array of strings")
                self.exec = v
            elif key == "output":
                self.has_output, self.output = True, v
            elif key == "crash":
                if not _int32(v):
                    raise TaskFailed("input key 'crash' must be an integer")
                self.crash = v
            elif key in ("hang", "ignore_cancel", "garbage"):
                if not isinstance(v, bool):
                    raise TaskFailed(f"input key {key!r} must be a bool")
                setattr(self, key, v)


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()


class EchoDriver(agent_shim.Driver):
    software = "python-echo-driver"
    software_version = "0.2.0"

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.deferred_cancel = False

    async def on_resume(self, ctx: agent_shim.Context, slept_ms: int) -> None:
        # A real driver refreshes here what may have expired while frozen.
        await ctx.log(f"resumed after {slept_ms} ms", level="info")

    async def on_task(self, task: Task, ctx: TaskContext) -> Any:
        spec = Spec(task.input)
        self.deferred_cancel = False
        if spec.crash is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(spec.crash & 0xFF)  # at once: no task_done, no cleanup
        if spec.hang:
            print(f"{NAME}: hanging as asked", file=sys.stderr, flush=True)
            threading.Event().wait()  # blocks the event loop: no more reads, no more pongs
        if spec.garbage:
            os.write(self.fd, GARBAGE)  # between two frames: the SDK writes whole frames
        if spec.exec is not None:
            await self.exec_tool(ctx, spec)
        chunks = spec.text.split() or [""]  # the words; an empty text is one empty chunk
        for i, word in enumerate(chunks, start=1):
            await self.safe_point(ctx, spec)
            await ctx.message(word, role="assistant", final=i == len(chunks))
            await ctx.progress(done=i, total=len(chunks))
        if spec.fail is not None:
            raise TaskFailed(spec.fail)
        return spec.output if spec.has_output else spec.text

    async def safe_point(self, ctx: TaskContext, spec: Spec) -> None:
        """The wait before a chunk: a cancel, pause or shutdown takes effect here."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.delay_s
        while True:
            if self.deferred_cancel:  # it came while an exec ran
                raise asyncio.CancelledError()
            try:
                await ctx.sleep(max(0.0, deadline - loop.time()))
                return
            except asyncio.CancelledError:
                if spec.ignore_cancel and not ctx.shutting_down:
                    _uncancel()
                    continue
                raise

    async def exec_tool(self, ctx: TaskContext, spec: Spec) -> None:
        """`tool_call`, the exec through the shim, `tool_result`. Not a safe point: a
        cancel or shutdown arriving meanwhile waits for the next one."""
        assert spec.exec is not None
        call_id = await ctx.tool_call("exec", {"argv": spec.exec}, call_id=f"{ctx.task_id}-exec")
        inner = asyncio.ensure_future(self.run_exec(ctx, spec.exec))
        while True:
            try:
                output, is_error = await asyncio.shield(inner)
                break
            except asyncio.CancelledError:
                if inner.cancelled():
                    raise
                if ctx.shutting_down or not spec.ignore_cancel:
                    self.deferred_cancel = True
                _uncancel()
        await ctx.tool_result(call_id, output, is_error=is_error)

    async def run_exec(self, ctx: TaskContext, argv: list[str]) -> tuple[Any, bool]:
        try:
            proc = await ctx.exec(argv)
        except RemoteError as e:  # the shim refused the exec
            return {"error": e.message}, True
        result = await proc.wait()  # stdout holds the `stdout` and `pty` chunks
        output = {
            "code": result.code,
            "signal": result.signal,
            "stdout": result.stdout.decode("utf-8", errors="replace"),
            "timed_out": result.timed_out,
            "truncated": result.truncated,
        }
        return output, result.code != 0


def main() -> int:
    try:
        sock = shim_socket()
    except ValueError as e:
        print(f"{NAME}: {e}", file=sys.stderr, flush=True)
        return EXIT_NO_SOCKET
    # stdout and stderr are not the protocol: the shim captures both as `log` events.
    print(f"{NAME}: started", flush=True)
    print(f"{NAME}: started", file=sys.stderr, flush=True)
    try:
        shutdown_code = int(os.environ.get(EXIT_CODE_VAR, "0").strip())
    except ValueError:
        shutdown_code = 0
    if not _int32(shutdown_code):
        shutdown_code = 0
    try:
        reason = EchoDriver(sock.fileno()).run(sock)
    except ProtocolError as e:
        print(f"{NAME}: {e}", file=sys.stderr, flush=True)
        return EXIT_PROTOCOL
    except ConnectionClosed:
        return 0  # the shim is gone: like end of stream
    return shutdown_code if reason == "shutdown" else 0


if __name__ == "__main__":
    sys.exit(main())
