from __future__ import annotations

import pytest

from corral.core.ids import API_KEY_RE, is_sandbox_id, new_access_token, new_api_key, new_sandbox_id
from corral.core.settings import load_settings


def test_sandbox_ids_fit_host_routing() -> None:
    ids = {new_sandbox_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(is_sandbox_id(i) and "-" not in i and len(i) == 20 for i in ids)
    assert not is_sandbox_id("abc-def") and not is_sandbox_id("ABC") and not is_sandbox_id("")


def test_api_keys_pass_the_official_sdk_format_check() -> None:
    assert API_KEY_RE.match(new_api_key())
    assert len(new_access_token()) == 64


def test_settings_precedence() -> None:
    env = {"CORRAL_PORT": "4000", "CORRAL_DOMAIN": "example.test"}
    settings = load_settings({"port": 5000}, env=env)
    assert settings.port == 5000 and settings.domain == "example.test" and settings.host == "127.0.0.1"
    assert str(settings.gateway) == "10.201.0.1"
    with pytest.raises(TypeError):
        load_settings({"nope": 1}, env={})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]
