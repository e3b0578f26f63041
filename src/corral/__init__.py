"""Corral: self-hosted secure sandboxes for AI agents, wire-compatible with E2B."""

__all__ = ["__version__"]

__version__ = "0.1.0"
