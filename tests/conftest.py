"""Shared test settings."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # the Triton kernels (lightning_palettize/_dkm_triton.py) run in Triton's interpreter on
    # CPU tensors; it has to be on before Triton is first imported (lightning imports it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lightning_palettize import _progress


@pytest.fixture(autouse=True)
def _progress_without_delay(monkeypatch):
    """Progress bars show at once, so tests can check that long work reports progress."""
    monkeypatch.setattr(_progress, "DELAY_S", 0.0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module of small tensors: OpenMP on a shared 2-vCPU box only
    adds jitter (and minutes). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
