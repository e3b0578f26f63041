"""Teams and their API keys in the store (`corral team create|key|list` is built on these)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.core.errors import AlreadyExists, InvalidArgument, NotFound
from corral.core.ids import API_KEY_RE
from corral.core.settings import load_settings
from corral.server.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(load_settings({"home": tmp_path / "home"}, env={}))
    yield opened
    opened.close()


def test_a_new_team_gets_its_own_key(store: Store) -> None:
    default_key = store.ensure_default_team(None)
    team_id, key = store.create_team("team-b")
    assert API_KEY_RE.match(key) and key != default_key
    assert store.team_for_api_key(key) == team_id != store.default_team_id()
    assert store.team_for_api_key(default_key) == store.default_team_id()


def test_names_are_unique_and_checked(store: Store) -> None:
    store.create_team("team-b")
    with pytest.raises(AlreadyExists):
        store.create_team("team-b")
    for bad in ("", "a b", "../x", "-x", "x" * 64, "ü"):
        with pytest.raises(InvalidArgument):
            store.create_team(bad)


def test_more_keys_for_a_team_and_listing(store: Store) -> None:
    team_id, first = store.create_team("team-b")
    second = store.add_api_key("team-b")
    assert second != first
    assert store.team_for_api_key(first) == store.team_for_api_key(second) == team_id
    with pytest.raises(NotFound):
        store.add_api_key("nobody")
    store.ensure_default_team(None)
    assert store.list_teams() == [("default", store.default_team_id(), 1), ("team-b", team_id, 2)]
