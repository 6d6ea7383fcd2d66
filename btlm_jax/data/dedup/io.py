"""Reading and writing SlimPajama-format shards (jsonl, optionally zstd-compressed)."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Iterator

import zstandard

from ..slimpajama import DataError, iter_lines
from .normalize import nfc

ZST_SUFFIXES = (".zst", ".zstd")
SUPPORTED_SUFFIXES = (".jsonl", ".json") + tuple(".jsonl" + s for s in ZST_SUFFIXES) + ZST_SUFFIXES

# Per-line status codes (stored as uint8).
OK, SHORT, CONTAMINATED, BAD_JSON, MISSING_TEXT, EMPTY_TEXT, NON_UTF8 = range(7)
BAD_REASONS = {
    BAD_JSON: "invalid_json",
    MISSING_TEXT: "missing_text",
    EMPTY_TEXT: "empty_text",
    NON_UTF8: "non_utf8",
}
UNKNOWN_SOURCE = "unknown"


class DedupInputError(ValueError):
    """A problem with the user's input files or arguments."""


def is_zst(path: str) -> bool:
    return path.endswith(ZST_SUFFIXES)


def expand_inputs(patterns: list[str]) -> list[str]:
    """Sorted, de-duplicated absolute paths of the files matched by the glob patterns."""
    files: set[str] = set()
    for pat in patterns:
        matched = [p for p in glob.glob(os.path.expanduser(pat), recursive=True) if os.path.isfile(p)]
        if not matched:
            raise DedupInputError(
                f"--input {pat!r} matches no files; check the path (quote the glob so the shell "
                "does not expand it)"
            )
        for p in matched:
            if not p.endswith(SUPPORTED_SUFFIXES):
                raise DedupInputError(
                    f"{p}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)} "
                    "(narrow the --input glob)"
                )
            files.add(os.path.abspath(p))
    return sorted(files)


def glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard (a file's own directory)."""
    pattern = os.path.abspath(os.path.expanduser(pattern))
    if not glob.has_magic(pattern):
        return os.path.dirname(pattern)
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or os.sep


def common_base(patterns: list[str], files: list[str]) -> str:
    """Output paths are the input paths relative to this directory: the fixed prefix of
    the --input globs, so ``in/**/*.jsonl.zst`` keeps the whole layout below ``in/``."""
    return os.path.commonpath([glob_root(p) for p in patterns] + [os.path.dirname(f) for f in files])


def iter_raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line bytes without the newline or a CR before it).

    The training reader's :func:`btlm_jax.data.slimpajama.iter_lines`, so both read a shard
    the same way: every zstd frame, and a corrupt stream or one that ends inside a frame (a
    truncated shard) is an error naming the file, whatever ``--on-bad-input`` says."""
    try:
        for lineno, raw in iter_lines(path):
            yield lineno, raw[:-1] if raw.endswith(b"\r") else raw
    except DataError as exc:
        raise DedupInputError(str(exc)) from None


@dataclass
class ParsedLine:
    status: int  # OK or one of BAD_REASONS
    record: dict | None
    text: str | None  # NFC text when status == OK
    source: str
    nbytes: int  # UTF-8 bytes of the NFC text, or of the raw line when bad
    detail: str = ""


def parse_line(raw: bytes) -> ParsedLine:
    """Decode and validate one jsonl line; never raises on bad data."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ParsedLine(NON_UTF8, None, None, UNKNOWN_SOURCE, len(raw), f"line is not UTF-8: {exc}")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return ParsedLine(BAD_JSON, None, None, UNKNOWN_SOURCE, len(raw), f"invalid JSON: {exc}")
    if not isinstance(record, dict):
        return ParsedLine(BAD_JSON, None, None, UNKNOWN_SOURCE, len(raw), "line is not a JSON object")
    source = UNKNOWN_SOURCE
    meta = record.get("meta")
    if isinstance(meta, dict) and isinstance(meta.get("redpajama_set_name"), str):
        source = meta["redpajama_set_name"]
    text = record.get("text")
    if not isinstance(text, str):
        what = "has no 'text' field" if text is None else f"'text' is a {type(text).__name__}, not a string"
        return ParsedLine(MISSING_TEXT, record, None, source, len(raw), what)
    if not text:
        return ParsedLine(EMPTY_TEXT, record, None, source, len(raw), "'text' is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return ParsedLine(NON_UTF8, record, None, source, len(raw), f"'text' is not valid Unicode: {exc}")
    text = nfc(text)
    return ParsedLine(OK, record, text, source, len(text.encode("utf-8")))


class ShardWriter:
    """Writes jsonl lines to ``path`` (zstd-compressed if the name ends in .zst), atomically."""

    def __init__(self, path: str, zstd_level: int = 3):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.tmp = path + ".tmp"
        self._fh = open(self.tmp, "wb")
        self._zst = None
        if is_zst(path):
            self._zst = zstandard.ZstdCompressor(level=zstd_level).stream_writer(self._fh, closefd=False)
        self._out = self._zst if self._zst is not None else self._fh

    def write_record(self, record: dict) -> None:
        self._out.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")

    def write_line(self, line: bytes) -> None:
        self._out.write(line + b"\n")

    def close(self) -> None:
        if self._zst is not None:
            self._zst.close()
        self._fh.close()
        os.replace(self.tmp, self.path)
