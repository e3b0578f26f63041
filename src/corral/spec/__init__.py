"""Corral's protocol contracts: generated envd Connect code and the OpenAPI helpers.

The contracts themselves live at the repo root in ``spec/`` (``envd/process/process.proto``,
``envd/filesystem/filesystem.proto``, ``openapi.yml``); ``_generated/`` holds the code
``scripts/generate.sh`` makes from them. Import what you need from the submodules
(``corral.spec.envd``, ``corral.spec.openapi``); this package imports nothing heavy itself.
"""

from __future__ import annotations

__all__: list[str] = []
