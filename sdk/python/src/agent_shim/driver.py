"""The driver SDK: subclass :class:`Driver`, implement ``on_task``, call ``run()``.

The SDK speaks the driver side of docs/PROTOCOL.md (§2-§7) for the author: the handshake,
``ready``, one task at a time, ``ping`` answered at once, ``cancel`` delivered as
:class:`asyncio.CancelledError`, ``pause`` answered at the task's next safe point
(:meth:`TaskContext.checkpoint`, :meth:`TaskContext.sleep`, or at once when idle), ``resume``,
``shutdown``, tool processes (``exec``), and bad frames refused with a clear error.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional

from . import __version__
from ._wire import (
    MAX_FRAME,
    SHIM_TO_DRIVER,
    U64,
    Message,
    check_hello,
    encode,
    error_frame,
    limit,
    read_frame,
)
from .errors import ConnectionClosed, ProtocolError, RemoteError, ShimTimeout, TaskFailed
from .process import Process, TtySize, exec_request

__all__ = ["Driver", "Context", "TaskContext", "Task", "FD_ENV"]

#: The variable holding the link's fd number, set by the shim.
FD_ENV = "AGENT_SHIM_FD"

#: The longest single wait in ``TaskContext.sleep`` (a longer delay waits in steps).
_MAX_WAIT_S = 3600.0


@dataclass(frozen=True)
class Task:
    """A task from the shim (``task``, PROTOCOL.md §9.3)."""

    task_id: str
    input: Any
    output_schema: Any = None
    timeout_ms: Optional[int] = None
    attempt: int = 1


class _Link:
    """The driver's end of the socket: writes frames, matches replies, routes exec output."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.max_frame = MAX_FRAME  # the shim's, once its hello says so
        self.next_id = 1
        self.pending: Dict[int, "asyncio.Future[Message]"] = {}
        self.processes: Dict[int, Process] = {}
        self.closed = False

    async def send(self, msg: Message) -> None:
        frame = encode(msg, self.max_frame)
        if self.closed:
            raise ConnectionClosed("the link to the shim is closed")
        try:
            self.writer.write(frame)
            await self.writer.drain()  # back-pressure: the shim may stop reading a while
        except (ConnectionError, OSError) as e:
            self.closed = True
            raise ConnectionClosed(f"cannot write to the shim: {e}") from None

    async def request(self, msg: Message, timeout: Optional[float]) -> Message:
        request_id = self.next_id
        self.next_id += 1
        msg["id"] = request_id
        fut: "asyncio.Future[Message]" = asyncio.get_running_loop().create_future()
        self.pending[request_id] = fut
        try:
            await self.send(msg)
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            raise ShimTimeout(f"no answer to {msg['type']} within {timeout} s") from None
        finally:
            self.pending.pop(request_id, None)

    def route(self, msg: Message) -> bool:
        """Delivers replies and exec messages; False if ``msg`` is none of those."""
        kind = msg["type"]
        if kind in ("ok", "pong", "exec_started", "error") and "re" in msg:
            fut = self.pending.get(msg["re"])
            if fut is None or fut.done():
                return True
            if kind == "error":
                fut.set_exception(RemoteError(msg["code"], msg["message"], msg["re"]))
            else:
                if kind == "exec_started":
                    started = Process(msg["exec_id"], msg["pid"], self.send)
                    self.processes[msg["exec_id"]] = msg["process"] = started
                fut.set_result(msg)
            return True
        if kind == "exec_output":
            proc = self.processes.get(msg["exec_id"])
            if proc is not None:
                proc._output(msg["stream"], msg["data"])
            return True
        if kind == "exec_exit":
            proc = self.processes.pop(msg["exec_id"], None)
            if proc is not None:
                proc._exit(msg)
            return True
        return False

    def lost(self, why: str) -> None:
        self.closed = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionClosed(why))
        for proc in self.processes.values():
            proc._lost(why)
        self.processes.clear()


