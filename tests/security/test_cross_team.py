"""Another team's sandboxes (gVisor class Lateral, attacker = Remote with a valid API key of team B).

Team B is made with `corral team create` on the running server's state dir. With B's key, every
API call that names team A's sandbox, snapshot or template answers exactly what an unknown id
answers (404 with the same message), so B learns nothing, not even that the id exists; and none
of them changes A's sandbox. B's own sandbox token does not open A's envd, and a sandbox of B
cannot reach one of A over the network.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from e2b import NotFoundException, Sandbox, Template
from e2b.exceptions import TemplateException

from corral.core.ids import new_sandbox_id
from tests.conftest import TEST_API_KEY, ServerProcess
from tests.security._probes import run
from tests.security.conftest import SandboxFactory, sdk_opts
from tests.security.test_reach_host import _reachable

pytestmark = [pytest.mark.integration, pytest.mark.compat]


def _corral(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "corral.cli.main", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def team_b_key(corral_server: ServerProcess) -> str:
    """A second team on the test server, made the way an operator does (`corral team create`)."""
    name = f"attackers-{uuid.uuid4().hex[:8]}"
    made = _corral("team", "create", name, "--home", str(corral_server.home), "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["apiKey"]
    assert key.startswith("e2b_") and key != TEST_API_KEY
    listed = _corral("team", "list", "--home", str(corral_server.home), "--json")
    assert {"name": name, "keys": 1} in [
        {"name": t["name"], "keys": t["keys"]} for t in json.loads(listed.stdout)
    ]
    again = _corral("team", "create", name, "--home", str(corral_server.home))
    assert again.returncode == 1 and "already exists" in again.stderr
    return str(key)


@pytest.fixture
def as_b(corral_server: ServerProcess, team_b_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=corral_server.url, headers={"X-API-Key": team_b_key}, timeout=60) as client:
        yield client


def _same_as_unknown(call, victim_id: str, unknown_id: str | None = None) -> None:  # type: ignore[no-untyped-def]
    """`call(id)` answers for the victim's id (or name) exactly what it answers for one nobody has."""
    unknown_id = unknown_id or new_sandbox_id()
    victim, unknown = call(victim_id), call(unknown_id)
    assert victim.status_code == 404, (victim.status_code, victim.text)
    assert unknown.status_code == 404, (unknown.status_code, unknown.text)
    assert victim.text.replace(victim_id, "<id>") == unknown.text.replace(unknown_id, "<id>")


def test_team_b_cannot_see_or_touch_team_a_sandbox(
    corral_server: ServerProcess, make_sandbox: SandboxFactory, as_b: httpx.Client, team_b_key: str
) -> None:
    a = make_sandbox(metadata={"owner": "team-a"})
    a.commands.run("sleep 1000", background=True)
    with corral_server.api() as as_a:
        end_before = as_a.get(f"/sandboxes/{a.sandbox_id}").json()["endAt"]

    listed = as_b.get("/v2/sandboxes", params={"state": "running,paused", "limit": 100})
    assert listed.status_code == 200 and a.sandbox_id not in listed.text
    assert as_b.get("/v2/sandboxes", params={"metadata": "owner=team-a"}).json() == []

    calls = {
        "get": lambda i: as_b.get(f"/sandboxes/{i}"),
        "connect": lambda i: as_b.post(f"/sandboxes/{i}/connect", json={"timeout": 60}),
        "set timeout": lambda i: as_b.post(f"/sandboxes/{i}/timeout", json={"timeout": 1}),
        "pause": lambda i: as_b.post(f"/sandboxes/{i}/pause", json={}),
        "pause (stop)": lambda i: as_b.post(f"/sandboxes/{i}/pause", json={"memory": False}),
        "kill": lambda i: as_b.delete(f"/sandboxes/{i}"),
        "snapshot": lambda i: as_b.post(
            f"/sandboxes/{i}/snapshots", json={"name": f"stolen-{uuid.uuid4().hex[:6]}"}
        ),
        "fork": lambda i: as_b.post(f"/sandboxes/{i}/fork", json={"timeout": 60, "count": 1}),
        "metrics": lambda i: as_b.get(f"/sandboxes/{i}/metrics"),
        "logs": lambda i: as_b.get(f"/v2/sandboxes/{i}/logs"),
        "network": lambda i: as_b.put(f"/sandboxes/{i}/network", json={"allowOut": ["0.0.0.0/0"]}),
    }
    for what, call in calls.items():
        try:
            _same_as_unknown(call, a.sandbox_id)
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}") from None

    # The official SDK with B's key: not found, and kill says there was nothing to kill.
    b_opts = {**sdk_opts(corral_server), "api_key": team_b_key}
    with pytest.raises(NotFoundException):
        Sandbox.connect(a.sandbox_id, **b_opts)
    with pytest.raises(NotFoundException):
        Sandbox.get_info(a.sandbox_id, **b_opts)
    assert Sandbox.kill(a.sandbox_id, **b_opts) is False

    # Nothing of that reached A's sandbox: still running, same end, its process alive, no snapshot.
    with corral_server.api() as as_a:
        info = as_a.get(f"/sandboxes/{a.sandbox_id}").json()
        assert info["state"] == "running" and info["endAt"] == end_before
        assert as_a.get("/snapshots", params={"sandboxID": a.sandbox_id}).json() == []
    assert "sleep 1000" in a.commands.run("ps -eo args").stdout


