"""COPY sources on the client: which files a `copy()` takes, their digest, and the archive to upload.

    files = select_files("folder/*", context_dir, ignore)      # relative paths, parents first
    digest = files_hash("folder/*", "/app/", context_dir, ignore)
    with pack_files("folder/*", context_dir, ignore) as archive: ...   # a tar.gz in a temp file

Sources are matched like E2B's SDK (`**` spans directories, `*` also matches dot files, a matched
directory brings everything below it) and the digest is computed the same way — `COPY src dest`,
then per path its relative name, `st_mode`, `st_size` and content (a symlink: its target) — so
for the same files both SDKs send the same `filesHash` and share the server's build cache.

Ignore patterns (`Template(file_ignore_patterns=...)` and the context's `.dockerignore`) follow
Docker's rules rather than E2B's: a pattern that matches a directory also drops everything
below it, `!pattern` takes a path back, and the last matching pattern wins.

Symlinks are archived as links unless `resolve_symlinks` (then files and directories they point
to are read in their place; a directory reached twice is not walked again). This module reads
the local disk only; it never talks to the network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import posixpath
import re
import stat
import tarfile
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, ParamSpec, TypeVar

__all__ = [
    "CHUNK_SIZE",
    "AsyncFileWork",
    "FileWork",
    "IgnoreRules",
    "aiter_file_chunks",
    "check_copy_source",
    "files_hash",
    "glob_regex",
    "iter_file_chunks",
    "pack_files",
    "read_dockerignore",
    "select_files",
]

CHUNK_SIZE = 1 << 20
_MAGIC = re.compile(r"[*?\[]")

P = ParamSpec("P")
T = TypeVar("T")


def check_copy_source(src: str) -> str:
    """The source as a clean relative path; `ValueError` when absolute or outside the context."""
    if not src:
        raise ValueError("a COPY source must not be empty")
    if src.startswith("/") or os.path.isabs(src):
        raise ValueError(
            f"invalid source path {src!r}: absolute paths are not allowed; "
            "use a path relative to the template's file context directory"
        )
    normalized = posixpath.normpath(src)
    if normalized == ".." or normalized.startswith("../"):
        raise ValueError(
            f"invalid source path {src!r}: it escapes the file context directory; "
            "the path must stay inside it"
        )
    return normalized


# -- patterns ---------------------------------------------------------------------------------------


def _segment_regex(segment: str) -> str:
    """One path segment of a glob: `*` and `?` stay inside the segment, `[...]` is a class."""
    out: list[str] = []
    i = 0
    while i < len(segment):
        char = segment[i]
        if char == "\\" and i + 1 < len(segment):
            out.append(re.escape(segment[i + 1]))
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = segment.find("]", i + 2 if segment[i + 1 : i + 2] in ("!", "^", "]") else i + 1)
            if end == -1:
                out.append(re.escape(char))
            else:
                body = segment[i + 1 : end]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over `/`-separated relative paths: `**` (a whole segment) spans any number of
    directories, `*`/`?` never cross a `/`, and dot files are not special."""
    segments = [s for s in pattern.split("/") if s not in ("", ".")]
    parts: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            if not last:
                parts.append("(?:[^/]*/)*")
            elif parts:  # `dir/**`: the directory itself and everything below it
                parts[-1] = parts[-1].removesuffix("/") + "(?:/.*)?"
            else:
                parts.append(".*")
            continue
        parts.append(_segment_regex(segment) + ("" if last else "/"))
    return re.compile("".join(parts) if parts else r"\.")


@dataclasses.dataclass(frozen=True, slots=True)
class _IgnorePattern:
    regex: re.Pattern[str]
    exclusion: bool  # `!pattern`: takes matching paths back


