"""A one-line progress bar on stderr, shared by sweeps and real runs.

No dependency: a carriage return redraws the line. Completed/total, elapsed
time and, once something has finished, an estimate of the time left from the
rate so far (work done before the bar started, e.g. rows of a resumed sweep,
does not count towards that rate).
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """``[#####.....] 12/40 points  0:07 elapsed, 0:16 left`` on one line of ``file``."""

    def __init__(self, total: int, *, unit: str = "", done: int = 0, file=None, width: int = 30):
        self.total = total
        self.unit = unit
        self.done = done
        self._start_done = done
        self._file = file
        self._width = width
        self._started = time.monotonic()
        self._shown = 0  # length of the line drawn last, to blank what a shorter one leaves

    def update(self, done: int | None = None) -> None:
        """Redraw with ``done`` finished (or the last count: the elapsed time still moves)."""
        if done is not None:
            self.done = done
        elapsed = time.monotonic() - self._started
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        fill = int(frac * self._width)
        line = f"\r[{'#' * fill}{'.' * (self._width - fill)}] {self.done}/{self.total}"
        if self.unit:
            line += f" {self.unit}"
        line += f"  {_clock(elapsed)} elapsed"
        ran = self.done - self._start_done
        if 0 < ran and self.done < self.total:
            line += f", {_clock(elapsed / ran * (self.total - self.done))} left"
        pad = max(0, self._shown - len(line))
        self._shown = len(line)
        file = sys.stderr if self._file is None else self._file  # looked up now: may be redirected
        file.write(line + " " * pad)
        file.flush()

    def close(self) -> None:
        file = sys.stderr if self._file is None else self._file
        file.write("\n")
        file.flush()
