"""examples/python-agent under the real shim, against a local stub of an OpenAI-compatible
chat-completions server that replays recorded responses (no network)."""

from __future__ import annotations

import asyncio
import http.server
import json
import sys
import threading
import time
from typing import Any

from conftest import REPO
from helpers import connect, run, until_done, until_type

AGENT = REPO / "examples" / "python-agent" / "agent.py"
RECORDED = REPO / "examples" / "python-agent" / "recorded"


class Stub:
    """Serves the recorded replies in order; records every request (path, headers, body)."""

    def __init__(self, replies: list[Any], status: int = 200, delay: float = 0.0) -> None:
        self.replies = list(replies)
        self.requests: list[dict[str, Any]] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                      "body": body})
                time.sleep(delay)
                reply = stub.replies.pop(0) if stub.replies else {"error": "no more replies"}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def agent_env(stub: Stub) -> dict[str, str]:
    return {"OPENAI_BASE_URL": stub.url, "OPENAI_MODEL": "test-model", "OPENAI_API_KEY": "test-key"}


def test_the_agent_calls_bash_through_the_shim_and_answers(shim_factory):
    stub = Stub(json.loads((RECORDED / "bash_then_answer.json").read_text()))
    shim = shim_factory([sys.executable, "-u", str(AGENT)], env=agent_env(stub))

    async def go():
        async with await connect(shim) as c:
            stream = c.events()
            await c.submit_task("a1", "What does `echo hello-from-bash; uname -s` print?")
            events, done = await until_done(stream, "a1", timeout=30)
            call = next(e for e in events if e.type == "tool_call")
            assert call.get("name") == "bash" and call.get("call_id") == "call_Xy9aBcD3eF"
            assert call.get("input") == {"command": "echo hello-from-bash; uname -s"}
            result = next(e for e in events if e.type == "tool_result")
            assert result.get("output")["output"] == "hello-from-bash\nLinux\n", result
            assert result.get("output")["exit_code"] == 0 and result.get("is_error") is False
            chunk = next(e for e in events if e.type == "message_chunk")
            assert chunk.get("final") is True
            answer = "The command printed hello-from-bash; the kernel is Linux."
            assert (done.get("status"), done.get("output")) == ("succeeded", answer)

    try:
        run(go())
    finally:
        stub.close()
    first, second = stub.requests
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer test-key"
    assert first["body"]["model"] == "test-model"
    assert first["body"]["tools"][0]["function"]["name"] == "bash"
    assert first["body"]["messages"][1]["content"].startswith("What does")
    tool_msg = second["body"]["messages"][-1]
    assert tool_msg == {"role": "tool", "tool_call_id": "call_Xy9aBcD3eF",
                        "content": "hello-from-bash\nLinux\n"}


def test_an_endpoint_error_fails_the_task_clearly(shim_factory):
    stub = Stub([{"error": {"message": "model not loaded"}}], status=503)
    shim = shim_factory([sys.executable, "-u", str(AGENT)], env=agent_env(stub))

    async def go():
        async with await connect(shim) as c:
            stream = c.events()
            await c.submit_task("a2", "hi")
            _, done = await until_done(stream, "a2", timeout=30)
            assert done.get("status") == "failed"
            assert "answered 503" in done.get("error") and "model not loaded" in done.get("error")

    try:
        run(go())
    finally:
        stub.close()


def test_a_cancel_ends_a_slow_model_call_at_once(shim_factory):
    stub = Stub([], delay=30)
    shim = shim_factory([sys.executable, "-u", str(AGENT)], env=agent_env(stub))

    async def go():
        async with await connect(shim) as c:
            stream = c.events()
            await c.submit_task("a3", "slow")
            await until_type(stream, "progress", task_id="a3")
            await asyncio.sleep(0.3)
            start = time.monotonic()
            await c.cancel_task("a3")
            _, done = await until_done(stream, "a3", timeout=10)
            assert done.get("status") == "cancelled"
            assert time.monotonic() - start < 3

    try:
        run(go())
    finally:
        stub.close()
