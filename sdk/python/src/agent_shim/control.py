"""The control client: commands, events (acknowledged, resumable), exec, reconnects.

::

    async with await Client.connect("unix:/run/agent.sock", token=read_token(path)) as c:
        await c.submit_task("t1", "hello")
        async for ev in c.events(after=cursor):
            ...                  # process the event, then persist ev.seq as the cursor
            if ev.type == "task_done":
                break

Every wait is bounded (connect, handshake, each request, reconnection); a silent
connection is probed with ``ping`` and redialed; a bad frame or a dead shim raises.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import os
import random
import re
import socket
import time
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Callable,
    Deque,
    Dict,
    List,
    Optional,
    Set,
    Tuple,
    Union,
)

from . import __version__
from ._wire import (
    HANDSHAKE_MAX_FRAME,
    MAX_FRAME,
    SHIM_TO_CONTROL,
    Message,
    check_hello,
    encode,
    error_frame,
    limit,
    read_frame,
)
from .errors import (
    AuthenticationError,
    ConnectionClosed,
    ProtocolError,
    RemoteError,
    ShimTimeout,
    remote_error,
)
from ._waits import next_or_dead
from .process import Process, TtySize, exec_request

if TYPE_CHECKING:
    from .files import Files, Watch

__all__ = ["Client", "Event", "Lagged", "Status", "parse_address", "DEFAULT_CONSUMER"]

log = logging.getLogger("agent_shim.control")

_AUTH_PREFIX = b"agent-shim-auth-v1\0"
#: The durable consumer a client is unless told otherwise (control-link's default too).
DEFAULT_CONSUMER = "control"
_CONSUMER = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
#: Codes worth another connection attempt after a backoff; any other ends the attempts.
_RETRY_CODES = {"busy", "limit", "timeout", "internal", "shutting_down"}

_FAILURES = (ConnectionClosed, ProtocolError, RemoteError, ShimTimeout, asyncio.TimeoutError, OSError)

#: Acknowledge at least every this many events, bytes, or seconds (the shim's hello may
#: advertise its own: `ack_every`, `ack_delay_ms`; a quarter of its `max_bytes`).
ACK_EVERY = 64
ACK_BYTES = 1 << 20
ACK_DELAY = 0.2


def mac(token: bytes, role: str, peer_nonce: bytes, own_nonce: bytes) -> bytes:
    """The proof of PROTOCOL.md §8.2 sent by ``role``."""
    msg = _AUTH_PREFIX + role.encode() + b"\0" + peer_nonce + own_nonce
    return hmac.new(token, msg, hashlib.sha256).digest()


def parse_address(address: str) -> Tuple[str, Any]:
    """``unix:PATH``, ``tcp:HOST:PORT`` (``[v6]``) or ``vsock:CID:PORT`` → (kind, target)."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return "unix", rest
    if kind in ("tcp", "vsock"):
        host, sep, port = rest.rpartition(":")
        if sep and host and port.isdigit() and int(port) < 65536:
            if kind == "tcp":
                return "tcp", (host[1:-1] if host.startswith("[") and host.endswith("]") else host, int(port))
            if host.isdigit():
                return "vsock", (int(host), int(port))
    raise ValueError(f"bad address {address!r}: use unix:PATH, tcp:HOST:PORT or vsock:CID:PORT")


@dataclass(frozen=True)
class Event:
    """One event (``event{seq, event}``): its seq, its type, and its body (with ``type``)."""

    seq: int
    type: str
    body: Dict[str, Any]
    #: The frame's body size, what acknowledging it frees in the shim's buffer.
    size: int = 0

    def get(self, field: str, default: Any = None) -> Any:
        """A field of the event's body."""
        return self.body.get(field, default)


@dataclass(frozen=True)
class Lagged:
    """An observer fell behind: ``missed`` events were skipped; the next is ``next_seq``."""

    missed: int
    next_seq: int


@dataclass(frozen=True)
class Status:
    """The shim's ``status_reply`` (PROTOCOL.md §9.5); ``raw`` holds every field."""

    state: str
    restarts: int
    uptime_ms: int
    children: int
    reaped: int
    tasks_queued: int
    execs_running: int
    buffered_events: int
    buffered_bytes: int
    last_seq: int
    rss_bytes: int
    driver_pid: Optional[int]
    task_running: Optional[str]
    idle_since_ms: Optional[int]
    raw: Dict[str, Any]
    #: Which per-child cgroups the shim creates (``v2-delegated``, ``v1``, ``none``).
    cgroups: Optional[str] = None


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: Message) -> None:
        self.reader = reader
        self.writer = writer
        self.hello = hello
        self.lost = asyncio.Event()
        self.why = "connection lost"
        self.task: Optional["asyncio.Task[None]"] = None
        self.last_read = time.monotonic()

    def close(self, why: str) -> None:
        if not self.lost.is_set():
            self.why = why
            self.lost.set()
        self.writer.close()


Item = Union[Event, Lagged, BaseException]

#: Frames of one streamed reply held for its reader at most (``fs_read``'s ``fs_data``, up
#: to 256 KiB each): beyond, the connection is read no faster than the reader takes them,
#: and the shim sends no faster (PROTOCOL.md §8.11, "Streams").
STREAM_FRAMES = 16


