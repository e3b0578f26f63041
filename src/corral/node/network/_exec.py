"""Running `ip` and `nft`: one bounded subprocess per call, killed if the caller gives up."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
from collections.abc import Sequence
from typing import Any

from corral.core.errors import FailedPrecondition, Internal

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
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    except BaseException:  # timeout or cancellation: never leave the child behind
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        raise
    assert proc.returncode is not None
    return Completed(tuple(argv), proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def parse_json(text: str) -> list[dict[str, Any]]:
    """`ip -json` output; nothing at all when there is nothing to list."""
    text = text.strip()
    return json.loads(text) if text else []
