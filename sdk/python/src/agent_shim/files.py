"""The shim's file operations (PROTOCOL.md §8.11, §9.10): ``client.fs``.

::

    fs = client.fs
    await fs.write("/work/in.txt", b"hello", parents=True)    # atomic replace
    data = await fs.read_bytes("/work/in.txt")
    async with fs.read("/work/big.bin") as r:                   # chunks as they stream in
        async for chunk in r:
            ...
    for entry in await fs.list("/work"):
        print(entry.name, entry.kind, entry.size)

Every path is under the shim's file root (``--fs-root``) and every operation has the
sandbox user's rights. Both transfers survive reconnects: a read cut mid-file asks again
from the byte it reached; an upload outlives its connection and goes on from the bytes the
shim has taken. A refusal raises the RemoteError of its code: ``NotFound``, ``BadPath``,
``PermissionDenied``, ``NoSpace``, ``FileChanged`` (``RemoteError`` with ``code`` for the
others: ``invalid``, ``limit``, ``timeout``, ``internal``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Deque,
    Dict,
    Iterable,
    List,
    Optional,
    Protocol,
    Set,
    Tuple,
    Union,
)

from ._waits import next_or_dead
from .errors import ConnectionClosed, FileChanged, NotFound, ProtocolError, RemoteError, ShimTimeout, remote_error

if TYPE_CHECKING:
    from .control import Client, Event, _Stream

__all__ = ["FileStat", "ListPage", "FileEvent", "Files", "FileReader", "Watch", "WriteSource"]

#: Bytes per ``fs_write_data``.
WRITE_CHUNK = 256 * 1024
#: Unanswered ``fs_write_data`` per upload: 4 MiB in flight, under the shim's 8 MiB.
WRITE_WINDOW = 16
#: How long an upload's close (its fsync and rename) may take at least, in seconds.
CLOSE_TIMEOUT = 60.0
#: Connections lost in a row, without a byte of progress, before a transfer gives up.
RESUMES = 5

#: The kinds of an entry (PROTOCOL.md §9.10).
KINDS = ("file", "dir", "symlink", "fifo", "socket", "char", "block")


class SupportsRead(Protocol):
    """A binary file object: ``read(n)`` returns at most ``n`` bytes, ``b""`` at its end."""

    def read(self, __n: int) -> bytes: ...


#: What :meth:`Files.write` takes: bytes, a binary file object, or an (async) iterable of
#: bytes.
WriteSource = Union[bytes, bytearray, memoryview, SupportsRead, AsyncIterable[bytes], Iterable[bytes]]

log = logging.getLogger("agent_shim.files")

_background: Set["asyncio.Task[None]"] = set()


def _uint(v: Any, bits: int = 64) -> bool:
    return type(v) is int and 0 <= v < (1 << bits)


@dataclass(frozen=True)
class FileStat:
    """One entry of ``fs_stat`` or ``fs_list`` (PROTOCOL.md §9.10)."""

    #: The last component (``/`` for the root).
    name: str
    #: ``file``, ``dir``, ``symlink``, ``fifo``, ``socket``, ``char`` or ``block``.
    kind: str
    size: int
    #: The permission bits (``st_mode & 0o7777``).
    mode: int
    uid: int
    gid: int
    #: The last modification, in ms since the Unix epoch.
    mtime_ms: int
    #: A symlink's target as stored (never resolved).
    target: Optional[str] = None

    @property
    def is_dir(self) -> bool:
        """Whether it is a directory."""
        return self.kind == "dir"

    @property
    def is_file(self) -> bool:
        """Whether it is a regular file."""
        return self.kind == "file"

    @property
    def is_symlink(self) -> bool:
        """Whether it is a symlink (``stat(follow=False)``, ``list``)."""
        return self.kind == "symlink"

    @classmethod
    def from_wire(cls, m: Any) -> "FileStat":
        """An entry map as the shim sends it; ProtocolError if a field is missing or bad."""
        if not isinstance(m, dict):
            raise ProtocolError("malformed", "a file entry is not a map")
        checks: Dict[str, Callable[[Any], bool]] = {
            "name": lambda v: isinstance(v, str),
            "kind": lambda v: isinstance(v, str),
            "size": _uint,
            "mode": lambda v: _uint(v, 32),
            "uid": lambda v: _uint(v, 32),
            "gid": lambda v: _uint(v, 32),
            "mtime_ms": lambda v: type(v) is int and -(1 << 63) <= v < (1 << 63),
        }
        for name, check in checks.items():
            if not check(m.get(name)):
                raise ProtocolError("malformed", f"a file entry has a bad or no `{name}`")
        target = m.get("target")
        if target is not None and not isinstance(target, str):
            raise ProtocolError("malformed", "a file entry has a bad `target`")
        return cls(
            name=m["name"], kind=m["kind"], size=m["size"], mode=m["mode"], uid=m["uid"],
            gid=m["gid"], mtime_ms=m["mtime_ms"], target=target,
        )


@dataclass(frozen=True)
class ListPage:
    """One page of :meth:`Files.list_page`; ``more``: ask again with ``after=page.last``."""

    entries: List[FileStat]
    more: bool

    @property
    def last(self) -> Optional[str]:
        """The name of this page's last entry (the ``after`` of the next page)."""
        return self.entries[-1].name if self.entries else None


