"""A small synchronous facade over the asyncio API, for scripts and threads.

``run_driver(MyDriver())`` runs a driver; :class:`SyncClient` runs a :class:`Client` on an
event loop in a background thread, and every call waits at most its timeout.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine, Dict, Iterator, List, Optional, TypeVar

from .control import Client, Event, EventStream, Status
from .driver import Driver
from .errors import ShimTimeout
from .process import ExecResult

__all__ = ["run_driver", "SyncClient"]

T = TypeVar("T")


def run_driver(driver: Driver, fd: Optional[int] = None) -> str:
    """Runs ``driver`` until the shim lets it go (see :meth:`Driver.run`)."""
    return driver.run(fd)


class SyncClient:
    """A blocking :class:`Client`: the same commands, each bounded by ``timeout`` seconds."""

    def __init__(self, address: str, *, timeout: float = 30.0, **options: Any) -> None:
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="agent-shim", daemon=True)
        self._thread.start()
        try:
            self.client: Client = self._call(Client.connect(address, **options))
        except BaseException:
            self._stop()
            raise
        self._stream: Optional[EventStream] = None

    def _call(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(self.timeout if timeout is None else timeout)
        except TimeoutError:
            fut.cancel()
            raise ShimTimeout("the call did not finish in time") from None

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def close(self) -> None:
        """Closes the connection and stops the background loop."""
        try:
            self._call(self.client.close())
        finally:
            self._stop()

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def status(self) -> Status:
        """See :meth:`Client.status`."""
        return self._call(self.client.status())

    def ping(self) -> float:
        """See :meth:`Client.ping`."""
        return self._call(self.client.ping())

    def submit_task(self, task_id: str, input: Any, **options: Any) -> None:
        """See :meth:`Client.submit_task`."""
        self._call(self.client.submit_task(task_id, input, **options))

    def cancel_task(self, task_id: str, grace_ms: Optional[int] = None) -> None:
        """See :meth:`Client.cancel_task`."""
        self._call(self.client.cancel_task(task_id, grace_ms))

    def pause(self) -> None:
        """See :meth:`Client.pause`."""
        self._call(self.client.pause())

    def resume(self) -> None:
        """See :meth:`Client.resume`."""
        self._call(self.client.resume())

    def restart_driver(self) -> None:
        """See :meth:`Client.restart_driver`."""
        self._call(self.client.restart_driver())

    def set_driver(self, argv: List[str], env: Optional[Dict[str, str]] = None) -> None:
        """See :meth:`Client.set_driver`."""
        self._call(self.client.set_driver(argv, env))

    def shutdown(self, grace_ms: Optional[int] = None) -> None:
        """See :meth:`Client.shutdown`."""
        self._call(self.client.shutdown(grace_ms))

    def run(self, argv: List[str], *, timeout: float = 60.0, **options: Any) -> ExecResult:
        """Runs a process to its end (``timeout`` seconds at most) and returns the result."""

        async def go() -> ExecResult:
            proc = await self.client.exec(argv, timeout=timeout, **options)
            return await proc.wait(timeout + 5)

        return self._call(go(), timeout + 10)

    def events(self, after: Optional[int] = 0, timeout: Optional[float] = None) -> Iterator[Event]:
        """The events after ``after`` (see :meth:`Client.events`); each wait for the next
        one lasts at most ``timeout`` seconds (ShimTimeout), None: no limit."""
        if self._stream is None:
            self._stream = self.client.events(after)
        stream = self._stream
        while True:
            yield self._call(stream.next(timeout), None if timeout is None else timeout + 5)
