"""Post-training palettization in pure PyTorch (no Lightning): k-means every layer of a trained
model to a 4-bit LUT, measure it, save the compact file and load it back.

Run: python examples/ptp_palettizer.py   (about 10 s on 2 cores)
"""

from __future__ import annotations

import os
import tempfile

import torch

from lightning_palettize import PostTrainingPalettizer, load_palettized, save_palettized
from lightning_palettize.data import DigitsCNN, DigitsDataModule, digits_accuracy, train_digits_cnn


def main() -> None:
    torch.set_num_threads(1)  # a model this small runs faster on one thread than on two
    test_set = DigitsDataModule().dataset("test")
    model = train_digits_cnn(epochs=8)
    print(f"fp32 test accuracy: {digits_accuracy(model, test_set):.4f}")

    palettizer = PostTrainingPalettizer(
        model,
        {
            "global_config": {"n_bits": 4},  # every Conv2d / Linear: 16 centroids per tensor
            "module_name_configs": {"fc2": {"n_bits": 8}},  # the classifier keeps 256
        },
    )
    small = palettizer.compress()  # a palettized copy; the fp32 model is untouched
    print(f"4-bit test accuracy: {digits_accuracy(small, test_set):.4f}")
    print(palettizer.report().to_table())

    path = os.path.join(tempfile.mkdtemp(), "digits_ptp.safetensors")
    summary = save_palettized(small, path)  # packed 4-bit indices + LUTs, no pickle
    print(f"dense {summary['dense_bytes']:,} bytes -> compact file {summary['file_bytes']:,}")
    restored = load_palettized(path, DigitsCNN())
    assert all(torch.equal(a, b) for a, b in zip(restored.parameters(), small.parameters()))
    print(f"reloaded from {path}: bit-identical weights")


if __name__ == "__main__":
    main()
