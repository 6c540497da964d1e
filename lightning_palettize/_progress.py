"""One progress display for long work (k-means over layers, calibration), silenceable."""

from __future__ import annotations

import sys

# tqdm appears only once the work has run this long (fast calls stay quiet); tests set it to 0
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
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, delay=DELAY_S)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
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
