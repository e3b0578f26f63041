"""`corral sandbox ...`: create, list, inspect, run commands in and end sandboxes.

Every command talks to the API through the SDK, configured like it: `--api-url`/`--api-key`,
else `CORRAL_API_URL`/`CORRAL_API_KEY`, else `E2B_*`, else http://127.0.0.1:3000.
"""

from __future__ import annotations

import shlex
import sys
from typing import Annotated, Any, cast

import httpx
import typer

from corral.cli._output import (
    errors_as_messages,
    fail,
    info_table,
    metrics_table,
    out,
    parse_pairs,
    print_json,
    sandbox_table,
)
from corral.sdk import (
    CommandExitException,
    ConnectionConfig,
    ConnectionOptions,
    NotSupportedException,
    Sandbox,
    SandboxInfo,
    SandboxQuery,
    SandboxState,
)

__all__ = ["app"]

app = typer.Typer(help="Create, inspect, use and end sandboxes.", no_args_is_help=True)


@app.callback()
def _connection(
    ctx: typer.Context,
    api_url: Annotated[
        str | None,
        typer.Option(help="API URL (env CORRAL_API_URL or E2B_API_URL; default http://127.0.0.1:3000)"),
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="API key (env CORRAL_API_KEY or E2B_API_KEY)")] = None,
) -> None:
    options: ConnectionOptions = {}
    if api_url:
        options["api_url"] = api_url
    if api_key:
        options["api_key"] = api_key
    ctx.obj = options


def _options(ctx: typer.Context) -> ConnectionOptions:
    """The group's `--api-url`/`--api-key` (click hands `obj` down to every subcommand)."""
    return cast(ConnectionOptions, dict(ctx.obj or {}))


def _attach(sandbox_id: str, options: ConnectionOptions) -> Sandbox:
    """A client for a running sandbox, without changing when it ends."""
    info = Sandbox.get_info(sandbox_id, **options)
    if info.state is SandboxState.PAUSED:
        fail(f"sandbox {sandbox_id} is paused; resume it first with `corral sandbox resume {sandbox_id}`")
    # connect() never shortens a running sandbox's life, and with 0 it does not extend it either.
    return Sandbox.connect(sandbox_id, timeout=0, **options)


@app.command()
def create(
    ctx: typer.Context,
    template: Annotated[str, typer.Argument(help="Template name or id")] = "base",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the new sandbox's id")] = False,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", "-m", help="KEY=VALUE, repeatable")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for every command, repeatable")
    ] = None,
    timeout: Annotated[int, typer.Option(help="Seconds until the sandbox ends", min=0)] = 300,
    no_internet: Annotated[bool, typer.Option("--no-internet", help="Block all outgoing traffic")] = False,
) -> None:
    """Start a new sandbox and print its id."""
    meta = parse_pairs(metadata, "--metadata")
    envs = parse_pairs(env, "--env")
    with errors_as_messages():
        sandbox = Sandbox.create(
            template,
            timeout=timeout,
            metadata=meta,
            envs=envs,
            allow_internet_access=not no_internet,
            **_options(ctx),
        )
        sandbox.close()
    if quiet:
        sys.stdout.write(sandbox.sandbox_id + "\n")
    else:
        out().print(
            f"Created sandbox [bold]{sandbox.sandbox_id}[/bold] from {template} (ends in {timeout} s)"
        )


def _all_sandboxes(options: ConnectionOptions, query: SandboxQuery | None = None) -> list[SandboxInfo]:
    return list(Sandbox.list(query=query, limit=100, **options))


@app.command("list")
def list_(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    state: Annotated[list[SandboxState] | None, typer.Option(help="Only this state, repeatable")] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", "-m", help="Only with KEY=VALUE, repeatable")
    ] = None,
) -> None:
    """List running and paused sandboxes, newest first."""
    query = SandboxQuery(metadata=parse_pairs(metadata, "--metadata") or None, state=state or None)
    with errors_as_messages():
        sandboxes = _all_sandboxes(_options(ctx), query)
    if as_json:
        print_json(sandboxes)
    elif not sandboxes:
        out().print("No sandboxes.")
    else:
        out().print(sandbox_table(sandboxes))


