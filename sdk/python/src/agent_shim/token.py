"""The control link's shared secret (PROTOCOL.md §8.2), read as the shim reads it."""

from __future__ import annotations

import os
from typing import Optional, Union

__all__ = ["TOKEN_ENV", "read_token", "token_from_env"]

#: The variable the shim (and agentctl) read the token from.
TOKEN_ENV = "AGENT_SHIM_TOKEN"


def _trim(data: bytes) -> bytes:
    # A token file written by `echo` ends in a newline: trailing \n and \r are not the token.
    return data.rstrip(b"\r\n")


def read_token(path: Union[str, "os.PathLike[str]"]) -> bytes:
    """The token in a file, without its trailing newlines. Raises ValueError if empty."""
    with open(path, "rb") as f:
        token = _trim(f.read())
    if not token:
        raise ValueError(f"{os.fspath(path)} holds an empty token")
    return token


def token_from_env(var: str = TOKEN_ENV) -> Optional[bytes]:
    """The token in ``var`` (trailing newlines dropped), None when unset."""
    value = os.environb.get(var.encode())
    if value is None:
        return None
    token = _trim(value)
    if not token:
        raise ValueError(f"{var} is empty")
    return token
