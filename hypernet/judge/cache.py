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
        with open(self.path, "rb") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                    self._answers[entry["key"]] = entry["answer"]
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                    skipped += 1  # a line cut short by a crash: that question is asked again
        if skipped:
            log.warning("judge cache %s: skipped %d unreadable line(s)", self.path, skipped)
        log.info("judge cache %s: %d answer(s) on file", self.path, len(self._answers))

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> str | None:
        return self._answers.get(key)

    def put(self, key: str, answer: str, model: str) -> None:
        line = json.dumps({"key": key, "answer": answer, "model": model}, ensure_ascii=False) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, data)
                if written != len(data):  # practically impossible for one short line
                    raise OSError(f"short write to {self.path}")
            finally:
                os.close(fd)
            self._answers[key] = answer


def default_cache_path() -> Path:
    """$XDG_CACHE_HOME/lorarar/judge/answers.jsonl (~/.cache/… when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorarar" / "judge" / "answers.jsonl"
