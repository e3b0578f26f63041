"""`corral` — the command line: `corral server`, `corral setup`, `corral sandbox|template|team ...`.

This module only assembles the commands; each group lives in its own module.
"""

from __future__ import annotations

import typer

from corral.cli.sandbox import app as sandbox_app
from corral.cli.server import server, setup
from corral.cli.team import app as team_app
from corral.cli.template import app as template_app

__all__ = ["app"]

app = typer.Typer(help="Corral: self-hosted secure sandboxes for AI agents.", no_args_is_help=True)
app.command()(setup)
app.command()(server)
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(template_app, name="template")
app.add_typer(team_app, name="team")


if __name__ == "__main__":
    app()
