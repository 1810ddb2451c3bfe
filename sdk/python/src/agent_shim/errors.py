"""The exceptions the SDK raises. Every one derives from :class:`AgentShimError`."""

from __future__ import annotations

from typing import Dict, Optional, Type

__all__ = [
    "AgentShimError",
    "ProtocolError",
    "ConnectionClosed",
    "RemoteError",
    "NotFound",
    "BadPath",
    "PermissionDenied",
    "NoSpace",
    "FileChanged",
    "remote_error",
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


class NotFound(RemoteError):
    """``not_found``: the file, directory, task, exec, watch or upload named does not exist."""


class BadPath(RemoteError):
    """``bad_path``: a file operation's path is empty, has a NUL, or leads out of the shim's
    file root (through ``..``, a symlink or a magic link)."""


class PermissionDenied(RemoteError):
    """``permission``: the sandbox user may not do this to this path (or it is read-only)."""


class NoSpace(RemoteError):
    """``no_space``: the sandbox's file system (or the user's quota) is full; nothing was
    left half-written."""


class FileChanged(RemoteError):
    """``changed``: the file changed (size, modification time or inode) while it was read;
    read it again."""


_BY_CODE: Dict[str, Type[RemoteError]] = {
    "not_found": NotFound,
    "bad_path": BadPath,
    "permission": PermissionDenied,
    "no_space": NoSpace,
    "changed": FileChanged,
}


def remote_error(
    code: str, message: str, re: Optional[int] = None, first_available: Optional[int] = None
) -> RemoteError:
    """The RemoteError for an ``error{code}`` from the shim: the subclass of its code when it
    has one (``NotFound``, ``PermissionDenied``…), else RemoteError itself."""
    return _BY_CODE.get(code, RemoteError)(code, message, re, first_available)


class ShimTimeout(AgentShimError, TimeoutError):
    """A bounded wait ran out (a reply, a handshake, a reconnect)."""


class TaskFailed(AgentShimError):
    """Raise from ``Driver.on_task`` to fail the task with exactly this message."""
