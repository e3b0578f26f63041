"""corral.server.query: list filters as the e2b SDK encodes them, cursors, and page order."""

from __future__ import annotations

import base64
import dataclasses
import random
import urllib.parse
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest

from corral.core.errors import InvalidArgument
from corral.core.sandbox import SandboxState
from corral.server import query as q
from corral.server.query import Cursor, Order, SandboxQuery

RUNNING, PAUSED = SandboxState.RUNNING, SandboxState.PAUSED


def sdk_metadata_param(metadata: Mapping[str, str]) -> str:
    """What the e2b SDK (paginator.next_items) puts into the `metadata` query parameter."""
    return urllib.parse.urlencode({urllib.parse.quote(k): urllib.parse.quote(v) for k, v in metadata.items()})


def through_the_wire(metadata: Mapping[str, str]) -> tuple[str, str]:
    """(raw query string httpx sends, the parameter value a framework decodes from it)."""
    url = httpx.URL("http://api/v2/sandboxes", params={"metadata": sdk_metadata_param(metadata)})
    raw = url.query.decode()
    (decoded,) = [v for k, v in urllib.parse.parse_qsl(raw, keep_blank_values=True) if k == "metadata"]
    return raw, decoded


# -- metadata filter -------------------------------------------------------------------------------


def test_triple_encoded_example_from_the_protocol_notes() -> None:
    raw, decoded = through_the_wire({"sandbox_test_id": "t 1&x", "b": "c"})
    assert raw == "metadata=sandbox_test_id%3Dt%2525201%252526x%26b%3Dc"  # e2b-protocol.md §2.1
    assert q.parse_metadata_filter(decoded) == {"sandbox_test_id": "t 1&x", "b": "c"}


@pytest.mark.parametrize(
    "metadata",
    [
        {"k": "v"},
        {"a=b": "c&d", "e%f": "g+h"},
        {"spaces in key": "and value", "plus+": "+1"},
        {"ünï": "cödé ✓", "slash/": "q?x#y"},
        {"empty": ""},
    ],
)
def test_metadata_round_trips_through_sdk_encoding(metadata: dict[str, str]) -> None:
    _, decoded = through_the_wire(metadata)
    assert q.parse_metadata_filter(decoded) == metadata


@pytest.mark.parametrize("raw", [None, ""])
def test_no_metadata_filter(raw: str | None) -> None:
    assert q.parse_metadata_filter(raw) == {}


@pytest.mark.parametrize("raw", ["novalue", "a=b=c", "a=b&c", "a%zz=b", "a=%4", "a=%ff"])
def test_bad_metadata_filter_is_invalid_argument(raw: str) -> None:
    with pytest.raises(InvalidArgument, match="metadata"):
        q.parse_metadata_filter(raw)


def test_metadata_matching_is_and_of_all_pairs() -> None:
    assert q.metadata_matches({"a": "1", "b": "2"}, {"a": "1", "b": "2"})
    assert q.metadata_matches({"a": "1", "b": "2"}, {"a": "1"})
    assert not q.metadata_matches({"a": "1"}, {"a": "1", "b": "2"})
    assert not q.metadata_matches({"a": "1", "b": "3"}, {"a": "1", "b": "2"})
    assert not q.metadata_matches({}, {"a": "1"})
    assert q.metadata_matches({}, {})


# -- other parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, {RUNNING, PAUSED}),
        ("", {RUNNING, PAUSED}),
        ("running", {RUNNING}),
        ("paused", {PAUSED}),
        ("running,paused", {RUNNING, PAUSED}),
        (" paused , running ", {RUNNING, PAUSED}),
        (["running", "paused"], {RUNNING, PAUSED}),  # repeated ?state=…&state=…
        ([], {RUNNING, PAUSED}),
    ],
)
def test_state_filter(raw: str | list[str] | None, expected: set[SandboxState]) -> None:
    assert q.parse_state_filter(raw) == expected


