"""Tests of the Python echo driver against a fake shim (pytest).

Each test starts `echo_driver.py` as a subprocess with one end of a real socketpair inherited
as AGENT_SHIM_FD, plays the shim's side of the driver link (docs/PROTOCOL.md section 7), and
checks the behaviour examples/README.md specifies. Every read has a deadline (a socket
timeout), and every driver started is killed and reaped by the fixture's finalizer.

Run: python -m pytest -q examples/python-driver   (with a python that has msgpack and pytest)
"""

import os
import pathlib
import socket
import struct
import subprocess
import sys
import time

import msgpack
import pytest

DRIVER = pathlib.Path(__file__).resolve().with_name("echo_driver.py")
DEADLINE_S = 10.0  # the longest any single read or wait may take
QUIET_S = 0.5  # how long "nothing arrives" is watched for
MAX_FRAME = 16 * 1024 * 1024

SHIM_HELLO = {
    "type": "hello", "protocol": "agent-shim", "versions": [1], "role": "shim",
    "software": "fake-shim", "software_version": "0.0.0", "capabilities": [],
}


class FakeShim:
    """The shim's end of the driver link, and the driver process behind it."""

    def __init__(self, sock, proc, stdout_path, stderr_path):
        self.sock = sock
        self.sock.settimeout(DEADLINE_S)
        self.proc = proc
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path

    # -- writing --

    def send(self, msg):
        self.send_body(msgpack.packb(msg, use_bin_type=True))

    def send_body(self, body):
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    # -- reading --

    def read_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"end of stream after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def recv(self):
        """The driver's next message (raises socket.timeout after DEADLINE_S)."""
        (length,) = struct.unpack(">I", self.read_exact(4))
        assert 0 < length <= MAX_FRAME, f"the driver sent a frame of {length} bytes"
        msg = msgpack.unpackb(self.read_exact(length), raw=False)
        assert isinstance(msg, dict) and isinstance(msg["type"], str), msg
        return msg

    def expect(self, kind):
        msg = self.recv()
        assert msg["type"] == kind, f"expected {kind}, got {msg}"
        return msg

    def until(self, kind):
        """Every message up to and including the first of type `kind`."""
        msgs = []
        while True:
            msgs.append(self.recv())
            if msgs[-1]["type"] == kind:
                return msgs

    def quiet(self, seconds=QUIET_S):
        """Asserts that the driver sends nothing for `seconds`."""
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(1)
        except socket.timeout:
            return
        finally:
            self.sock.settimeout(DEADLINE_S)
        pytest.fail(f"the driver sent something: {data!r}")

    def at_eof(self):
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # -- the driver --

    def handshake(self, hello=SHIM_HELLO):
        self.send(hello)
        theirs = self.expect("hello")
        assert self.recv() == {"type": "ready"}
        return theirs

    def exit_code(self):
        return self.proc.wait(timeout=DEADLINE_S)

    def stdout(self):
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self):
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")


@pytest.fixture
def spawn(tmp_path):
    """Returns a function that starts a driver and yields its FakeShim; kills them all after."""
    shims = []

    def start(env=None, handshake=True, pass_socket=True):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        environ = {k: v for k, v in os.environ.items() if k not in ("ECHO_EXIT_CODE",)}
        environ["AGENT_SHIM_FD"] = str(theirs.fileno())
        for key, value in (env or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        n = len(shims)
        out_path, err_path = tmp_path / f"stdout-{n}", tmp_path / f"stderr-{n}"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(DRIVER)], env=environ, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, pass_fds=[theirs.fileno()] if pass_socket else [])
        theirs.close()
        shim = FakeShim(ours, proc, out_path, err_path)
        shims.append(shim)
        if handshake:
            shim.handshake()
        return shim

    yield start
    for shim in shims:
        shim.sock.close()
        if shim.proc.poll() is None:
            shim.proc.kill()
        shim.proc.wait(timeout=DEADLINE_S)


def task(task_id, input_):
    return {"type": "task", "task_id": task_id, "input": input_, "attempt": 1}


def events_of(msgs):
    return [m["type"] for m in msgs]


# --- Start and handshake --------------------------------------------------------------------


