"""One progress display for long work (k-means over layers, calibration), silenceable."""

from __future__ import annotations

import sys
import time

# a bar appears at the first update after the work has run this long (fast calls stay quiet);
# tests set it to 0
DELAY_S = 0.5


class Progress:
    """tqdm if installed, else a stderr line every ~10%; prints nothing when disabled.

    Args:
        total: number of units of work.
        desc: label shown before the count.
        unit: name of one unit ("layer", "sample").
        enabled: ``False`` silences it completely.
    """

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True) -> None:
        self.total, self.desc, self.unit = max(total, 1), desc, unit
        self.enabled, self.done, self.tenth = enabled, 0, 0
        self.bar = None
        self._tqdm = None
        self._start = time.perf_counter()
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._tqdm = tqdm
        if DELAY_S <= 0:
            self._open()

    def _open(self) -> None:
        # created only once the work has run DELAY_S: fast calls never build (or print) a bar
        self.bar = self._tqdm(
            total=self.total, desc=self.desc, unit=self.unit, leave=False, initial=self.done
        )

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._tqdm is not None:
            if self.bar is None and time.perf_counter() - self._start >= DELAY_S:
                self._open()
            elif self.bar is not None:
                self.bar.update(n)
        elif self.enabled and (tenth := 10 * self.done // self.total) > self.tenth:
            self.tenth = tenth
            print(
                f"{self.desc}: {self.done}/{self.total} {self.unit}s ({10 * tenth}%)",
                file=sys.stderr,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