@dataclass(frozen=True)
class FileEvent:
    """A change under a watch (the event ``fs_event``, PROTOCOL.md §9.10).

    ``change`` is ``created`` (or moved in), ``modified`` (a write closed), ``removed`` (or
    moved out), ``renamed`` (within the watch: ``path`` → ``to``), ``overflow`` (changes were
    lost, at least ``dropped`` of them when known: rescan) or ``ended`` (the watch ended by
    itself, its directory removed: the last event of the watch)."""

    watch: int
    change: str
    #: The path under the file root, with a leading ``/`` (empty for overflow and ended).
    path: str
    #: For ``renamed``: the new path.
    to: Optional[str]
    #: For ``overflow``: how many changes were lost, at least, when known.
    dropped: Optional[int]
    #: The event's seq in the shim's event stream.
    seq: int

    @classmethod
    def from_body(cls, seq: int, body: Dict[str, Any]) -> "FileEvent":
        """An ``fs_event`` body (fields of the wrong type read as absent)."""
        watch, change, path, to, dropped = (body.get(k) for k in ("watch", "change", "path", "to", "dropped"))
        return cls(
            watch=watch if type(watch) is int and _uint(watch) else 0,
            change=change if isinstance(change, str) else "",
            path=path if isinstance(path, str) else "",
            to=to if isinstance(to, str) else None,
            dropped=dropped if type(dropped) is int and _uint(dropped) else None,
            seq=seq,
        )

    @classmethod
    def from_event(cls, event: "Event") -> "FileEvent":
        """An ``fs_event`` read from :meth:`Client.events` (a watch this client did not take,
        e.g. one taken before a restart)."""
        if event.type != "fs_event":
            raise ValueError(f"not an fs_event: {event.type}")
        return cls.from_body(event.seq, event.body)


