"""corral.node.spawn: helper programs run with posix_spawn, output collected, never left as zombies."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from corral.core.errors import Internal
from corral.node.spawn import run


async def test_output_and_status() -> None:
    done = await run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (done.returncode, done.stdout, done.stderr) == (3, b"out\n", b"err\n")
    with pytest.raises(Internal, match="err"):
        done.check("the thing")
    assert (await run(["true"])).check("true").returncode == 0


async def test_large_output_on_both_streams_does_not_block() -> None:
    done = await run(["sh", "-c", "head -c 300000 /dev/zero >&2; head -c 300000 /dev/zero"])
    assert len(done.stdout) == len(done.stderr) == 300000


async def test_stdin_is_empty_and_signals_are_negative() -> None:
    assert (await run(["cat"])).stdout == b""
    assert (await run(["sh", "-c", "kill -9 $$"])).returncode == -9


async def test_cancelled_run_leaves_no_child() -> None:
    task = asyncio.create_task(run(["sh", "-c", "echo $$; sleep 30"]))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "sleep" not in _child_commands()


def _child_commands() -> list[str]:
    """Names of this process's children (zombies included), from /proc."""
    names = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        if int(fields[1].split()[1]) == os.getpid():
            names.append(fields[0].split("(", 1)[1])
    return names


async def test_unknown_program() -> None:
    with pytest.raises(Internal, match="not found"):
        await run(["no-such-program-here"])
