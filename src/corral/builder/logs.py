"""A build's log: timestamped entries the status endpoint pages through (`logsOffset`).

Entries are only appended, so an offset stays valid while the build runs; E2B's SDK advances its
offset by the number of entries it got and stops once a finished build returns none.
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
from typing import Any, Literal

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


class BuildLog:
    """Thread-safe append-only list of entries."""

    def __init__(self) -> None:
        self._entries: list[LogEntry] = []
        self._lock = threading.Lock()
        self._truncated = False

    def add(self, message: str, level: LogLevel = "info", step: str | None = None) -> None:
        if len(message) > MAX_LINE:
            message = message[:MAX_LINE] + " …"
        entry = LogEntry(datetime.datetime.now(datetime.UTC), message, level, step)
        with self._lock:
            if len(self._entries) < MAX_ENTRIES:
                self._entries.append(entry)
            elif not self._truncated:
                self._truncated = True
                self._entries.append(
                    LogEntry(entry.timestamp, f"(log cut after {MAX_ENTRIES} entries)", "warn", step)
                )

    def page(self, offset: int, limit: int = PAGE_SIZE) -> list[LogEntry]:
        with self._lock:
            return self._entries[max(0, offset) : max(0, offset) + limit]

    def tail(self, count: int) -> list[LogEntry]:
        with self._lock:
            return self._entries[-count:]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
