"""`corral server` and `corral setup`: run the control plane and prepare this host.

Server code is imported inside the commands, so the SDK-only install (httpx, typer, rich) can
still load the CLI and use its client commands.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["server", "setup"]


def _settings(**overrides: object):
    from corral.core.settings import load_settings

    return load_settings(overrides)


def setup(
    home: Annotated[Path | None, typer.Option(help="State dir [env CORRAL_HOME]")] = None,
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


def _check_runtime(settings) -> None:
    """Refuse a runtime with known escapes (unless allowed); say which runtime and CVEs were checked."""
    from corral.core.errors import CorralError
    from corral.node.runtime.runtimes import check_runtime

    try:
        runtime, warnings = check_runtime(
            settings.runtime, allow_vulnerable=settings.allow_vulnerable_runtime
        )
    except CorralError as exc:
        typer.echo(f"corral server: {exc.message}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"corral server: sandboxes run on {runtime.label}")
    for warning in warnings:
        typer.echo(f"corral server: note: {warning}", err=True)


def server(
    home: Annotated[
        Path | None, typer.Option(help="State dir [env CORRAL_HOME, default /var/lib/corral]")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Listen address [env CORRAL_HOST, default 127.0.0.1]")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Port for API, envd and sandbox ports [env CORRAL_PORT, default 3000]"),
    ] = None,
    domain: Annotated[
        str | None, typer.Option(help="Domain for {port}-{id}.{domain} routing [env CORRAL_DOMAIN]")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="API key accepted for the default team [env CORRAL_API_KEY]")
    ] = None,
    bridge: Annotated[
        str | None, typer.Option(help="Sandbox bridge name [env CORRAL_BRIDGE, default corral0]")
    ] = None,
    subnet: Annotated[
        str | None, typer.Option(help="Sandbox address pool [env CORRAL_SUBNET, default 10.201.0.0/16]")
    ] = None,
    runtime: Annotated[
        str | None,
        typer.Option(help="OCI runtime: crun, runc or runsc [env CORRAL_RUNTIME, default crun]"),
    ] = None,
    allow_vulnerable_runtime: Annotated[
        bool | None,
        typer.Option(
            "--allow-vulnerable-runtime",
            help="Run sandboxes even on a runtime with known escapes [env CORRAL_ALLOW_VULNERABLE_RUNTIME]",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level")] = "warning",
    tls_cert: Annotated[
        Path | None, typer.Option(help="Serve HTTPS: certificate chain (PEM), e.g. for *.{domain}")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(help="Serve HTTPS: the certificate's private key (PEM)")
    ] = None,
) -> None:
    """Run the Corral server in the foreground. Ctrl-C stops it; sandboxes keep running."""
    import ipaddress

    import uvicorn

    from corral.core.ids import API_KEY_RE
    from corral.server.app import create_app

    if api_key is not None and not API_KEY_RE.match(api_key):
        typer.echo("corral server: --api-key must be 'e2b_' followed by 40 hex characters", err=True)
        raise typer.Exit(2)
    if (tls_cert is None) != (tls_key is None):
        typer.echo("corral server: --tls-cert and --tls-key go together", err=True)
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
        allow_vulnerable_runtime=allow_vulnerable_runtime,
    )
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _check_runtime(settings)

    def ready(key: str) -> None:
        url = f"{'https' if tls_cert else 'http'}://{settings.host}:{settings.port}"
        print(
            f"Corral is ready on {url} (state in {settings.home}). Use it with the official e2b SDK:\n",
            flush=True,
        )
        print(f"export E2B_API_URL={url} E2B_SANDBOX_URL={url} E2B_API_KEY={key}\n", flush=True)

    from corral.server.http_limits import http_protocol

    uvicorn.run(
        create_app(settings, on_ready=ready),
        host=settings.host,
        port=settings.port,
        http=http_protocol(),  # request heads must arrive in time and within a size (slowloris)
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=2,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
    )
    sys.exit(0)