class Context:
    """What a driver can do outside a task too: log, custom events, exec, ping."""

    def __init__(self, driver: "Driver", link: _Link, task_id: Optional[str] = None) -> None:
        self._driver = driver
        self._link = link
        self._task_id = task_id

    def _event(self, type_: str, **fields: Any) -> Message:
        msg: Message = {"type": type_}
        if self._task_id is not None:
            msg["task_id"] = self._task_id
        msg.update((k, v) for k, v in fields.items() if v is not None)
        return msg

    async def log(self, text: str, level: Optional[str] = "info") -> None:
        """A ``log`` event (``stream: "driver"``)."""
        await self._link.send(self._event("log", stream="driver", level=level, text=text))

    async def custom(self, kind: str, data: Any) -> None:
        """A ``custom`` event of the driver's own ``kind`` (``data`` may be None)."""
        msg = self._event("custom", kind=kind)
        msg["data"] = data
        await self._link.send(msg)

    async def error(self, code: str, message: str) -> None:
        """An ``error`` event worth reporting (not a reply)."""
        await self._link.send(self._event("error", code=code, message=message))

    async def ping(self, timeout: float = 10.0) -> None:
        """Pings the shim; raises ShimTimeout without a ``pong`` in ``timeout`` seconds."""
        await self._link.request({"type": "ping"}, timeout)

    async def exec(
        self,
        argv: List[str],
        *,
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        tty: Optional[TtySize] = None,
        stdin: bool = False,
        timeout: Optional[float] = None,
        output_cap: Optional[int] = None,
        start_timeout: float = 60.0,
    ) -> Process:
        """Runs a tool process through the shim (PROTOCOL.md §7.5) and returns it once it
        started. ``timeout`` (seconds) makes the shim kill it; in a task, cancelling the task
        kills it too. Raises RemoteError when the shim refuses (``not_found``, ``invalid``,
        ``limit``…)."""
        msg = exec_request(
            0, argv, env=env, cwd=cwd, user=user, tty=tty, stdin=stdin, timeout=timeout,
            output_cap=output_cap, task_id=self._task_id,
        )
        started = await self._link.request(msg, start_timeout)
        proc: Process = started["process"]
        return proc


