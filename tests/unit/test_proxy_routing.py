from __future__ import annotations

from corral.server.proxy import route_target


def test_host_routing() -> None:
    assert route_target({"host": "8080-abc123.corral.test"}, "corral.test") == ("abc123", 8080)
    assert route_target({"host": "49983-abc123.corral.test:3000"}, "corral.test") == ("abc123", 49983)


def test_header_routing() -> None:
    headers = {"host": "127.0.0.1:3000", "e2b-sandbox-id": "abc", "e2b-sandbox-port": "49999"}
    assert route_target(headers, "localhost") == ("abc", 49999)
    assert route_target({"host": "127.0.0.1", "e2b-sandbox-id": "abc"}, "localhost") == ("abc", 49983)


def test_control_plane_requests_are_not_routed() -> None:
    assert route_target({"host": "127.0.0.1:3000"}, "localhost") is None
    assert route_target({"host": "api.corral.test"}, "corral.test") is None
    assert route_target({"host": "x-Bad.corral.test"}, "corral.test") is None
    assert route_target({"host": "80-a.b.corral.test"}, "corral.test") is None