def test_team_b_cannot_use_team_a_snapshots(
    corral_server: ServerProcess, make_sandbox: SandboxFactory, as_b: httpx.Client
) -> None:
    a = make_sandbox()
    a.files.write("/home/user/secret.txt", "team a only")
    name = f"a-private-{uuid.uuid4().hex[:8]}"
    snapshot = a.create_snapshot(name=name)
    try:
        for ref in (snapshot.snapshot_id, name):
            created = as_b.post("/sandboxes", json={"templateID": ref, "timeout": 60})
            unknown = as_b.post(
                "/sandboxes", json={"templateID": f"unknown-{uuid.uuid4().hex[:8]}", "timeout": 60}
            )
            assert created.status_code == unknown.status_code == 404, created.text
            if created.status_code == 201:  # never: but do not leave a sandbox behind
                as_b.delete(f"/sandboxes/{created.json()['sandboxID']}")
        for ref in (snapshot.snapshot_id, name):  # nor as the base of a template build of B's
            started = _start_build(as_b, ref)
            unknown = _start_build(as_b, f"unknown-{uuid.uuid4().hex[:8]}")
            assert started.status_code == unknown.status_code == 404, started.text
        assert as_b.get("/snapshots").json() == []
        assert as_b.get("/snapshots", params={"sandboxID": a.sandbox_id}).json() == []
        _same_as_unknown(lambda i: as_b.delete(f"/templates/{i}"), snapshot.snapshot_id)
        # Still A's, and still usable by A.
        again = make_sandbox(template=snapshot.snapshot_id)
        assert again.files.read("/home/user/secret.txt") == "team a only"
    finally:
        Sandbox.delete_snapshot(snapshot.snapshot_id, **sdk_opts(corral_server))


def _start_build(client: httpx.Client, base: str) -> httpx.Response:
    """Request a build of a new template of B's and start it from `base`."""
    requested = client.post("/v3/templates", json={"name": f"b-steal-{uuid.uuid4().hex[:8]}"})
    assert requested.status_code == 202, requested.text
    ids = requested.json()
    return client.post(
        f"/v2/templates/{ids['templateID']}/builds/{ids['buildID']}", json={"fromTemplate": base, "steps": []}
    )


