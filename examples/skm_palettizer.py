"""Sensitive k-means in pure PyTorch (no Lightning): weight each weight's clustering error by
its Fisher information from a few calibration batches, then palettize to 3 bits.

Run: python examples/skm_palettizer.py   (about 10 s on 2 cores)
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from lightning_palettize import PostTrainingPalettizer, SKMPalettizer
from lightning_palettize.data import DigitsDataModule, digits_accuracy, train_digits_cnn


def main() -> None:
    torch.set_num_threads(1)  # a model this small runs faster on one thread than on two
    data = DigitsDataModule(batch_size=64)
    test_set = data.dataset("test")
    model = train_digits_cnn(epochs=8)
    print(f"fp32 test accuracy: {digits_accuracy(model, test_set):.4f}")

    def loss_fn(model: nn.Module, batch) -> nn.Module:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    config = {
        "global_config": {"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 2},
        "calibration_nsamples": 128,  # samples, because per_sample=True below
    }
    skm = SKMPalettizer(model, config)
    calibration = list(itertools.islice(data.train_dataloader(), 4))
    small = skm.compress(calibration, loss_fn, per_sample=True)  # SqueezeLLM's per-sample Fisher
    plain = PostTrainingPalettizer(model, {"global_config": config["global_config"]}).compress()
    print(f"3-bit test accuracy: SKM {digits_accuracy(small, test_set):.4f}, "
          f"plain k-means {digits_accuracy(plain, test_set):.4f}")  # fmt: skip
    print(skm.report().to_table())


if __name__ == "__main__":
    main()