def test_handshake_ready_and_started_lines(spawn):
    shim = spawn(handshake=False)
    shim.send(SHIM_HELLO)
    hello = shim.expect("hello")
    assert hello["protocol"] == "agent-shim" and hello["versions"] == [1]
    assert hello["role"] == "driver" and hello["software"] == "python-echo-driver"
    assert isinstance(hello["software_version"], str)
    assert shim.recv() == {"type": "ready"}
    shim.send({"type": "shutdown", "id": 1})
    assert shim.recv() == {"type": "ok", "re": 1}
    assert shim.exit_code() == 0
    assert "echo-driver: started" in shim.stdout().splitlines()
    assert "echo-driver: started" in shim.stderr().splitlines()


def test_the_link_is_close_on_exec(spawn):
    shim = spawn()
    fd = None
    for entry in os.listdir(f"/proc/{shim.proc.pid}/fd"):
        target = os.readlink(f"/proc/{shim.proc.pid}/fd/{entry}")
        if target.startswith("socket:"):
            fd = entry
    assert fd is not None, "the driver holds no socket"
    with open(f"/proc/{shim.proc.pid}/fdinfo/{fd}") as info:
        flags = next(int(l.split()[1], 8) for l in info if l.startswith("flags:"))
    assert flags & os.O_CLOEXEC


@pytest.mark.parametrize("versions", [[99], [2, 3], []])
def test_no_common_version_is_refused(spawn, versions):
    shim = spawn(handshake=False)
    shim.send(dict(SHIM_HELLO, versions=versions))
    shim.expect("hello")
    reply = shim.expect("error")
    assert reply["code"] == "unsupported_version"
    assert shim.at_eof()
    assert shim.exit_code() == 3


@pytest.mark.parametrize("change, code", [
    ({"protocol": "other"}, "malformed"),
    ({"role": "driver"}, "invalid"),
    ({"versions": "1"}, "malformed"),
    ({"software": None}, "malformed"),
])
def test_a_bad_hello_is_refused(spawn, change, code):
    shim = spawn(handshake=False)
    shim.send(dict(SHIM_HELLO, **change))
    shim.expect("hello")
    assert shim.expect("error")["code"] == code
    assert shim.at_eof()
    assert shim.exit_code() == 3


def test_a_first_frame_that_is_not_hello_is_refused(spawn):
    shim = spawn(handshake=False)
    shim.send({"type": "ping", "id": 1})
    shim.expect("hello")
    assert shim.expect("error")["code"] == "invalid_state"
    assert shim.exit_code() == 3


@pytest.mark.parametrize("value", [None, "", "nope", "-1", "999"])
def test_a_missing_or_bad_fd_exits_2(spawn, value):
    shim = spawn(env={"AGENT_SHIM_FD": value}, handshake=False, pass_socket=False)
    assert shim.exit_code() == 2
    assert "AGENT_SHIM_FD" in shim.stderr()


def test_an_fd_that_is_not_a_socket_exits_2(spawn):
    # fd 0 is /dev/null in the driver: open, but not a socket.
    shim = spawn(env={"AGENT_SHIM_FD": "0"}, handshake=False, pass_socket=False)
    assert shim.exit_code() == 2


def test_end_of_stream_exits_0(spawn):
    shim = spawn()
    shim.sock.shutdown(socket.SHUT_WR)
    assert shim.exit_code() == 0


def test_end_of_stream_during_the_handshake_exits_0(spawn):
    shim = spawn(handshake=False)
    shim.sock.shutdown(socket.SHUT_WR)
    shim.expect("hello")
    assert shim.exit_code() == 0


# --- Tasks ----------------------------------------------------------------------------------


def test_a_string_task_is_echoed_word_by_word(spawn):
    shim = spawn()
    shim.send(task("t1", "hello  brave\nworld"))
    msgs = shim.until("task_done")
    words = ["hello", "brave", "world"]
    expected = []
    for i, word in enumerate(words, start=1):
        expected.append({"type": "message_chunk", "task_id": "t1", "text": word,
                         "role": "assistant", "final": i == 3})
        expected.append({"type": "progress", "task_id": "t1", "done": i, "total": 3})
    expected.append({"type": "task_done", "task_id": "t1", "status": "succeeded",
                     "output": "hello  brave\nworld"})
    assert msgs == expected


