"""One `nft -f` transaction for the scripts that arrive together.

Why: every nftables transaction pays a commit that waits for an RCU grace period, and transactions
of the host's network namespace run one at a time; concurrent `nft` processes also refetch their
rule cache whenever another one commits. 48 sandbox attaches at once took 4.8 s as 48 processes
and 0.03 s as one script on these machines. So scripts submitted while a transaction runs are
queued and go together as the next one.

    batcher = NftBatcher(run)            # run(script) -> Completed, e.g. one `nft -f -` process
    done = await batcher.run(script)     # the outcome of `script`, as if it had run alone

Semantics stay those of one transaction per script: the joined script applies all or nothing, and
when it fails each script of the batch is run again on its own, in order, so every caller gets
its own outcome (and error text). The order of scripts is the order of `run` calls. A caller that
is cancelled does not withdraw its script (it may already be applied): callers undo on failure,
which is queued behind it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["NftBatcher"]

log = logging.getLogger(__name__)

MAX_BATCH = 256  # scripts per transaction: keeps one failure's retry (one process per script) bounded


class NftBatcher:
    """Coalesces concurrent scripts. `run_script(script)` applies one script and returns a result
    with a `returncode` attribute (0 = applied); it must not raise for a failing script."""

    def __init__(self, run_script: Callable[[str], Awaitable[Any]]) -> None:
        self._run_script = run_script
        self._queue: list[tuple[str, asyncio.Future[Any]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def run(self, script: str) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((script, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain(), name="nft-batch")
        return await asyncio.shield(future)

    async def _drain(self) -> None:
        batch: list[tuple[str, asyncio.Future[Any]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    await self._apply(batch)
                except Exception as exc:  # noqa: BLE001 - the runner failed (a timeout): its callers get it
                    _fail(batch, exc)
        except BaseException:  # cancelled: nothing more is applied
            _fail([*batch, *self._queue], RuntimeError("nft batch cancelled"))
            self._queue = []
            raise

    async def _apply(self, batch: list[tuple[str, asyncio.Future[Any]]]) -> None:
        if len(batch) == 1:
            script, future = batch[0]
            future.set_result(await self._run_script(script))
            return
        joined = "".join(script if script.endswith("\n") else script + "\n" for script, _ in batch)
        result = await self._run_script(joined)
        if result.returncode == 0:
            for _, future in batch:
                future.set_result(result)
            return
        log.debug("nft batch of %d failed; running its scripts one by one", len(batch))
        for script, future in batch:  # each gets its own outcome, as if it had run alone
            future.set_result(await self._run_script(script))

    async def aclose(self) -> None:
        """Wait for queued scripts to be applied."""
        if self._worker is not None:
            await asyncio.wait([self._worker])


def _fail(batch: list[tuple[str, asyncio.Future[Any]]], exc: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
