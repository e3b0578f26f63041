"""The sandbox list query (`GET /v2/sandboxes`): parsing, filtering and opaque cursors. No I/O.

Wire facts (e2b-protocol.md §2.1, §6 items 8-10):

* `metadata` arrives encoded three times (the SDK quotes each key and value, `urlencode`s the pairs,
  and httpx encodes the whole parameter). After the framework has decoded the parameter once,
  `parse_metadata_filter` unescapes the whole string, splits it on `&` and `=`, and unescapes each
  key and value - the same steps as E2B's `parseFilters`, Go `url.QueryUnescape` semantics included
  (`+` means space, a malformed `%` escape is an error). Every pair must match (AND).
* `state` is a comma list of `running`/`paused` (default: both). Killed and creating sandboxes are
  never listed.
* `startedAfter` is inclusive (`>=`) at full (microsecond) precision.
* Order is by the key `(started_at, sandbox_id)`: descending by default (newest first), ascending
  with `order=asc`; the two orders are exact inverses. A page holds at most `limit` rows
  (1..100, default 100); the cursor names the last row of a page and the next page starts strictly
  after it. The cursor is base64url(`{RFC3339Nano started_at}__{sandbox_id}[__asc]`), like E2B's,
  and a cursor is only valid for the order it was issued for.

`paginate` is the reference implementation over rows in memory (fakes and tests use it); the store
runs the same semantics in SQL.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Protocol, TypeVar
from urllib.parse import unquote_plus

from corral.core.errors import InvalidArgument
from corral.core.sandbox import SandboxState

__all__ = [
    "DEFAULT_LIMIT",
    "LISTABLE_STATES",
    "MAX_LIMIT",
    "Cursor",
    "Listable",
    "Order",
    "SandboxQuery",
    "cursor_after",
    "decode_cursor",
    "encode_cursor",
    "format_rfc3339_nano",
    "matches",
    "metadata_matches",
    "paginate",
    "parse_limit",
    "parse_metadata_filter",
    "parse_order",
    "parse_sandbox_query",
    "parse_started_after",
    "parse_state_filter",
    "sort_key",
]

DEFAULT_LIMIT = 100
MAX_LIMIT = 100
# The only states a list may ask for: the SDK's SandboxState enum knows nothing else.
LISTABLE_STATES: frozenset[SandboxState] = frozenset({SandboxState.RUNNING, SandboxState.PAUSED})

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# A `+` in an unencoded offset ("...T10:00:00+02:00") reaches us as a space after form decoding.
_SPACE_OFFSET = re.compile(r" (\d{2}:?\d{2})$")
_ASC_SUFFIX = "asc"


class Order(enum.StrEnum):
    """Direction of the `(started_at, sandbox_id)` key."""

    DESC = "desc"  # newest first (the default)
    ASC = "asc"  # oldest first


@dataclasses.dataclass(frozen=True, slots=True)
class Cursor:
    """Position after which the next page starts: the key of the previous page's last row."""

    started_at: datetime
    sandbox_id: str
    order: Order = Order.DESC


@dataclasses.dataclass(frozen=True, slots=True)
class SandboxQuery:
    """A parsed, validated list request. `team_id` is not part of it: the caller scopes by team."""

    states: frozenset[SandboxState] = LISTABLE_STATES
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    order: Order = Order.DESC
    started_after: datetime | None = None
    template: str | None = None  # template id or alias (name)
    limit: int = DEFAULT_LIMIT
    cursor: Cursor | None = None


class Listable(Protocol):
    """What filtering and ordering need from a row (the store's `SandboxRow` has all of it)."""

    @property
    def sandbox_id(self) -> str: ...
    @property
    def template_id(self) -> str: ...
    @property
    def alias(self) -> str | None: ...
    @property
    def state(self) -> SandboxState: ...
    @property
    def started_at(self) -> datetime: ...
    @property
    def metadata(self) -> Mapping[str, str]: ...


_RowT = TypeVar("_RowT", bound=Listable)


# -- parsing ---------------------------------------------------------------------------------------


def _query_unescape(text: str, what: str) -> str:
    """Go's `url.QueryUnescape`: `+` is a space, and a `%` not followed by two hex digits is an error."""
    if _BAD_ESCAPE.search(text):
        raise InvalidArgument(f"invalid metadata filter: malformed percent-escape in {what} {text!r}")
    return unquote_plus(text, errors="strict") if "%" in text or "+" in text else text


def parse_metadata_filter(raw: str | None) -> dict[str, str]:
    """Parse the framework-decoded `metadata` query parameter into the pairs that must all match."""
    if not raw:
        return {}
    try:
        whole = _query_unescape(raw, "query")
        filters: dict[str, str] = {}
        for pair in whole.split("&"):
            parts = pair.split("=")
            if len(parts) != 2:
                raise InvalidArgument(
                    f"invalid metadata filter: {pair!r} is not a key=value pair "
                    "(encode the filter as the e2b SDK does: urlencode of quoted keys and values)"
                )
            filters[_query_unescape(parts[0], "key")] = _query_unescape(parts[1], "value")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"invalid metadata filter: not UTF-8 after unescaping ({exc.reason})") from None
    return filters


def parse_state_filter(raw: str | Sequence[str] | None) -> frozenset[SandboxState]:
    """`running`, `paused` or both (comma list, or repeated parameters); empty means both."""
    values = [raw] if isinstance(raw, str) else list(raw or ())
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if not names:
        return LISTABLE_STATES
    states: set[SandboxState] = set()
    for name in names:
        try:
            state = SandboxState(name)
        except ValueError:
            state = None
        if state not in LISTABLE_STATES:
            raise InvalidArgument(f"invalid state {name!r}: expected 'running' and/or 'paused'")
        assert state is not None
        states.add(state)
    return frozenset(states)


