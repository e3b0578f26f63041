"""Routing header-less signed `/files` URLs to the sandbox whose token made the signature."""

from __future__ import annotations

from e2b.sandbox.signature import get_signature

from corral.server.signed_routing import find_sandbox_for_signature, signed_files_query

SANDBOXES = [("open", None), ("aaa", "token-a"), ("bbb", "token-b")]


def _query(path: str, op: str, user: str | None, token: str, expires_in: int | None = None) -> dict[str, str]:
    sig = get_signature(path, op, user, token, expires_in)  # the official SDK's signer
    query = {"path": path, "signature": sig["signature"]}
    if user:
        query["username"] = user
    if sig["expiration"] is not None:
        query["signature_expiration"] = str(sig["expiration"])
    return query


def test_finds_the_signing_sandbox() -> None:
    assert find_sandbox_for_signature(_query("f.txt", "read", None, "token-b"), SANDBOXES) == "bbb"
    assert (
        find_sandbox_for_signature(_query("/x", "write", "root", "token-a", 60), SANDBOXES, "write") == "aaa"
    )
    # expired signatures still route: the sandbox's envd answers "signature is already expired"
    assert (
        find_sandbox_for_signature(_query("f", "read", "user", "token-a", -120), SANDBOXES, "read") == "aaa"
    )


def test_no_match() -> None:
    good = _query("f.txt", "read", "user", "token-a")
    assert find_sandbox_for_signature(good, SANDBOXES, "write") is None  # wrong operation
    assert find_sandbox_for_signature({**good, "path": "other"}, SANDBOXES) is None
    assert find_sandbox_for_signature({**good, "username": "root"}, SANDBOXES) is None
    assert find_sandbox_for_signature({**good, "signature": "v1_forged"}, SANDBOXES) is None
    assert find_sandbox_for_signature({**good, "signature_expiration": "soon"}, SANDBOXES) is None
    assert find_sandbox_for_signature({"path": "f.txt"}, SANDBOXES) is None
    assert find_sandbox_for_signature(good, [("open", None), ("other", "")]) is None


def test_signed_files_query() -> None:
    def scope(path: str, query: bytes) -> dict[str, object]:
        return {"type": "http", "path": path, "query_string": query, "method": "GET"}

    assert signed_files_query(scope("/files", b"path=a&signature=v1_x&path=b")) == {
        "path": "a",
        "signature": "v1_x",
    }
    assert signed_files_query(scope("/files", b"path=a")) is None
    assert signed_files_query(scope("/files", b"path=a&signature=")) is None
    assert signed_files_query(scope("/filesx", b"signature=v1_x")) is None
