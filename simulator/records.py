"""Compact records of a run: spans kept as columns.

A 16384-rank simulation records tens of millions of spans. As tuples of Python
objects each costs about 200 bytes and the heap that holds them slows every
later allocation; as typed columns (names interned once) each costs about 30.
"""

from __future__ import annotations

from array import array

import numpy as np
import pandas as pd

SPAN_COLUMNS = ["rank", "stream", "name", "start", "end", "iteration"]


class SpanLog:
    """Spans (rank, stream, name, start, end, iteration) appended one by one, kept as columns."""

    __slots__ = ("_rank", "_stream", "_name", "_start", "_end", "_iteration", "_codes", "_names")

    def __init__(self) -> None:
        self._rank = array("q")
        self._stream = array("q")
        self._name = array("q")
        self._start = array("d")
        self._end = array("d")
        self._iteration = array("q")
        self._codes: dict[str, int] = {}
        self._names: list[str] = []

    def _code(self, text: str) -> int:
        code = self._codes.get(text)
        if code is None:
            code = self._codes[text] = len(self._names)
            self._names.append(text)
        return code

    def append(self, rank: int, stream: str, name: str, start: float, end: float, iteration: int) -> None:
        self._rank.append(rank)
        self._stream.append(self._code(stream))
        self._name.append(self._code(name))
        self._start.append(start)
        self._end.append(end)
        self._iteration.append(iteration)

    def __len__(self) -> int:
        return len(self._start)

    def frame(self) -> pd.DataFrame:
        """The spans as a DataFrame with :data:`SPAN_COLUMNS`, in the order they were appended."""
        names = np.array(self._names, dtype=object)

        def ints(column: array) -> np.ndarray:
            return np.frombuffer(column, dtype=np.int64)

        return pd.DataFrame({
            "rank": ints(self._rank), "stream": names[ints(self._stream)], "name": names[ints(self._name)],
            "start": np.frombuffer(self._start, dtype=np.float64), "end": np.frombuffer(self._end, dtype=np.float64),
            "iteration": ints(self._iteration),
        }, columns=SPAN_COLUMNS)
