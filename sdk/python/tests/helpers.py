"""Shared helpers for the SDK tests: bounded asyncio runs and event collection."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, List, Tuple, TypeVar

from agent_shim import Client, Event
from agent_shim.control import EventStream

T = TypeVar("T")
BOUND = 60.0  # no test coroutine runs longer than this


def run(coro: Awaitable[T], bound: float = BOUND) -> T:
    """Runs a coroutine to its end, or fails it after `bound` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, bound)

    return asyncio.run(bounded())


async def until_done(stream: EventStream, task_id: str, timeout: float = 20) -> Tuple[List[Event], Event]:
    """The events of `task_id` until its task_done (others are skipped)."""
    events: List[Event] = []
    while True:
        ev = await stream.next(timeout)
        if ev.get("task_id") != task_id or ev.type == "task_accepted":
            continue
        if ev.type == "task_done":
            return events, ev
        events.append(ev)


async def until_type(stream: EventStream, kind: str, timeout: float = 20, **fields: Any) -> Event:
    """The next event of type `kind` whose fields match."""
    while True:
        ev = await stream.next(timeout)
        if ev.type == kind and all(ev.get(k) == v for k, v in fields.items()):
            return ev


async def connect(shim: Any, **options: Any) -> Client:
    from agent_shim import read_token

    token = read_token(shim.token_file) if shim.token is not None else None
    return await Client.connect(shim.address, token=token, **options)
