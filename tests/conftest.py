"""Shared test settings."""

import pytest

from lightning_palettize import _progress


@pytest.fixture(autouse=True)
def _progress_without_delay(monkeypatch):
    """Progress bars show at once, so tests can check that long work reports progress."""
    monkeypatch.setattr(_progress, "DELAY_S", 0.0)
