"""NftBatcher: concurrent scripts share one transaction; a failing batch gives each its own outcome."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from corral.node.network._nft_batch import NftBatcher


@dataclasses.dataclass
class Result:
    returncode: int
    script: str


class FakeNft:
    """Applies scripts of lines; a line "bad" fails the whole transaction (as nft does)."""

    def __init__(self) -> None:
        self.transactions: list[str] = []
        self.applied: list[str] = []

    async def __call__(self, script: str) -> Result:
        await asyncio.sleep(0.01)  # a transaction takes a while: others queue meanwhile
        self.transactions.append(script)
        lines = script.splitlines()
        if "bad" in lines:
            return Result(1, script)
        self.applied.extend(lines)
        return Result(0, script)


async def test_concurrent_scripts_share_one_transaction_in_order() -> None:
    nft = FakeNft()
    batcher = NftBatcher(nft)
    first = asyncio.ensure_future(batcher.run("a\n"))
    await asyncio.sleep(0)  # "a" runs alone; the next ones arrive while it runs
    rest = await asyncio.gather(*(batcher.run(f"s{i}\n") for i in range(5)))
    assert (await first).returncode == 0 and all(r.returncode == 0 for r in rest)
    assert nft.transactions == ["a\n", "s0\ns1\ns2\ns3\ns4\n"]
    assert nft.applied == ["a", "s0", "s1", "s2", "s3", "s4"]
    await batcher.aclose()


async def test_a_failing_script_fails_alone() -> None:
    nft = FakeNft()
    batcher = NftBatcher(nft)
    blocker = asyncio.ensure_future(batcher.run("x"))
    await asyncio.sleep(0)
    good1, bad, good2 = await asyncio.gather(batcher.run("g1"), batcher.run("bad"), batcher.run("g2"))
    await blocker
    assert (good1.returncode, bad.returncode, good2.returncode) == (0, 1, 0)
    assert bad.script == "bad"  # its own error, not the batch's
    assert nft.applied == ["x", "g1", "g2"]  # the joined transaction applied nothing; then one by one


async def test_a_runner_error_reaches_every_caller_of_its_batch() -> None:
    async def broken(script: str) -> Result:
        raise TimeoutError("nft hung")

    batcher = NftBatcher(broken)
    with pytest.raises(TimeoutError):
        await batcher.run("a")
    results = await asyncio.gather(batcher.run("b"), batcher.run("c"), return_exceptions=True)
    assert all(isinstance(r, TimeoutError) for r in results)


async def test_a_cancelled_caller_does_not_withdraw_its_script() -> None:
    nft = FakeNft()
    batcher = NftBatcher(nft)
    task = asyncio.ensure_future(batcher.run("kept"))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await batcher.aclose()
    assert nft.applied == ["kept"]