class _Stream:
    """The frames of one streamed reply on one connection (the frames of an ``fs_read``).

    The connection's reader waits while ``STREAM_FRAMES`` wait here (the protocol's flow
    control); the stream ends with ConnectionClosed when its connection does."""

    def __init__(self, conn: _Conn, request_id: int) -> None:
        self.conn = conn
        self.id = request_id
        self.frames: Deque[Union[Message, BaseException]] = collections.deque()
        self.ready = asyncio.Event()
        self.space = asyncio.Event()
        #: Closed by its reader (nothing more is kept) or ended by its connection.
        self.closed = False

    async def feed(self, msg: Message) -> None:
        while len(self.frames) >= STREAM_FRAMES and not self.closed:
            self.space.clear()
            await self.space.wait()
        if not self.closed:
            self.frames.append(msg)
            self.ready.set()

    def end(self, err: BaseException) -> None:
        if not self.closed:
            self.frames.append(err)
            self.closed = True
        self.ready.set()
        self.space.set()

    def close(self) -> None:
        self.closed = True
        self.frames.clear()
        self.ready.set()
        self.space.set()

    async def get(self, timeout: float) -> Message:
        while not self.frames:
            if self.closed:
                raise ConnectionClosed("the stream was closed")
            self.ready.clear()
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except asyncio.TimeoutError:
                raise ShimTimeout(f"nothing from the shim within {timeout} s") from None
        item = self.frames.popleft()
        self.space.set()
        if isinstance(item, BaseException):
            raise item
        return item


@dataclass(frozen=True)
class ExecInfo:
    """One exec of ``list_execs`` (PROTOCOL.md §8.10); ``exit`` is None while it runs."""

    exec_id: int
    argv: List[str]
    pid: int
    uid: int
    owner: str
    started_ms: int
    output_bytes: int
    tag: Optional[str]
    user: Optional[str]
    exit: Optional[Dict[str, Any]]
    raw: Dict[str, Any]


@dataclass(frozen=True)
class AttachOutput:
    """Output of an attached exec: ``data`` at byte ``offset`` of its output."""

    stream: str
    offset: int
    data: bytes


@dataclass(frozen=True)
class AttachLagged:
    """This client read too slowly: ``missed`` bytes skipped, it goes on at ``next_offset``."""

    missed: int
    next_offset: int


@dataclass(frozen=True)
class AttachExit:
    """The attached exec ended (the fields of its ``exec_exit`` in ``raw``); the last item."""

    code: Optional[int]
    signal: Optional[str]
    raw: Dict[str, Any]


AttachItem = Union[AttachOutput, AttachLagged, AttachExit]


class Attachment:
    """An attached exec (:meth:`Client.attach_exec`): iterate it for its output, then its
    exit. It belongs to the connection: if that is lost the iteration raises
    ConnectionClosed, and ``next_offset`` is where to attach again."""

    def __init__(self, exec_id: int, reply: Message) -> None:
        self.exec_id = exec_id
        self.from_offset: int = reply["from_offset"]
        self.first_offset: int = reply["first_offset"]
        self.end_offset: int = reply["end_offset"]
        self.running: bool = reply["running"]
        self.next_offset = self.from_offset
        #: The exit, once it came.
        self.exit: Optional[AttachExit] = None
        self._queue: "asyncio.Queue[Union[AttachItem, BaseException]]" = asyncio.Queue()

    def _put(self, item: Union[AttachItem, BaseException]) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> "Attachment":
        return self

    async def __anext__(self) -> AttachItem:
        if self.exit is not None:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, AttachOutput):
            self.next_offset = item.offset + len(item.data)
        elif isinstance(item, AttachLagged):
            self.next_offset = item.next_offset
        else:
            self.exit = item
        return item


