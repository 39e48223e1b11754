"""Progress is an interface: null, human (rich bars on stderr), JSON lines. The CLI picks one.

Library code only calls :class:`Progress` methods; it never prints.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO


class Progress(Protocol):
    """Receives progress of long work: one task at a time, measured in bytes or items."""

    def begin(self, label: str, total: int | None) -> None:
        """A task starts; ``total`` is its size if known."""

    def advance(self, amount: int) -> None:
        """``amount`` more units are done."""

    def end(self) -> None:
        """The task is over (success or failure)."""


class NullProgress:
    """Reports nothing."""

    def begin(self, label: str, total: int | None) -> None:
        """Ignore."""

    def advance(self, amount: int) -> None:
        """Ignore."""

    def end(self) -> None:
        """Ignore."""


class _Throttled:
    """Shared bookkeeping: counts, rate, and at most one report per ``interval`` seconds."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self.label = ""
        self.total: int | None = None
        self.done = 0
        self.started = clock()
        self._last = 0.0

    def reset(self, label: str, total: int | None) -> None:
        with self._lock:
            self.label, self.total, self.done = label, total, 0
            self.started = self._clock()
            self._last = 0.0

    def add(self, amount: int) -> bool:
        """Count ``amount``; True when a report is due."""
        with self._lock:
            self.done += amount
            now = self._clock()
            if now - self._last >= self._interval:
                self._last = now
                return True
            return False

    def snapshot(self) -> dict[str, Any]:
        elapsed = max(self._clock() - self.started, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if self.total and rate > 0 else None
        return {
            "task": self.label,
            "done": self.done,
            "total": self.total,
            "rate": round(rate, 1),
            "elapsed": round(elapsed, 3),
            "eta": round(eta, 1) if eta is not None else None,
        }


class JsonLinesProgress:
    """One JSON object per line on ``stream`` (stderr), at most every ``interval`` seconds."""

    def __init__(self, stream: TextIO | None = None, interval: float = 0.5) -> None:
        self._stream = stream or sys.stderr
        self._state = _Throttled(interval)

    def _write(self, event: str) -> None:
        record = {"event": event, **self._state.snapshot()}
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()

    def begin(self, label: str, total: int | None) -> None:
        """Report the start."""
        self._state.reset(label, total)
        self._write("begin")

    def advance(self, amount: int) -> None:
        """Report progress, throttled."""
        if self._state.add(amount):
            self._write("progress")

    def end(self) -> None:
        """Report the end."""
        self._write("end")


class CallbackProgress:
    """Hands a throttled snapshot dict to ``callback`` (the catalog, for the dashboard)."""

    def __init__(self, callback: Callable[[dict[str, Any]], None], interval: float = 1.0) -> None:
        self._callback = callback
        self._state = _Throttled(interval)

    def begin(self, label: str, total: int | None) -> None:
        """Report the start."""
        self._state.reset(label, total)
        self._callback({**self._state.snapshot(), "state": "running"})

    def advance(self, amount: int) -> None:
        """Report progress, throttled."""
        if self._state.add(amount):
            self._callback({**self._state.snapshot(), "state": "running"})

    def end(self) -> None:
        """Report the end."""
        self._callback({**self._state.snapshot(), "state": "done"})


class RichProgress:
    """A rich progress bar on stderr (bytes, MB/s, ETA); for terminals."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichBar

        self._bar = RichBar(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task: Any = None

    def begin(self, label: str, total: int | None) -> None:
        """Show a new bar."""
        self._bar.start()
        self._task = self._bar.add_task(label, total=total)

    def advance(self, amount: int) -> None:
        """Move the bar."""
        if self._task is not None:
            self._bar.advance(self._task, amount)

    def end(self) -> None:
        """Stop the bar."""
        self._bar.stop()
        self._task = None


class FanOutProgress:
    """Sends every call to several progress sinks."""

    def __init__(self, *sinks: Progress) -> None:
        self._sinks = sinks

    def begin(self, label: str, total: int | None) -> None:
        """Forward."""
        for sink in self._sinks:
            sink.begin(label, total)

    def advance(self, amount: int) -> None:
        """Forward."""
        for sink in self._sinks:
            sink.advance(amount)

    def end(self) -> None:
        """Forward."""
        for sink in self._sinks:
            sink.end()