class IgnoreRules:
    """`.dockerignore` semantics over relative paths (moby's patternmatcher)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self._patterns: list[_IgnorePattern] = []
        for raw in patterns:
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            exclusion = text.startswith("!")
            if exclusion:
                text = text[1:].strip()
            text = posixpath.normpath(text).lstrip("/")
            if text in ("", "."):
                continue
            self._patterns.append(_IgnorePattern(glob_regex(text), exclusion))

    def __bool__(self) -> bool:
        return bool(self._patterns)

    @property
    def has_exclusions(self) -> bool:
        """Whether some `!pattern` may take back a path below an ignored directory."""
        return any(p.exclusion for p in self._patterns)

    def ignored(self, path: str) -> bool:
        """Whether `path` (relative, `/`-separated) is left out; the last matching pattern wins."""
        if path == ".":
            return False
        parents = _parents(path)
        matched = False
        for pattern in self._patterns:
            if pattern.regex.fullmatch(path) or any(pattern.regex.fullmatch(p) for p in parents):
                matched = not pattern.exclusion
        return matched


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def read_dockerignore(context_dir: Path) -> list[str]:
    """The patterns of `<context>/.dockerignore` (none when there is no such file)."""
    try:
        text = (context_dir / ".dockerignore").read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


# -- selecting files --------------------------------------------------------------------------------


def _join(parent: str, name: str) -> str:
    return name if parent == "." else f"{parent}/{name}"


def _is_dir(path: Path, follow: bool) -> bool:
    try:
        mode = path.stat().st_mode if follow else path.lstat().st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode)


class _Walker:
    """Walks below the context directory; symlinked directories only when `follow`."""

    def __init__(self, context_dir: Path, ignore: IgnoreRules, follow: bool) -> None:
        self.root = context_dir
        self.ignore = ignore
        self.follow = follow
        self._seen: set[tuple[int, int]] = set()

    def children(self, rel: str) -> list[str]:
        path = self.root / rel
        try:
            info = path.stat()
        except OSError:
            return []
        if (info.st_dev, info.st_ino) in self._seen:
            return []  # a symlink loop, or a directory reached twice through links
        self._seen.add((info.st_dev, info.st_ino))
        try:
            names = sorted(os.listdir(path))
        except OSError:
            return []
        return [_join(rel, name) for name in names]

    def subtree(self, rel: str) -> Iterator[str]:
        """Everything below the directory `rel` that is not ignored."""
        for child in self.children(rel):
            ignored = self.ignore.ignored(child)
            if not ignored:
                yield child
            if _is_dir(self.root / child, self.follow) and (not ignored or self.ignore.has_exclusions):
                yield from self.subtree(child)


def select_files(
    src: str, context_dir: Path, ignore_patterns: Sequence[str] = (), *, resolve_symlinks: bool = False
) -> list[str]:
    """The relative paths a COPY of `src` takes (directories too), sorted so parents come first."""
    source = check_copy_source(src)
    ignore = IgnoreRules(ignore_patterns)
    walker = _Walker(context_dir, ignore, resolve_symlinks)
    matches: list[str] = []
    if not _MAGIC.search(source.replace("\\\\", "")):
        if os.path.lexists(context_dir / source):
            matches.append(source)
    else:
        regex = glob_regex(source)
        literal = []
        for segment in source.split("/"):
            if _MAGIC.search(segment):
                break
            literal.append(segment)
        start = "/".join(literal) or "."
        pending = [start] if _is_dir(context_dir / start, resolve_symlinks) else []
        if start != "." and pending and regex.fullmatch(start):  # `dir/**` matches `dir` itself
            matches.append(start)
            pending = []
        while pending:
            for child in walker.children(pending.pop()):
                if regex.fullmatch(child):
                    matches.append(child)
                elif _is_dir(context_dir / child, resolve_symlinks):
                    pending.append(child)
    selected: set[str] = set()
    for match in matches:
        ignored = ignore.ignored(match)
        if not ignored:
            selected.add(match)
        if _is_dir(context_dir / match, resolve_symlinks) and (not ignored or ignore.has_exclusions):
            selected.update(walker.subtree(match))
    return sorted(selected, key=lambda rel: str(context_dir / rel) if rel != "." else str(context_dir))


# -- digest and archive -----------------------------------------------------------------------------


def files_hash(
    src: str,
    dest: str,
    context_dir: Path,
    ignore_patterns: Sequence[str] = (),
    *,
    resolve_symlinks: bool = False,
) -> str:
    """The `filesHash` of a COPY: sha256 over the instruction and every selected path's relative
    name, mode, size and content (E2B's algorithm). `ValueError` when nothing matches."""
    files = select_files(src, context_dir, ignore_patterns, resolve_symlinks=resolve_symlinks)
    if not files:
        raise ValueError(f"no files match {src!r} in {context_dir}")
    digest = hashlib.sha256(f"COPY {src} {dest}".encode())

    def add_stat(info: os.stat_result) -> None:
        digest.update(str(info.st_mode).encode())
        digest.update(str(info.st_size).encode())

    for rel in files:
        path = context_dir / rel
        digest.update(rel.encode())
        if path.is_symlink():
            follow = resolve_symlinks and (path.is_file() or path.is_dir())
            if not follow:
                add_stat(path.lstat())
                digest.update(os.readlink(path).encode())
                continue
        info = path.stat()
        add_stat(info)
        if stat.S_ISREG(info.st_mode):
            with path.open("rb") as file:
                while chunk := file.read(CHUNK_SIZE):
                    digest.update(chunk)
    return digest.hexdigest()


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # The server sets owners itself (`user=`); local user names and ids are nobody's business.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack_files(
    src: str,
    context_dir: Path,
    ignore_patterns: Sequence[str] = (),
    *,
    resolve_symlinks: bool = False,
    gzip: bool = True,
) -> IO[bytes]:
    """A tar (gzip by default) of the selected files, named relative to the context directory, in
    an anonymous temp file positioned at its start. The caller closes it."""
    files = select_files(src, context_dir, ignore_patterns, resolve_symlinks=resolve_symlinks)
    if not files:
        raise ValueError(f"no files match {src!r} in {context_dir}")
    archive = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller, who closes it
    try:
        with tarfile.open(fileobj=archive, mode="w:gz" if gzip else "w", dereference=resolve_symlinks) as tar:
            for rel in files:
                tar.add(context_dir / rel, arcname=rel, recursive=False, filter=_anonymous)
        archive.seek(0)
    except BaseException:
        archive.close()
        raise
    return archive


def iter_file_chunks(file: IO[bytes]) -> Iterator[bytes]:
    """The rest of `file` in chunks (an upload body for the sync client)."""
    while chunk := file.read(CHUNK_SIZE):
        yield chunk


async def aiter_file_chunks(file: IO[bytes]) -> AsyncIterator[bytes]:
    """The rest of `file` in chunks (an upload body for the async client; local reads are quick)."""
    while chunk := file.read(CHUNK_SIZE):
        yield chunk


class FileWork:
    """Blocking file work (hashing, packing) in the sync SDK: just call it."""

    @staticmethod
    def run(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`function(*args, **kwargs)`."""
        return function(*args, **kwargs)


class AsyncFileWork:
    """Blocking file work in the async SDK: in a worker thread, so the event loop keeps running."""

    @staticmethod
    async def run(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`function(*args, **kwargs)` in a thread."""
        return await asyncio.to_thread(function, *args, **kwargs)