class Watch:
    """A watch (:meth:`Files.watch`): iterate it for its :class:`FileEvent`\\ s.

    Its events come through the client's exactly-once event stream: moving to the next
    event marks the previous one processed, and the shim replays what is not processed
    after a reconnect. An ``overflow`` event says changes were lost (rescan); an ``ended``
    event is the last. The iteration ends after ``ended`` or :meth:`close` (``unwatch``),
    and raises ConnectionClosed when the client is lost for good."""

    def __init__(self, client: "Client", watch_id: int, path: str, recursive: bool) -> None:
        self._client = client
        #: The watch's id (its ``fs_watch``'s request id), in every event's ``watch``.
        self.id = watch_id
        self.path = path
        self.recursive = recursive
        self._queue: "asyncio.Queue[Union[FileEvent, BaseException]]" = asyncio.Queue(client._queue.maxsize)
        self._current: Optional[int] = None
        self._over = False
        #: Changes reported lost by ``overflow`` events so far (the known counts).
        self.dropped = 0

    async def _deliver(self, seq: int, body: Dict[str, Any]) -> None:
        if not self._over:
            await self._queue.put(FileEvent.from_body(seq, body))
            if not self._over:
                return
            seq = -1  # closed while it waited for room: in the queue, drained below
        self._drain()
        if seq >= 0:
            self._client._consumed(seq)

    def _end(self, err: BaseException) -> None:
        try:
            self._queue.put_nowait(err)
        except asyncio.QueueFull:
            pass

    def __aiter__(self) -> "Watch":
        return self

    async def __anext__(self) -> FileEvent:
        try:
            ev = await self.next()
        except ConnectionClosed:
            if self._client._closing:
                raise StopAsyncIteration from None
            raise
        if ev is None:
            raise StopAsyncIteration
        return ev

    async def next(self, timeout: Optional[float] = None) -> Optional[FileEvent]:
        """The next event (the previous one counts as processed); None once the watch is
        over; ShimTimeout after ``timeout`` seconds without one."""
        client = self._client
        if self._current is not None:
            client._consumed(self._current)
            self._current = None
        if self._over and self._queue.empty():
            return None
        item = await self._get(timeout)
        if isinstance(item, BaseException):
            self._end(item)  # stays the answer for every later call
            raise item
        self._current = item.seq
        if item.change == "overflow":
            self.dropped += item.dropped or 0
        elif item.change == "ended":
            self._over = True
            client._forget_watch(self.id)
        return item

    async def _get(self, timeout: Optional[float]) -> Union[FileEvent, BaseException]:
        return await next_or_dead(self._queue, self._client, timeout, f"change under {self.path}")

    def _drain(self) -> None:
        """The events not taken count as processed (the watch is over for its reader)."""
        if self._current is not None:
            self._client._consumed(self._current)
            self._current = None
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, FileEvent):
                self._client._consumed(item.seq)

    async def close(self) -> None:
        """Ends the watch (``fs_unwatch``); the events not yet taken are dropped. A watch
        already over (``ended``, or gone from the shim) closes quietly."""
        over = self._over
        self._over = True
        self._client._forget_watch(self.id)
        self._drain()
        if over:
            return
        try:
            await self._client.request({"type": "fs_unwatch", "watch": self.id})
        except RemoteError as e:
            if e.code != "not_found":
                raise

    async def __aenter__(self) -> "Watch":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class FileReader:
    """A file's bytes as they stream in (:meth:`Files.read`): iterate it for chunks, or
    ``await read(n)``. Close it (``async with``, :meth:`aclose`) when done before the end:
    the connection is read no faster than this reader takes its chunks.

    A lost connection is resumed: the reader asks again from the byte it reached
    (``offset``), so the bytes come exactly once, in order (up to ``RESUMES`` losses in a row
    without progress). A file that changes while it is read raises FileChanged: the shim
    checks each ``fs_read``; across a resume the reader compares the file's size and
    modification time with a ``stat`` taken after its first chunk (a file read in one chunk
    costs no ``stat``)."""

    def __init__(
        self, client: "Client", path: str, offset: int, length: Optional[int], timeout: float
    ) -> None:
        self._stream: Optional["_Stream"] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length are not negative")
        self._client = client
        self.path = path
        self.timeout = timeout
        #: The file offset of the next byte received from the shim.
        self._at = offset
        self._end = None if length is None else offset + length
        self._buf = bytearray()
        self._done = False
        self._losses = 0
        #: The file's stat soon after the read began, to compare with after a resume.
        self._baseline: Optional["asyncio.Future[FileStat]"] = None
        #: How many times the read was asked again after a lost connection.
        self.resumes = 0

    @property
    def offset(self) -> int:
        """The file offset of the next byte this reader returns."""
        return self._at - len(self._buf)

    async def _open(self) -> "_Stream":
        client = self._client
        loop = asyncio.get_running_loop()
        budget = client.reconnect_timeout + client.connect_timeout
        deadline = loop.time() + budget
        while True:
            conn = await client._live(max(0.0, deadline - loop.time()))
            if not conn.lost.is_set():
                break
            if loop.time() >= deadline:
                raise ShimTimeout(f"not connected to {client.address} within {budget} s")
            await asyncio.sleep(0.01)  # the keeper redials
        msg: Dict[str, Any] = {"type": "fs_read", "path": self.path, "offset": self._at}
        if self._end is not None:
            msg["length"] = self._end - self._at
        self._loop = loop
        return client._start_stream(conn, msg)

    def _stop(self) -> None:
        self._loop = None
        if self._stream is not None:
            self._client._stop_stream(self._stream)
            self._stream = None

    async def _chunk(self) -> Optional[bytes]:
        """The next bytes from the shim; None at the end."""
        try:
            data = await self._next()
        except BaseException:
            self._done = True
            self._drop_baseline()
            raise
        if data is None:
            self._drop_baseline()
        elif self._baseline is None and not self._done:
            # More than one chunk: what a resume compares the file with (in the background).
            self._baseline = asyncio.ensure_future(
                Files(self._client).stat(self.path, follow=True, timeout=self.timeout)
            )
        return data

    def _drop_baseline(self) -> None:
        if self._baseline is not None:
            _settle(self._baseline)

    async def _check_unchanged(self) -> None:
        """Before a resume: the file has the size and modification time it had."""
        if self._baseline is None:
            return
        try:
            before = await asyncio.wait_for(asyncio.shield(self._baseline), self.timeout)
        except (RemoteError, ConnectionClosed, ShimTimeout, asyncio.TimeoutError) as e:
            log.warning("%s: read %s: no stat to compare after a resume: %s", self._client.address, self.path, e)
            return
        now = await Files(self._client).stat(self.path, follow=True, timeout=self.timeout)
        if (now.size, now.mtime_ms) != (before.size, before.mtime_ms):
            raise FileChanged(
                "changed",
                f"{self.path} changed while the connection was lost (size {before.size} -> {now.size}, "
                f"mtime_ms {before.mtime_ms} -> {now.mtime_ms}); read it again",
            )

    async def _next(self) -> Optional[bytes]:
        client = self._client
        while not self._done:
            if self._end is not None and self._at >= self._end:
                self._done = True
                break
            if self._stream is None:
                self._stream = await self._open()
            try:
                msg = await self._stream.get(self.timeout)
            except ConnectionClosed:
                self._stop()
                if client._dead is not None:
                    self._done = True
                    raise client._dead from None
                self._losses += 1
                if self._losses > RESUMES:
                    self._done = True
                    raise ConnectionClosed(
                        f"read {self.path}: the connection was lost {self._losses} times at byte {self._at}"
                    ) from None
                self.resumes += 1
                log.info("%s: read %s: connection lost; asking again from byte %d", client.address, self.path, self._at)
                await self._check_unchanged()
                continue
            except BaseException:
                self._stop()
                self._done = True
                raise
            if msg["type"] == "error":
                self._stream = None  # its last frame
                self._done = True
                raise remote_error(msg["code"], msg["message"], msg.get("re"))
            if msg["offset"] != self._at:
                self._stop()
                self._done = True
                raise ProtocolError("malformed", f"fs_data at {msg['offset']} where {self._at} was due")
            data: bytes = msg.get("data", b"")
            if self._end is not None and len(data) > self._end - self._at:
                data = data[: self._end - self._at]
            self._at += len(data)
            if data:
                self._losses = 0
            if msg.get("eof"):
                self._stream = None  # its last frame
                self._done = True
            if data:
                return data
        return None

    def __aiter__(self) -> "FileReader":
        return self

    async def __anext__(self) -> bytes:
        if self._buf:
            out = bytes(self._buf)
            self._buf.clear()
            return out
        chunk = await self._chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def read(self, n: int = -1) -> bytes:
        """At most ``n`` bytes (fewer only at the end; ``b""`` after it); ``n < 0``: all that
        is left."""
        if n < 0:
            # Joined once at the end: a growing buffer would be copied again as it grows.
            parts = [bytes(self._buf)]
            self._buf.clear()
            while (chunk := await self._chunk()) is not None:
                parts.append(chunk)
            return b"".join(parts)
        while len(self._buf) < n:
            chunk = await self._chunk()
            if chunk is None:
                break
            self._buf += chunk
        if n >= len(self._buf):
            out = bytes(self._buf)
            self._buf.clear()
            return out
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def aclose(self) -> None:
        """Stops reading: the rest of the stream is dropped as it comes."""
        self._drop_baseline()
        self._done = True
        self._buf.clear()
        self._stop()

    async def __aenter__(self) -> "FileReader":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # An abandoned reader must not hold its connection's reader back.
        # The collector may run in another thread than the client's loop (the sync facade).
        stream, loop = getattr(self, "_stream", None), getattr(self, "_loop", None)
        if stream is not None and loop is not None:
            try:
                loop.call_soon_threadsafe(stream.close)
            except RuntimeError:
                pass  # the loop is closed


async def _rechunk(pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Pieces of any size as chunks of WRITE_CHUNK bytes (the last one shorter)."""
    buf = bytearray()
    async for piece in pieces:
        if not isinstance(piece, (bytes, bytearray, memoryview)):
            raise TypeError(f"an upload's data must be bytes, not {type(piece).__name__}")
        if not buf and len(piece) == WRITE_CHUNK:
            yield bytes(piece)
            continue
        buf += piece
        while len(buf) >= WRITE_CHUNK:
            yield bytes(buf[:WRITE_CHUNK])
            del buf[:WRITE_CHUNK]
    if buf:
        yield bytes(buf)


def _check_source(data: Any) -> None:
    """Refuses what cannot be uploaded before the upload is opened (a str: encode it)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return
    if not isinstance(data, str) and any(hasattr(data, n) for n in ("read", "__aiter__", "__iter__")):
        return
    raise TypeError(f"cannot upload a {type(data).__name__}: give bytes, a binary file or an iterable of bytes")


async def _pieces(data: WriteSource) -> AsyncIterator[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        for at in range(0, len(view), WRITE_CHUNK):
            yield bytes(view[at : at + WRITE_CHUNK])
    elif hasattr(data, "read"):
        loop = asyncio.get_running_loop()
        reader: SupportsRead = data  # type: ignore[assignment]
        while True:
            # A file's read may block (a disk, a pipe): not on the event loop.
            piece = await loop.run_in_executor(None, reader.read, WRITE_CHUNK)
            if not piece:
                return
            yield piece
    elif hasattr(data, "__aiter__"):
        async for piece in data:
            yield piece
    elif hasattr(data, "__iter__"):
        for piece in data:
            yield piece
    else:
        raise TypeError(f"cannot upload a {type(data).__name__}: give bytes, a binary file or an iterable of bytes")


def _settle(fut: "asyncio.Future[Any]") -> None:
    """A reply no one will wait for: cancelled, or its exception marked retrieved."""
    if fut.done():
        if not fut.cancelled():
            fut.exception()
    else:
        fut.cancel()


class Files:
    """The file operations of one shim (:attr:`Client.fs`). Paths are under the shim's
    file root (a leading ``/`` names the root); operations run with the sandbox user's
    rights. Every request is bounded by the client's ``request_timeout`` (or ``timeout``)."""

    def __init__(self, client: "Client") -> None:
        self._client = client

    async def stat(self, path: str, *, follow: bool = False, timeout: Optional[float] = None) -> FileStat:
        """A path's metadata; a final symlink is reported as itself unless ``follow``."""
        msg: Dict[str, Any] = {"type": "fs_stat", "path": path}
        if follow:
            msg["follow"] = True
        reply = await self._client.request(msg, timeout)
        return FileStat.from_wire(reply.get("entry"))

    async def exists(self, path: str, *, timeout: Optional[float] = None) -> bool:
        """Whether ``path`` exists (a dangling symlink does)."""
        try:
            await self.stat(path, timeout=timeout)
        except NotFound:
            return False
        return True

    async def list_page(
        self, path: str, *, after: Optional[str] = None, limit: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> ListPage:
        """One page of a directory, sorted by name (bytewise), after the name ``after``:
        at most ``limit`` entries (None: the shim's cap, 1000). Symlinks are not followed."""
        msg: Dict[str, Any] = {"type": "fs_list", "path": path}
        if after is not None:
            msg["after"] = after
        if limit is not None:
            if not 0 < limit < (1 << 32):
                raise ValueError("limit is 1 to 2**32 - 1")
            msg["limit"] = limit
        reply = await self._client.request(msg, timeout)
        entries = [FileStat.from_wire(e) for e in reply["entries"]]
        return ListPage(entries, bool(reply.get("more", False)) and bool(entries))

    async def list(
        self, path: str, *, page_size: Optional[int] = None, timeout: Optional[float] = None
    ) -> List[FileStat]:
        """Every entry of a directory, by name, page after page (``page_size`` each)."""
        out: List[FileStat] = []
        async for entry in self.iter_list(path, page_size=page_size, timeout=timeout):
            out.append(entry)
        return out

    async def iter_list(
        self, path: str, *, page_size: Optional[int] = None, timeout: Optional[float] = None
    ) -> AsyncIterator[FileStat]:
        """The entries of a directory, by name, asking for a page at a time."""
        after: Optional[str] = None
        while True:
            page = await self.list_page(path, after=after, limit=page_size, timeout=timeout)
            for entry in page.entries:
                yield entry
            if not page.more:
                return
            if page.last == after:  # a page that ends where the last did: it would never end
                raise ProtocolError("malformed", f"fs_list of {path}: a page that does not move past {after!r}")
            after = page.last

    async def mkdir(
        self, path: str, *, parents: bool = False, mode: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> None:
        """Creates a directory; with ``parents``, its missing parents too, and an existing
        directory is fine. ``mode`` less the umask (default ``0o755``)."""
        msg: Dict[str, Any] = {"type": "fs_mkdir", "path": path}
        if parents:
            msg["parents"] = True
        if mode is not None:
            msg["mode"] = mode
        await self._client.request(msg, timeout)

    async def remove(self, path: str, *, recursive: bool = False, timeout: Optional[float] = None) -> None:
        """Removes a file, a symlink (not its target) or an empty directory; with
        ``recursive``, a directory and everything in it (symlinks never followed)."""
        msg: Dict[str, Any] = {"type": "fs_remove", "path": path}
        if recursive:
            msg["recursive"] = True
        await self._client.request(msg, timeout)

    async def rename(self, src: str, dst: str, *, timeout: Optional[float] = None) -> None:
        """Moves ``src`` to ``dst`` (``rename(2)``: replaces ``dst``, one file system)."""
        await self._client.request({"type": "fs_rename", "from": src, "to": dst}, timeout)

    def read(
        self, path: str, *, offset: int = 0, length: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> FileReader:
        """The file's bytes from ``offset`` (at most ``length`` of them) as they stream in:
        a :class:`FileReader`. ``timeout`` bounds each wait for the shim (default the
        client's ``request_timeout``)."""
        return FileReader(self._client, path, offset, length,
                          self._client.request_timeout if timeout is None else timeout)

    async def read_bytes(
        self, path: str, *, offset: int = 0, length: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> bytes:
        """The whole file (from ``offset``, at most ``length`` bytes) in memory."""
        async with self.read(path, offset=offset, length=length, timeout=timeout) as reader:
            return await reader.read()

    async def write(
        self, path: str, data: WriteSource, *, mode: Optional[int] = None, parents: bool = False,
        append: bool = False, timeout: Optional[float] = None,
    ) -> int:
        """Writes ``data`` (bytes, a binary file object, or an async or plain iterable of
        bytes) to ``path``; the number of bytes written.

        By default the file is replaced atomically once every byte is on disk (readers see
        the old file or the new one, never half); with ``append`` the bytes are appended as
        they come. ``parents`` creates missing directories; ``mode`` a new file's bits, less
        the umask (default ``0o644``). A lost connection does not lose the upload: the
        client asks the shim what it has and goes on from there. Any failure (or a
        cancellation) aborts the upload and leaves the target as it was (``append``
        excepted: what was appended stays). ``timeout`` bounds each wait for the shim (the
        close's, which syncs the file to disk, at least ``CLOSE_TIMEOUT``)."""
        _check_source(data)
        client = self._client
        budget = client.request_timeout if timeout is None else timeout
        msg: Dict[str, Any] = {"type": "fs_write_open", "path": path}
        if mode is not None:
            msg["mode"] = mode
        if parents:
            msg["parents"] = True
        if append:
            msg["append"] = True
        ready = await client.request(msg, budget)
        handle: int = ready["handle"]
        try:
            written = await self._upload(handle, data, budget)
            # The close syncs the whole file to disk: a large one on a slow disk takes a while.
            await client.request({"type": "fs_write_close", "handle": handle}, max(budget, CLOSE_TIMEOUT))
        except BaseException:
            self._abort(handle)
            raise
        return written

    def _abort(self, handle: int) -> None:
        """Throws the upload away, in the background and bounded (the caller is failing)."""
        client = self._client

        async def abort() -> None:
            try:
                await client.request({"type": "fs_write_close", "handle": handle, "abort": True})
            except Exception:
                pass  # gone already, or no connection: the shim drops it when idle

        if client._dead is None:
            task = asyncio.ensure_future(abort())
            _background.add(task)
            task.add_done_callback(_background.discard)

    async def _offset(self, handle: int, budget: float) -> int:
        """The bytes the upload has taken (``fs_write_open{handle}``)."""
        reply = await self._client.request(
            {"type": "fs_write_open", "path": "", "handle": handle}, max(budget, self._client.reconnect_timeout)
        )
        taken: int = reply["offset"]
        return taken

    async def _send_chunk(self, handle: int, offset: int, data: bytes) -> "asyncio.Future[Dict[str, Any]]":
        client = self._client
        conn = await client._live(client.reconnect_timeout + client.connect_timeout)
        msg = {"type": "fs_write_data", "handle": handle, "offset": offset, "data": data}
        fut = client._send_request(conn, msg)
        try:
            await asyncio.wait_for(conn.writer.drain(), client.request_timeout)
        except (OSError, asyncio.TimeoutError):
            pass  # the reply's wait tells
        return fut

    async def _upload(self, handle: int, data: WriteSource, budget: float) -> int:
        """Sends ``data``'s bytes to the upload, WRITE_WINDOW chunks in flight, the unanswered
        ones kept to send again after a loss."""
        client = self._client
        window: Deque[Tuple[int, bytes, "asyncio.Future[Dict[str, Any]]"]] = collections.deque()
        source = _rechunk(_pieces(data)).__aiter__()
        offset = 0
        eof = False
        losses = 0
        taken_before = -1
        try:
            while not eof or window:
                if not eof and len(window) < WRITE_WINDOW:
                    try:
                        chunk = await source.__anext__()
                    except StopAsyncIteration:
                        eof = True
                        continue
                    window.append((offset, chunk, await self._send_chunk(handle, offset, chunk)))
                    offset += len(chunk)
                    continue
                at, chunk, fut = window[0]
                try:
                    await asyncio.wait_for(asyncio.shield(fut), budget)
                    window.popleft()
                    continue
                except asyncio.TimeoutError:
                    raise ShimTimeout(f"write: no answer for the bytes at {at} within {budget} s") from None
                except RemoteError as e:
                    # `invalid`: out of order after a reconnect; `limit`: too much in flight.
                    if e.code not in ("invalid", "limit"):
                        raise
                    if e.code == "limit":
                        await asyncio.sleep(0.05)
                except ConnectionClosed:
                    if client._dead is not None:
                        raise client._dead from None
                # Ask the upload what it has, then send again from there, in order.
                taken = await self._offset(handle, budget)
                log.info("%s: upload %d: the shim has %d bytes; sending again from there", client.address, handle, taken)
                if taken > taken_before:
                    losses = 0
                losses += 1
                taken_before = taken
                if losses > RESUMES:
                    raise ConnectionClosed(f"write: the upload stalled at byte {taken}")
                again = list(window)
                window.clear()
                for o, b, f in again:
                    _settle(f)
                for o, b, _ in again:
                    if o + len(b) > taken:
                        window.append((o, b, await self._send_chunk(handle, o, b)))
            return offset
        finally:
            for _, _, f in window:
                _settle(f)
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()

    async def watch(self, path: str, *, recursive: bool = False, timeout: Optional[float] = None) -> Watch:
        """Watches ``path`` (the tree below, directories created later included, with
        ``recursive``): a :class:`Watch` to iterate for its :class:`FileEvent`\\ s, exactly
        once across reconnects. Without :meth:`Client.events` called first, the client's
        events start flowing from the shim's last seq now (as :meth:`Client.exec` does)."""
        client = self._client
        if not client._pumping:
            client._start_pump(after=(await client.status()).last_seq)
        msg: Dict[str, Any] = {"type": "fs_watch", "id": client._next_id(), "path": path}
        if recursive:
            msg["recursive"] = True
        watch = Watch(client, msg["id"], path, recursive)
        # Registered before the request: its events may come right behind the `ok`.
        client._watches[watch.id] = watch
        try:
            await client.request(msg, timeout)
        except BaseException:
            client._watches.pop(watch.id, None)
            raise
        return watch

    async def unwatch(self, watch: Union[Watch, int]) -> None:
        """Ends a watch (a :class:`Watch`, or the id of one taken before, e.g. by another
        client): ``fs_unwatch``. NotFound if the shim has no such watch."""
        if isinstance(watch, Watch):
            await watch.close()
            return
        self._client._forget_watch(watch)
        await self._client.request({"type": "fs_unwatch", "watch": watch})
