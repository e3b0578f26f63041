"""httpx details both twins share: timeouts, the TLS context and the mapping of transport failures.
No I/O, except that the shared TLS context reads the CA bundle once, when first needed."""

from __future__ import annotations

import functools
import ssl

import httpx

from corral.sdk._errors import ConnectionException, SandboxException, TimeoutException

__all__ = ["is_dropped_connection", "shared_ssl_context", "stream_timeout_for", "timeout_for", "transport_error"]

# Reads on a stream may sit idle this long past its own deadline: envd ends streams at their
# deadline itself and sends keepalives on idle ones, so a longer silence means a dead connection.
_STREAM_GRACE_S = 30.0


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """httpx's default TLS context (certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR), made once per
    process. Why: building one reads the whole CA bundle, about 30 ms here, and every SDK client
    (one per `Sandbox.create`) would pay it again; an SSLContext is safe to share."""
    return httpx.create_ssl_context()


def timeout_for(seconds: float | None) -> httpx.Timeout:
    """One deadline per network operation (connect, each read, each write); None = no limit."""
    return httpx.Timeout(seconds)


def stream_timeout_for(request_seconds: float | None, stream_seconds: float | None) -> httpx.Timeout:
    """Open within `request_seconds`; then reads may wait up to the stream's own lifetime."""
    read = stream_seconds + (request_seconds or _STREAM_GRACE_S) if stream_seconds else None
    return httpx.Timeout(request_seconds, read=read)


def is_dropped_connection(exc: BaseException) -> bool:
    """The connection died mid-request (the sandbox may have gone with it)."""
    return isinstance(exc, httpx.ReadError | httpx.RemoteProtocolError | httpx.WriteError)


def transport_error(exc: httpx.HTTPError, what: str, url: str) -> SandboxException:
    """A transport failure as an SDK exception that says what to do."""
    if isinstance(exc, httpx.TimeoutException):
        return TimeoutException(
            f"{what}: no answer from {url} in time ({type(exc).__name__}); pass a larger request_timeout= (0 disables it)",
            code="deadline_exceeded",
        )
    if isinstance(exc, httpx.ConnectError):
        return ConnectionException(
            f"{what}: cannot connect to {url} ({exc}); is the Corral server running there? "
            "Set CORRAL_API_URL (or api_url=) to its address",
            code="unavailable",
        )
    return ConnectionException(
        f"{what}: the connection to {url} failed: {type(exc).__name__}: {exc}", code="unavailable"
    )
