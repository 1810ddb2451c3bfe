"""A small synchronous facade over the asyncio API, for scripts and threads.

``run_driver(MyDriver())`` runs a driver; :class:`SyncClient` runs a :class:`Client` on an
event loop in a background thread, and every call waits at most its timeout.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine, Dict, Iterator, List, Optional, TypeVar, Union

from .control import Client, Event, EventStream, Status
from .driver import Driver
from .errors import ShimTimeout
from .files import FileEvent, FileReader, FileStat, ListPage, Watch, WriteSource
from .process import ExecResult

__all__ = ["run_driver", "SyncClient", "SyncFiles", "SyncWatch"]

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
        #: The file operations (see :class:`SyncFiles`).
        self.fs = SyncFiles(self)

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


class SyncFiles:
    """:class:`~agent_shim.files.Files` for synchronous code (``SyncClient.fs``): the same
    operations, each bounded by ``timeout`` (default the client's)."""

    def __init__(self, sync: SyncClient) -> None:
        self._sync = sync

    def _call(self, coro: Coroutine[Any, Any, T], timeout: Optional[float]) -> T:
        return self._sync._call(coro, timeout)

    def stat(self, path: str, *, follow: bool = False, timeout: Optional[float] = None) -> FileStat:
        """See :meth:`Files.stat`."""
        return self._call(self._sync.client.fs.stat(path, follow=follow), timeout)

    def exists(self, path: str, *, timeout: Optional[float] = None) -> bool:
        """See :meth:`Files.exists`."""
        return self._call(self._sync.client.fs.exists(path), timeout)

    def list(self, path: str, *, page_size: Optional[int] = None, timeout: Optional[float] = None) -> List[FileStat]:
        """See :meth:`Files.list` (``timeout`` bounds the whole listing)."""
        return self._call(self._sync.client.fs.list(path, page_size=page_size), timeout)

    def list_page(self, path: str, *, after: Optional[str] = None, limit: Optional[int] = None,
                  timeout: Optional[float] = None) -> ListPage:
        """See :meth:`Files.list_page`."""
        return self._call(self._sync.client.fs.list_page(path, after=after, limit=limit), timeout)

    def mkdir(self, path: str, *, parents: bool = False, mode: Optional[int] = None,
              timeout: Optional[float] = None) -> None:
        """See :meth:`Files.mkdir`."""
        self._call(self._sync.client.fs.mkdir(path, parents=parents, mode=mode), timeout)

    def remove(self, path: str, *, recursive: bool = False, timeout: Optional[float] = None) -> None:
        """See :meth:`Files.remove`."""
        self._call(self._sync.client.fs.remove(path, recursive=recursive), timeout)

    def rename(self, src: str, dst: str, *, timeout: Optional[float] = None) -> None:
        """See :meth:`Files.rename`."""
        self._call(self._sync.client.fs.rename(src, dst), timeout)

    def read_bytes(self, path: str, *, offset: int = 0, length: Optional[int] = None,
                   timeout: Optional[float] = None) -> bytes:
        """See :meth:`Files.read_bytes` (``timeout`` bounds the whole transfer)."""
        return self._call(self._sync.client.fs.read_bytes(path, offset=offset, length=length), timeout)

    def read(self, path: str, *, offset: int = 0, length: Optional[int] = None,
             timeout: Optional[float] = None) -> Iterator[bytes]:
        """The file's chunks as they stream in (see :meth:`Files.read`); ``timeout`` bounds
        each wait for the next chunk. Closing the iterator (or leaving a ``for``) stops the
        read."""
        sync = self._sync

        async def open_() -> FileReader:
            return sync.client.fs.read(path, offset=offset, length=length)

        reader = self._call(open_(), timeout)

        async def next_() -> Optional[bytes]:
            try:
                return await reader.__anext__()
            except StopAsyncIteration:
                return None

        try:
            while True:
                chunk = self._call(next_(), timeout)
                if chunk is None:
                    return
                yield chunk
        finally:
            self._call(reader.aclose(), timeout)

    def write(self, path: str, data: WriteSource, *, mode: Optional[int] = None, parents: bool = False,
              append: bool = False, timeout: Optional[float] = None) -> int:
        """See :meth:`Files.write` (``timeout`` bounds the whole transfer; a plain iterable
        or a file object is read on the client's loop thread, a file's reads in a worker)."""
        return self._call(
            self._sync.client.fs.write(path, data, mode=mode, parents=parents, append=append), timeout
        )

    def watch(self, path: str, *, recursive: bool = False, timeout: Optional[float] = None) -> "SyncWatch":
        """See :meth:`Files.watch`."""
        watch = self._call(self._sync.client.fs.watch(path, recursive=recursive), timeout)
        return SyncWatch(self._sync, watch)

    def unwatch(self, watch: Union["SyncWatch", int], *, timeout: Optional[float] = None) -> None:
        """See :meth:`Files.unwatch`."""
        target: Union[Watch, int] = watch.watch if isinstance(watch, SyncWatch) else watch
        self._call(self._sync.client.fs.unwatch(target), timeout)


class SyncWatch:
    """A :class:`~agent_shim.files.Watch` for synchronous code: ``next(timeout)``, or
    iterate it (each wait at most the SyncClient's ``timeout``: ShimTimeout)."""

    def __init__(self, sync: SyncClient, watch: Watch) -> None:
        self._sync = sync
        #: The asyncio watch behind it.
        self.watch = watch
        self.id = watch.id

    def next(self, timeout: Optional[float] = None) -> Optional[FileEvent]:
        """The next event (None once the watch is over); ShimTimeout after ``timeout`` s."""
        return self._sync._call(self.watch.next(timeout), None if timeout is None else timeout + 5)

    def __iter__(self) -> Iterator[FileEvent]:
        while True:
            ev = self.next()
            if ev is None:
                return
            yield ev

    def close(self) -> None:
        """Ends the watch (``fs_unwatch``)."""
        self._sync._call(self.watch.close())

    def __enter__(self) -> "SyncWatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