def test_an_empty_text_sends_one_empty_final_chunk_and_the_given_output(spawn):
    shim = spawn()
    output = {"answer": [1, 2.5, None, b"\x00\xff"], "nested": {"ok": True}}
    shim.send(task("t1", {"output": output}))
    assert shim.until("task_done") == [
        {"type": "message_chunk", "task_id": "t1", "text": "", "role": "assistant",
         "final": True},
        {"type": "progress", "task_id": "t1", "done": 1, "total": 1},
        {"type": "task_done", "task_id": "t1", "status": "succeeded", "output": output},
    ]
    # Tasks come one after another.
    shim.send(task("t2", "again"))
    assert shim.until("task_done")[-1]["output"] == "again"


def test_fail_ends_the_task_failed_after_the_chunks(spawn):
    shim = spawn()
    shim.send(task("t1", {"text": "a b", "fail": "boom"}))
    msgs = shim.until("task_done")
    assert events_of(msgs) == ["message_chunk", "progress"] * 2 + ["task_done"]
    assert msgs[-1] == {"type": "task_done", "task_id": "t1", "status": "failed",
                        "error": "boom"}


@pytest.mark.parametrize("input_", [42, None, ["a"], {"delay_ms": -1}, {"text": 5},
                                    {"exec": ["ls", 1]}, {"hang": "yes"}, {"crash": 1.5}])
def test_an_input_it_cannot_read_fails_the_task(spawn, input_):
    shim = spawn()
    shim.send(task("t1", input_))
    done = shim.expect("task_done")
    assert (done["task_id"], done["status"]) == ("t1", "failed")
    assert isinstance(done["error"], str)
    shim.send({"type": "ping", "id": 3})
    assert shim.recv() == {"type": "pong", "re": 3}


def test_a_second_task_while_one_runs_gets_limit(spawn):
    shim = spawn()
    shim.send(task("t1", {"text": "slow", "delay_ms": 5000}))
    shim.send(task("t2", "quick"))
    reply = shim.expect("error")
    assert (reply["code"], reply.get("task_id")) == ("limit", "t2")
    assert "re" not in reply
    shim.send({"type": "cancel", "id": 1, "task_id": "t1"})
    assert shim.recv() == {"type": "ok", "re": 1}
    assert shim.recv() == {"type": "task_done", "task_id": "t1", "status": "cancelled"}


def test_crash_exits_at_once_without_task_done(spawn):
    shim = spawn()
    shim.send(task("t1", {"text": "never", "crash": 5}))
    assert shim.at_eof()
    assert shim.exit_code() == 5


def test_hang_stops_answering(spawn):
    shim = spawn()
    shim.send(task("t1", {"hang": True}))
    time.sleep(0.2)
    shim.send({"type": "ping", "id": 1})
    shim.quiet(1.0)
    assert shim.proc.poll() is None


def test_garbage_writes_a_4gib_length_prefix_then_goes_on(spawn):
    shim = spawn()
    shim.send(task("t1", {"text": "still here", "garbage": True}))
    assert shim.read_exact(16) == bytes.fromhex("ffffffffdeadbeefdeadbeefdeadbeef")
    # The driver keeps running: what follows is its next frames.
    assert shim.until("task_done")[-1]["status"] == "succeeded"


# --- Requests from the shim -----------------------------------------------------------------


def test_ping_is_answered_idle_and_during_a_delay(spawn):
    shim = spawn()
    shim.send({"type": "ping", "id": 1})
    assert shim.recv() == {"type": "pong", "re": 1}
    shim.send(task("t1", {"text": "a", "delay_ms": 5000}))
    shim.send({"type": "ping", "id": 2})
    assert shim.recv() == {"type": "pong", "re": 2}  # long before the chunk


