#!/usr/bin/env python3
"""python-echo-driver: a complete agent-shim driver whose "agent" echoes its task back.

It speaks the whole driver side of the agent-shim protocol (docs/PROTOCOL.md, sections 2-7
and 9) with nothing but the standard library and the `msgpack` package, and behaves exactly
like the Rust `echo-driver` (examples/README.md specifies both). The end-to-end tests steer it
through the task's `input`; driver authors can copy its structure:

    reader thread                               main thread
    -------------                               -----------
    read a frame, check it  --- inbox queue --> handshake, `ready`, then one task at a time;
    (16 MiB limit, one map,                     looks at the queue whenever it waits: while
    string `type`, fields)                      idle, while an exec runs, and at the task's
                                                *safe points* (the waits before each chunk)

`ping` is answered whenever the main thread looks at the queue. `cancel` and `shutdown` are
answered (`ok`) when read; they and `pause` (answered `paused`) *take effect* at the next safe
point (at once when idle), because only there may the agent stop without leaving work half
done. Both threads write frames, so writes go through one lock.

Run it under the shim, which passes the link's fd number in AGENT_SHIM_FD:

    agent-shim ... -- python3 echo_driver.py

Exit codes: 0 after end of stream or `shutdown` (then ECHO_EXIT_CODE, default 0), 1 when
the driver itself fails, 2 when AGENT_SHIM_FD is missing or bad, 3 after a bad `hello` or a
bad frame from the shim, and the task's `crash` code when asked to crash.
"""

import collections
import os
import queue
import socket
import struct
import sys
import threading
import time

try:
    import msgpack
except ImportError:  # the one dependency
    sys.exit("echo-driver: needs the msgpack package: pip install msgpack")

# --- Constants ------------------------------------------------------------------------------

SOFTWARE = "python-echo-driver"  # the name in our `hello`
NAME = "echo-driver"  # how we sign our lines on stdout/stderr
SOFTWARE_VERSION = "0.1.0"
PROTOCOL = "agent-shim"
VERSIONS = [1]  # every protocol version this driver speaks

MAX_FRAME = 16 * 1024 * 1024  # the default maximum body length (PROTOCOL.md section 2)
MAX_DEPTH = 64  # arrays and maps nested deeper than this make a body malformed

EXIT_INTERNAL = 1  # the driver itself failed (a message too large to send)
EXIT_NO_SOCKET = 2  # AGENT_SHIM_FD is missing or not a socket
EXIT_PROTOCOL = 3  # the shim's hello is unacceptable, or it sent a bad frame

EXIT_CODE_VAR = "ECHO_EXIT_CODE"  # the exit code after `shutdown`

# What the `garbage` flag writes: a 4 GiB length prefix, then junk.
GARBAGE = bytes.fromhex("ffffffff" + "deadbeef" * 3)

MAX_WAIT_S = 3600.0  # the longest single wait on the inbox (a longer delay waits in steps)

HEADER = struct.Struct(">I")  # the frame header: body length, u32 big-endian


# --- Exceptions -----------------------------------------------------------------------------


