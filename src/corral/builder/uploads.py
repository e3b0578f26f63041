"""COPY sources: the archives clients upload, keyed by the client's files hash, per scope (team).

E2B's flow: `GET /templates/{id}/files/{hash}` answers whether the archive is already there and a
pre-signed URL to PUT it to (no API key on that request). Ours is `/upload/<token>` on the API's own
port: the token is random, lives in memory for `TOKEN_TTL_S`, and names (scope, hash), so whoever
holds it can only write that one archive. The hash is the client's claim about the content; it is
only trusted inside its own scope (the same hash uploaded by another team is another file).

Archives are written to a temp file in the scope's directory and renamed into place when complete,
so a reader sees a whole archive or none. Lifecycle: issued token → PUT (stored) → read by builds
→ removed by `remove_older_than` (GC) once no build needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from corral.core.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted

__all__ = ["MAX_UPLOAD_BYTES", "TOKEN_TTL_S", "UploadStore", "UploadTicket"]

TOKEN_TTL_S = 3600.0
MAX_UPLOAD_BYTES = 8 << 30  # 8 GiB per archive
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True, slots=True)
class UploadTicket:
    scope: str
    files_hash: str
    expires_at: float  # time.monotonic()


class UploadStore:
    def __init__(self, directory: Path, *, max_bytes: int = MAX_UPLOAD_BYTES) -> None:
        self._dir = directory
        self._max_bytes = max_bytes
        self._tickets: dict[str, UploadTicket] = {}
        self._lock = threading.Lock()

    def _scope_dir(self, scope: str) -> Path:
        # Scopes are team ids; hashing them keeps any value a safe directory name.
        return self._dir / hashlib.sha256(scope.encode()).hexdigest()[:32]

    def path(self, scope: str, files_hash: str) -> Path:
        if not _HASH_RE.match(files_hash):
            raise InvalidArgument(f"invalid files hash {files_hash!r}: expected 64 hex characters")
        return self._scope_dir(scope) / f"{files_hash}.tar"

    def present(self, scope: str, files_hash: str) -> bool:
        return self.path(scope, files_hash).is_file()

    def issue(self, scope: str, files_hash: str) -> str:
        """A token for one upload of (scope, hash)."""
        self.path(scope, files_hash)  # validates the hash
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            for old, ticket in list(self._tickets.items()):
                if ticket.expires_at < now:
                    del self._tickets[old]
            self._tickets[token] = UploadTicket(scope, files_hash, now + TOKEN_TTL_S)
        return token

    def ticket(self, token: str) -> UploadTicket:
        with self._lock:
            ticket = self._tickets.get(token)
        if ticket is None:
            raise NotFound("this upload URL is not known to this server (ask for a new one)")
        if ticket.expires_at < time.monotonic():
            raise PermissionDenied("this upload URL has expired (ask for a new one)")
        return ticket

    async def receive(
        self, token: str, chunks: AsyncIterator[bytes], declared_size: int | None = None
    ) -> int:
        """Store the body of a PUT to the token's URL; returns its size."""
        ticket = self.ticket(token)
        if declared_size is not None and declared_size > self._max_bytes:
            raise ResourceExhausted(f"the archive is larger than {self._max_bytes} bytes")
        target = self.path(ticket.scope, ticket.files_hash)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self._max_bytes:
                        raise ResourceExhausted(f"the archive is larger than {self._max_bytes} bytes")
                    f.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return size

    def remove_older_than(self, seconds: float) -> int:
        """Remove archives not written for `seconds` (and stray temp files); returns how many."""
        if not self._dir.is_dir():
            return 0
        cutoff = time.time() - seconds
        removed = 0
        for path in self._dir.glob("*/*"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed
