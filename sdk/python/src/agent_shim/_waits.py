"""A bounded wait for the next item of a client's queue that ends early when the client's
connection is dead for good."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Optional, TypeVar, Union

from .errors import ShimTimeout

if TYPE_CHECKING:
    from .control import Client

T = TypeVar("T")


async def next_or_dead(
    queue: "asyncio.Queue[T]", client: "Client", timeout: Optional[float], what: str
) -> Union[T, BaseException]:
    """The next item of ``queue``; the client's fatal error once it has one (it is returned,
    not raised); ShimTimeout, naming ``what``, when neither comes within ``timeout`` seconds
    (None: no bound)."""
    if not queue.empty():
        return queue.get_nowait()
    if client._dead is not None:
        return client._dead
    getter = asyncio.ensure_future(queue.get())
    dead = asyncio.ensure_future(client._dead_event.wait())
    try:
        await asyncio.wait({getter, dead}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        dead.cancel()
        if not getter.done():
            getter.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    if client._dead is not None:
        return client._dead
    raise ShimTimeout(f"no {what} within {timeout} s")
