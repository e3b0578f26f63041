"""`make bench`: start our own `corral server` and the podman peer, measure, print, write bench.json.

    python -m benchmarks [--runs N] [--only create,exec,files,concurrent,memory,pause,template]
                         [--out bench.json]

The server gets its own home, bridge and subnet (env CORRAL_BENCH_HOME, CORRAL_BENCH_BRIDGE,
CORRAL_BENCH_SUBNET; defaults /var/lib/corral-bench, crlbench0, 10.218.0.0/16), seeded with the
host's `base` template like the test home (`corral.testing.seed_home`). The warm pool runs with
the server's defaults unless CORRAL_POOL_SIZE / CORRAL_POOL_TEMPLATES are set.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks import cases
from benchmarks.peer import Podman
from benchmarks.stats import BENCH_KEYS, check_shape, drift, percentile, summary, summary_p50
from corral.node.pool import PoolConfig
from corral.testing import ServerProcess, free_port, seed_home

__all__ = ["main"]

console = Console(width=max(130, Console().width))


def _log(message: str) -> None:
    console.print(f"[dim]{message}[/dim]")


def _bench_settings() -> tuple[Path, str, str]:
    home = Path(os.environ.get("CORRAL_BENCH_HOME", "/var/lib/corral-bench"))
    bridge = os.environ.get("CORRAL_BENCH_BRIDGE", "crlbench0")
    subnet = os.environ.get("CORRAL_BENCH_SUBNET", "10.218.0.0/16")
    return home, bridge, subnet


def _base_layers(home: Path) -> tuple[list[Path], str]:
    from corral.core.settings import load_settings
    from corral.node.storage.templates import TemplateStore

    settings = load_settings({"home": home}, env={})
    manifest = TemplateStore(settings).get("base")
    dirs = [settings.layers_dir / digest for digest in manifest.layers]
    return dirs, hashlib.sha256(":".join(manifest.layers).encode()).hexdigest()


def _pool_size() -> int:
    config = PoolConfig.from_env()
    return config.size if "base" in config.templates else 0


class CaseFailed(Exception):
    """A measurement could not be made; its keys stay null and the table says why."""


def _timed(name: str, work: Callable[[], Any]) -> Any:
    started = time.monotonic()
    _log(f"{name} ...")
    try:
        result = work()
    except Exception as exc:
        console.print(f"[red]{name} failed: {exc!r}[/red]")
        raise CaseFailed(f"failed: {exc}"[:120]) from exc
    _log(f"{name}: {time.monotonic() - started:.1f} s")
    return result


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}{unit}"
    return f"{value}{unit}"


def _verdict(ok: bool | None) -> str:
    return {True: "[green]ok[/green]", False: "[red]MISSED[/red]", None: "[yellow]n/a[/yellow]"}[ok]


def _table(result: dict[str, Any], notes: dict[str, str]) -> Table:
    table = Table(title="Corral benchmarks (2 cores) — bench.json", show_lines=False)
    for column in ("metric", "value", "target", "", "notes"):
        table.add_column(column)
    cek, run = result["create_exec_kill_ms"], result["podman_run_ms"]
    ratio = run["p50"] / cek["p50"] if cek and run else None
    exe, pexe = result["exec_ms"], result["podman_exec_ms"]
    conc = result["concurrent_create_50"]
    rows: list[tuple[str, str, str, bool | None, str]] = [
        ("create→exec→kill p50 / p99", f"{_fmt(cek and cek['p50'])} / {_fmt(cek and cek['p99'])} ms",
         "p50 ≤ 50 ms", cek["p50"] <= 50 if cek else None, notes.get("create", "")),
        ("podman run --rm p50 / p99", f"{_fmt(run and run['p50'])} / {_fmt(run and run['p99'])} ms",
         "", None, notes.get("podman_run", "")),
        ("  speed-up vs podman run", _fmt(ratio, "×"), "≥ 6×", ratio >= 6 if ratio else None, ""),
        ("exec p50 / p99", f"{_fmt(exe and exe['p50'])} / {_fmt(exe and exe['p99'])} ms", "p50 ≤ 8 ms",
         exe["p50"] <= 8 if exe else None, notes.get("exec", "")),
        ("podman exec p50", f"{_fmt(pexe and pexe['p50'])} ms", "", None, ""),
        ("file write 100 MB", _fmt(result["file_write_MBps"], " MB/s"), "≥ 300 MB/s",
         result["file_write_MBps"] >= 300 if result["file_write_MBps"] is not None else None, notes.get("files", "")),
        ("file read 100 MB", _fmt(result["file_read_MBps"], " MB/s"), "≥ 300 MB/s",
         result["file_read_MBps"] >= 300 if result["file_read_MBps"] is not None else None, ""),
        ("50 concurrent creates", f"{_fmt(conc and conc['wall_s'])} s, {_fmt(conc and conc['errors'])} errors",
         "≤ 3 s, 0 errors", conc["wall_s"] <= 3 and conc["errors"] == 0 if conc else None, notes.get("concurrent", "")),
        ("idle host memory / sandbox", _fmt(result["idle_host_mem_mb_per_sandbox"], " MB"), "≤ 5 MB",
         result["idle_host_mem_mb_per_sandbox"] <= 5 if result["idle_host_mem_mb_per_sandbox"] is not None else None,
         notes.get("memory", "")),
        ("pause p50", _fmt(result["pause_ms"] and result["pause_ms"]["p50"], " ms"), "≤ 20 ms",
         result["pause_ms"]["p50"] <= 20 if result["pause_ms"] else None, notes.get("pause", "")),
        ("resume p50", _fmt(result["resume_ms"] and result["resume_ms"]["p50"], " ms"), "≤ 20 ms",
         result["resume_ms"]["p50"] <= 20 if result["resume_ms"] else None, ""),
        ("template cached rebuild", _fmt(result["template_cached_rebuild_s"], " s"), "", None, notes.get("template", "")),
    ]  # fmt: skip
    for metric, value, target, ok, note in rows:
        table.add_row(metric, value, target, _verdict(ok) if target else "", note)
    return table


def _note_drift(values: list[float]) -> str:
    d = drift(values)
    return "" if math.isnan(d) else f"p50 halves differ {d * 100:.0f}%"


Result = dict[str, Any]
Notes = dict[str, str]


def _create(bench: cases.Bench, result: Result, notes: Notes) -> None:
    ours, podman_runs = cases.create_exec_kill(bench)
    result["create_exec_kill_ms"], result["podman_run_ms"] = summary(ours), summary(podman_runs)
    notes["create"], notes["podman_run"] = _note_drift(ours), _note_drift(podman_runs)


def _exec(bench: cases.Bench, result: Result, notes: Notes) -> None:
    ours, podman_execs = cases.exec_latency(bench)
    result["exec_ms"], result["podman_exec_ms"] = summary(ours), summary_p50(podman_execs)
    notes["exec"] = f"{_note_drift(ours)}; min {min(ours):.1f} ms"


def _files(bench: cases.Bench, result: Result, notes: Notes) -> None:
    result["file_write_MBps"], result["file_read_MBps"] = cases.file_throughput(bench)


def _concurrent(bench: cases.Bench, result: Result, notes: Notes) -> None:
    result["concurrent_create_50"] = cases.concurrent_create(bench)


def _memory(bench: cases.Bench, result: Result, notes: Notes) -> None:
    result["idle_host_mem_mb_per_sandbox"], parts = cases.idle_memory(bench)
    notes["memory"] = (
        f"larger of: MemAvailable {parts['top_down_mb']:.2f} (machine drift up to "
        f"{parts['baseline_drift_mb']:.0f} MB) and kernel {parts['kernel_mb']:.2f} + cgroups "
        f"{parts['cgroups_mb']:.2f} + server {parts['server_rss_mb']:.2f} = {parts['bottom_up_mb']:.2f}"
    )


def _pause(bench: cases.Bench, result: Result, notes: Notes) -> None:
    pauses, resumes = cases.pause_resume(bench)
    if pauses is None or resumes is None:
        notes["pause"] = "the server answers 501: it cannot pause"
        return
    result["pause_ms"] = {"p50": round(percentile(pauses, 50), 2)}
    result["resume_ms"] = {"p50": round(percentile(resumes, 50), 2)}
    notes["pause"] = f"n={len(pauses)}; pause p99 {percentile(pauses, 99):.1f}, resume p99 {percentile(resumes, 99):.1f} ms"


def _template(bench: cases.Bench, result: Result, notes: Notes) -> None:
    result["template_cached_rebuild_s"] = cases.template_rebuild(bench)


# name -> (what the log says, the measurement); run in this order
CASE_RUNNERS: dict[str, tuple[str, Callable[[cases.Bench, Result, Notes], None]]] = {
    "create": ("create→exec→kill vs podman run", _create),
    "exec": ("exec vs podman exec", _exec),
    "files": ("files 100 MB", _files),
    "concurrent": ("50 concurrent creates", _concurrent),
    "memory": ("100 idle sandboxes", _memory),
    "pause": ("pause / resume", _pause),
    "template": ("template cached rebuild", _template),
}


def run(only: set[str], runs: int, out: Path) -> dict[str, Any]:
    home, bridge, subnet = _bench_settings()
    _timed("seeding the bench home", lambda: seed_home(home))
    layer_dirs, digest = _base_layers(home)
    peer = _timed("preparing podman (image import on first use)", lambda: Podman.prepare(layer_dirs, digest, home / "podman"))
    server = ServerProcess(free_port(), home=home, bridge=bridge, subnet=subnet, log_level="warning")
    result: Result = dict.fromkeys(BENCH_KEYS)
    notes: Notes = {}
    load_before = os.getloadavg()
    server.start()
    try:
        server.kill_all_sandboxes()  # left by an interrupted earlier run: the bench counts sandboxes
        bench = cases.Bench(server=server, peer=peer, runs=runs, pool_size=_pool_size(), log=_log)
        for name, (title, measure) in CASE_RUNNERS.items():
            if name in only:
                try:
                    _timed(title, lambda: measure(bench, result, notes))  # noqa: B023 - called at once
                except CaseFailed as exc:
                    notes[name] = str(exc)
    finally:
        with contextlib.suppress(Exception):
            server.kill_all_sandboxes()
        server.stop()
    check_shape(result)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(_table(result, notes))
    load_after = os.getloadavg()
    console.print(
        f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
        f"warm pool {_pool_size()} per template; wrote {out}"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "50")))
    parser.add_argument("--only", default=",".join(CASE_RUNNERS), help=f"comma-separated subset of {','.join(CASE_RUNNERS)}")
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    args = parser.parse_args(argv)
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = only - set(CASE_RUNNERS)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        print("make bench: must run as root (sandboxes run with crun as root)", file=sys.stderr)
        return 1
    run(only, args.runs, args.out)
    return 0
