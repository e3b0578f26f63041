"""`corral` — the command line: `corral server`, `corral setup`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

__all__ = ["app"]

app = typer.Typer(help="Corral: self-hosted secure sandboxes for AI agents.", no_args_is_help=True)


def _settings(**overrides: object):  # noqa: ANN202 - server-only imports stay lazy for the SDK-only install
    from corral.core.settings import load_settings

    return load_settings(overrides)


@app.command()
def setup(
    home: Annotated[Optional[Path], typer.Option(help="State dir [env CORRAL_HOME]")] = None,
) -> None:
    """Prepare this host (cgroups, forwarding) and build the default `base` template once."""
    from corral.builder.base import ensure_base_template
    from corral.core.errors import CorralError
    from corral.node.host import prepare_host

    settings = _settings(home=home)
    try:
        for message in prepare_host(settings):
            typer.echo(f"corral setup: {message}")
        ensure_base_template(settings, log=lambda line: typer.echo(f"  {line}"))
    except CorralError as exc:
        typer.echo(f"corral setup: {exc.message}", err=True)
        raise typer.Exit(1) from None


@app.command()
def server(
    home: Annotated[Optional[Path], typer.Option(help="State dir [env CORRAL_HOME, default /var/lib/corral]")] = None,
    host: Annotated[Optional[str], typer.Option(help="Listen address [env CORRAL_HOST, default 127.0.0.1]")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port for API, envd and sandbox ports [env CORRAL_PORT, default 3000]")] = None,
    domain: Annotated[Optional[str], typer.Option(help="Domain for {port}-{id}.{domain} routing [env CORRAL_DOMAIN]")] = None,
    api_key: Annotated[Optional[str], typer.Option(help="API key accepted for the default team [env CORRAL_API_KEY]")] = None,
    bridge: Annotated[Optional[str], typer.Option(help="Sandbox bridge name [env CORRAL_BRIDGE, default corral0]")] = None,
    subnet: Annotated[Optional[str], typer.Option(help="Sandbox address pool [env CORRAL_SUBNET, default 10.201.0.0/16]")] = None,
    runtime: Annotated[Optional[str], typer.Option(help="OCI runtime [env CORRAL_RUNTIME, default crun]")] = None,
    log_level: Annotated[str, typer.Option(help="Log level")] = "warning",
) -> None:
    """Run the Corral server in the foreground. Ctrl-C stops it; sandboxes keep running."""
    import ipaddress

    import uvicorn

    from corral.core.ids import API_KEY_RE
    from corral.server.app import create_app

    if api_key is not None and not API_KEY_RE.match(api_key):
        typer.echo("corral server: --api-key must be 'e2b_' followed by 40 hex characters", err=True)
        raise typer.Exit(2)
    settings = _settings(
        home=home,
        host=host,
        port=port,
        domain=domain,
        api_key=api_key,
        bridge=bridge,
        subnet=ipaddress.IPv4Network(subnet) if subnet else None,
        runtime=runtime,
    )
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(key: str) -> None:
        url = f"http://{settings.host}:{settings.port}"
        print(f"Corral is ready on {url} (state in {settings.home}). Use it with the official e2b SDK:\n", flush=True)
        print(f"export E2B_API_URL={url} E2B_SANDBOX_URL={url} E2B_API_KEY={key}\n", flush=True)

    uvicorn.run(
        create_app(settings, on_ready=ready),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    sys.exit(0)


if __name__ == "__main__":
    app()
