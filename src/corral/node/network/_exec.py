"""Running `ip` and `nft`: one bounded subprocess per call (posix_spawn), killed if the caller gives up."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from collections.abc import Sequence
from typing import Any

from corral.core.errors import FailedPrecondition, Internal
from corral.node import spawn

__all__ = ["Completed", "parse_json", "run", "tool"]


@dataclasses.dataclass(frozen=True, slots=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Completed:
        if self.returncode != 0:
            raise Internal(f"`{' '.join(self.argv)}` exited {self.returncode}: {self.stderr.strip()}")
        return self


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise FailedPrecondition(f"`{name}` is not installed (Debian: iproute2 / nftables)")
    return path


async def run(argv: Sequence[str], *, stdin: str | None = None, timeout: float = 10.0) -> Completed:
    # posix_spawn (corral.node.spawn), not asyncio's fork: a fork of the server blocks its event
    # loop for several ms per call, and create/kill make several of these calls.
    async with asyncio.timeout(timeout):  # on timeout or cancellation spawn.run kills the child
        done = await spawn.run(argv, stdin=stdin.encode() if stdin is not None else None)
    out, err = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    return Completed(tuple(argv), done.returncode, out, err)


def parse_json(text: str) -> list[dict[str, Any]]:
    """`ip -json` output; nothing at all when there is nothing to list."""
    text = text.strip()
    return json.loads(text) if text else []
