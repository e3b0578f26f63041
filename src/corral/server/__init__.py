"""The control plane: E2B-compatible REST API (`api`), state store (`store`), list queries (`query`),
the sandbox service, the proxy and the composition root that wires them into one ASGI app."""

__all__: list[str] = []
