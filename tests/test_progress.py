"""The progress display: silenceable, and quiet for work that finishes quickly."""

import time

from lightning_palettize import _progress
from lightning_palettize._progress import Progress


def test_bar_opens_only_once_the_work_has_run_the_delay(monkeypatch, capsys):
    monkeypatch.setattr(_progress, "DELAY_S", 0.05)
    with Progress(4, "work", "item") as bar:
        bar.update()
        assert bar.bar is None  # fast so far: nothing built, nothing printed
        time.sleep(0.06)
        bar.update()
        assert bar.bar is not None and bar.bar.n == 2  # opens with the units already done
        bar.update(2)
        assert bar.bar.n == 4
    assert "work" in capsys.readouterr().err


def test_disabled_progress_prints_nothing(monkeypatch, capsys):
    monkeypatch.setattr(_progress, "DELAY_S", 0.0)
    with Progress(3, "work", "item", enabled=False) as bar:
        bar.update(3)
        assert bar.bar is None
    assert capsys.readouterr().err == ""