@pytest.mark.parametrize("raw", ["killed", "creating", "RUNNING", "running,stopped", ["paused", "dead"]])
def test_invalid_state_filter(raw: str | list[str]) -> None:
    with pytest.raises(InvalidArgument, match="state"):
        q.parse_state_filter(raw)


def test_order() -> None:
    assert q.parse_order(None) is Order.DESC
    assert q.parse_order("asc") is Order.ASC
    assert q.parse_order("desc") is Order.DESC
    with pytest.raises(InvalidArgument, match="order"):
        q.parse_order("up")


@pytest.mark.parametrize(("raw", "expected"), [(None, 100), ("", 100), ("1", 1), ("100", 100), (7, 7)])
def test_limit(raw: str | int | None, expected: int) -> None:
    assert q.parse_limit(raw) == expected


@pytest.mark.parametrize("raw", ["0", "101", "-1", "ten", "1.5"])
def test_invalid_limit(raw: str) -> None:
    with pytest.raises(InvalidArgument, match="limit"):
        q.parse_limit(raw)


def test_started_after_keeps_full_precision_and_offsets() -> None:
    expected = datetime(2025, 3, 4, 5, 6, 7, 891234, tzinfo=UTC)
    assert q.parse_started_after("2025-03-04T05:06:07.891234Z") == expected
    assert q.parse_started_after("2025-03-04T07:06:07.891234+02:00") == expected
    # An unencoded "+" of an offset arrives as a space after form decoding.
    assert q.parse_started_after("2025-03-04T07:06:07.891234 02:00") == expected
    # What the SDK sends: started_after.astimezone().isoformat().
    sdk = expected.astimezone(timezone(timedelta(hours=-5))).isoformat()
    assert q.parse_started_after(sdk) == expected
    assert q.parse_started_after("2025-03-04T05:06:07.891234") == expected  # naive means UTC
    assert q.parse_started_after(None) is None


def test_invalid_started_after() -> None:
    with pytest.raises(InvalidArgument, match="startedAfter"):
        q.parse_started_after("yesterday")


# -- cursors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", list(Order))
@pytest.mark.parametrize("micro", [0, 1, 120000, 999999])
def test_cursor_round_trip(order: Order, micro: int) -> None:
    started = datetime(2025, 1, 2, 3, 4, 5, micro, tzinfo=UTC)
    token = q.encode_cursor(started, "abc123", order)
    assert q.decode_cursor(token) == Cursor(started, "abc123", order)


def test_cursor_format_is_e2bs() -> None:
    started = datetime(2025, 1, 2, 3, 4, 5, 120000, tzinfo=UTC)
    assert base64.urlsafe_b64decode(q.encode_cursor(started, "sbx1")) == b"2025-01-02T03:04:05.12Z__sbx1"
    assert base64.urlsafe_b64decode(q.encode_cursor(started, "sbx1", Order.ASC)).endswith(b"__sbx1__asc")
    # A token minted by E2B's infra (nanoseconds, padded base64) is read, truncated to microseconds.
    infra = base64.urlsafe_b64encode(b"2025-01-02T03:04:05.123456789Z__sbx1").decode()
    assert q.decode_cursor(infra) == Cursor(datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC), "sbx1")
    assert q.decode_cursor(infra.rstrip("=")) == q.decode_cursor(infra)


@pytest.mark.parametrize(
    "token",
    [
        "!!!",
        base64.urlsafe_b64encode(b"no-separator").decode(),
        base64.urlsafe_b64encode(b"2025-01-02T03:04:05Z__").decode(),
        base64.urlsafe_b64encode(b"not-a-time__sbx").decode(),
        base64.urlsafe_b64encode(b"2025-01-02T03:04:05Z__sbx__desc").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ],
)
def test_bad_cursor(token: str) -> None:
    with pytest.raises(InvalidArgument, match="nextToken"):
        q.decode_cursor(token)


