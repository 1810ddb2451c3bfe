#!/usr/bin/env python3
"""python-agent: a minimal, real agent loop as an agent-shim driver.

The model is any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama,
llama.cpp's server); its one tool, `bash`, runs through the shim (`ctx.exec`), so the shim
bounds it (timeout, output cap), kills it when the task is cancelled, and reports it. Only
the standard library and the `agent_shim` SDK.

Environment:
  OPENAI_BASE_URL   the API's base URL (default https://api.openai.com/v1)
  OPENAI_MODEL      the model (default gpt-4o-mini)
  OPENAI_API_KEY    the key, sent as a bearer token when set (local servers need none)
  AGENT_MAX_STEPS   model calls per task (default 8)
  AGENT_HTTP_TIMEOUT, AGENT_TOOL_TIMEOUT   seconds (default 120 and 60)

Run it under the shim: agent-shim --control-listen ... -- python3 agent.py
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import sys
import urllib.error
import urllib.request
from typing import Any

try:
    import agent_shim
except ImportError:  # run from a checkout without `pip install ./sdk/python`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "sdk" / "python" / "src"))
    import agent_shim

from agent_shim import Context, Task, TaskContext, TaskFailed

SYSTEM = (
    "You are an agent working in a Linux sandbox. Use the bash tool to inspect or change "
    "the sandbox when that helps; answer briefly once you know the answer."
)
BASH_TOOL = {
    "type": "function",
    "function": {
        "name": "bash",
        "description": "Run a bash command in the sandbox; returns its exit code and output.",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string", "description": "The command line."}},
            "required": ["command"],
        },
    },
}
OUTPUT_CAP = 64 * 1024  # bytes of a tool's output kept per stream


class ChatClient:
    """POST /chat/completions, with the standard library."""

    def __init__(self) -> None:
        self.base_url = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1").rstrip("/")
        self.model = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")
        self.key = os.environ.get("OPENAI_API_KEY", "")
        self.timeout = float(os.environ.get("AGENT_HTTP_TIMEOUT", "120"))

    def complete(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        body = json.dumps({"model": self.model, "messages": messages, "tools": [BASH_TOOL]})
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", body.encode(), headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                reply: dict[str, Any] = json.load(resp)
        except urllib.error.HTTPError as e:
            detail = e.read(500).decode(errors="replace")
            raise TaskFailed(f"the model endpoint answered {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as e:
            raise TaskFailed(f"the model endpoint failed: {e}") from None
        choices = reply.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0].get("message"), dict):
            raise TaskFailed(f"the model endpoint sent no message: {str(reply)[:300]}")
        message: dict[str, Any] = choices[0]["message"]
        return message


class Agent(agent_shim.Driver):
    software = "python-agent"

    async def setup(self, ctx: Context) -> None:
        self.chat = ChatClient()
        self.max_steps = int(os.environ.get("AGENT_MAX_STEPS", "8"))
        self.tool_timeout = float(os.environ.get("AGENT_TOOL_TIMEOUT", "60"))
        await ctx.log(f"model {self.chat.model} at {self.chat.base_url}")

    async def on_task(self, task: Task, ctx: TaskContext) -> Any:
        prompt = task.input if isinstance(task.input, str) else json.dumps(task.input)
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": prompt},
        ]
        for step in range(self.max_steps):
            await ctx.checkpoint()  # a safe point: no request in flight
            await ctx.progress(f"model call {step + 1}", done=step, total=self.max_steps)
            # The blocking HTTP call runs in a thread; a cancel still ends the task at once.
            message = await asyncio.to_thread(self.chat.complete, messages)
            calls = message.get("tool_calls") or []
            content = message.get("content") or ""
            messages.append({"role": "assistant", "content": content or None,
                             **({"tool_calls": calls} if calls else {})})
            if content:
                await ctx.message(content, role="assistant", final=not calls)
            if not calls:
                return content
            for call in calls:
                messages.append(await self.run_tool(ctx, call))
        raise TaskFailed(f"no answer after {self.max_steps} model calls")

    async def run_tool(self, ctx: TaskContext, call: dict[str, Any]) -> dict[str, Any]:
        """Runs one tool call; returns the `tool` message for the model."""
        call_id = str(call.get("id", ""))
        function = call.get("function") or {}
        name = function.get("name", "")
        try:
            args = json.loads(function.get("arguments") or "{}")
        except json.JSONDecodeError:
            args = None
        await ctx.tool_call(name, args, call_id=call_id)
        if name != "bash" or not isinstance(args, dict) or not isinstance(args.get("command"), str):
            text, is_error, output = f"error: no tool {name!r} with these arguments", True, None
        else:
            try:
                proc = await ctx.exec(["bash", "-c", args["command"]], timeout=self.tool_timeout,
                                      output_cap=OUTPUT_CAP)
                result = await proc.wait()
            except agent_shim.RemoteError as e:
                text, is_error, output = f"error: {e}", True, None
            else:
                text = (result.stdout + result.stderr).decode(errors="replace")
                if result.timed_out:
                    text += f"\n[timed out after {self.tool_timeout:g} s]"
                output = {"exit_code": result.code, "signal": result.signal, "output": text}
                is_error = result.code != 0
        await ctx.tool_result(call_id, output if output is not None else {"error": text}, is_error=is_error)
        return {"role": "tool", "tool_call_id": call_id, "content": text}


if __name__ == "__main__":
    try:
        Agent().run()
    except agent_shim.ProtocolError as e:
        print(f"python-agent: {e}", file=sys.stderr)
        sys.exit(3)