class BadFrame(Exception):
    """A frame we must reject: reply `error{code, message, re?}` and close the link."""

    def __init__(self, code, message, re=None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.re = re


class LinkClosed(Exception):
    """The shim closed the link (end of stream between frames, or a failed write)."""


class Stop(Exception):
    """The driver stops and exits with `code`; raised wherever the decision is made."""

    def __init__(self, code):
        super().__init__(f"exit {code}")
        self.code = code


class TaskCancelled(Exception):
    """The running task was cancelled and must end at this safe point."""


class BadInput(Exception):
    """The task's input does not describe an echo task; the task fails."""


# --- Checking messages from the shim --------------------------------------------------------
#
# A receiver rejects a frame of a known type whose fields are missing or of the wrong type
# (PROTOCOL.md section 4). These are the types the shim may send a driver (section 9), with
# each field's check and whether it is required. Unknown fields are ignored; an optional field
# that is nil counts as absent.


def _uint(bits):
    # `type(v) is int` rejects bool (a subclass of int in Python) and floats.
    return lambda v: type(v) is int and 0 <= v < (1 << bits)


def _int32(v):
    return type(v) is int and -(1 << 31) <= v < (1 << 31)


def _str(v):
    return isinstance(v, str)


def _bool(v):
    return isinstance(v, bool)


def _bin(v):
    return isinstance(v, bytes)


def _list_of(check):
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _any(_v):
    return True


def _one_of(*names):
    return lambda v: v in names


U16, U32, U64 = _uint(16), _uint(32), _uint(64)
REQ, OPT = True, False

SHIM_TO_DRIVER = {
    "hello": {
        "protocol": (_str, REQ),
        "versions": (_list_of(U32), REQ),
        "role": (_str, REQ),
        "software": (_str, REQ),
        "software_version": (_str, REQ),
        "capabilities": (_list_of(_str), OPT),
        "agent_id": (_str, OPT),
        "nonce": (_bin, OPT),
    },
    "ok": {"re": (U64, REQ)},
    "error": {
        "re": (U64, OPT),
        "code": (_str, REQ),
        "message": (_str, REQ),
        "task_id": (_str, OPT),
    },
    "ping": {"id": (U64, REQ)},
    "pong": {"re": (U64, REQ)},
    "task": {
        "task_id": (_str, REQ),
        "input": (_any, REQ),
        "output_schema": (_any, OPT),
        "timeout_ms": (U64, OPT),
        "attempt": (U32, OPT),
    },
    "cancel": {"id": (U64, REQ), "task_id": (_str, REQ), "grace_ms": (U64, OPT)},
    "pause": {"id": (U64, REQ), "timeout_ms": (U64, OPT)},
    "resume": {"id": (U64, REQ), "slept_ms": (U64, OPT)},
    "shutdown": {"id": (U64, REQ), "grace_ms": (U64, OPT), "reason": (_str, OPT)},
    "exec_started": {"re": (U64, REQ), "exec_id": (U64, REQ), "pid": (U32, REQ)},
    "exec_output": {
        "exec_id": (U64, REQ),
        "stream": (_one_of("stdout", "stderr", "pty"), REQ),
        "data": (_bin, REQ),
    },
    "exec_exit": {
        "exec_id": (U64, REQ),
        "code": (_int32, OPT),
        "signal": (_str, OPT),
        "timed_out": (_bool, OPT),
        "truncated": (_bool, OPT),
        "duration_ms": (U64, REQ),
    },
}


def _too_deep(value):
    """Whether arrays/maps nest deeper than MAX_DEPTH; the body's own map is level 1."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > MAX_DEPTH:
                return True
            children = item if isinstance(item, list) else [*item.keys(), *item.values()]
            stack.extend((child, depth + 1) for child in children)
    return False


def decode_body(body):
    """Decodes and checks one frame body; returns the message map or raises BadFrame."""
    try:
        # raw=False: msgpack str -> Python str (invalid UTF-8 raises); bin -> bytes.
        # strict_map_key=False: maps nested inside `any` fields may have non-string keys.
        # unpackb raises on trailing bytes after the value (ExtraData) and on bad input.
        msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except msgpack.ExtraData as e:  # a whole value, then more: still tell which request
        unpacked = e.unpacked if isinstance(e.unpacked, dict) else {}
        re = unpacked.get("id") if U64(unpacked.get("id")) else None
        raise BadFrame("malformed", "bytes after the end of the message map", re) from None
    except Exception as e:  # anything else the decoder rejects is a malformed frame
        raise BadFrame("malformed", f"not one MessagePack value: {e}") from None
    if not isinstance(msg, dict):
        raise BadFrame("malformed", "the body is not a map")
    if not all(isinstance(key, str) for key in msg):
        raise BadFrame("malformed", "a key of the body is not a string")
    request_id = msg.get("id") if U64(msg.get("id")) else None
    if not isinstance(msg.get("type"), str):
        raise BadFrame("malformed", "no string `type`", request_id)
    if _too_deep(msg):
        raise BadFrame("malformed", f"nested deeper than {MAX_DEPTH} levels", request_id)
    for name, (check, required) in SHIM_TO_DRIVER.get(msg["type"], {}).items():
        # nil stands for "absent", except in a field of type `any`, where it is a value.
        present = name in msg and (msg[name] is not None or check is _any)
        if not present:
            if required:
                raise BadFrame("malformed", f"{msg['type']}: missing field `{name}`", request_id)
        elif not check(msg[name]):
            raise BadFrame("malformed", f"{msg['type']}: bad field `{name}`", request_id)
    return msg


# --- Framing --------------------------------------------------------------------------------


class Link:
    """The driver's end of the shim link: frames of a u32 big-endian length + one map.

    `recv` is only ever called by one thread at a time (the main thread during the
    handshake, the reader thread after it); `send` may be called from both, so it locks.
    """

    def __init__(self, sock):
        self.sock = sock
        self._write_lock = threading.Lock()

    def _read_exact(self, n, at_frame_start=False):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except (ConnectionResetError, ConnectionAbortedError):
                raise LinkClosed("the shim reset the link") from None
            if not chunk:
                if at_frame_start and not buf:
                    raise LinkClosed("end of stream")  # between frames: a normal close
                raise BadFrame("malformed", "the stream ended inside a frame")
            buf += chunk
        return bytes(buf)

    def recv(self):
        """Reads one message; raises LinkClosed at end of stream, BadFrame on a bad frame."""
        (length,) = HEADER.unpack(self._read_exact(HEADER.size, at_frame_start=True))
        if length > MAX_FRAME:  # checked before reading (and allocating) the body
            raise BadFrame("frame_too_large", f"a frame of {length} bytes")
        if length == 0:
            raise BadFrame("malformed", "an empty frame")
        return decode_body(self._read_exact(length))

    def send(self, msg):
        """Writes one message. Our messages are small; a real driver must split large data."""
        body = msgpack.packb(msg, use_bin_type=True)  # str -> str, bytes -> bin
        if len(body) > MAX_FRAME:
            raise ValueError(f"a {msg['type']} of {len(body)} bytes is over the frame limit")
        self.send_raw(HEADER.pack(len(body)) + body)

    def send_raw(self, data):
        # The shim may stop reading for a while (backpressure), so this can block: never
        # hold other locks here. Python ignores SIGPIPE, so a closed link raises an OSError.
        try:
            with self._write_lock:
                self.sock.sendall(data)
        except OSError as e:
            raise LinkClosed(f"cannot write to the shim: {e}") from None

    def send_error(self, code, message, re=None, task_id=None):
        msg = {"type": "error", "code": code, "message": message}
        if re is not None:
            msg["re"] = re
        if task_id is not None:
            msg["task_id"] = task_id
        self.send(msg)


class LinkEnd:
    """The reader's last item in the inbox: the link is over; exit with `code`."""

    def __init__(self, code):
        self.code = code


def read_frames(link, inbox, stop_reading):
    """The reader thread: decodes every frame into `inbox` until the link ends or is bad.

    A bad frame is answered here, at once, with `error{code}`; the main thread then exits
    (which closes the link). `stop_reading` is set by a task that wants to `hang`.
    """
    while not stop_reading.is_set():
        try:
            inbox.put(link.recv())
        except LinkClosed:
            inbox.put(LinkEnd(0))
            return
        except BadFrame as e:
            print(f"{NAME}: bad frame from the shim: {e}", file=sys.stderr, flush=True)
            try:
                link.send_error(e.code, e.message, re=e.re)
            except LinkClosed:
                pass  # the link is being closed anyway
            inbox.put(LinkEnd(EXIT_PROTOCOL))
            return
        except OSError as e:  # a read error we cannot explain: give up on the link
            print(f"{NAME}: cannot read from the shim: {e}", file=sys.stderr, flush=True)
            inbox.put(LinkEnd(EXIT_PROTOCOL))
            return


# --- The task's input -----------------------------------------------------------------------


class Spec:
    """What a task's `input` asks of the echo driver (examples/README.md)."""

    def __init__(self):
        self.text = ""
        self.delay_s = 0.0
        self.exec = None  # argv: list of str
        self.has_output = False
        self.output = None
        self.fail = None
        self.crash = None
        self.hang = False
        self.ignore_cancel = False
        self.garbage = False


def parse_input(value):
    """Reads an input: a string S means {"text": S}; a map's known keys must have their types.

    Non-string keys and unknown keys are ignored. nil is not a valid value for a typed key.
    """
    spec = Spec()
    if isinstance(value, str):
        spec.text = value
        return spec
    if not isinstance(value, dict):
        raise BadInput("input must be a string or a map")

    def wrong(key, what):
        return BadInput(f"input key {key!r} must be {what}")

    for key, v in value.items():
        if key == "text":
            if not isinstance(v, str):
                raise wrong(key, "a string")
            spec.text = v
        elif key == "delay_ms":
            if not U64(v):
                raise wrong(key, "an unsigned integer")
            spec.delay_s = v / 1000.0
        elif key == "exec":
            if not _list_of(_str)(v):
                raise wrong(key, "an array of strings")
            spec.exec = v
        elif key == "output":
            spec.has_output, spec.output = True, v
        elif key == "fail":
            if not isinstance(v, str):
                raise wrong(key, "a string")
            spec.fail = v
        elif key == "crash":
            if not _int32(v):
                raise wrong(key, "an integer")
            spec.crash = v
        elif key in ("hang", "ignore_cancel", "garbage"):
            if not isinstance(v, bool):
                raise wrong(key, "a bool")
            setattr(spec, key, v)
    return spec


# --- The driver -----------------------------------------------------------------------------


class Running:
    """The task being run, and what the shim asked of it that waits for a safe point."""

    def __init__(self, task_id):
        self.task_id = task_id
        self.ignore_cancel = False
        self.cancel = False  # a `cancel` was accepted
        self.shutdown = False  # a `shutdown` was accepted
        self.pauses = []  # ids of `pause` requests to answer at the next safe point


class Driver:
    """The main thread's side of the link: handles messages, runs tasks."""

    def __init__(self, link, shutdown_code):
        self.link = link
        self.shutdown_code = shutdown_code
        self.inbox = queue.Queue()  # filled by the reader thread
        self.held = collections.deque()  # messages read while paused, handled after resume
        self.task = None  # the Running task, if any
        self.next_id = 1  # ids of our own requests (exec)
        self.stop_reading = threading.Event()

    # -- startup --

    def handshake(self):
        """Sends our `hello`, reads and checks the shim's (PROTOCOL.md section 5)."""
        self.link.send({
            "type": "hello", "protocol": PROTOCOL, "versions": VERSIONS, "role": "driver",
            "software": SOFTWARE, "software_version": SOFTWARE_VERSION, "capabilities": [],
        })
        try:
            hello = self.link.recv()  # the shim sends its hello at once, too
        except LinkClosed:
            raise Stop(0) from None
        except BadFrame as e:
            self.fatal(e.code, e.message)
        except OSError as e:
            print(f"{NAME}: cannot read from the shim: {e}", file=sys.stderr, flush=True)
            raise Stop(EXIT_PROTOCOL) from None
        if hello["type"] == "error":
            print(f"{NAME}: the shim refused us: {hello['code']}: {hello['message']}",
                  file=sys.stderr, flush=True)
            raise Stop(EXIT_PROTOCOL)
        if hello["type"] != "hello":
            self.fatal("invalid_state", f"expected hello, got {hello['type']}")
        if hello["protocol"] != PROTOCOL:
            self.fatal("malformed", f"protocol {hello['protocol']!r} is not {PROTOCOL!r}")
        if hello["role"] != "shim":
            self.fatal("invalid", f"a driver talks to a shim, not to a {hello['role']!r}")
        common = set(hello["versions"]) & set(VERSIONS)
        if not common:
            self.fatal("unsupported_version",
                       f"the shim speaks versions {hello['versions']}, we speak {VERSIONS}")
        return max(common)  # the negotiated version; 1 is the only one so far

    def fatal(self, code, message):
        """Reports a protocol failure to the shim, then exits (closing the link)."""
        print(f"{NAME}: {code}: {message}", file=sys.stderr, flush=True)
        try:
            self.link.send_error(code, message)
        except LinkClosed:
            pass  # the link is being closed because of this error anyway
        raise Stop(EXIT_PROTOCOL)

    def run(self):
        self.handshake()
        reader = threading.Thread(
            target=read_frames, args=(self.link, self.inbox, self.stop_reading),
            name="shim-reader", daemon=True)
        reader.start()
        # ... a real driver prepares itself here (model client, credentials) ...
        self.link.send({"type": "ready"})
        while True:  # idle: wait for the next message, forever
            self.answer(self.next_message(None))

    # -- reading --

    def next_message(self, timeout):
        """The next message: a held one first, else from the reader.

        `timeout` is in seconds (None: wait forever; 0: do not wait); returns None when it
        passes. End of stream and bad frames stop the driver.
        """
        if self.held:
            return self.held.popleft()
        return self._from_reader(timeout)

    def _from_reader(self, timeout):
        try:
            item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, LinkEnd):
            raise Stop(item.code)
        return item

    # -- answering --

    def answer(self, msg):
        """Handles one message outside the paused state: replies at once where the reply
        does not wait for a safe point, and records in the running task what does."""
        kind, run = msg["type"], self.task
        if kind == "ping":
            self.link.send({"type": "pong", "re": msg["id"]})
        elif kind == "task":
            if run is None:
                self.run_task(msg)
            else:  # one task at a time
                self.link.send_error("limit", "a task is already running",
                                     task_id=msg["task_id"])
        elif kind == "cancel":
            if run is not None and run.task_id == msg["task_id"]:
                self.link.send({"type": "ok", "re": msg["id"]})
                if not run.ignore_cancel:
                    run.cancel = True
            else:
                self.link.send_error("not_found", f"no running task {msg['task_id']!r}",
                                     re=msg["id"])
        elif kind == "pause":
            if run is None:  # idle is always a safe point
                self.link.send({"type": "paused", "re": msg["id"]})
                self.stay_paused()
            else:
                run.pauses.append(msg["id"])
        elif kind == "resume":
            self.link.send_error("invalid_state", "not paused", re=msg["id"])
        elif kind == "shutdown":
            self.link.send({"type": "ok", "re": msg["id"]})
            if run is None:
                raise Stop(self.shutdown_code)
            run.shutdown = True
        elif SHIM_TO_DRIVER.get(kind) is None and U64(msg.get("id")):
            # A type we do not know, or that a shim does not send, with an id.
            self.link.send_error("unsupported", f"unsupported message type {kind!r}",
                                 re=msg["id"])
        # Anything else (ok, error, pong, a stray exec_* message, a second hello, unknown
        # types without an id) needs no answer.

    def stay_paused(self):
        """The paused state, entered after `paused` was sent: answers `ping`, ends with
        `resume` (or `shutdown`), and holds every other message until then."""
        held = collections.deque()
        while True:
            msg = self._from_reader(None)  # new messages only; earlier held ones stay held
            kind = msg["type"]
            if kind == "ping":
                self.link.send({"type": "pong", "re": msg["id"]})
            elif kind == "resume":
                # A real driver refreshes here what may have expired while frozen.
                slept_ms = msg.get("slept_ms") or 0
                self.link.send({"type": "log", "stream": "driver", "level": "info",
                                "text": f"resumed after {slept_ms} ms"})
                self.link.send({"type": "ready", "re": msg["id"]})
                held.extend(self.held)  # what was held now comes before older held messages
                self.held = held
                return
            elif kind == "shutdown":
                self.link.send({"type": "ok", "re": msg["id"]})
                if self.task is not None:
                    self.end_task("cancelled", error="shutdown")
                raise Stop(self.shutdown_code)
            else:
                held.append(msg)

    # -- the task --

    def end_task(self, status, output=None, has_output=False, error=None):
        done = {"type": "task_done", "task_id": self.task.task_id, "status": status}
        if has_output:
            done["output"] = output
        if error is not None:
            done["error"] = error
        self.link.send(done)

    def safe_point(self, delay_s):
        """A safe point: acts on a pending shutdown, cancel or pause, then waits `delay_s`
        while answering what arrives (and acting on that at once, too)."""
        run = self.task
        deadline = time.monotonic() + delay_s
        while True:
            if run.shutdown:
                self.end_task("cancelled", error="shutdown")
                raise Stop(self.shutdown_code)
            if run.cancel:
                raise TaskCancelled()
            if run.pauses:
                self.link.send({"type": "paused", "re": run.pauses.pop(0)})
                self.stay_paused()
                continue
            remaining = deadline - time.monotonic()
            # Waits are capped: a huge delay_ms would overflow the lock's timeout.
            msg = self.next_message(min(max(0.0, remaining), MAX_WAIT_S))
            if msg is not None:
                self.answer(msg)
            elif time.monotonic() >= deadline:  # the delay is over and nothing is pending
                return

    def run_task(self, msg):
        self.task = Running(msg["task_id"])
        try:
            self._run_task(msg)
        except TaskCancelled:
            self.end_task("cancelled")
        finally:
            self.task = None

    def _run_task(self, msg):
        try:
            spec = parse_input(msg["input"])
        except BadInput as e:
            self.end_task("failed", error=str(e))
            return
        self.task.ignore_cancel = spec.ignore_cancel
        if spec.crash is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(spec.crash & 0xFF)  # at once: no task_done, no cleanup
        if spec.hang:
            print(f"{NAME}: hanging as asked", file=sys.stderr, flush=True)
            self.stop_reading.set()  # the reader stops after the frame it is reading
            threading.Event().wait()  # forever: no more pongs
        if spec.garbage:
            # Writes go through the lock, so the junk lands between two frames.
            self.link.send_raw(GARBAGE)
        if spec.exec is not None:
            self.exec_tool(spec.exec)

        task_id = self.task.task_id
        chunks = spec.text.split() or [""]  # the words; an empty text is one empty chunk
        for i, word in enumerate(chunks, start=1):
            self.safe_point(spec.delay_s)
            self.link.send({"type": "message_chunk", "task_id": task_id, "text": word,
                            "role": "assistant", "final": i == len(chunks)})
            self.link.send({"type": "progress", "task_id": task_id, "done": i,
                            "total": len(chunks)})
        if spec.fail is not None:
            self.end_task("failed", error=spec.fail)
        else:
            output = spec.output if spec.has_output else spec.text
            self.end_task("succeeded", output=output, has_output=True)

    def exec_tool(self, argv):
        """Runs `argv` through the shim as a tool call (PROTOCOL.md section 7.5):
        `tool_call`, `exec`, its output until `exec_exit`, `tool_result`."""
        task_id = self.task.task_id
        call_id = f"{task_id}-exec"
        self.link.send({"type": "tool_call", "task_id": task_id, "call_id": call_id,
                        "name": "exec", "input": {"argv": argv}})
        request_id = self.next_id
        self.next_id += 1
        # With `task_id`, the shim kills the process when the task is cancelled.
        self.link.send({"type": "exec", "id": request_id, "argv": argv, "task_id": task_id})
        result = self.wait_exec(request_id)
        if isinstance(result, str):  # the shim refused the exec
            output, is_error = {"error": result}, True
        else:
            exit_msg, stdout = result
            code = exit_msg.get("code")
            output = {
                "code": code,
                "signal": exit_msg.get("signal"),
                "stdout": stdout.decode("utf-8", errors="replace"),
                "timed_out": bool(exit_msg.get("timed_out")),
                "truncated": bool(exit_msg.get("truncated")),
            }
            is_error = code != 0
        self.link.send({"type": "tool_result", "task_id": task_id, "call_id": call_id,
                        "output": output, "is_error": is_error})

    def wait_exec(self, request_id):
        """Waits for the reply to exec `request_id` and, once started, for its output and
        exit, answering everything else meanwhile (not a safe point: cancel, pause and
        shutdown wait for the next one). Returns (exec_exit, stdout bytes), or the error
        message when the shim refused the exec."""
        exec_id = None
        stdout = bytearray()
        while True:
            msg = self.next_message(None)
            kind = msg["type"]
            if kind == "exec_started" and msg["re"] == request_id:
                exec_id = msg["exec_id"]
            elif kind == "error" and msg.get("re") == request_id and exec_id is None:
                return msg["message"]
            elif kind == "exec_output" and exec_id is not None and msg["exec_id"] == exec_id:
                if msg["stream"] in ("stdout", "pty"):
                    stdout += msg["data"]
            elif kind == "exec_exit" and exec_id is not None and msg["exec_id"] == exec_id:
                return msg, bytes(stdout)
            else:
                self.answer(msg)