def test_cursor_is_only_valid_for_its_order() -> None:
    token = q.encode_cursor(datetime(2025, 1, 1, tzinfo=UTC), "a", Order.ASC)
    assert q.parse_sandbox_query(order="asc", next_token=token).cursor is not None
    with pytest.raises(InvalidArgument, match="order=asc"):
        q.parse_sandbox_query(next_token=token)


def test_parse_sandbox_query_defaults() -> None:
    assert q.parse_sandbox_query() == SandboxQuery()
    assert SandboxQuery().limit == 100 and SandboxQuery().order is Order.DESC


# -- pagination (reference implementation) ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    sandbox_id: str
    started_at: datetime
    state: SandboxState = RUNNING
    template_id: str = "base"
    alias: str | None = "base"
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _rows() -> list[Row]:
    rng = random.Random(7)
    base = datetime(2025, 5, 1, tzinfo=UTC)
    rows = []
    for i in range(40):
        # Few distinct instants, so many rows tie on started_at and the id decides.
        started = base + timedelta(microseconds=rng.choice([0, 1, 2, 999_999, 1_000_000]))
        rows.append(Row(f"s{i:02d}{rng.choice('abc')}", started, rng.choice([RUNNING, PAUSED])))
    return rows


def _all_pages(rows: list[Row], query: SandboxQuery) -> list[list[Row]]:
    pages = []
    while True:
        page, token = q.paginate(rows, query)
        pages.append(page)
        if token is None:
            return pages
        query = dataclasses.replace(query, cursor=q.decode_cursor(token))


@pytest.mark.parametrize("order", list(Order))
@pytest.mark.parametrize("limit", [1, 3, 7, 40, 100])
def test_pages_cover_every_row_once_in_order(order: Order, limit: int) -> None:
    rows = _rows()
    pages = _all_pages(rows, SandboxQuery(order=order, limit=limit))
    seen = [row for page in pages for row in page]
    expected = sorted(rows, key=lambda r: (r.started_at, r.sandbox_id), reverse=order is Order.DESC)
    assert seen == expected
    assert all(len(page) == limit for page in pages[:-1])
    assert 0 < len(pages[-1]) <= limit
    assert len(pages) == -(-len(rows) // limit)  # no empty trailing page


def test_limit_one_gives_newest_first_then_the_older() -> None:
    old = Row("older", datetime(2025, 1, 1, tzinfo=UTC))
    new = Row("extra", datetime(2025, 1, 1, 0, 0, 1, tzinfo=UTC))
    first, token = q.paginate([old, new], SandboxQuery(limit=1))
    assert first == [new] and token is not None
    second, token = q.paginate([old, new], SandboxQuery(limit=1, cursor=q.decode_cursor(token)))
    assert second == [old] and token is None


def test_filters() -> None:
    t0 = datetime(2025, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
    rows = [
        Row("a", t0, RUNNING, metadata={"k": "v", "x": "1"}),
        Row("b", t0 + timedelta(seconds=1), PAUSED, metadata={"k": "v"}),
        Row("c", t0 - timedelta(microseconds=1), RUNNING, template_id="tpl9", alias=None),
    ]

    def ids(**kwargs: object) -> list[str]:
        page, _ = q.paginate(rows, SandboxQuery(**kwargs))  # type: ignore[arg-type]
        return [r.sandbox_id for r in page]

    assert ids() == ["b", "a", "c"]
    assert ids(states=frozenset({PAUSED})) == ["b"]
    assert ids(metadata={"k": "v"}) == ["b", "a"]
    assert ids(metadata={"k": "v", "x": "1"}) == ["a"]
    assert ids(started_after=t0) == ["b", "a"]  # inclusive, to the microsecond
    assert ids(started_after=t0 + timedelta(seconds=1)) == ["b"]
    assert ids(template="tpl9") == ["c"]
    assert ids(template="base") == ["b", "a"]  # by alias (name)
    assert ids(template="nope") == []