def _build_for_a(corral_server: ServerProcess, name: str) -> dict[str, str]:
    """Team A builds template `name` (one RUN step on base, tagged v1) and waits until it is ready."""
    with corral_server.api() as as_a:
        ids = as_a.post("/v3/templates", json={"name": name, "tags": ["v1"]}).json()
        started = as_a.post(
            f"/v2/templates/{ids['templateID']}/builds/{ids['buildID']}",
            json={"fromTemplate": "base", "steps": [{"type": "RUN", "args": [f"echo {name} > /tmp/a.txt"]}]},
        )
        assert started.status_code == 202, started.text
        deadline = time.monotonic() + 180
        status = "building"
        while status == "building" and time.monotonic() < deadline:
            time.sleep(0.2)
            answer = as_a.get(f"/templates/{ids['templateID']}/builds/{ids['buildID']}/status").json()
            status = answer["status"]
        assert status == "ready", answer
    return ids


def test_team_b_learns_nothing_of_team_a_template_and_snapshot_names(
    corral_server: ServerProcess, make_sandbox: SandboxFactory, as_b: httpx.Client, team_b_key: str
) -> None:
    """Lookups by name, id or tag (alias, tags, tag changes, delete, uploads, builds) answer for A's
    templates and snapshots exactly what they answer for names nobody has; the public `base` stays
    visible to B, and A's templates are unchanged."""
    built_name = f"a-built-{uuid.uuid4().hex[:8]}"
    built = _build_for_a(corral_server, built_name)
    snapshot_name = f"a-snap-{uuid.uuid4().hex[:8]}"
    snapshot = make_sandbox().create_snapshot(name=snapshot_name)
    try:
        calls = {
            "alias": lambda r: as_b.get(f"/templates/aliases/{r}"),
            "list tags": lambda r: as_b.get(f"/templates/{r}/tags"),
            "list tags of a tag": lambda r: as_b.get(f"/templates/{r}:v1/tags"),
            "assign tags": lambda r: as_b.post("/templates/tags", json={"target": r, "tags": ["stolen"]}),
            "assign from a tag": lambda r: as_b.post(
                "/templates/tags", json={"target": f"{r}:v1", "tags": ["x"]}
            ),
            "remove tags": lambda r: as_b.request(
                "DELETE", "/templates/tags", json={"name": r, "tags": ["v1"]}
            ),
            "upload link": lambda r: as_b.get(f"/templates/{r}/files/{'f' * 64}"),
            "delete": lambda r: as_b.delete(f"/templates/{r}"),
        }
        victims = (built_name, built["templateID"], snapshot_name, snapshot.snapshot_id)
        for victim in victims:
            for what, call in calls.items():
                try:
                    _same_as_unknown(call, victim, unknown_id=f"nobody-{uuid.uuid4().hex[:8]}")
                    _same_as_unknown(call, victim)  # an unknown id, too
                except AssertionError as exc:
                    raise AssertionError(f"{what} of {victim}: {exc}") from None

        # A's build, by its ids: status and start answer as for a build nobody has.
        unknown_build = str(uuid.uuid4())
        for path, send in (
            ("/templates/{t}/builds/{b}/status", as_b.get),
            (
                "/v2/templates/{t}/builds/{b}",
                lambda url: as_b.post(url, json={"fromTemplate": "base", "steps": []}),
            ),
        ):
            for template_ref in (built["templateID"], built_name):
                victim = send(path.format(t=template_ref, b=built["buildID"]))
                unknown = send(path.format(t="nobody", b=unknown_build))
                assert victim.status_code == unknown.status_code == 404, (path, victim.text)
                normalised = victim.text.replace(built["buildID"], "<b>").replace(template_ref, "<t>")
                assert normalised == unknown.text.replace(unknown_build, "<b>").replace("nobody", "<t>")

        # Names are one namespace, so B cannot claim A's names; the answer is the same for a
        # built template and a snapshot, and names neither's id.
        claims = [as_b.post("/v3/templates", json={"name": n}) for n in (built_name, snapshot_name)]
        assert [c.status_code for c in claims] == [409, 409], [c.text for c in claims]
        assert claims[0].text.replace(built_name, "<n>") == claims[1].text.replace(snapshot_name, "<n>")
        assert built["templateID"] not in claims[0].text and snapshot.snapshot_id not in claims[1].text

        # The official SDK with B's key: A's names do not exist (E2B would say they do, with a 403).
        b_opts = {**sdk_opts(corral_server), "api_key": team_b_key}
        for victim in victims:
            assert Template.exists(victim, **b_opts) is False
            with pytest.raises(TemplateException):
                Template.get_tags(victim, **b_opts)
        # The controls: the public base is B's to see, and A sees its own (tags untouched).
        assert Template.exists("base", **b_opts) is True
        assert as_b.get("/templates/aliases/base").json() == {"templateID": "base", "public": True}
        assert [t["tag"] for t in as_b.get("/templates/base/tags").json()] == ["default"]
        with corral_server.api() as as_a:
            for victim in victims:
                alias = as_a.get(f"/templates/aliases/{victim}")
                assert alias.status_code == 200 and alias.json()["public"] is False, alias.text
            assert [t["tag"] for t in as_a.get(f"/templates/{built_name}/tags").json()] == ["v1"]
            assert [t["tag"] for t in as_a.get(f"/templates/{snapshot_name}/tags").json()] == ["default"]
        assert Template.exists(snapshot_name, **sdk_opts(corral_server)) is True
    finally:
        Sandbox.delete_snapshot(snapshot.snapshot_id, **sdk_opts(corral_server))
        with corral_server.api() as as_a:
            assert as_a.delete(f"/templates/{built['templateID']}").status_code == 204


