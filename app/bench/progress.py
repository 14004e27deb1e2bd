"""A dependency-free progress bar on stderr: redrawn in place on a terminal, a line per 10% otherwise."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class ProgressBar:
    def __init__(self, total: int, *, label: str = "", stream: TextIO | None = None, width: int = 30) -> None:
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.done = 0
        self.errors = 0
        self.tokens = 0
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._lock = threading.Lock()
        self._closed = False
        self.status = ""  # extra text at the end of the line, e.g. how many workers are busy

    def set_status(self, text: str) -> None:
        """Show `text` after the counters (redrawn at once on a terminal, with the next line otherwise)."""
        with self._lock:
            changed = text != self.status
            self.status = text
            if changed and self._tty:
                self._draw()

    def advance(self, tokens: int = 0, error: bool = False) -> None:
        with self._lock:
            self.done += 1
            self.tokens += tokens
            self.errors += int(error)
            self._draw(force=self.done >= self.total)

    def line(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = round(frac * self.width)
        elapsed = max(time.monotonic() - self._start, 1e-9)
        bar = "#" * filled + "." * (self.width - filled)
        prefix = f"{self.label} " if self.label else ""
        status = f"  {self.status}" if self.status else ""
        return (
            f"{prefix}[{bar}] {self.done}/{self.total} requests  "
            f"{self.tokens / elapsed:7.1f} tok/s  errors {self.errors}  {elapsed:5.1f} s{status}"
        )

    def _draw(self, force: bool = False) -> None:
        if self._closed:
            return
        now = time.monotonic()
        if self._tty:
            if force or now - self._last_draw >= 0.1:
                self.stream.write("\r" + self.line())
                self.stream.flush()
                self._last_draw = now
            return
        decile = int(10 * self.done / self.total) if self.total else 10
        if decile != self._last_decile:
            self._last_decile = decile
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._draw(force=True)
            if self._tty:
                self.stream.write("\n")
                self.stream.flush()
            self._closed = True
