"""`sandbox.git` against repositories inside the sandbox: a bare repo over file://, and one
behind a small HTTP server (git http-backend) that wants Basic credentials."""

from __future__ import annotations

import time

import pytest

from corral import AsyncSandbox, CommandExitException, GitAuthException, GitUpstreamException
from corral.sdk._handlers import asleep

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-Pa55word"
TOKEN = "tok3n-0123456789abcdef"

# Serves /srv/git/* with git's own CGI; accepts alice:PASSWORD and x-access-token:TOKEN only.
GIT_HTTP_SERVER = """
import base64, http.server, os, subprocess, sys
ACCEPTED = {"Basic " + base64.b64encode(pair.encode()).decode() for pair in sys.argv[1:]}
class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args): pass
    def do_GET(self): self.git()
    def do_POST(self): self.git()
    def git(self):
        if self.headers.get("Authorization") not in ACCEPTED:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = dict(os.environ, GIT_PROJECT_ROOT="/tmp/srv", GIT_HTTP_EXPORT_ALL="1", PATH_INFO=path,
                   QUERY_STRING=query, REQUEST_METHOD=self.command, REMOTE_USER="git", REMOTE_ADDR="127.0.0.1",
                   CONTENT_TYPE=self.headers.get("Content-Type", ""), CONTENT_LENGTH=str(len(body)))
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        head, _, rest = out.partition(b"\\r\\n\\r\\n")
        status, headers = 200, []
        for line in head.decode().split("\\r\\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.split()[0])
            elif key:
                headers.append((key, value.strip()))
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        self.wfile.write(rest)
http.server.ThreadingHTTPServer(("127.0.0.1", 8000), Handler).serve_forever()
"""

AUTHOR = {"author_name": "Test Author", "author_email": "test@example.com"}


async def _seed_bare_repo(sandbox: AsyncSandbox, bare: str) -> None:
    """A bare repository with one commit on `main`."""
    await sandbox.git.init(bare, bare=True, initial_branch="main")
    await sandbox.git.init("/tmp/seed", initial_branch="main")
    await sandbox.files.write("/tmp/seed/README.md", "# seed\n")
    await sandbox.git.add("/tmp/seed")
    await sandbox.git.commit("/tmp/seed", "first", **AUTHOR)
    await sandbox.git.remote_add("/tmp/seed", "origin", bare)
    await sandbox.git.push("/tmp/seed", remote="origin", branch="main")


async def test_clone_status_branches_commit_push_pull(sandbox: AsyncSandbox) -> None:
    await _seed_bare_repo(sandbox, "/tmp/r.git")
    await sandbox.git.clone("file:///tmp/r.git", "/tmp/work")
    status = await sandbox.git.status("/tmp/work")
    assert (status.current_branch, status.upstream, status.ahead, status.behind, status.is_clean) == (
        "main",
        "origin/main",
        0,
        0,
        True,
    )
    await sandbox.files.write("/tmp/work/new.txt", "new")
    await sandbox.files.write("/tmp/work/README.md", "# changed\n")
    status = await sandbox.git.status("/tmp/work")
    assert sorted((item.name, item.status, item.staged) for item in status.file_status) == [
        ("README.md", "modified", False),
        ("new.txt", "untracked", False),
    ]
    await sandbox.git.add("/tmp/work")
    assert (await sandbox.git.status("/tmp/work")).has_staged
    await sandbox.git.commit("/tmp/work", "second", **AUTHOR)
    status = await sandbox.git.status("/tmp/work")
    assert (status.ahead, status.is_clean) == (1, True)
    await sandbox.git.push("/tmp/work")
    assert (await sandbox.git.status("/tmp/work")).ahead == 0

    await sandbox.git.checkout_branch("/tmp/work", "feature", create=True)
    branches = await sandbox.git.branches("/tmp/work")
    assert (branches.branches, branches.current_branch) == (["feature", "main"], "feature")
    with pytest.raises(GitUpstreamException):
        await sandbox.git.push("/tmp/work", set_upstream=False)
    await sandbox.git.push("/tmp/work", branch="feature")
    assert (await sandbox.git.status("/tmp/work")).upstream == "origin/feature"

    await sandbox.git.pull("/tmp/seed", remote="origin", branch="main")
    assert await sandbox.files.read("/tmp/seed/new.txt") == "new"
    with pytest.raises(CommandExitException):
        await sandbox.git.checkout_branch("/tmp/work", "no-such-branch")


async def test_http_credentials_work_and_never_leak(sandbox: AsyncSandbox) -> None:
    await _seed_bare_repo(sandbox, "/tmp/srv/repo.git")
    await sandbox.files.write("/tmp/git_http.py", GIT_HTTP_SERVER)
    await sandbox.commands.run(
        f"python3 /tmp/git_http.py alice:{PASSWORD} x-access-token:{TOKEN}", background=True, timeout=0
    )
    deadline = time.monotonic() + 15
    while (
        "401"
        not in (
            await sandbox.commands.run(
                "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8000/ || true"
            )
        ).stdout
    ):
        assert time.monotonic() < deadline, "the git HTTP server did not start"
        await asleep(0.2)
    url = "http://127.0.0.1:8000/repo.git"

    with pytest.raises(GitAuthException) as no_credentials:
        await sandbox.git.clone(url, "/tmp/anon")
    with pytest.raises(GitAuthException) as wrong:
        await sandbox.git.clone(url, "/tmp/wrong", username="alice", password="wrong-" + PASSWORD)
    for error in (no_credentials.value, wrong.value):
        assert PASSWORD not in str(error) and "credentials" in str(error)

    await sandbox.git.clone(url, "/tmp/by-password", username="alice", password=PASSWORD)
    await sandbox.git.clone(url, "/tmp/by-token", token=TOKEN)
    assert await sandbox.files.read("/tmp/by-token/README.md") == "# seed\n"
    # Nothing of the secrets stays behind in the clone's configuration.
    config = (await sandbox.commands.run("cat /tmp/by-password/.git/config /tmp/by-token/.git/config")).stdout
    assert PASSWORD not in config and TOKEN not in config

    await sandbox.files.write("/tmp/by-token/token.txt", "pushed with a token")
    await sandbox.git.add("/tmp/by-token")
    await sandbox.git.commit("/tmp/by-token", "via token", **AUTHOR)
    await sandbox.git.push("/tmp/by-token", token=TOKEN)
    await sandbox.git.pull("/tmp/by-password", username="alice", password=PASSWORD)
    assert await sandbox.files.read("/tmp/by-password/token.txt") == "pushed with a token"
