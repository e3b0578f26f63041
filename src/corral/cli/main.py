"""`corral` — the command line: `corral server`, `corral setup` and `corral sandbox ...`.

This module only assembles the commands; each group lives in its own module.
"""

from __future__ import annotations

import typer

from corral.cli.sandbox import app as sandbox_app
from corral.cli.server import server, setup
from corral.cli.template import app as template_app

__all__ = ["app"]

app = typer.Typer(help="Corral: self-hosted secure sandboxes for AI agents.", no_args_is_help=True)
app.command()(setup)
app.command()(server)
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(template_app, name="template")


if __name__ == "__main__":
    app()