def test_cancel_during_a_delay_ends_the_task_cancelled(spawn):
    shim = spawn()
    shim.send(task("t1", {"text": "one two three", "delay_ms": 300}))
    assert shim.expect("message_chunk")["text"] == "one"
    shim.expect("progress")
    shim.send({"type": "cancel", "id": 7, "task_id": "nope"})
    reply = shim.expect("error")
    assert (reply["code"], reply["re"]) == ("not_found", 7)
    shim.send({"type": "cancel", "id": 8, "task_id": "t1", "grace_ms": 1000})
    assert shim.recv() == {"type": "ok", "re": 8}
    assert shim.recv() == {"type": "task_done", "task_id": "t1", "status": "cancelled"}
    shim.send({"type": "cancel", "id": 9, "task_id": "t1"})  # over now
    assert shim.expect("error")["code"] == "not_found"


@pytest.mark.parametrize("delay_ms", [5000, 2**64 - 1])
def test_cancel_does_not_wait_for_the_delay_to_end(spawn, delay_ms):
    shim = spawn()
    shim.send(task("t1", {"text": "one", "delay_ms": delay_ms}))
    shim.send({"type": "ping", "id": 2})
    assert shim.recv() == {"type": "pong", "re": 2}
    start = time.monotonic()
    shim.send({"type": "cancel", "id": 1, "task_id": "t1"})
    assert shim.recv() == {"type": "ok", "re": 1}
    assert shim.recv() == {"type": "task_done", "task_id": "t1", "status": "cancelled"}
    assert time.monotonic() - start < 4.0  # the delay is the safe point: no chunk first


def test_ignore_cancel_answers_ok_and_goes_on(spawn):
    shim = spawn()
    shim.send(task("t1", {"text": "a b", "delay_ms": 300, "ignore_cancel": True}))
    shim.send({"type": "cancel", "id": 1, "task_id": "t1"})
    msgs = shim.until("task_done")
    assert msgs[0] == {"type": "ok", "re": 1}
    assert msgs[-1]["status"] == "succeeded"
    assert events_of(msgs[1:]) == ["message_chunk", "progress"] * 2 + ["task_done"]


def test_pause_at_a_safe_point_then_ping_and_resume(spawn):
    shim = spawn()
    shim.send(task("t1", {"text": "a b c", "delay_ms": 400}))
    shim.send({"type": "pause", "id": 5, "timeout_ms": 5000})
    assert shim.recv() == {"type": "paused", "re": 5}
    shim.send({"type": "ping", "id": 6})
    assert shim.recv() == {"type": "pong", "re": 6}
    shim.send({"type": "cancel", "id": 7, "task_id": "other"})  # held until resumed
    shim.quiet(0.6)  # paused: no chunks, no answer to the cancel
    shim.send({"type": "resume", "id": 8, "slept_ms": 1234})
    assert shim.recv() == {"type": "log", "stream": "driver", "level": "info",
                           "text": "resumed after 1234 ms"}
    assert shim.recv() == {"type": "ready", "re": 8}
    msgs = shim.until("task_done")
    assert msgs[0]["type"] == "error" and msgs[0]["re"] == 7  # the held cancel, answered now
    assert [m["text"] for m in msgs if m["type"] == "message_chunk"] == ["a", "b", "c"]
    assert msgs[-1]["status"] == "succeeded"


def test_pause_when_idle_and_resume_when_not_paused(spawn):
    shim = spawn()
    shim.send({"type": "resume", "id": 1, "slept_ms": 0})
    reply = shim.expect("error")
    assert (reply["code"], reply["re"]) == ("invalid_state", 1)
    shim.send({"type": "pause", "id": 2})
    assert shim.recv() == {"type": "paused", "re": 2}
    shim.send(task("t1", "later"))  # held while paused
    shim.quiet()
    shim.send({"type": "resume", "id": 3, "slept_ms": 10})
    assert shim.expect("log")["text"] == "resumed after 10 ms"
    assert shim.recv() == {"type": "ready", "re": 3}
    assert shim.until("task_done")[-1]["output"] == "later"


def test_shutdown_mid_task_cancels_it_and_exits_with_echo_exit_code(spawn):
    shim = spawn(env={"ECHO_EXIT_CODE": "7"})
    shim.send(task("t1", {"text": "a b", "delay_ms": 5000}))
    shim.send({"type": "shutdown", "id": 4, "grace_ms": 1000, "reason": "test"})
    assert shim.recv() == {"type": "ok", "re": 4}
    assert shim.recv() == {"type": "task_done", "task_id": "t1", "status": "cancelled",
                           "error": "shutdown"}
    assert shim.at_eof()
    assert shim.exit_code() == 7


