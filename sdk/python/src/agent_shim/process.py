"""A tool process the shim runs (``exec``), seen from Python: output, input, exit."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional, Tuple

from .errors import ConnectionClosed, ShimTimeout

__all__ = ["ExecResult", "Process", "TtySize"]

#: Output kept per process for ``wait()`` beyond what was iterated (then ``dropped`` is set).
MAX_BUFFERED = 64 * 1024 * 1024


@dataclass(frozen=True)
class TtySize:
    """The size of an exec's terminal."""

    rows: int
    cols: int


@dataclass
class ExecResult:
    """How an exec ended (``exec_exit``), with the output not taken by iteration."""

    code: Optional[int]
    signal: Optional[str]
    timed_out: bool
    truncated: bool
    duration_ms: int
    oom_killed: Optional[bool] = None
    stdout: bytes = b""
    stderr: bytes = b""
    #: More than MAX_BUFFERED bytes waited unread: the excess was dropped here.
    dropped: bool = False

    @property
    def ok(self) -> bool:
        """Whether the process exited with code 0."""
        return self.code == 0


Send = Callable[[Dict[str, Any]], Awaitable[None]]


@dataclass
class _State:
    chunks: "asyncio.Queue[Tuple[str, bytes]]" = field(default_factory=asyncio.Queue)
    buffered: int = 0
    dropped: bool = False
    exit: Optional[Dict[str, Any]] = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    lost: Optional[str] = None


class Process:
    """A running exec. Iterate it for ``(stream, data)`` chunks (``stdout``, ``stderr``,
    ``pty``) or just ``await wait()``; ``write``/``close_stdin`` need ``stdin=True`` or a tty.
    """

    def __init__(self, exec_id: int, pid: int, send: Send) -> None:
        self.exec_id = exec_id
        self.pid = pid
        self._send = send
        self._state = _State()

    # -- fed by the link --

    def _output(self, stream: str, data: bytes) -> None:
        st = self._state
        if st.buffered + len(data) > MAX_BUFFERED:
            st.dropped = True
            return
        st.buffered += len(data)
        st.chunks.put_nowait((stream, data))

    def _exit(self, msg: Dict[str, Any]) -> None:
        self._state.exit = msg
        self._state.exited.set()

    def _lost(self, why: str) -> None:
        if self._state.exit is None:
            self._state.lost = why
            self._state.exited.set()

    # -- for the author --

    def __aiter__(self) -> AsyncIterator[Tuple[str, bytes]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Tuple[str, bytes]]:
        st = self._state
        while True:
            if not st.chunks.empty():
                stream, data = st.chunks.get_nowait()
                st.buffered -= len(data)
                yield stream, data
                continue
            if st.exited.is_set():
                return
            getter = asyncio.ensure_future(st.chunks.get())
            ender = asyncio.ensure_future(st.exited.wait())
            try:
                await asyncio.wait({getter, ender}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ender.cancel()
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                stream, data = getter.result()
                st.buffered -= len(data)
                yield stream, data

    async def wait(self, timeout: Optional[float] = None) -> ExecResult:
        """Waits for the exit (at most ``timeout`` seconds if given); the output not yet
        iterated is in ``stdout``/``stderr`` (``pty`` output counts as stdout)."""
        st = self._state
        try:
            await asyncio.wait_for(st.exited.wait(), timeout)
        except asyncio.TimeoutError:
            raise ShimTimeout(f"exec {self.exec_id} still running after {timeout} s") from None
        if st.exit is None:
            raise ConnectionClosed(f"exec {self.exec_id}: {st.lost}")
        out: List[bytes] = []
        err: List[bytes] = []
        while not st.chunks.empty():
            stream, data = st.chunks.get_nowait()
            st.buffered -= len(data)
            (err if stream == "stderr" else out).append(data)
        m = st.exit
        return ExecResult(
            code=m.get("code"),
            signal=m.get("signal"),
            timed_out=bool(m.get("timed_out")),
            truncated=bool(m.get("truncated")),
            duration_ms=int(m.get("duration_ms", 0)),
            oom_killed=m.get("oom_killed"),
            stdout=b"".join(out),
            stderr=b"".join(err),
            dropped=st.dropped,
        )

    @property
    def returncode(self) -> Optional[int]:
        """The exit code once exited (None before, or when a signal killed it)."""
        return None if self._state.exit is None else self._state.exit.get("code")

    async def write(self, data: bytes) -> None:
        """Sends bytes to the process's stdin (or terminal)."""
        await self._send({"type": "exec_input", "exec_id": self.exec_id, "data": bytes(data)})

    async def close_stdin(self) -> None:
        """Closes stdin (on a terminal: sends its end-of-file character)."""
        await self._send({"type": "exec_input", "exec_id": self.exec_id, "eof": True})

    async def resize(self, rows: int, cols: int) -> None:
        """Resizes the process's terminal."""
        await self._send({"type": "exec_resize", "exec_id": self.exec_id, "rows": rows, "cols": cols})

    async def signal(self, signal: str) -> None:
        """Sends a signal (``TERM``, ``SIGKILL``, ``15``) to the process's group."""
        await self._send({"type": "exec_signal", "exec_id": self.exec_id, "signal": str(signal)})


def exec_request(
    request_id: int,
    argv: List[str],
    *,
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[str] = None,
    user: Optional[str] = None,
    tty: Optional[TtySize] = None,
    stdin: bool = False,
    timeout: Optional[float] = None,
    output_cap: Optional[int] = None,
    task_id: Optional[str] = None,
    tag: Optional[str] = None,
) -> Dict[str, Any]:
    """The ``exec`` message (PROTOCOL.md §9.2); ``timeout`` in seconds."""
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv must be a list of str")
    msg: Dict[str, Any] = {"type": "exec", "id": request_id, "argv": list(argv)}
    if env:
        msg["env"] = dict(env)
    if cwd is not None:
        msg["cwd"] = cwd
    if user is not None:
        msg["user"] = user
    if tty is not None:
        msg["tty"] = {"rows": tty.rows, "cols": tty.cols}
    if stdin:
        msg["stdin"] = True
    if timeout is not None:
        msg["timeout_ms"] = max(0, int(timeout * 1000))
    if output_cap is not None:
        msg["output_cap"] = output_cap
    if task_id is not None:
        msg["task_id"] = task_id
    if tag is not None:
        msg["tag"] = tag
    return msg
