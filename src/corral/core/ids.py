"""Identifiers, tokens and API keys.

Sandbox ids match `^[a-z0-9]+$`: the first label of `{port}-{sandboxID}.{domain}` is split on
the first dash, so ids must never contain one.
"""

from __future__ import annotations

import re
import secrets
import string

__all__ = [
    "API_KEY_RE",
    "SANDBOX_ID_RE",
    "is_sandbox_id",
    "new_access_token",
    "new_api_key",
    "new_sandbox_id",
]

_ALPHABET = string.ascii_lowercase + string.digits
SANDBOX_ID_RE = re.compile(r"^[a-z0-9]{1,64}$")
API_KEY_RE = re.compile(r"^e2b_[0-9a-f]{40}$")


def new_sandbox_id() -> str:
    """20 characters of [a-z0-9]: ~103 bits, and it always starts with a letter."""
    return secrets.choice(string.ascii_lowercase) + "".join(secrets.choice(_ALPHABET) for _ in range(19))


def is_sandbox_id(value: str) -> bool:
    return bool(SANDBOX_ID_RE.match(value))


def new_access_token() -> str:
    return secrets.token_hex(32)


def new_api_key() -> str:
    """`e2b_` + 40 hex characters, so the official SDK's client-side format check passes."""
    return "e2b_" + secrets.token_hex(20)
