"""Pure parts of envd-on-localhost (`localhost.local_headers`) and of GET /metrics (`metrics_payload`)."""

from __future__ import annotations

from types import SimpleNamespace

from corral.node.cgroups.readings import CgroupUsage
from corral.node.envd.localhost import local_headers
from corral.node.envd.metrics import MIB, Sample, metrics_payload


def test_local_headers_force_the_sandbox() -> None:
    sent = [
        (b"Host", b"49983-other.example.com"),
        (b"x-access-token", b"tok"),
        (b"E2B-Sandbox-Id", b"other"),
        (b"e2b-sandbox-port", b"22"),
        (b"accept", b"*/*"),
    ]
    assert local_headers(sent, "mine") == [
        (b"host", b"localhost:49983"),
        (b"x-access-token", b"tok"),
        (b"accept", b"*/*"),
        (b"e2b-sandbox-id", b"mine"),
        (b"e2b-sandbox-port", b"49983"),
    ]


def _sample(at: float, cpu_ns: int, *, limit: int | None = 512 * MIB, cpus: int = 2) -> Sample:
    cgroup = CgroupUsage(
        cpu_ns=cpu_ns, mem_usage=300 * MIB, mem_limit=limit, mem_cache=50 * MIB, mem_inactive_file=40 * MIB
    )
    return Sample(at=at, usage=SimpleNamespace(cgroup=cgroup, cpu_count=cpus, disk_used=123, disk_total=456))


def test_metrics_payload() -> None:
    payload = metrics_payload(
        _sample(10.0, 0), _sample(11.0, 500_000_000), host_memory=8192 * MIB, now=1700000000.7
    )
    assert payload == {
        "ts": 1700000000,
        "cpu_count": 2,
        "cpu_used_pct": 25.0,  # half a CPU of two
        "mem_total": 512 * MIB,
        "mem_used": 260 * MIB,  # usage minus inactive file cache
        "mem_cache": 50 * MIB,
        "mem_total_mib": 512,
        "mem_used_mib": 260,
        "disk_used": 123,
        "disk_total": 456,
    }
    unlimited = metrics_payload(
        _sample(0, 0, limit=None), _sample(0, 0, limit=None), host_memory=1024 * MIB, now=0
    )
    assert unlimited["mem_total"] == 1024 * MIB and unlimited["cpu_used_pct"] == 0.0