class TaskContext(Context):
    """The running task's view: events about it, safe points, its tools."""

    def __init__(self, driver: "Driver", link: _Link, task: Task) -> None:
        super().__init__(driver, link, task.task_id)
        self.task = task
        self.cancel_requested = False
        self._finished = False
        self.attention = asyncio.Event()  # set when a pause waits for a safe point

    @property
    def task_id(self) -> str:
        """The task's id."""
        return self.task.task_id

    @property
    def shutting_down(self) -> bool:
        """Whether the shim asked the driver to shut down (the task is being cancelled)."""
        return self._driver._shutdown is not None

    async def message(self, text: str, *, role: Optional[str] = None, final: bool = False) -> None:
        """A ``message_chunk``: a piece of the agent's output text."""
        await self._link.send(self._event("message_chunk", text=text, role=role, final=final))

    async def progress(
        self, message: Optional[str] = None, *, done: Optional[int] = None, total: Optional[int] = None
    ) -> None:
        """A ``progress`` event."""
        await self._link.send(self._event("progress", message=message, done=done, total=total))

    async def tool_call(self, name: str, input: Any, *, call_id: Optional[str] = None) -> str:
        """A ``tool_call`` event; returns its ``call_id`` (made up when not given)."""
        if call_id is None:
            self._driver._calls += 1
            call_id = f"{self.task_id}-{self._driver._calls}"
        msg = self._event("tool_call", call_id=call_id, name=name)
        msg["input"] = input
        await self._link.send(msg)
        return call_id

    async def tool_result(self, call_id: str, output: Any, *, is_error: bool = False) -> None:
        """A ``tool_result`` event for ``call_id``."""
        msg = self._event("tool_result", call_id=call_id)
        msg["output"] = output
        msg["is_error"] = is_error
        await self._link.send(msg)

    async def file_change(self, path: str, change: str, *, from_path: Optional[str] = None) -> None:
        """A ``file_change`` event (``created``, ``modified``, ``deleted``, ``renamed``)."""
        if change not in ("created", "modified", "deleted", "renamed"):
            raise ValueError(f"unknown change {change!r}")
        msg = self._event("file_change", path=path, change=change)
        if from_path is not None:
            msg["from"] = from_path
        await self._link.send(msg)

    async def checkpoint(self) -> None:
        """A safe point: answers pending ``pause`` requests and waits here until resumed.
        A cancel pending for the task is raised here (as at every ``await``)."""
        await asyncio.sleep(0)
        drv = self._driver
        while drv._pauses:
            await drv._enter_pause(drv._pauses.pop(0))
            await drv._resumed.wait()

    async def sleep(self, seconds: float) -> None:
        """Waits ``seconds`` as a safe point: a pause arriving meanwhile is answered at once,
        and the rest of the wait follows the resume."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, seconds)
        while True:
            await self.checkpoint()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self.attention.clear()
            try:
                await asyncio.wait_for(self.attention.wait(), min(remaining, _MAX_WAIT_S))
            except asyncio.TimeoutError:
                pass


class Driver:
    """Subclass and implement :meth:`on_task`; then ``MyDriver().run()``.

    ``on_task`` returns the task's output (None: no output) or raises to fail it
    (:class:`TaskFailed` for a plain message). A ``cancel`` arrives as
    :class:`asyncio.CancelledError` at the task's next ``await``.
    """

    #: The ``software`` and ``software_version`` of the driver's hello.
    software: str = "agent-shim-python"
    software_version: str = __version__
    capabilities: List[str] = []
    #: How long the shim's hello may take.
    handshake_timeout: float = 30.0

    def __init__(self) -> None:
        self._link: Optional[_Link] = None
        self._task: Optional["asyncio.Task[None]"] = None
        self._ctx: Optional[TaskContext] = None
        self._pauses: List[int] = []
        self._paused = False
        self._resumed = asyncio.Event()
        self._held: Deque[Message] = collections.deque()
        self._shutdown: Optional[str] = None
        self._stop: Optional[asyncio.Future[str]] = None
        self._calls = 0
        #: The shim's hello, once connected.
        self.shim_hello: Message = {}

    # -- hooks --

    async def setup(self, ctx: Context) -> None:
        """Called after the handshake, before ``ready``: load models, check credentials."""

    async def on_task(self, task: Task, ctx: TaskContext) -> Any:
        """Does the task; returns its output or raises to fail it."""
        raise NotImplementedError

    async def on_pause(self, ctx: Context) -> None:
        """Called at the safe point, just before ``paused`` is answered."""

    async def on_resume(self, ctx: Context, slept_ms: int) -> None:
        """Called before ``ready`` after a pause: refresh what may have expired."""

    async def on_shutdown(self, ctx: Context, reason: Optional[str]) -> None:
        """Called once the shim asked the driver to stop, after the running task ended."""

    # -- running --

    def run(self, fd: "int | socket.socket | None" = None) -> str:
        """Runs the driver until the shim lets it go: ``"shutdown"`` after a ``shutdown``,
        ``"closed"`` at end of stream. Raises ProtocolError on a bad frame or hello from the
        shim, ValueError when AGENT_SHIM_FD is missing or not a socket."""
        return asyncio.run(self.serve(fd))

    async def serve(self, fd: "int | socket.socket | None" = None) -> str:
        """The asyncio form of :meth:`run`. ``fd``: the link's fd or socket (default: the
        fd in AGENT_SHIM_FD)."""
        sock = fd if isinstance(fd, socket.socket) else shim_socket(fd)
        self._resumed = asyncio.Event()
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        link = self._link = _Link(reader, writer)
        try:
            return await self._serve(link)
        finally:
            link.lost("the driver stopped")
            if self._task is not None and not self._task.done():
                self._task.cancel()
            writer.close()

    async def _serve(self, link: _Link) -> str:
        await link.send({
            "type": "hello", "protocol": "agent-shim", "versions": [1], "role": "driver",
            "software": self.software, "software_version": self.software_version,
            "capabilities": list(self.capabilities),
        })
        try:
            got = await asyncio.wait_for(
                read_frame(link.reader, SHIM_TO_DRIVER, MAX_FRAME), self.handshake_timeout
            )
        except asyncio.TimeoutError:
            raise ShimTimeout(f"no hello from the shim within {self.handshake_timeout} s") from None
        except ProtocolError as e:
            await self._refuse(e)
            raise
        except ConnectionClosed:
            return "closed"
        if got is None:
            return "closed"
        hello = got[0]
        try:
            check_hello(hello, "shim")
        except ProtocolError as e:
            if hello["type"] != "error":
                await self._refuse(e)
            raise
        self.shim_hello = hello
        link.max_frame = limit(hello, "max_frame", MAX_FRAME)
        self._stop = asyncio.get_running_loop().create_future()
        reading = asyncio.ensure_future(self._read(link))
        try:
            await self.setup(Context(self, link))
            await link.send({"type": "ready"})
            await asyncio.wait({reading, self._stop}, return_when=asyncio.FIRST_COMPLETED)
        except ConnectionClosed:
            return "closed"
        finally:
            reading.cancel()
        if self._stop.done():
            return self._stop.result()
        return reading.result()

    async def _refuse(self, e: ProtocolError) -> None:
        print(f"{self.software}: {e}", file=sys.stderr, flush=True)
        assert self._link is not None
        try:
            self._link.writer.write(error_frame(e.code, e.message, e.re))
            await asyncio.wait_for(self._link.writer.drain(), 5)
        except (OSError, asyncio.TimeoutError):
            pass

    async def _read(self, link: _Link) -> str:
        while True:
            try:
                got = await read_frame(link.reader, SHIM_TO_DRIVER, MAX_FRAME)
            except ProtocolError as e:
                link.lost(str(e))
                await self._refuse(e)
                raise
            except ConnectionClosed:
                got = None
            if got is None:
                link.lost("the shim closed the link")
                return "closed"
            msg = got[0]
            if link.route(msg):
                continue
            try:
                if self._paused:
                    await self._while_paused(msg)
                else:
                    await self._dispatch(msg)
            except ConnectionClosed:
                return "closed"

    async def _reply(self, msg: Message) -> None:
        assert self._link is not None
        await self._link.send(msg)

    async def _dispatch(self, msg: Message) -> None:
        kind = msg["type"]
        ctx = self._ctx
        if kind == "ping":
            await self._reply({"type": "pong", "re": msg["id"]})
        elif kind == "task":
            if self._task is not None:
                await self._reply({"type": "error", "code": "limit",
                                   "message": "a task is already running", "task_id": msg["task_id"]})
            else:
                self._start_task(msg)
                await asyncio.sleep(0)  # the task starts before the next message is handled
        elif kind == "cancel":
            if ctx is not None and self._task is not None and ctx.task_id == msg["task_id"]:
                await self._reply({"type": "ok", "re": msg["id"]})
                self._cancel()
            else:
                await self._reply({"type": "error", "re": msg["id"], "code": "not_found",
                                   "message": f"no running task {msg['task_id']!r}"})
        elif kind == "pause":
            if self._task is None:  # idle is always a safe point
                await self._enter_pause(msg["id"])
            else:
                self._pauses.append(msg["id"])
                if ctx is not None:
                    ctx.attention.set()
        elif kind == "resume":
            await self._reply({"type": "error", "re": msg["id"], "code": "invalid_state",
                               "message": "not paused"})
        elif kind == "shutdown":
            await self._begin_shutdown(msg)
        elif kind not in SHIM_TO_DRIVER and U64(msg.get("id")):
            await self._reply({"type": "error", "re": msg["id"], "code": "unsupported",
                               "message": f"unsupported message type {kind!r}"})
        # Anything else (a stray reply, a second hello, unknown types without id): nothing.

    async def _while_paused(self, msg: Message) -> None:
        kind = msg["type"]
        if kind == "ping":
            await self._reply({"type": "pong", "re": msg["id"]})
        elif kind == "resume":
            assert self._link is not None
            await self.on_resume(Context(self, self._link), msg.get("slept_ms") or 0)
            await self._reply({"type": "ready", "re": msg["id"]})
            self._paused = False
            self._resumed.set()
            while self._held and not self._paused:
                await self._dispatch(self._held.popleft())
        elif kind == "shutdown":
            await self._begin_shutdown(msg)
        else:
            self._held.append(msg)

    async def _enter_pause(self, pause_id: int) -> None:
        assert self._link is not None
        await self.on_pause(Context(self, self._link))
        self._resumed.clear()
        self._paused = True
        await self._reply({"type": "paused", "re": pause_id})

    async def _begin_shutdown(self, msg: Message) -> None:
        await self._reply({"type": "ok", "re": msg["id"]})
        self._shutdown = msg.get("reason") or "shutdown"
        if self._task is None:
            await self._finish_shutdown()
        else:
            self._cancel()

    async def _finish_shutdown(self) -> None:
        assert self._link is not None and self._stop is not None
        try:
            await self.on_shutdown(Context(self, self._link), self._shutdown)
        finally:
            if not self._stop.done():
                self._stop.set_result("shutdown")

    def _cancel(self) -> None:
        ctx, task = self._ctx, self._task
        if ctx is not None and task is not None and not ctx.cancel_requested:
            ctx.cancel_requested = True
            # Scheduled after the task's first step: the cancel lands inside on_task, even
            # for a task that has not started to run yet, and never after on_task ended.
            asyncio.get_running_loop().call_soon(lambda: None if ctx._finished else task.cancel())

    def _start_task(self, msg: Message) -> None:
        assert self._link is not None
        task = Task(
            task_id=msg["task_id"], input=msg["input"], output_schema=msg.get("output_schema"),
            timeout_ms=msg.get("timeout_ms"), attempt=msg.get("attempt") or 1,
        )
        self._ctx = TaskContext(self, self._link, task)
        self._pauses = []
        self._task = asyncio.ensure_future(self._run_task(task, self._ctx))

    async def _run_task(self, task: Task, ctx: TaskContext) -> None:
        done: Message = {"type": "task_done", "task_id": task.task_id}
        try:
            try:
                output = await self.on_task(task, ctx)
            finally:
                ctx._finished = True
        except asyncio.CancelledError:
            done["status"] = "cancelled"
            if self._shutdown is not None:
                done["error"] = "shutdown"
        except TaskFailed as e:
            done.update(status="failed", error=str(e))
        except ConnectionClosed:
            self._task = self._ctx = None
            return
        except Exception as e:  # the author's bug or a tool's failure: the task fails
            traceback.print_exc(file=sys.stderr)
            done.update(status="failed", error=f"{type(e).__name__}: {e}")
        else:
            done["status"] = "succeeded"
            if output is not None:
                done["output"] = output
        ctx.cancel_requested = True  # from now on a cancel has nothing to interrupt
        self._task = None
        self._ctx = None
        self._pauses = []
        assert self._link is not None
        try:
            try:
                await self._link.send(done)
            except ValueError as e:  # an output over the frame limit
                await self._link.send({"type": "task_done", "task_id": task.task_id,
                                       "status": "failed", "error": str(e)})
        except ConnectionClosed:
            return
        if self._shutdown is not None:
            await self._finish_shutdown()


def shim_socket(fd: Optional[int] = None) -> socket.socket:
    """Takes over the link the shim gave the driver: ``fd``, else the number in
    AGENT_SHIM_FD. Marks it close-on-exec. Raises ValueError when it is not a socket."""
    if fd is None:
        value = os.environ.get(FD_ENV)
        if value is None:
            raise ValueError(f"{FD_ENV} is not set: run this driver under agent-shim")
        try:
            fd = int(value.strip())
        except ValueError:
            raise ValueError(f"{FD_ENV}={value!r} is not a file descriptor number") from None
    if fd < 0:
        raise ValueError(f"{FD_ENV}={fd} is not a file descriptor number")
    try:
        os.set_inheritable(fd, False)  # the tools the driver starts must not inherit it
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise ValueError(f"{FD_ENV}={fd}: not an open socket ({e.strerror})") from None
    if sock.family != socket.AF_UNIX:
        sock.detach()
        raise ValueError(f"{FD_ENV}={fd}: not a unix socket")
    return sock