# --- Startup --------------------------------------------------------------------------------


def shim_socket():
    """Takes over the link the shim gave us: the fd number in AGENT_SHIM_FD."""
    value = os.environ.get("AGENT_SHIM_FD")
    if value is None:
        raise ValueError("AGENT_SHIM_FD is not set")
    try:
        fd = int(value.strip())
    except ValueError:
        raise ValueError(f"AGENT_SHIM_FD={value!r} is not a file descriptor number") from None
    if fd < 0:
        raise ValueError(f"AGENT_SHIM_FD={value!r} is not a file descriptor number")
    try:
        os.set_inheritable(fd, False)  # close-on-exec: the tools we start must not inherit it
        return socket.socket(fileno=fd)  # fails unless fd is an open socket
    except OSError as e:
        raise ValueError(f"AGENT_SHIM_FD={fd}: not an open socket ({e.strerror})") from None


def main():
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
    driver = Driver(Link(sock), shutdown_code)
    try:
        driver.run()
    except Stop as stop:
        return stop.code
    except LinkClosed:
        return 0  # the shim is gone: like end of stream
    except ValueError as e:  # from Link.send: a message over the frame limit
        print(f"{NAME}: {e}", file=sys.stderr, flush=True)
        return EXIT_INTERNAL
    return 0


if __name__ == "__main__":
    sys.exit(main())
