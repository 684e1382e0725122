"""Progress over long runs: one bar with an ETA (rank 0 only) and a status record saved as work finishes.

Hours-long atlas runs need two things: a person watching sees one bar, not one per rank, with an ETA computed
from the work done in this session (resumed work does not inflate the rate), and a program watching (or the
next resume) sees run.json say how far the run got. The record goes through a writer callable: run.json is
written by its owner, `scsuperweight.results.RunLog` (pass ``writer=log.progress``).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Progress:
    """Count finished units (chunks, conditions) of `total`, `initial` of which were already done (a resume).

    Parameters
    ----------
    total, initial
        Units in all, and units finished before this session (they count as done but not towards the rate).
    desc, unit
        Bar label and unit name.
    enabled
        Show the bar (``progress=`` flags); the writer is called either way.
    is_main
        Only rank 0 shows a bar and writes (`scsuperweight.dist.DistContext.is_main`).
    writer
        Called with a dict (``stage``, ``done``, ``total``, ``rate_per_s``, ``eta_s``, ``elapsed_s``, ``updated``,
        plus the keywords of the last `update`) at most every `every_s` seconds and at `close`.
    """

    def __init__(self, total: int, *, initial: int = 0, desc: str = "", unit: str = "chunk", enabled: bool = True,
                 is_main: bool = True, writer: Callable[[dict], None] | None = None, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.done, self.initial = int(total), int(initial), int(initial)
        self.desc, self.is_main, self.writer, self.every_s, self._clock = desc, is_main, writer, every_s, clock
        self._start = clock()
        self._last_write = -float("inf")
        self._info: dict = {}
        self._bar = None
        if enabled and is_main:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit=unit, dynamic_ncols=True)

    def record(self) -> dict:
        """The status as written: counts, this session's rate and the ETA of the rest (None before any unit)."""
        elapsed = self._clock() - self._start
        new = self.done - self.initial
        rate = new / elapsed if new and elapsed > 0 else None
        eta = (self.total - self.done) / rate if rate else None
        return {"stage": self.desc, "done": self.done, "total": self.total, "rate_per_s": rate, "eta_s": eta,
                "elapsed_s": elapsed, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **self._info}

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        self._info = info
        if self._bar is not None:
            self._bar.update(n)
        if self.writer is not None and self.is_main and self._clock() - self._last_write >= self.every_s:
            self._write()

    def _write(self) -> None:
        self._last_write = self._clock()
        self.writer(self.record())

    def close(self) -> None:
        if self.writer is not None and self.is_main:
            self._write()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
