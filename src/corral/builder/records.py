"""Build records on disk, so a build's status and log outlive the server process.

    <home>/builds/<build id>.json   the record (status, reason, template, team, times), replaced atomically
    <home>/builds/<build id>.log    its log: one JSON entry per line, appended as the build runs

The template service (`corral.builder.service`) owns the record's shape; this module only stores
dicts and log entries. `load()` reads every record back at start. A record that was still waiting
or building is one the server stopped in the middle of: the service finishes it as `error`. A torn
last log line (the process died mid-write) is skipped. Build ids become file names, so only UUIDs
are accepted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import uuid
from pathlib import Path
from typing import IO, Any

from corral.builder.logs import LogEntry

__all__ = ["BuildLogFile", "BuildRecordStore", "StoredBuild"]

log = logging.getLogger(__name__)

StoredBuild = tuple[dict[str, Any], list[LogEntry]]


def _checked(build_id: str) -> str:
    if str(uuid.UUID(build_id)) != build_id:
        raise ValueError(f"not a canonical build id: {build_id!r}")
    return build_id


class BuildLogFile:
    """Appends entries to one build's log file; opened on the first entry, closed by `close`."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: IO[str] | None = None
        self._lock = threading.Lock()  # build logs are also written from threads

    def __call__(self, entry: LogEntry) -> None:
        line = json.dumps(entry.to_json(), separators=(",", ":"), ensure_ascii=False) + "\n"
        with self._lock:
            try:
                if self._file is None:
                    self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                    self._file = open(self._path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
                self._file.write(line)
            except OSError as exc:  # a full disk must not fail the build; the status is in memory
                log.warning("cannot write build log %s: %s", self._path, exc)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None


class BuildRecordStore:
    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def log_file(self, build_id: str) -> BuildLogFile:
        return BuildLogFile(self._dir / f"{_checked(build_id)}.log")

    def save(self, record: dict[str, Any]) -> None:
        """Write a record (its `buildID` names the file) atomically."""
        target = self._dir / f"{_checked(record['buildID'])}.json"
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, sort_keys=True)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, build_id: str) -> None:
        for suffix in (".json", ".log"):
            (self._dir / f"{_checked(build_id)}{suffix}").unlink(missing_ok=True)

    def load(self) -> list[StoredBuild]:
        """Every stored record with its log; unreadable records are skipped (and logged)."""
        if not self._dir.is_dir():
            return []
        for leftover in self._dir.glob(".tmp-*"):
            leftover.unlink(missing_ok=True)
        builds = []
        for path in sorted(self._dir.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                if not isinstance(record, dict) or _checked(str(record.get("buildID"))) != path.stem:
                    raise ValueError("the record does not name its own file")
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable build record %s: %s", path, exc)
                continue
            builds.append((record, self._read_log(path.with_suffix(".log"))))
        return builds

    @staticmethod
    def _read_log(path: Path) -> list[LogEntry]:
        entries: list[LogEntry] = []
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return entries
        for line in text.splitlines():
            try:
                entries.append(LogEntry.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                continue  # a line the process died writing
        return entries
