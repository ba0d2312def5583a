"""On-disk answer cache, so an interrupted batch resumes without asking again.

Format: JSON Lines, one `{"key": …, "answer": …, "model": …}` per answered question, keyed by
sha256 over (model, temperature, max_tokens, prompt, image hashes). The file is append-only:
each entry is written with a single O_APPEND `os.write`, so concurrent writers (threads or two
processes sharing a cache) never interleave inside a line, and a crash can at worst leave one
truncated last line — which `load` skips. This is why the cache does not use the project's
usual write-temp-then-rename: rewriting the whole file per answer would be O(n²) and would
race between processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Sequence

from ..errors import JudgeInputError
from .images import PreparedImage

log = logging.getLogger(__name__)


def cache_key(model: str, temperature: float, max_tokens: int, prompt: str,
              images: Sequence[PreparedImage]) -> str:
    identity = [model, float(temperature), int(max_tokens), prompt, [i.sha256 for i in images]]
    return hashlib.sha256(json.dumps(identity).encode("utf-8")).hexdigest()


class AnswerCache:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._answers: dict[str, str] = {}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JudgeInputError(f"judge cache {self.path}: cannot create its folder ({exc.strerror})") from exc
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        skipped = 0
        try:
            handle = open(self.path, "rb")
        except OSError as exc:
            raise JudgeInputError(f"judge cache {self.path}: cannot be read ({exc.strerror})") from None
        with handle:
            for line in handle:
                entry = _entry(line)
                if entry is None:
                    skipped += 1  # a line cut short by a crash, or not ours: asked again
                else:
                    self._answers[entry[0]] = entry[1]
        if skipped:
            log.warning("judge cache %s: skipped %d unreadable line(s)", self.path, skipped)
        log.info("judge cache %s: %d answer(s) on file", self.path, len(self._answers))

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> str | None:
        return self._answers.get(key)

    def put(self, key: str, answer: str, model: str) -> None:
        line = json.dumps({"key": key, "answer": answer, "model": model}, ensure_ascii=False) + "\n"
        data = line.encode("utf-8", "replace")  # a lone surrogate must not stop the run
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    written = os.write(fd, data)
                finally:
                    os.close(fd)
            except OSError as exc:  # full disk, read-only folder, path is a folder, …
                raise JudgeInputError(
                    f"judge cache {self.path}: cannot append an answer ({exc.strerror or exc}); "
                    "free space or choose another cache file (--cache), or run with --no-cache"
                ) from None
            if written != len(data):  # practically impossible for one short line
                raise JudgeInputError(f"judge cache {self.path}: short write ({written} of {len(data)} bytes)")
            self._answers[key] = answer


def _entry(line: bytes) -> tuple[str, str] | None:
    """(key, answer) from one cache line, or None for anything else. ValueError covers bad
    JSON and bad UTF-8 (and integers past Python's digit limit), RecursionError deep nesting."""
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(entry, dict):
        return None
    key, answer = entry.get("key"), entry.get("answer")
    if isinstance(key, str) and isinstance(answer, str):
        return key, answer
    return None


def default_cache_path() -> Path:
    """$XDG_CACHE_HOME/lorarar/judge/answers.jsonl (~/.cache/… when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorarar" / "judge" / "answers.jsonl"