def test_shutdown_while_paused_exits(spawn):
    shim = spawn(env={"ECHO_EXIT_CODE": "9"})
    shim.send(task("t1", {"text": "a", "delay_ms": 400}))
    shim.send({"type": "pause", "id": 1})
    assert shim.recv() == {"type": "paused", "re": 1}
    shim.send({"type": "shutdown", "id": 2})
    assert shim.recv() == {"type": "ok", "re": 2}
    assert shim.expect("task_done")["error"] == "shutdown"
    assert shim.exit_code() == 9


def test_an_unknown_type_with_an_id_is_unsupported_and_without_one_ignored(spawn):
    shim = spawn()
    shim.send({"type": "teleport", "id": 42, "to": "mars"})
    reply = shim.expect("error")
    assert (reply["code"], reply["re"]) == ("unsupported", 42)
    shim.send({"type": "teleport", "to": "mars"})
    shim.send({"type": "task_done", "id": 43, "task_id": "x", "status": "succeeded"})
    shim.send({"type": "ok", "re": 99})
    shim.send({"type": "ping", "id": 44})
    reply = shim.expect("error")  # a type that is not valid shim -> driver
    assert (reply["code"], reply["re"]) == ("unsupported", 43)
    assert shim.recv() == {"type": "pong", "re": 44}  # nothing for the others


# --- Exec -----------------------------------------------------------------------------------


def start_exec(shim, argv):
    shim.send(task("t1", {"text": "done", "exec": argv}))
    call = shim.expect("tool_call")
    assert call == {"type": "tool_call", "task_id": "t1", "call_id": "t1-exec",
                    "name": "exec", "input": {"argv": argv}}
    request = shim.expect("exec")
    assert request["argv"] == argv and request["task_id"] == "t1"
    assert isinstance(request["id"], int)
    return request["id"]


def test_exec_runs_a_tool_call_through_the_shim(spawn):
    shim = spawn()
    request_id = start_exec(shim, ["echo", "hello"])
    shim.send({"type": "exec_started", "re": request_id, "exec_id": 9, "pid": 1234})
    shim.send({"type": "ping", "id": 77})  # answered while the exec runs
    assert shim.recv() == {"type": "pong", "re": 77}
    shim.send({"type": "exec_output", "exec_id": 9, "stream": "stdout", "data": b"hel"})
    shim.send({"type": "exec_output", "exec_id": 9, "stream": "stderr", "data": b"noise"})
    shim.send({"type": "exec_output", "exec_id": 8, "stream": "stdout", "data": b"other"})
    shim.send({"type": "exec_output", "exec_id": 9, "stream": "stdout", "data": b"lo \xff\n"})
    shim.send({"type": "exec_exit", "exec_id": 9, "code": 0, "duration_ms": 5})
    result = shim.expect("tool_result")
    assert result == {
        "type": "tool_result", "task_id": "t1", "call_id": "t1-exec",
        "output": {"code": 0, "signal": None, "stdout": "hello \ufffd\n",
                   "timed_out": False, "truncated": False},
        "is_error": False,
    }
    msgs = shim.until("task_done")
    assert msgs[0]["text"] == "done" and msgs[-1]["status"] == "succeeded"


def test_exec_killed_by_a_signal_is_an_error_result(spawn):
    shim = spawn()
    request_id = start_exec(shim, ["sleep", "100"])
    shim.send({"type": "exec_started", "re": request_id, "exec_id": 1, "pid": 99})
    shim.send({"type": "exec_exit", "exec_id": 1, "signal": "SIGKILL", "timed_out": True,
               "truncated": True, "duration_ms": 100})
    result = shim.expect("tool_result")
    assert result["output"] == {"code": None, "signal": "SIGKILL", "stdout": "",
                                "timed_out": True, "truncated": True}
    assert result["is_error"] is True


