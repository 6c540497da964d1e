"""DKM (differentiable k-means) in a plain PyTorch training loop (no Lightning): prepare, train
with one extra call per optimizer step, finalize.

Run: python examples/dkm_palettizer.py   (about 10 s on 2 cores)
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_palettize import DKMPalettizer
from lightning_palettize.data import DigitsDataModule, digits_accuracy, train_digits_cnn


def main() -> None:
    torch.set_num_threads(1)  # a model this small runs faster on one thread than on two
    data = DigitsDataModule(batch_size=64)
    model = train_digits_cnn(epochs=8)  # DKM fine-tunes a trained model
    print(f"fp32 test accuracy: {digits_accuracy(model, data.dataset('test')):.4f}")

    # coremltools' DKM config: 2 bits for convolutions, 4 for Linear; layers with <= 2048
    # weights (conv1, fc2) stay fp32.
    palettizer = DKMPalettizer(
        model,
        {
            "module_type_configs": {
                "Conv2d": {"n_bits": 2, "weight_threshold": 2048},
                "Linear": {"n_bits": 4, "weight_threshold": 2048},
            }
        },
    )
    model = palettizer.prepare(inplace=True)  # forward now sees soft-clustered weights
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    for _ in range(2):
        for x, y in data.train_dataloader():
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            palettizer.step()  # counts steps: weights start at their milestone
    print(palettizer.report().to_table())
    model = palettizer.finalize(inplace=True)  # hard LUTs, plain nn.Module again
    print(f"DKM test accuracy: {digits_accuracy(model, data.dataset('test')):.4f}")
    print(f"distinct values in conv2: {torch.unique(model.conv2.weight).numel()}")


if __name__ == "__main__":
    main()
