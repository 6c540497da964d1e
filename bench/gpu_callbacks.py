"""GPU check of the DKM callback: Trainer(accelerator="gpu", precision=16-mixed / bf16-mixed).

Run on a CUDA machine:  python bench/gpu_callbacks.py
Prints one line per precision and exits non-zero on a failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402

from lightning_palettize.callbacks import PalettizationCallback  # noqa: E402


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main() -> int:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(512, 64, generator=g), torch.randint(0, 10, (512,), generator=g)
    )
    failures = 0
    for precision in ("16-mixed", "bf16-mixed"):
        torch.manual_seed(0)
        module = Module()
        cb = PalettizationCallback({"global_config": {"n_bits": 2, "weight_threshold": 0}})
        trainer = L.Trainer(
            accelerator="gpu",
            devices=1,
            precision=precision,
            max_steps=20,
            callbacks=[cb],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=64))
        counts = [len(torch.unique(module.net[i].weight)) for i in (0, 2)]
        # (Lightning moves the module back to the CPU in teardown: no device check here)
        ok = all(c <= 4 for c in counts)
        failures += not ok
        print(
            f"[{'PASS' if ok else 'FAIL'}] DKM callback {precision} on "
            f"{torch.cuda.get_device_name(0)}: distinct values per layer {counts}",
            flush=True,
        )
    return failures


if __name__ == "__main__":
    sys.exit(main())
