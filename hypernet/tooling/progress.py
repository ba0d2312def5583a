"""A one-line progress bar on stderr for the CLI (ComfyUI nodes use comfy.utils.ProgressBar)."""

from __future__ import annotations

import sys
import time


class ProgressLine:
    def __init__(self, label: str, stream=None, min_interval: float = 0.1):
        self.label, self.stream, self.min_interval = label, stream or sys.stderr, min_interval
        self._last = 0.0
        self._shown = False
        self._start = time.monotonic()

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self.min_interval:
            return
        self._last = now
        if not self.stream.isatty() and done < total:
            return  # logs and pipes get the final line only
        elapsed = now - self._start
        eta = elapsed / done * (total - done) if done else 0.0
        width = 30
        filled = int(width * done / total) if total else width
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                          f"{elapsed:.1f}s" + (f" eta {eta:.1f}s" if done < total else "") + "   ")
        self.stream.flush()
        self._shown = True

    def __enter__(self) -> "ProgressLine":
        return self

    def __exit__(self, *exc) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
