"""Run the Python driver skeleton of docs/PROTOCOL.md §13 against a scripted shim.

The code block is taken from the document itself, so the spec's example stays correct. The
test plays the shim's side of the driver link over a real socketpair: handshake, ready, a
task, ping, pause/resume, an unknown request, cancel, shutdown — and a version mismatch.
Every read has a deadline and the driver process is always killed and reaped.
"""

import os
import pathlib
import re
import socket
import struct
import subprocess
import sys

import msgpack
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
DEADLINE_S = 10.0


def skeleton_source():
    doc = (ROOT / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    matches = [b for b in blocks if b.startswith("# driver.py")]
    assert len(matches) == 1, "docs/PROTOCOL.md must have exactly one '# driver.py' block"
    return matches[0]


class Shim:
    """The shim's end of the driver link."""

    def __init__(self, sock):
        self.sock = sock
        self.sock.settimeout(DEADLINE_S)

    def send(self, msg):
        body = msgpack.packb(msg, use_bin_type=True)
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def _read_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def recv(self):
        (length,) = struct.unpack(">I", self._read_exact(4))
        assert 0 < length <= 16 * 1024 * 1024
        msg = msgpack.unpackb(self._read_exact(length), raw=False)
        assert isinstance(msg, dict) and isinstance(msg["type"], str)
        return msg

    def at_eof(self):
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


@pytest.fixture
def driver(tmp_path):
    """Start the skeleton with one end of a socketpair as AGENT_SHIM_FD; yield (shim, proc)."""
    script = tmp_path / "driver.py"
    script.write_text(skeleton_source(), encoding="utf-8")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ, AGENT_SHIM_FD=str(theirs.fileno()))
    proc = subprocess.Popen([sys.executable, str(script)], pass_fds=[theirs.fileno()], env=env)
    theirs.close()
    try:
        yield Shim(ours), proc
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=DEADLINE_S)


SHIM_HELLO = {
    "type": "hello", "protocol": "agent-shim", "versions": [1], "role": "shim",
    "software": "agent-shim", "software_version": "0.1.0", "capabilities": [],
}


def test_skeleton_runs_the_driver_link(driver):
    shim, proc = driver
    shim.send(SHIM_HELLO)
    hello = shim.recv()
    assert hello["type"] == "hello" and hello["role"] == "driver"
    assert hello["protocol"] == "agent-shim" and 1 in hello["versions"]
    assert shim.recv() == {"type": "ready"}

    shim.send({"type": "task", "task_id": "t1", "input": "What is 2+2?", "attempt": 1})
    events = []
    while True:
        msg = shim.recv()
        events.append(msg)
        if msg["type"] == "task_done":
            break
    assert [m["type"] for m in events] == ["progress", "message_chunk", "task_done"]
    assert all(m["task_id"] == "t1" for m in events)
    assert events[-1]["status"] == "succeeded"

    shim.send({"type": "ping", "id": 5})
    assert shim.recv() == {"type": "pong", "re": 5}
    shim.send({"type": "pause", "id": 9, "timeout_ms": 10000})
    assert shim.recv() == {"type": "paused", "re": 9}
    shim.send({"type": "resume", "id": 10, "slept_ms": 300000})
    assert shim.recv() == {"type": "ready", "re": 10}

    shim.send({"type": "teleport", "id": 42, "to": "mars"})
    reply = shim.recv()
    assert (reply["type"], reply["code"], reply["re"]) == ("error", "unsupported", 42)
    shim.send({"type": "cancel", "id": 11, "task_id": "t1"})
    reply = shim.recv()
    assert (reply["type"], reply["code"], reply["re"]) == ("error", "not_found", 11)

    shim.send({"type": "shutdown", "id": 12, "grace_ms": 1000})
    assert shim.recv() == {"type": "ok", "re": 12}
    assert proc.wait(timeout=DEADLINE_S) == 0


def test_skeleton_refuses_a_shim_without_a_common_version(driver):
    shim, proc = driver
    shim.send(dict(SHIM_HELLO, versions=[2, 3]))
    assert shim.recv()["type"] == "hello"
    reply = shim.recv()
    assert (reply["type"], reply["code"]) == ("error", "unsupported_version")
    assert shim.at_eof()
    assert proc.wait(timeout=DEADLINE_S) != 0


def test_skeleton_rejects_an_oversized_frame(driver):
    shim, proc = driver
    shim.send(SHIM_HELLO)
    assert shim.recv()["type"] == "hello"
    assert shim.recv()["type"] == "ready"
    shim.sock.sendall(struct.pack(">I", 16 * 1024 * 1024 + 1))
    reply = shim.recv()
    assert (reply["type"], reply["code"]) == ("error", "frame_too_large")
    assert shim.at_eof()
    assert proc.wait(timeout=DEADLINE_S) != 0


def test_skeleton_exits_when_the_shim_goes_away(driver):
    shim, proc = driver
    shim.send(SHIM_HELLO)
    assert shim.recv()["type"] == "hello"
    assert shim.recv()["type"] == "ready"
    shim.sock.close()
    assert proc.wait(timeout=DEADLINE_S) == 0