def test_exec_refused_by_the_shim_is_an_error_result(spawn):
    shim = spawn()
    request_id = start_exec(shim, [])
    shim.send({"type": "error", "re": request_id, "code": "invalid", "message": "empty argv"})
    result = shim.expect("tool_result")
    assert result["output"] == {"error": "empty argv"} and result["is_error"] is True
    assert shim.until("task_done")[-1]["status"] == "succeeded"


def test_cancel_during_an_exec_takes_effect_at_the_next_safe_point(spawn):
    shim = spawn()
    request_id = start_exec(shim, ["sleep", "100"])
    shim.send({"type": "cancel", "id": 5, "task_id": "t1"})
    assert shim.recv() == {"type": "ok", "re": 5}
    shim.send({"type": "exec_started", "re": request_id, "exec_id": 1, "pid": 99})
    shim.send({"type": "exec_exit", "exec_id": 1, "signal": "SIGKILL", "duration_ms": 1})
    shim.expect("tool_result")
    assert shim.recv() == {"type": "task_done", "task_id": "t1", "status": "cancelled"}


# --- Bad frames -----------------------------------------------------------------------------


def packed(msg):
    return msgpack.packb(msg, use_bin_type=True)


@pytest.mark.parametrize("body, re", [
    (b"", None),  # empty
    (packed([1, 2, 3]), None),  # not a map
    (packed({"id": 1}), 1),  # no type
    (packed({"type": 5}), None),  # type not a string
    (packed({1: "x", "type": "ping", "id": 2}), None),  # a non-string key
    (packed({"type": "ping", "id": 3}) + b"\x00", 3),  # trailing bytes
    (b"\x81\xa4type\xa2\xff\xfe", None),  # invalid UTF-8
    (packed({"type": "ping", "id": "x"}), None),  # wrong field type
    (packed({"type": "ping", "id": 1.0}), None),  # floats are not integers
    (packed({"type": "ping", "id": True}), None),  # nor are bools
    (packed({"type": "task", "task_id": "t"}), None),  # missing required field
    (packed({"type": "cancel", "id": 4}), 4),  # missing task_id; id readable
    (packed({"type": "exec_output", "exec_id": 1, "stream": "tty", "data": b""}), None),
])
def test_a_bad_frame_is_answered_malformed_and_the_driver_exits_3(spawn, body, re):
    shim = spawn()
    shim.send_body(body)
    reply = shim.expect("error")
    assert reply["code"] == "malformed"
    assert reply.get("re") == re
    assert shim.at_eof()
    assert shim.exit_code() == 3


def nested(depth):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_nesting_over_64_levels_is_malformed(spawn):
    shim = spawn()
    shim.send({"type": "ping", "id": 1, "extra": nested(63)})  # 64 levels with the map
    assert shim.recv() == {"type": "pong", "re": 1}
    shim.send({"type": "ping", "id": 2, "extra": nested(64)})  # 65
    reply = shim.expect("error")
    assert (reply["code"], reply["re"]) == ("malformed", 2)
    assert shim.exit_code() == 3


def test_a_frame_over_16_mib_is_refused_before_its_body(spawn):
    shim = spawn()
    shim.sock.sendall(struct.pack(">I", MAX_FRAME + 1))  # no body follows
    reply = shim.expect("error")
    assert reply["code"] == "frame_too_large"
    assert shim.at_eof()
    assert shim.exit_code() == 3


def test_a_frame_of_exactly_16_mib_is_accepted(spawn):
    shim = spawn()
    msg = {"type": "ping", "id": 1, "pad": b""}
    overhead = len(packed(dict(msg, pad=b"x" * 70000))) - 70000
    msg["pad"] = b"x" * (MAX_FRAME - overhead)
    body = packed(msg)
    assert len(body) == MAX_FRAME
    shim.send_body(body)
    assert shim.recv() == {"type": "pong", "re": 1}


def test_a_stream_ending_inside_a_frame_is_malformed(spawn):
    shim = spawn()
    shim.sock.sendall(struct.pack(">I", 10) + b"\x81")
    shim.sock.shutdown(socket.SHUT_WR)
    assert shim.expect("error")["code"] == "malformed"
    assert shim.exit_code() == 3
