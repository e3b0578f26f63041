"""A build's log: timestamped entries the status endpoint pages through (`logsOffset`).

Entries are only appended, so an offset stays valid while the build runs; E2B's SDK advances its
offset by the number of entries it got and stops once a finished build returns none. A `sink`
sees every entry as it is kept (`corral.builder.records` appends it to the build's log file), and
`BuildLog(entries)` is a log read back after a restart.
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, cast

__all__ = ["MAX_ENTRIES", "PAGE_SIZE", "BuildLog", "LogEntry", "LogLevel"]

LogLevel = Literal["debug", "info", "warn", "error"]
PAGE_SIZE = 100  # entries per status response, as E2B
MAX_ENTRIES = 50_000  # a chattier build keeps its first entries and a note that output was cut
MAX_LINE = 4096  # characters of one output line that are kept


@dataclasses.dataclass(frozen=True, slots=True)
class LogEntry:
    timestamp: datetime.datetime
    message: str
    level: LogLevel = "info"
    step: str | None = None  # "0" = base, "1".."N" = steps, "finalize"

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "timestamp": self.timestamp.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "message": self.message,
            "level": self.level,
        }
        if self.step is not None:
            body["step"] = self.step
        return body

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LogEntry:
        level = str(data.get("level", "info"))
        step = data.get("step")
        return cls(
            timestamp=datetime.datetime.fromisoformat(str(data["timestamp"])),
            message=str(data["message"]),
            level=cast(LogLevel, level if level in ("debug", "info", "warn", "error") else "info"),
            step=None if step is None else str(step),
        )


class BuildLog:
    """Thread-safe append-only list of entries."""

    def __init__(
        self, entries: Iterable[LogEntry] = (), sink: Callable[[LogEntry], None] | None = None
    ) -> None:
        self._entries: list[LogEntry] = list(entries)
        self._lock = threading.Lock()
        self._truncated = len(self._entries) > MAX_ENTRIES
        self.sink = sink

    def add(self, message: str, level: LogLevel = "info", step: str | None = None) -> None:
        if len(message) > MAX_LINE:
            message = message[:MAX_LINE] + " …"
        entry = LogEntry(datetime.datetime.now(datetime.UTC), message, level, step)
        with self._lock:
            if len(self._entries) < MAX_ENTRIES:
                kept: LogEntry | None = entry
            elif not self._truncated:
                self._truncated = True
                kept = LogEntry(entry.timestamp, f"(log cut after {MAX_ENTRIES} entries)", "warn", step)
            else:
                kept = None
            if kept is not None:
                self._entries.append(kept)
                if self.sink is not None:
                    self.sink(kept)  # under the lock: the file keeps the entries' order

    def page(self, offset: int, limit: int = PAGE_SIZE) -> list[LogEntry]:
        with self._lock:
            return self._entries[max(0, offset) : max(0, offset) + limit]

    def tail(self, count: int) -> list[LogEntry]:
        with self._lock:
            return self._entries[-count:]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