def parse_order(raw: str | None) -> Order:
    if not raw:
        return Order.DESC
    try:
        return Order(raw.lower())
    except ValueError:
        raise InvalidArgument(f"invalid order {raw!r}: expected 'asc' or 'desc'") from None


def _parse_aware(raw: str) -> datetime:
    """An ISO 8601 / RFC 3339 timestamp; naive ones are taken as UTC. Result is UTC, microseconds."""
    value = datetime.fromisoformat(raw)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def parse_started_after(raw: str | None) -> datetime | None:
    if not raw:
        return None
    text = _SPACE_OFFSET.sub(r"+\1", raw.strip())
    try:
        return _parse_aware(text)
    except ValueError:
        raise InvalidArgument(
            f"invalid startedAfter {raw!r}: expected an ISO 8601 timestamp such as 2025-01-31T12:00:00Z"
        ) from None


def parse_limit(raw: str | int | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except (TypeError, ValueError):
        limit = None
    if limit is None or not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgument(f"invalid limit {raw!r}: expected an integer from 1 to {MAX_LIMIT}")
    return limit


def parse_sandbox_query(
    *,
    metadata: str | None = None,
    state: str | Sequence[str] | None = None,
    order: str | None = None,
    started_after: str | None = None,
    template: str | None = None,
    limit: str | int | None = None,
    next_token: str | None = None,
) -> SandboxQuery:
    """Build a `SandboxQuery` from the (framework-decoded) query parameters of `GET /v2/sandboxes`."""
    direction = parse_order(order)
    cursor = decode_cursor(next_token) if next_token else None
    if cursor is not None and cursor.order is not direction:
        raise InvalidArgument(
            f"invalid nextToken: it was issued for order={cursor.order.value}, not order={direction.value}; "
            "repeat the query with the same order, or start again without nextToken"
        )
    return SandboxQuery(
        states=parse_state_filter(state),
        metadata=parse_metadata_filter(metadata),
        order=direction,
        started_after=parse_started_after(started_after),
        template=template or None,
        limit=parse_limit(limit),
        cursor=cursor,
    )


# -- cursors ---------------------------------------------------------------------------------------


def format_rfc3339_nano(value: datetime) -> str:
    """Go's `time.RFC3339Nano` in UTC: fractional seconds without trailing zeros, `Z` suffix."""
    value = value.astimezone(UTC)
    fraction = f"{value.microsecond:06d}".rstrip("0")
    return value.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


def encode_cursor(started_at: datetime, sandbox_id: str, order: Order = Order.DESC) -> str:
    text = f"{format_rfc3339_nano(started_at)}__{sandbox_id}"
    if order is Order.ASC:
        text += f"__{_ASC_SUFFIX}"
    return base64.urlsafe_b64encode(text.encode()).decode("ascii")


def decode_cursor(token: str) -> Cursor:
    """Inverse of `encode_cursor`; any malformed token is an `InvalidArgument`."""
    invalid = InvalidArgument("invalid nextToken: pass back the X-Next-Token of the previous page unchanged")
    try:
        padded = token + "=" * (-len(token) % 4)
        text = base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        raise invalid from None
    parts = text.split("__")
    if len(parts) == 3 and parts[2] == _ASC_SUFFIX:
        order = Order.ASC
    elif len(parts) == 2:
        order = Order.DESC
    else:
        raise invalid
    if not parts[1]:
        raise invalid
    try:
        started_at = _parse_aware(parts[0])
    except ValueError:
        raise invalid from None
    return Cursor(started_at=started_at, sandbox_id=parts[1], order=order)


# -- filtering and ordering ------------------------------------------------------------------------


def sort_key(row: Listable) -> tuple[datetime, str]:
    return (row.started_at, row.sandbox_id)


def cursor_after(row: Listable, cursor: Cursor) -> bool:
    """True when `row` comes strictly after the cursor in the cursor's direction."""
    key = sort_key(row)
    mark = (cursor.started_at, cursor.sandbox_id)
    return key < mark if cursor.order is Order.DESC else key > mark


def metadata_matches(metadata: Mapping[str, str] | None, wanted: Mapping[str, str]) -> bool:
    """AND of all pairs: every wanted key present with exactly that value."""
    if not wanted:
        return True
    if not metadata:
        return False
    return all(key in metadata and metadata[key] == value for key, value in wanted.items())


def matches(row: Listable, query: SandboxQuery) -> bool:
    """Whether `row` passes the query's filters (state, time, template, metadata; not the cursor)."""
    if row.state not in query.states:
        return False
    if query.started_after is not None and row.started_at < query.started_after:
        return False
    if query.template is not None and query.template not in (row.template_id, row.alias):
        return False
    return metadata_matches(row.metadata, query.metadata)


def paginate(rows: Iterable[_RowT], query: SandboxQuery) -> tuple[list[_RowT], str | None]:
    """One page of `rows` for `query`, and the token of the next page (None on the last one)."""
    selected = [row for row in rows if matches(row, query)]
    if query.cursor is not None:
        cursor = query.cursor
        selected = [row for row in selected if cursor_after(row, cursor)]
    selected.sort(key=sort_key, reverse=query.order is Order.DESC)
    page = selected[: query.limit]
    if len(selected) <= query.limit:
        return page, None
    last = page[-1]
    return page, encode_cursor(last.started_at, last.sandbox_id, query.order)
