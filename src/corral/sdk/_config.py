"""Connection settings: one frozen object per client, resolved once.

Precedence, highest first: call argument > client-bound value (the sandbox's own config) >
`CORRAL_*` environment variable > `E2B_*` environment variable > default.

| setting          | env (first found)                          | default                         |
|------------------|--------------------------------------------|---------------------------------|
| api_url          | CORRAL_API_URL, E2B_API_URL                | http://127.0.0.1:3000           |
| api_key          | CORRAL_API_KEY, E2B_API_KEY                | none (the server may need one)  |
| sandbox_url      | CORRAL_SANDBOX_URL, E2B_SANDBOX_URL        | the api_url (Corral serves envd and sandbox ports on the API's port) |
| domain           | CORRAL_DOMAIN, E2B_DOMAIN                  | the API's answer, else the api_url host |
| request_timeout  | CORRAL_REQUEST_TIMEOUT                     | 60 seconds (0 = no limit)       |

`UNSET` marks "not given, fall back"; `None` given explicitly means "none" (for `api_key`:
send no key even if the environment has one).
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from collections.abc import Mapping
from typing import Final, TypedDict

from corral.sdk._errors import InvalidArgumentException

__all__ = [
    "DEFAULT_API_URL",
    "DEFAULT_REQUEST_TIMEOUT",
    "UNSET",
    "ConnectionConfig",
    "ConnectionOptions",
    "Unset",
]

DEFAULT_API_URL: Final = "http://127.0.0.1:3000"
DEFAULT_REQUEST_TIMEOUT: Final = 60.0


class Unset:
    """Type of `UNSET`: a value that was not given (distinct from an explicit `None`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Final = Unset()


class ConnectionOptions(TypedDict, total=False):
    """Per-call connection options accepted by `create`, `connect`, `list` and the by-id methods."""

    api_url: str
    api_key: str | None
    sandbox_url: str | None
    domain: str | None
    request_timeout: float | None
    headers: Mapping[str, str]


_ENV: dict[str, tuple[str, ...]] = {
    "api_url": ("CORRAL_API_URL", "E2B_API_URL"),
    "api_key": ("CORRAL_API_KEY", "E2B_API_KEY"),
    "sandbox_url": ("CORRAL_SANDBOX_URL", "E2B_SANDBOX_URL"),
    "domain": ("CORRAL_DOMAIN", "E2B_DOMAIN"),
    "request_timeout": ("CORRAL_REQUEST_TIMEOUT",),
}


def _from_env(name: str, env: Mapping[str, str]) -> str | None:
    for var in _ENV[name]:
        value = env.get(var)
        if value:
            return value
    return None


def _check_url(name: str, url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InvalidArgumentException(f"{name} must be an http(s) URL like {DEFAULT_API_URL}, got {url!r}")
    return url.rstrip("/")


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionConfig:
    """Where the Corral API and the sandboxes are and how to authenticate. Immutable.

    Build it with `ConnectionConfig.resolve(...)`; derive per-call variants with `override(...)`.
    """

    api_url: str
    """Base URL of the REST API, without a trailing slash."""
    api_key: str | None
    """Sent as `X-API-Key`; None sends none."""
    sandbox_url: str
    """Base URL of envd and sandbox ports (Corral routes by the `E2b-Sandbox-Id` header)."""
    domain: str | None
    """Domain for `{port}-{sandboxID}.{domain}` hosts when the API does not name one."""
    request_timeout: float | None
    """Seconds for one request; None means no limit."""
    headers: tuple[tuple[str, str], ...] = ()
    """Extra headers for API requests (not sent to envd)."""

    @classmethod
    def resolve(
        cls,
        *,
        api_url: str | Unset = UNSET,
        api_key: str | None | Unset = UNSET,
        sandbox_url: str | None | Unset = UNSET,
        domain: str | None | Unset = UNSET,
        request_timeout: float | None | Unset = UNSET,
        headers: Mapping[str, str] | Unset = UNSET,
        env: Mapping[str, str] | None = None,
    ) -> ConnectionConfig:
        """Arguments first, then the environment (`CORRAL_*`, then `E2B_*`), then defaults."""
        env = os.environ if env is None else env
        resolved_api_url = (
            api_url if not isinstance(api_url, Unset) else _from_env("api_url", env) or DEFAULT_API_URL
        )
        resolved_api_url = _check_url("api_url", resolved_api_url)
        resolved_sandbox_url = (
            sandbox_url if not isinstance(sandbox_url, Unset) else _from_env("sandbox_url", env)
        ) or resolved_api_url
        timeout: float | None
        if isinstance(request_timeout, Unset):
            raw = _from_env("request_timeout", env)
            try:
                timeout = float(raw) if raw else DEFAULT_REQUEST_TIMEOUT
            except ValueError:
                raise InvalidArgumentException(
                    f"CORRAL_REQUEST_TIMEOUT must be a number of seconds, got {raw!r}"
                ) from None
        else:
            timeout = request_timeout
        return cls(
            api_url=resolved_api_url,
            api_key=api_key if not isinstance(api_key, Unset) else _from_env("api_key", env),
            sandbox_url=_check_url("sandbox_url", resolved_sandbox_url),
            domain=domain if not isinstance(domain, Unset) else _from_env("domain", env),
            request_timeout=timeout or None,
            headers=tuple(sorted(headers.items())) if not isinstance(headers, Unset) else (),
        )

    @classmethod
    def from_options(cls, config: ConnectionConfig | None, options: ConnectionOptions) -> ConnectionConfig:
        """The config for one call: `options` over `config` (or over the environment when None)."""
        if config is None:
            return cls.resolve(**options)
        return config.override(**options)

    def override(self, **options: object) -> ConnectionConfig:
        """A copy with the given options replaced (call argument > client-bound)."""
        unknown = set(options) - set(ConnectionOptions.__annotations__)
        if unknown:
            raise InvalidArgumentException(f"unknown connection options: {sorted(unknown)}")
        if not options:
            return self
        changes: dict[str, object] = {}
        for name, value in options.items():
            if name in ("api_url", "sandbox_url") and isinstance(value, str):
                value = _check_url(name, value)
            if name == "sandbox_url" and value is None:
                value = changes.get("api_url", self.api_url)
            if name == "request_timeout":
                value = value or None
            if name == "headers" and isinstance(value, Mapping):
                value = tuple(sorted({**dict(self.headers), **value}.items()))
            changes[name] = value
        if "api_url" in changes and "sandbox_url" not in changes and self.sandbox_url == self.api_url:
            changes["sandbox_url"] = changes["api_url"]  # it was derived from the api_url: follow it
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def timeout(self, request_timeout: float | None = None) -> float | None:
        """The timeout of one request: the call's `request_timeout` (0 = none) or the config's."""
        if request_timeout is None:
            return self.request_timeout
        return request_timeout or None

    @property
    def api_host(self) -> str:
        """Host name of the API URL (used as the sandbox domain of last resort)."""
        return urllib.parse.urlsplit(self.api_url).hostname or "localhost"
