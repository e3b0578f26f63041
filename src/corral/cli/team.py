"""`corral team ...`: teams and their API keys, on the server's host (its state dir, not the API).

    corral team create NAME      a new team and its first API key (printed once: only a hash is kept)
    corral team key NAME         another API key for a team (its other keys keep working)
    corral team list             teams and how many keys each has

Every team sees only its own sandboxes, snapshots and templates; another team's sandbox answers
404 like an unknown id (docs/security.md). The commands write the server's database directly, so
they work while the server runs (a new key is accepted at once) and need its state dir (root).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from corral.cli._output import fail, out, print_json

__all__ = ["app"]

app = typer.Typer(help="Teams and their API keys (run on the server's host).", no_args_is_help=True)

_Home = Annotated[
    Path | None, typer.Option(help="State dir of the server [env CORRAL_HOME, default /var/lib/corral]")
]


def _store(home: Path | None):  # -> corral.server.store.Store (server code is imported lazily)
    from corral.core.settings import load_settings
    from corral.server.store import Store

    return Store.open(load_settings({"home": home}))


def _run(action):  # type: ignore[no-untyped-def]
    from corral.core.errors import CorralError

    try:
        return action()
    except CorralError as exc:
        fail(exc.message)


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="Team name: letters, digits, '_', '.', '-'")],
    home: _Home = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the team as JSON")] = False,
) -> None:
    """Create a team and print its first API key (shown only this once)."""
    store = _store(home)
    try:
        team_id, key = _run(lambda: store.create_team(name))
    finally:
        store.close()
    if as_json:
        print_json({"name": name, "teamID": team_id, "apiKey": key})
        return
    out().print(f"Created team [bold]{name}[/bold] ({team_id}). Its API key (shown only now):")
    print(key, flush=True)


@app.command()
def key(
    name: Annotated[str, typer.Argument(help="Team name")],
    home: _Home = None,
) -> None:
    """Print a new API key for a team (shown only this once; its other keys keep working)."""
    store = _store(home)
    try:
        new_key = _run(lambda: store.add_api_key(name))
    finally:
        store.close()
    print(new_key, flush=True)


@app.command("list")
def list_(
    home: _Home = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """List teams and how many API keys each has."""
    from rich.table import Table

    store = _store(home)
    try:
        teams = store.list_teams()
    finally:
        store.close()
    if as_json:
        print_json([{"name": n, "teamID": i, "keys": k} for n, i, k in teams])
        return
    table = Table("NAME", "TEAM ID", "KEYS")
    for name, team_id, keys in teams:
        table.add_row(name, team_id, str(keys))
    out().print(table)
