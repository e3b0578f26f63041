"""The base template's login shell: every command runs as `bash -l -c` (E2B's semantics), so it must
start no program of its own (each fork and exec costs 1-2 ms here), and still set up what a
Debian login shell sets up: PATH by user, ~/.profile, /etc/profile.d, the prompt, `mesg n` on a
terminal for root. Driven through the official e2b SDK, as agents drive it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import gvisor

pytestmark = pytest.mark.integration

ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
# The last pid the sandbox's pid namespace handed out, read with builtins only: it is the shell's
# own pid unless the login files started a process (a command substitution, `id`, `mesg`).
LAST_PID = 'read -r last < /proc/sys/kernel/ns_last_pid; echo "$$ $last"'


@pytest.fixture(scope="module")
def sandbox(e2b_env) -> Iterator[object]:
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=120)
    try:
        yield sbx
    finally:
        sbx.kill()


@pytest.mark.parametrize("user", ["user", "root"])
@gvisor.NO_NS_LAST_PID
def test_login_shell_starts_no_program(sandbox, user: str) -> None:
    shell_pid, last_pid = sandbox.commands.run(LAST_PID, user=user).stdout.split()
    assert last_pid == shell_pid, (
        f"the login shell of {user} started {int(last_pid) - int(shell_pid)} process(es)"
    )


@gvisor.NO_NS_LAST_PID
def test_the_probe_sees_a_forked_process(sandbox) -> None:
    """The probe above can fail: a command substitution in the login files would show."""
    out = sandbox.commands.run('x=$(echo y); read -r last < /proc/sys/kernel/ns_last_pid; echo "$$ $last"')
    shell_pid, last_pid = out.stdout.split()
    assert int(last_pid) > int(shell_pid)


@pytest.mark.parametrize(("user", "path"), [("user", USER_PATH), ("root", ROOT_PATH)])
def test_path_by_user_for_bash_and_sh(sandbox, user: str, path: str) -> None:
    assert sandbox.commands.run('printf %s "$PATH"', user=user).stdout == path
    # sh has no $EUID: /etc/profile still asks `id -u` there
    assert sandbox.commands.run("sh -l -c 'printf %s \"$PATH\"'", user=user).stdout == path


def test_profile_and_profile_d_are_read(sandbox) -> None:
    sandbox.commands.run("mkdir -p ~/.local/bin")
    assert sandbox.commands.run('printf %s "$PATH"').stdout == f"/home/user/.local/bin:{USER_PATH}"
    sandbox.commands.run(
        "echo 'export CORRAL_PROFILE_D=read' > /etc/profile.d/zz-corral-test.sh", user="root"
    )
    for user in ("user", "root"):
        assert sandbox.commands.run('printf %s "$CORRAL_PROFILE_D"', user=user).stdout == "read"


def test_interactive_login_shell_gets_the_prompt(sandbox) -> None:
    out = sandbox.commands.run("bash -l -i -c 'printf %s \"$PS1\"' 2>/dev/null", user="root")
    assert out.stdout == r"${debian_chroot:+($debian_chroot)}\u@\h:\w\$ "


def test_root_on_a_terminal_still_runs_mesg_n(sandbox) -> None:
    from e2b import CommandExitException, PtySize

    screen: list[bytes] = []
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80), user="root")
    sandbox.pty.send_stdin(terminal.pid, b"mesg; exit\n")
    with pytest.raises(CommandExitException):  # `mesg` with messages off exits 1, the shell with it
        terminal.wait(on_pty=screen.append)
    assert b"is n" in b"".join(screen)