def _envd(corral_server: ServerProcess, sandbox_id: str, token: str, api_key: str) -> httpx.Response:
    """Start `touch /tmp/pwned` through envd's process service (a Connect streaming call)."""
    body = json.dumps({"process": {"cmd": "/bin/touch", "args": ["/tmp/pwned"]}}).encode()
    return httpx.post(
        f"{corral_server.url}/process.Process/Start",
        headers={
            "E2b-Sandbox-Id": sandbox_id,
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": token,
            "X-API-Key": api_key,
            "Content-Type": "application/connect+json",
            "Connect-Protocol-Version": "1",
        },
        content=struct.pack(">BI", 0, len(body)) + body,
        timeout=30,
    )


def test_team_b_token_and_key_do_not_open_team_a_envd(
    corral_server: ServerProcess, make_sandbox: SandboxFactory, team_b_key: str
) -> None:
    a = make_sandbox()
    b = make_sandbox(api_key=team_b_key)  # B's own sandbox, whose token B holds
    b_token = b._envd_access_token
    assert b_token
    for token in (b_token, ""):
        answer = _envd(corral_server, a.sandbox_id, token, team_b_key)
        assert answer.status_code == 401, answer.text
        files = httpx.get(
            f"{corral_server.url}/files",
            params={"path": "/etc/hostname"},
            headers={"E2b-Sandbox-Id": a.sandbox_id, "E2b-Sandbox-Port": "49983", "X-Access-Token": token,
                     "X-API-Key": team_b_key},
            timeout=30,
        )  # fmt: skip
        assert files.status_code == 401 and a.sandbox_id not in files.text
    assert run(a, "test -e /tmp/pwned && echo pwned || echo clean").stdout == "clean\n"
    # The control: B's token does open B's own envd.
    assert _envd(corral_server, b.sandbox_id, b_token, team_b_key).status_code == 200


def test_team_b_sandbox_cannot_reach_team_a_sandbox(make_sandbox: SandboxFactory, team_b_key: str) -> None:
    a = make_sandbox()
    b = make_sandbox(api_key=team_b_key)
    a.commands.run("python3 -m http.server 8000 --bind 0.0.0.0", background=True, timeout=0)
    run(a, "for i in $(seq 300); do (echo > /dev/tcp/127.0.0.1/8000) 2>/dev/null && break; sleep 0.1; done")
    ip_a = run(a, "hostname -I").stdout.split()[0]
    assert _reachable(a, [(ip_a, 8000)]) == [[ip_a, 8000]]  # the control: it listens
    assert _reachable(b, [(ip_a, 8000), (ip_a, 49983), (ip_a, 22)]) == []