class Client:
    """A control-plane connection to one shim. Use :meth:`connect`.

    ``consumer`` names the durable consumer this connection is (default ``"control"``, as
    control-link's): the shim keeps its events until it acknowledges them, and a newer
    connection of the same name replaces this one. ``consumer=None`` makes an observer:
    it sees events while connected, its acks are ignored, nothing is kept for it. (Shims
    without sessions have one shared position and ignore the name.)
    """

    def __init__(
        self,
        address: str,
        *,
        token: Optional[Union[bytes, str]] = None,
        consumer: Optional[str] = DEFAULT_CONSUMER,
        connect_timeout: float = 10.0,
        request_timeout: float = 10.0,
        reconnect: bool = True,
        reconnect_timeout: float = 30.0,
        backoff: Tuple[float, float] = (0.1, 5.0),
        keepalive: float = 15.0,
        max_frame: int = MAX_FRAME,
        queue_size: int = 4096,
        software: str = "agent-shim-python",
    ) -> None:
        self.address = address
        self._target = parse_address(address)
        self._token = token.encode() if isinstance(token, str) else token
        if self._token is not None and not self._token:
            raise ValueError("the token is empty")
        if consumer is not None and not _CONSUMER.match(consumer):
            raise ValueError("a consumer name is 1 to 64 of A-Z a-z 0-9 . _ -")
        if self._token is None and self._target[0] != "unix":
            raise ValueError("tcp and vsock need a token")
        self.consumer = consumer
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.reconnect = reconnect
        self.reconnect_timeout = reconnect_timeout
        self.backoff = backoff
        self.keepalive = keepalive
        self.max_frame = max_frame
        self.software = software
        self._conn: Optional[_Conn] = None
        self._connected = asyncio.Event()
        self._dead: Optional[BaseException] = None
        self._dead_event = asyncio.Event()
        self._closing = False
        self._keeper: Optional["asyncio.Task[None]"] = None
        self._pending: Dict[int, Tuple["asyncio.Future[Message]", bool]] = {}
        self._id_high = random.getrandbits(32) << 32
        self._id_low = 0
        # events
        self._pumping = False
        self._from_now = False
        self._queue: "asyncio.Queue[Item]" = asyncio.Queue(queue_size)
        self._unconsumed: Deque[Tuple[int, int]] = collections.deque()
        self._last_received = 0
        self._resumed_from = 0
        self._last_acked = 0
        self._bytes_since_ack = 0
        self._ack_timer: Optional[asyncio.TimerHandle] = None
        self._procs: Dict[int, Process] = {}
        #: The execs followed on the current connection (attach_exec), by exec id.
        self._attached: Dict[int, Attachment] = {}
        self._streaming = False
        #: Seqs of the events handed out and not yet processed, and those processed out of
        #: order (a watch's before the event stream's): the ack point is below the first.
        self._unconsumed_seqs: Set[int] = set()
        self._processed: Set[int] = set()
        #: Streamed replies (fs_read) by request id, and the watches taken here by watch id.
        self._streams: Dict[int, _Stream] = {}
        self._watches: Dict[int, "Watch"] = {}
        #: Watches ended here: their late events are acknowledged and dropped.
        self._unwatched: "collections.OrderedDict[int, None]" = collections.OrderedDict()
        self._files: Optional["Files"] = None
        #: The shim's hello on the current connection.
        self.hello: Message = {}
        #: How many times the connection was re-established.
        self.reconnects = 0

    # -- connecting --

    @classmethod
    async def connect(cls, address: str, **options: Any) -> "Client":
        """Connects and authenticates (see the constructor for ``options``)."""
        client = cls(address, **options)
        await client._start()
        return client

    async def __aenter__(self) -> "Client":
        if self._keeper is None:
            await self._start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def agent_id(self) -> Optional[str]:
        """The ``agent_id`` of the shim's hello."""
        value = self.hello.get("agent_id")
        return value if isinstance(value, str) else None

    @property
    def cgroups(self) -> Optional[str]:
        """The ``cgroups`` of the shim's hello: which per-child cgroups it creates
        (``v2-delegated``, ``v1`` or ``none``; None from a shim that does not say)."""
        value = self.hello.get("cgroups")
        return value if isinstance(value, str) else None

    @property
    def fs(self) -> "Files":
        """The shim's file operations (:class:`~agent_shim.files.Files`): stat, list, read,
        write, mkdir, remove, rename, watch."""
        if self._files is None:
            from .files import Files

            self._files = Files(self)
        return self._files

    async def _start(self) -> None:
        self._attach(await self._dial(self.connect_timeout))
        self._keeper = asyncio.ensure_future(self._keep())

    async def close(self) -> None:
        """Flushes the acknowledgement, closes the connection, ends every wait."""
        if self._closing:
            return
        self._closing = True
        conn = self._conn
        if conn is not None and not conn.lost.is_set():
            self._send_ack(conn)
            try:
                await asyncio.wait_for(conn.writer.drain(), 2)
            except (OSError, asyncio.TimeoutError):
                pass
            conn.close("closed by the client")
        if self._keeper is not None:
            self._keeper.cancel()
        self._die(ConnectionClosed("the client was closed"))

    def _die(self, why: BaseException) -> None:
        if self._dead is None:
            self._dead = why
        self._dead_event.set()
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(self._dead)
        for proc in self._procs.values():
            proc._lost(str(self._dead))
        self._procs.clear()
        self._end_attachments(str(self._dead))
        self._end_streams(None, self._dead)
        for watch in self._watches.values():
            watch._end(self._dead)
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        try:
            self._queue.put_nowait(self._dead)
        except asyncio.QueueFull:
            pass
        self._connected.set()  # wakes every waiter; they see _dead

    async def _open(self, timeout: float) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        kind, target = self._target
        if kind == "unix":
            return await asyncio.wait_for(asyncio.open_unix_connection(target), timeout)
        if kind == "tcp":
            return await asyncio.wait_for(asyncio.open_connection(*target), timeout)
        family = getattr(socket, "AF_VSOCK", None)
        if family is None:
            raise ConnectionClosed("this Python has no AF_VSOCK")
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, target), timeout)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def _handshake(self, timeout: float) -> _Conn:
        reader, writer = await self._open(timeout)
        try:
            return await asyncio.wait_for(self._handshake_on(reader, writer), timeout)
        except BaseException:
            writer.close()
            raise

    async def _handshake_on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Conn:
        nonce = os.urandom(32) if self._token is not None else None
        hello: Message = {
            "type": "hello", "protocol": "agent-shim", "versions": [1], "role": "control",
            "software": self.software, "software_version": __version__, "capabilities": [],
        }
        if nonce is not None:
            hello["nonce"] = nonce
        if self.consumer is not None:
            hello["consumer"] = self.consumer
        writer.write(encode(hello))
        got = await read_frame(reader, SHIM_TO_CONTROL, HANDSHAKE_MAX_FRAME)
        if got is None:
            raise ConnectionClosed("the shim closed the connection before its hello")
        shim_hello = got[0]
        try:
            check_hello(shim_hello, "shim")
        except ProtocolError as e:
            if shim_hello["type"] != "error":
                writer.write(error_frame(e.code, e.message))
            if e.code == "unauthorized":
                raise AuthenticationError(e.code, e.message) from None
            raise
        shim_nonce = shim_hello.get("nonce")
        if self._token is not None and nonce is not None:
            if not isinstance(shim_nonce, bytes) or len(shim_nonce) != 32:
                writer.write(error_frame("unauthorized", "the shim did not authenticate"))
                raise AuthenticationError("unauthorized", "the shim's hello has no nonce (a downgrade?)")
            writer.write(encode({"type": "auth", "mac": mac(self._token, "control", shim_nonce, nonce)}))
            got = await read_frame(reader, SHIM_TO_CONTROL, HANDSHAKE_MAX_FRAME)
            if got is None:
                raise AuthenticationError("unauthorized", "the shim closed the connection: a wrong token?")
            auth = got[0]
            if auth["type"] == "error":
                raise AuthenticationError(auth["code"], auth["message"])
            if auth["type"] != "auth":
                raise ProtocolError("invalid_state", f"expected auth, got {auth['type']}")
            want = mac(self._token, "shim", nonce, shim_nonce)
            if not hmac.compare_digest(auth["mac"], want):
                writer.write(error_frame("unauthorized", "wrong proof"))
                raise AuthenticationError("unauthorized", "the shim's proof is wrong: another token")
        elif shim_nonce is not None:
            raise AuthenticationError("unauthorized", "the shim wants a token and we have none")
        return _Conn(reader, writer, shim_hello)

    async def _dial(self, budget: float) -> _Conn:
        """Dials until connected or ``budget`` seconds passed; backoff with jitter."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        delay = self.backoff[0]
        last: BaseException = ShimTimeout(f"cannot connect to {self.address} within {budget} s")
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ShimTimeout(f"cannot connect to {self.address} within {budget} s: {last}") from last
            try:
                return await self._handshake(min(remaining, max(self.connect_timeout, 0.1)))
            except (ProtocolError, RemoteError) as e:
                if e.code not in _RETRY_CODES:
                    raise
                last = e  # busy, limit, timeout: retry after a backoff
            except asyncio.TimeoutError:
                last = ShimTimeout("the handshake timed out")
            except (OSError, ConnectionClosed) as e:
                last = e
            await asyncio.sleep(min(delay * random.uniform(0.8, 1.2), max(0.0, deadline - loop.time())))
            delay = min(delay * 2, self.backoff[1])

    def _attach(self, conn: _Conn) -> None:
        before = self.hello.get("instance")
        now = conn.hello.get("instance")
        if before is not None and now is not None and before != now:
            # Another shim answers at this address (PROTOCOL.md §8.3): its stream is a new
            # one, taken from its start.
            log.warning("%s: shim instance %x after %x: a new shim", self.address, now, before)
            self._new_shim()
        self._conn = conn
        self.hello = conn.hello
        conn.task = asyncio.ensure_future(self._read(conn))
        if self._pumping:
            self._send_resume(conn)
        self._connected.set()

    async def _keep(self) -> None:
        """Keeps a connection: probes a silent one, redials a lost one."""
        while not self._closing:
            conn = self._conn
            assert conn is not None
            try:
                await asyncio.wait_for(conn.lost.wait(), self.keepalive)
            except asyncio.TimeoutError:
                if time.monotonic() - conn.last_read >= self.keepalive:
                    asyncio.ensure_future(self._probe(conn))
                continue
            self._connected.clear()
            for fut, _ in list(self._pending.values()):
                if not fut.done():
                    fut.set_exception(ConnectionClosed(conn.why))
            if self._closing:
                return
            if not self.reconnect or conn.why.startswith("replaced"):
                self._die(ConnectionClosed(f"the connection to {self.address} ended: {conn.why}"))
                return
            try:
                new = await self._dial(self.reconnect_timeout)
            except _FAILURES as e:
                self._die(ConnectionClosed(f"lost {self.address} ({conn.why}) and could not reconnect: {e}"))
                return
            self.reconnects += 1
            self._attach(new)

    async def _probe(self, conn: _Conn) -> None:
        try:
            await self._request_on(conn, {"type": "ping"}, self.request_timeout)
        except _FAILURES:
            conn.close("no answer to a keepalive ping")

    async def _read(self, conn: _Conn) -> None:
        why = "the shim closed the connection"
        try:
            while True:
                got = await read_frame(conn.reader, SHIM_TO_CONTROL, self.max_frame)
                if got is None:
                    break
                conn.last_read = time.monotonic()
                await self._on_message(conn, *got)
        except ProtocolError as e:
            why = f"bad frame from the shim: {e}"
            log.warning("%s: %s", self.address, why)
            try:
                conn.writer.write(error_frame(e.code, e.message, e.re))
            except OSError:
                pass
        except ConnectionClosed as e:
            why = str(e)
        except asyncio.CancelledError:
            why = "closed"
            raise
        finally:
            conn.close(why)
            self._end_attachments(why)
            self._end_streams(conn, ConnectionClosed(f"the connection was lost: {why}"))

    async def _on_message(self, conn: _Conn, msg: Message, size: int) -> None:
        kind = msg["type"]
        if kind == "event":
            await self._on_event(msg["seq"], msg["event"], size)
        elif kind in ("fs_data", "error") and msg.get("re") in self._streams:
            stream = self._streams[msg["re"]]
            if kind == "error" or msg.get("eof"):
                del self._streams[msg["re"]]  # the stream's last frame
            await stream.feed(msg)
        elif kind in ("attach_output", "attach_lagged", "attach_exit"):
            self._on_attached(msg)
        elif "re" in msg and kind in (
            "ok", "pong", "exec_started", "status_reply", "error", "exec_list", "exec_attached",
            "fs_stat_reply", "fs_list_reply", "fs_write_ready",
        ):
            entry = self._pending.get(msg["re"])
            if entry is None or entry[0].done():
                return
            fut, is_exec = entry
            if kind == "error":
                fut.set_exception(remote_error(msg["code"], msg["message"], msg["re"], msg.get("first_available")))
                return
            if kind == "exec_started" and is_exec:
                proc = Process(msg["exec_id"], msg["pid"], self._send)
                self._procs[msg["exec_id"]] = msg["process"] = proc
            fut.set_result(msg)
        elif kind == "lagged":
            skipped_to = msg["next_seq"] - 1
            self._resumed_from = skipped_to
            self._last_received = max(self._last_received, skipped_to)
            await self._queue.put(Lagged(msg["missed"], msg["next_seq"]))
        elif kind == "error":
            err = remote_error(msg["code"], msg["message"], None, msg.get("first_available"))
            if msg["code"] == "replaced":
                conn.close("replaced by a newer connection of the same consumer")
                self._die(ConnectionClosed(f"replaced: {msg['message']}"))
            elif msg["code"] == "gap" and self._pumping:
                await self._queue.put(err)
            else:
                log.warning("%s: error from the shim: %s", self.address, err)

    def _end_streams(self, conn: Optional[_Conn], err: BaseException) -> None:
        """Streamed replies belong to their connection (all of them: ``conn`` None)."""
        for request_id, stream in list(self._streams.items()):
            if conn is None or stream.conn is conn:
                del self._streams[request_id]
                stream.end(err)

    def _start_stream(self, conn: _Conn, msg: Message) -> _Stream:
        """Sends a request answered by a stream of frames (``fs_read``) on ``conn``."""
        msg["id"] = self._next_id()
        stream = _Stream(conn, msg["id"])
        if conn.lost.is_set():
            stream.end(ConnectionClosed(conn.why))
            return stream
        self._streams[msg["id"]] = stream
        try:
            conn.writer.write(encode(msg, limit(conn.hello, "max_frame", MAX_FRAME)))
        except BaseException:
            self._streams.pop(msg["id"], None)
            raise
        return stream

    def _stop_stream(self, stream: _Stream) -> None:
        """Its reader is done with it: later frames of the request are dropped."""
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
        stream.close()

    def _send_request(self, conn: _Conn, msg: Message) -> "asyncio.Future[Message]":
        """Sends a request on ``conn`` without waiting: the future of its reply (failed with
        ConnectionClosed when the connection is lost first)."""
        msg.setdefault("id", self._next_id())
        request_id = msg["id"]
        fut: "asyncio.Future[Message]" = asyncio.get_running_loop().create_future()
        if conn.lost.is_set():
            fut.set_exception(ConnectionClosed(conn.why))
            return fut
        frame = encode(msg, limit(conn.hello, "max_frame", MAX_FRAME))
        self._pending[request_id] = (fut, False)

        def forget(done: "asyncio.Future[Message]") -> None:
            entry = self._pending.get(request_id)
            if entry is not None and entry[0] is done:
                del self._pending[request_id]

        fut.add_done_callback(forget)
        conn.writer.write(frame)
        return fut

    def _end_attachments(self, why: str) -> None:
        """Attachments belong to the connection: each ends with ConnectionClosed."""
        for att in self._attached.values():
            att._put(ConnectionClosed(f"attachment ended: {why}"))
        self._attached.clear()

    def _on_attached(self, msg: Message) -> None:
        att = self._attached.get(msg["exec_id"])
        if att is None:
            return
        kind = msg["type"]
        if kind == "attach_output":
            att._put(AttachOutput(msg["stream"], msg["offset"], msg["data"]))
        elif kind == "attach_lagged":
            att._put(AttachLagged(msg["missed"], msg["next_offset"]))
        else:
            del self._attached[msg["exec_id"]]
            att._put(AttachExit(msg.get("code"), msg.get("signal"), msg))

    # -- requests --

    def _next_id(self) -> int:
        self._id_low = (self._id_low + 1) & 0xFFFFFFFF
        return self._id_high | self._id_low

    async def _live(self, timeout: float) -> _Conn:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            raise ShimTimeout(f"not connected to {self.address} within {timeout} s") from None
        if self._dead is not None:
            raise self._dead
        assert self._conn is not None
        return self._conn

    async def _request_on(self, conn: _Conn, msg: Message, timeout: float, is_exec: bool = False) -> Message:
        if "id" not in msg:
            msg["id"] = self._next_id()
        if conn.lost.is_set():
            raise ConnectionClosed(conn.why)
        fut: "asyncio.Future[Message]" = asyncio.get_running_loop().create_future()
        self._pending[msg["id"]] = (fut, is_exec)
        try:
            conn.writer.write(encode(msg, limit(conn.hello, "max_frame", MAX_FRAME)))
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        finally:
            self._pending.pop(msg["id"], None)

    async def request(self, msg: Message, timeout: Optional[float] = None) -> Message:
        """Sends a request and returns its reply; ``error`` replies raise RemoteError.

        A connection lost meanwhile is redialed and the request sent again with the same
        ``id`` (the shim answers a repeated id from its record: nothing runs twice)."""
        loop = asyncio.get_running_loop()
        budget = self.request_timeout if timeout is None else timeout
        deadline = loop.time() + budget
        msg = dict(msg)
        msg.setdefault("id", self._next_id())
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ShimTimeout(f"no answer to {msg['type']} within {budget} s")
            conn = await self._live(remaining)
            try:
                return await self._request_on(conn, msg, max(0.0, deadline - loop.time()), msg["type"] == "exec")
            except asyncio.TimeoutError:
                raise ShimTimeout(f"no answer to {msg['type']} within {budget} s") from None
            except ConnectionClosed:
                if self._dead is not None:
                    raise self._dead from None
                await asyncio.sleep(0.01)  # the keeper redials; then send again, same id

    async def _send(self, msg: Message) -> None:
        conn = await self._live(self.request_timeout)
        conn.writer.write(encode(msg, limit(conn.hello, "max_frame", MAX_FRAME)))
        try:
            await asyncio.wait_for(conn.writer.drain(), self.request_timeout)
        except asyncio.TimeoutError:
            raise ShimTimeout("the shim does not read") from None
        except OSError as e:
            raise ConnectionClosed(str(e)) from None

    async def _ok(self, msg: Message) -> None:
        await self.request(msg)

    # -- typed commands (PROTOCOL.md §8.5) --

    async def ping(self) -> float:
        """A round trip, in seconds."""
        start = time.monotonic()
        await self.request({"type": "ping"})
        return time.monotonic() - start

    async def status(self) -> Status:
        """The shim's status."""
        r = await self.request({"type": "status"})
        return Status(
            state=r["state"], restarts=r["restarts"], uptime_ms=r["uptime_ms"],
            children=r["children"], reaped=r["reaped"], tasks_queued=r["tasks_queued"],
            execs_running=r["execs_running"], buffered_events=r["buffered_events"],
            buffered_bytes=r["buffered_bytes"], last_seq=r["last_seq"], rss_bytes=r["rss_bytes"],
            driver_pid=r.get("driver_pid"), task_running=r.get("task_running"),
            idle_since_ms=r.get("idle_since_ms"), raw=r, cgroups=r.get("cgroups"),
        )

    async def list_execs(self) -> List[ExecInfo]:
        """The execs running and the recently exited ones (``list_execs``, PROTOCOL.md §8.10)."""
        r = await self.request({"type": "list_execs"})
        return [
            ExecInfo(
                exec_id=e["exec_id"], argv=list(e["argv"]), pid=e["pid"], uid=e["uid"],
                owner=e["owner"], started_ms=e["started_ms"], output_bytes=e["output_bytes"],
                tag=e.get("tag"), user=e.get("user"), exit=e.get("exit"), raw=e,
            )
            for e in r["execs"]
        ]

    async def attach_exec(self, exec_id: int, from_offset: Optional[int] = None) -> Attachment:
        """Follows exec ``exec_id`` (``attach_exec``, PROTOCOL.md §8.10): the output the shim
        still retains from ``from_offset`` (None: the oldest byte retained), then the live
        output, then its exit. An offset no longer retained raises RemoteError ``gap`` whose
        ``first_available`` is the oldest offset retained. Not retried on another
        connection: a lost connection ends the attachment (attach again from its
        ``next_offset``)."""
        conn = await self._live(self.request_timeout)
        msg: Message = {"type": "attach_exec", "id": self._next_id(), "exec_id": exec_id}
        if from_offset is not None:
            msg["from_offset"] = from_offset
        # Registered before the request: output may follow the reply at once.
        pending = Attachment(exec_id, {"from_offset": from_offset or 0, "first_offset": 0,
                                       "end_offset": 0, "running": True})
        self._attached[exec_id] = pending
        try:
            reply = await self._request_on(conn, msg, self.request_timeout)
        except BaseException:
            if self._attached.get(exec_id) is pending:
                del self._attached[exec_id]
            raise
        pending.from_offset = pending.next_offset = reply["from_offset"]
        pending.first_offset = reply["first_offset"]
        pending.end_offset = reply["end_offset"]
        pending.running = reply["running"]
        return pending

    async def detach_exec(self, exec_id: int) -> None:
        """Stops following exec ``exec_id`` on this connection (``detach_exec``)."""
        self._attached.pop(exec_id, None)
        await self.request({"type": "detach_exec", "exec_id": exec_id})

    async def submit_task(
        self,
        task_id: str,
        input: Any,
        *,
        output_schema: Any = None,
        timeout_ms: Optional[int] = None,
        redeliver: bool = False,
    ) -> None:
        """Queues a task (idempotent by ``task_id``); ``task_accepted`` follows as an event."""
        msg: Message = {"type": "submit_task", "task_id": task_id, "input": input}
        if output_schema is not None:
            msg["output_schema"] = output_schema
        if timeout_ms is not None:
            msg["timeout_ms"] = timeout_ms
        if redeliver:
            msg["redeliver"] = True
        await self._ok(msg)

    async def cancel_task(self, task_id: str, grace_ms: Optional[int] = None) -> None:
        """Cancels a queued or running task."""
        msg: Message = {"type": "cancel_task", "task_id": task_id}
        if grace_ms is not None:
            msg["grace_ms"] = grace_ms
        await self._ok(msg)

    async def pause(self, timeout_ms: Optional[int] = None) -> None:
        """Asks the driver for a safe point; the event ``paused`` says it is there."""
        msg: Message = {"type": "pause"}
        if timeout_ms is not None:
            msg["timeout_ms"] = timeout_ms
        await self._ok(msg)

    async def resume(self, unix_ms: Optional[int] = None) -> None:
        """Resumes a paused agent (``invalid_state`` when it is not paused).

        With ``unix_ms`` (milliseconds since the Unix epoch; ``int(time.time() * 1000)`` for
        this machine's time), the shim first sets the sandbox's wall clock to it, as
        :meth:`set_clock` does, and only then wakes the driver: what a microVM restored from
        a snapshot needs. A ``clock_set`` event reports the jump. A time the kernel refuses is
        ``invalid`` (``internal`` where the shim may not set the clock) and the agent stays
        paused.
        """
        msg: Message = {"type": "resume"}
        if unix_ms is not None:
            msg["unix_ms"] = unix_ms
        await self._ok(msg)

    async def set_clock(self, unix_ms: int) -> None:
        """Sets the sandbox's wall clock to ``unix_ms`` (milliseconds since the Unix epoch).

        A ``clock_set`` event reports the jump. ``invalid`` for a time the kernel refuses,
        ``internal`` where the shim may not set the clock (inside a container: the clock is
        the host's).
        """
        await self._ok({"type": "set_clock", "unix_ms": unix_ms})

    async def signal(self, signal: str, *, exec_id: Optional[int] = None) -> None:
        """Signals the driver's process group, or an exec's when ``exec_id`` is given."""
        msg: Message = {"type": "signal", "signal": str(signal)}
        if exec_id is not None:
            msg.update(target="exec", exec_id=exec_id)
        await self._ok(msg)

    async def restart_driver(self) -> None:
        """Relaunches the driver, also out of a crash loop."""
        await self._ok({"type": "restart_driver"})

    async def set_driver(self, argv: List[str], env: Optional[Dict[str, str]] = None) -> None:
        """Replaces the driver command."""
        msg: Message = {"type": "set_driver", "argv": list(argv)}
        if env:
            msg["env"] = dict(env)
        await self._ok(msg)

    async def shutdown(self, grace_ms: Optional[int] = None, reason: Optional[str] = None) -> None:
        """Stops the agent and the shim."""
        msg: Message = {"type": "shutdown"}
        if grace_ms is not None:
            msg["grace_ms"] = grace_ms
        if reason is not None:
            msg["reason"] = reason
        await self._ok(msg)

    async def forget_consumer(self, consumer: str) -> None:
        """Drops a durable consumer's cursor on the shim (shims with sessions)."""
        await self._ok({"type": "forget_consumer", "consumer": consumer})

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
        tag: Optional[str] = None,
    ) -> Process:
        """Runs a process in the sandbox. Its output and exit arrive as events, which this
        client takes for the process and acknowledges. Without :meth:`events` called first,
        events start flowing from the shim's last seq now, and the other events that pass
        meanwhile are acknowledged as read (as ``agentctl exec`` does); call :meth:`events`
        first to see every event (those of the exec excepted)."""
        if not self._pumping:
            self._start_pump(after=(await self.status()).last_seq)
        msg = exec_request(
            self._next_id(), argv, env=env, cwd=cwd, user=user, tty=tty, stdin=stdin,
            timeout=timeout, output_cap=output_cap, tag=tag,
        )
        started = await self.request(msg)
        proc: Process = started["process"]
        return proc

    # -- events --

    def events(
        self,
        after: Optional[int] = 0,
        *,
        on_lagged: Optional[Callable[[Lagged], None]] = None,
    ) -> "EventStream":
        """The events after seq ``after`` (the cursor the caller persisted; 0: all still
        buffered; None: live ones only, for an observer of a shim with sessions).

        Moving to the next event marks the previous one processed: acknowledgements follow
        every ``ack_every`` events, ``ack_bytes`` bytes or ``ack_delay`` seconds. Persist
        ``ev.seq`` with the event's effects before asking for the next one, and processing
        is exactly once across crashes and reconnects. After :meth:`exec` or ``fs.watch``,
        the events already flow: ``after`` is then ignored and the stream starts with the
        next one."""
        if self._streaming:
            raise RuntimeError("one event stream per client")
        if not self._pumping:
            self._start_pump(after)
        self._streaming = True
        return EventStream(self, on_lagged)

    def _start_pump(self, after: Optional[int]) -> None:
        self._pumping = True
        self._from_now = after is None
        self._last_received = self._resumed_from = self._last_acked = after or 0
        conn = self._conn
        if conn is not None and not conn.lost.is_set():
            self._send_resume(conn)

    def _send_resume(self, conn: _Conn) -> None:
        if self._from_now and self._last_received == 0:
            msg: Message = {"type": "resume_from"}
        elif self.consumer is None:
            # An observer: nothing is kept for it, so it goes on after what it received
            # (what waits in the queue is delivered from there).
            msg = {"type": "resume_from", "seq": self._last_received}
        else:
            msg = {"type": "resume_from", "seq": self._ack_point()}
            self._last_acked = max(self._last_acked, self._ack_point())
        self._resumed_from = msg.get("seq", 0)
        conn.writer.write(encode(msg))

    def _new_shim(self) -> None:
        """Another shim answers at this address: its event stream is a new one, followed
        from its first event, and the watches, which lived in the old shim, end."""
        self._unconsumed.clear()
        self._unconsumed_seqs.clear()
        self._processed.clear()
        self._resumed_from = self._last_acked = self._last_received = 0
        self._from_now = False
        for watch_id, watch in list(self._watches.items()):
            self._forget_watch(watch_id)
            watch._end(ConnectionClosed("a new shim answers at this address: the watch is gone"))

    def _ack_point(self) -> int:
        return self._unconsumed[0][0] - 1 if self._unconsumed else self._last_received

    async def _on_event(self, seq: int, body: Dict[str, Any], size: int) -> None:
        if self._resumed_from < seq <= self._last_received:
            return  # replayed after a reconnect, and already taken
        if seq <= self._resumed_from:
            # Lower than our cursor: a new shim behind the same address (one that does not
            # tell its instance); a new stream.
            log.warning("%s: seq %d after resume_from %d: a new shim", self.address, seq, self._resumed_from)
            self._new_shim()
        self._last_received = seq
        kind = body["type"]
        if kind == "fs_event" and await self._on_fs_event(seq, body, size):
            return
        exec_id = body.get("exec_id")
        proc = self._procs.get(exec_id) if kind in ("exec_output", "exec_exit") and isinstance(exec_id, int) else None
        if proc is not None:
            if kind == "exec_output" and isinstance(body.get("data"), bytes):
                proc._output(str(body.get("stream")), body["data"])
            elif kind == "exec_exit":
                self._procs.pop(exec_id, None)  # type: ignore[arg-type]
                proc._exit(body)
            self._bytes_since_ack += size
            self._ack_progress()
            return
        if not self._streaming:  # nobody reads events: passed over (see `exec`)
            self._bytes_since_ack += size
            self._ack_progress()
            return
        self._hand_out(seq, size)
        await self._queue.put(Event(seq, kind, body, size))

    async def _on_fs_event(self, seq: int, body: Dict[str, Any], size: int) -> bool:
        """An ``fs_event`` of a watch taken here goes to it (True); of a watch ended here, it
        is acknowledged and dropped (True); any other goes on as an event (False)."""
        watch_id = body.get("watch")
        if type(watch_id) is not int:
            return False
        watch = self._watches.get(watch_id)
        if watch is not None:
            if body.get("change") == "ended":
                del self._watches[watch_id]
            self._hand_out(seq, size)
            await watch._deliver(seq, body)
            return True
        if watch_id in self._unwatched:
            self._bytes_since_ack += size
            self._ack_progress()
            return True
        return False

    def _forget_watch(self, watch_id: int) -> None:
        """Its watch is over here: its later events are acknowledged and dropped."""
        self._watches.pop(watch_id, None)
        self._unwatched[watch_id] = None
        while len(self._unwatched) > 1024:
            self._unwatched.popitem(last=False)

    def _hand_out(self, seq: int, size: int) -> None:
        self._unconsumed.append((seq, size))
        self._unconsumed_seqs.add(seq)

    def _consumed(self, seq: int) -> None:
        """Event ``seq`` is processed; the ack point moves past every processed event below
        the first one still out (events are processed in order per stream or watch)."""
        if seq in self._unconsumed_seqs:
            self._processed.add(seq)
        while self._unconsumed and self._unconsumed[0][0] in self._processed:
            first, size = self._unconsumed.popleft()
            self._processed.discard(first)
            self._unconsumed_seqs.discard(first)
            self._bytes_since_ack += size
        self._ack_progress()

    def _ack_progress(self) -> None:
        hello = self.hello
        every = limit(hello, "ack_every", ACK_EVERY)
        max_bytes = limit(hello, "max_bytes", 0)
        by_bytes = min(ACK_BYTES, max_bytes // 4) if max_bytes else ACK_BYTES
        pending = self._ack_point() - self._last_acked
        if pending <= 0:
            return
        conn = self._conn
        if pending >= every or self._bytes_since_ack >= by_bytes:
            if conn is not None:
                self._send_ack(conn)
        elif self._ack_timer is None:
            delay = limit(hello, "ack_delay_ms", int(ACK_DELAY * 1000)) / 1000
            self._ack_timer = asyncio.get_running_loop().call_later(delay, self._ack_due)

    def _ack_due(self) -> None:
        self._ack_timer = None
        if self._conn is not None:
            self._send_ack(self._conn)

    def _send_ack(self, conn: _Conn) -> None:
        point = self._ack_point()
        if point <= self._last_acked or conn.lost.is_set():
            return
        try:
            conn.writer.write(encode({"type": "ack", "seq": point}))
        except OSError:
            return
        self._last_acked = point
        self._bytes_since_ack = 0
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    @property
    def cursor(self) -> int:
        """The last seq processed (acknowledged or due to be)."""
        return self._ack_point()


class EventStream:
    """The async iterator of :meth:`Client.events`."""

    def __init__(self, client: Client, on_lagged: Optional[Callable[[Lagged], None]]) -> None:
        self._client = client
        self._on_lagged = on_lagged
        self._current: Optional[int] = None
        #: Events skipped because an observer fell behind.
        self.missed = 0

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.next()
        except ConnectionClosed:
            if self._client._closing:
                raise StopAsyncIteration from None
            raise

    async def next(self, timeout: Optional[float] = None) -> Event:
        """The next event (the previous one counts as processed); ShimTimeout after
        ``timeout`` seconds without one."""
        client = self._client
        if self._current is not None:
            client._consumed(self._current)
            self._current = None
        while True:
            item = await self._get(timeout)
            if isinstance(item, BaseException):
                client._queue.put_nowait(item)  # stays the answer for every later call
                raise item
            if isinstance(item, Lagged):
                self.missed += item.missed
                if self._on_lagged is not None:
                    self._on_lagged(item)
                else:
                    log.warning("%s: fell behind, %d events missed", client.address, item.missed)
                continue
            self._current = item.seq
            return item

    async def _get(self, timeout: Optional[float]) -> Item:
        return await next_or_dead(self._client._queue, self._client, timeout, "event")

    async def aclose(self) -> None:
        """Marks the current event processed and sends the acknowledgement."""
        if self._current is not None:
            self._client._consumed(self._current)
            self._current = None
        if self._client._conn is not None:
            self._client._send_ack(self._client._conn)


