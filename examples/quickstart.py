"""A bit-width sweep in plain PyTorch: train an MLP on the digits shipped with the package,
palettize it with PostTrainingPalettizer at 4, 3 and 2 bits, and print accuracy and the report.
(The main job is the ``lightning-palettize`` command; see docs/CLI.md.)

Run: python examples/quickstart.py   (seconds)
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_palettize import PostTrainingPalettizer
from lightning_palettize.data import load_digits


def load_digits_tensors(seed: int = 0):
    x, y = load_digits()
    x = x.flatten(1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_tensors()
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(300):
        idx = torch.randint(0, len(xtr), (128,))
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"fp32 test accuracy: {accuracy(model, xte, yte):.4f}")
    for n_bits in (4, 3, 2):
        palettizer = PostTrainingPalettizer(model, {"global_config": {"n_bits": n_bits}})
        small = palettizer.compress(progress=False)
        print(f"\n{n_bits}-bit palettized test accuracy: {accuracy(small, xte, yte):.4f}")
        print(palettizer.report().to_table())


if __name__ == "__main__":
    main()
