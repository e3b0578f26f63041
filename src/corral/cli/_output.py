"""How the client commands print: tables, JSON, and errors as one line with a non-zero exit."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from corral.sdk import SandboxException, SandboxInfo, SandboxMetrics

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "errors_as_messages",
    "fail",
    "info_table",
    "metrics_table",
    "out",
    "parse_pairs",
    "print_json",
    "sandbox_table",
    "to_jsonable",
]

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def out() -> Console:
    """The stdout console (made per call, so test runners that swap `sys.stdout` see the output)."""
    # Not a terminal (a pipe, a test runner): wide enough that tables are never cut.
    return Console(file=sys.stdout, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print `corral: <message>` on stderr and exit with `code`."""
    Console(file=sys.stderr, soft_wrap=True, highlight=False).print(
        f"[red]corral:[/red] {message}", markup=True
    )
    raise typer.Exit(code)


@contextlib.contextmanager
def errors_as_messages() -> Iterator[None]:
    """SDK errors become one line on stderr and exit code 1; Ctrl-C exits 130. No tracebacks."""
    try:
        yield
    except SandboxException as exc:
        fail(_escape(str(exc)))
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def parse_pairs(values: Iterable[str] | None, what: str) -> dict[str, str]:
    """`["k=v", ...]` to a dict; a value without `=` is a usage error."""
    pairs: dict[str, str] = {}
    for value in values or ():
        key, sep, item = value.partition("=")
        if not sep or not key:
            fail(f"{what} must look like KEY=VALUE, got {value!r}", code=2)
        pairs[key] = item
    return pairs


def to_jsonable(value: Any) -> Any:
    """Dataclasses, enums and datetimes as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: to_jsonable(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {key: to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    return value


def print_json(value: Any) -> None:
    """Machine-readable output: indented JSON on stdout."""
    sys.stdout.write(json.dumps(to_jsonable(value), indent=2, sort_keys=True) + "\n")


def _when(value: dt.datetime) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _metadata(metadata: dict[str, str]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(metadata.items()))


def sandbox_table(sandboxes: Sequence[SandboxInfo]) -> Table:
    """One row per sandbox."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("SANDBOX ID", no_wrap=True)
    table.add_column("TEMPLATE", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    table.add_column("STARTED", no_wrap=True)
    table.add_column("ENDS", no_wrap=True)
    table.add_column("METADATA")
    for info in sandboxes:
        table.add_row(
            info.sandbox_id,
            info.name or info.template_id,
            info.state.value,
            _when(info.started_at),
            _when(info.end_at),
            _metadata(info.metadata),
        )
    return table


def info_table(info: SandboxInfo) -> Table:
    """One sandbox, one attribute per row."""
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    rows = [
        ("Sandbox ID", info.sandbox_id),
        (
            "Template",
            f"{info.name} ({info.template_id})"
            if info.name and info.name != info.template_id
            else info.template_id,
        ),
        ("State", info.state.value),
        ("Started", _when(info.started_at)),
        ("Ends", _when(info.end_at)),
        ("CPUs", str(info.cpu_count)),
        ("Memory", f"{info.memory_mb} MiB"),
        ("Disk", f"{info.disk_size_mb} MiB"),
        ("envd", info.envd_version),
        (
            "Internet",
            ""
            if info.allow_internet_access is None
            else ("allowed" if info.allow_internet_access else "blocked"),
        ),
        ("Metadata", _metadata(info.metadata)),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def metrics_table(metrics: Sequence[SandboxMetrics]) -> Table:
    """One row per sample."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("TIME", "CPUS", "CPU %", "MEMORY", "DISK"):
        table.add_column(column, no_wrap=True)
    mib = 1024 * 1024
    for sample in metrics:
        table.add_row(
            _when(sample.timestamp),
            str(sample.cpu_count),
            f"{sample.cpu_used_pct:.1f}",
            f"{sample.mem_used // mib} / {sample.mem_total // mib} MiB",
            f"{sample.disk_used // mib} / {sample.disk_total // mib} MiB",
        )
    return table