@app.command()
def info(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Show one sandbox."""
    with errors_as_messages():
        details = Sandbox.get_info(sandbox_id, **_options(ctx))
    if as_json:
        print_json(details)
    else:
        out().print(info_table(details))


@app.command()
def kill(
    ctx: typer.Context,
    sandbox_ids: Annotated[list[str] | None, typer.Argument(help="Sandbox ids", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Kill every running and paused sandbox")] = False,
) -> None:
    """Kill sandboxes (their processes stop and their files are gone)."""
    if bool(sandbox_ids) == all_:
        fail("name sandbox ids or pass --all (not both)", code=2)
    options = _options(ctx)
    missing = []
    with errors_as_messages():
        ids = sandbox_ids or [info.sandbox_id for info in _all_sandboxes(options)]
        for sandbox_id in ids:
            if Sandbox.kill(sandbox_id, **options):
                out().print(f"Killed {sandbox_id}")
            else:
                missing.append(sandbox_id)
    if all_ and not ids:
        out().print("No sandboxes to kill.")
    if missing:
        fail(f"no such sandbox: {', '.join(missing)}")


@app.command("exec")
def exec_(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id")],
    command: Annotated[
        list[str], typer.Argument(help="Command: one argument is run as shell code, several as argv")
    ],
    user: Annotated[str | None, typer.Option(help="Run as this user (default: the sandbox's)")] = None,
    cwd: Annotated[str | None, typer.Option(help="Working directory")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE, repeatable")] = None,
    timeout: Annotated[
        float, typer.Option(help="Kill the command after this many seconds (0 = never)", min=0)
    ] = 0,
) -> None:
    """Run a command in a sandbox, stream its output, and exit with its exit code.

    corral sandbox exec ID -- ls -la /tmp        (argv)
    corral sandbox exec ID -- 'echo $HOME | wc'  (shell code)
    """
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        fail("name a command to run: corral sandbox exec ID -- CMD...", code=2)
    line = command[0] if len(command) == 1 else shlex.join(command)
    envs = parse_pairs(env, "--env")

    def write(stream: Any) -> Any:
        def emit(text: str) -> None:
            stream.write(text)
            stream.flush()

        return emit

    with errors_as_messages():
        sandbox = _attach(sandbox_id, _options(ctx))
        try:
            sandbox.commands.run(
                line,
                envs=envs,
                user=user,
                cwd=cwd,
                timeout=timeout,
                on_stdout=write(sys.stdout),
                on_stderr=write(sys.stderr),
            )
        except CommandExitException as exc:
            raise typer.Exit(exc.exit_code if 0 < exc.exit_code < 256 else 137) from None
        finally:
            sandbox.close()


@app.command()
def shell(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id")],
    user: Annotated[str | None, typer.Option(help="Log in as this user (default: the sandbox's)")] = None,
    cwd: Annotated[str | None, typer.Option(help="Start in this directory")] = None,
) -> None:
    """Open an interactive shell in a sandbox (Ctrl-D or `exit` leaves)."""
    import asyncio

    from corral.cli._shell import run_shell

    with errors_as_messages():
        _attach(sandbox_id, _options(ctx)).close()  # fail fast, before the terminal goes raw
        code = asyncio.run(run_shell(sandbox_id, _options(ctx), user=user, cwd=cwd))
    raise typer.Exit(code)


@app.command()
def logs(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id")],
) -> None:
    """Print a sandbox's logs (when the server keeps them)."""
    options = _options(ctx)
    with errors_as_messages():
        Sandbox.get_info(sandbox_id, **options)  # a clear "not found" first
        config = ConnectionConfig.resolve(**options)
        headers = {"x-api-key": config.api_key} if config.api_key else {}
        try:
            response = httpx.get(
                f"{config.api_url}/sandboxes/{sandbox_id}/logs",
                headers=headers,
                timeout=config.request_timeout,
            )
        except httpx.HTTPError as exc:
            fail(f"cannot reach {config.api_url}: {exc}")
    if response.status_code in (404, 405, 501):
        fail(
            f"this server does not keep sandbox logs (GET /sandboxes/{sandbox_id}/logs answered {response.status_code})"
        )
    if response.status_code != 200:
        fail(f"logs of {sandbox_id}: HTTP {response.status_code}: {response.text[:300]}")
    body = response.json()
    for entry in body.get("logEntries") or body.get("logs") or []:
        sys.stdout.write(f"{entry.get('timestamp', '')} {entry.get('message', entry.get('line', ''))}\n")


@app.command()
def metrics(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Show a sandbox's CPU, memory and disk use."""
    options = _options(ctx)
    with errors_as_messages():
        Sandbox.get_info(sandbox_id, **options)
        try:
            samples = Sandbox.get_metrics(sandbox_id, **options)
        except NotSupportedException:
            fail("this server does not report sandbox metrics yet")
    if as_json:
        print_json(samples)
    elif not samples:
        out().print("No samples yet.")
    else:
        out().print(metrics_table(samples))


@app.command()
def pause(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id")],
) -> None:
    """Pause a sandbox (resume it with `corral sandbox resume`)."""
    with errors_as_messages():
        try:
            paused = Sandbox.pause(sandbox_id, **_options(ctx))
        except NotSupportedException:
            fail("this server cannot pause sandboxes yet")
    out().print(f"Paused {sandbox_id}" if paused else f"{sandbox_id} was already paused")


@app.command()
def resume(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id")],
    timeout: Annotated[int, typer.Option(help="Keep it running at least this many seconds", min=0)] = 300,
) -> None:
    """Resume a paused sandbox (a running one just gets at least `--timeout` seconds more)."""
    with errors_as_messages():
        try:
            Sandbox.connect(sandbox_id, timeout=timeout, **_options(ctx)).close()
        except NotSupportedException:
            fail("this server cannot resume paused sandboxes yet")
    out().print(f"{sandbox_id} is running")
