"""The exceptions the SDK raises. Every one derives from :class:`AgentShimError`."""

from __future__ import annotations

from typing import Optional

__all__ = [
    "AgentShimError",
    "ProtocolError",
    "ConnectionClosed",
    "RemoteError",
    "AuthenticationError",
    "ShimTimeout",
    "TaskFailed",
]


class AgentShimError(Exception):
    """Base class of every error of this package."""


class ProtocolError(AgentShimError):
    """The peer broke the protocol (a bad frame, a bad handshake); the link is closed.

    ``code`` is the protocol error code that describes it (``malformed``,
    ``frame_too_large``, ``unsupported_version``, ``invalid_state``, ``invalid``…).
    """

    def __init__(self, code: str, message: str, re: Optional[int] = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.re = re


class AuthenticationError(ProtocolError):
    """The HMAC handshake failed: a wrong token on either side, or a downgrade."""


class ConnectionClosed(AgentShimError):
    """The link ended (end of stream, reset) and could not be (re)established."""


class RemoteError(AgentShimError):
    """The shim answered a request with ``error{code, message}``.

    ``code`` is one of PROTOCOL.md §4 (``not_found``, ``limit``, ``invalid_state``…) or a
    newer one, kept verbatim.
    """

    def __init__(
        self, code: str, message: str, re: Optional[int] = None, first_available: Optional[int] = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.re = re
        #: With ``code == "gap"``: the oldest seq the shim still holds.
        self.first_available = first_available


class ShimTimeout(AgentShimError, TimeoutError):
    """A bounded wait ran out (a reply, a handshake, a reconnect)."""


class TaskFailed(AgentShimError):
    """Raise from ``Driver.on_task`` to fail the task with exactly this message."""
