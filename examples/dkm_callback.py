"""DKM with Lightning: add PalettizationCallback to the Trainer, keep the LightningModule as is.

Trains the digits CNN in fp32, fine-tunes it with DKM (the callback prepares in setup, steps
with trainer.global_step and finalizes on fit end), saves the finalized checkpoint and loads it
into a fresh module.

Run: python examples/dkm_callback.py   (about 10 s on 2 cores)
"""

from __future__ import annotations

import os
import tempfile

import lightning as L
import torch

from lightning_palettize.callbacks import PalettizationCallback, load_palettized_checkpoint
from lightning_palettize.data import DigitsClassifier, DigitsDataModule


def main() -> None:
    torch.set_num_threads(1)  # a model this small runs faster on one thread than on two
    L.seed_everything(0)
    data, module = DigitsDataModule(), DigitsClassifier(lr=1e-3)
    L.Trainer(max_epochs=8, logger=False, enable_checkpointing=False).fit(module, data)

    callback = PalettizationCallback(
        {"global_config": {"n_bits": 4, "weight_threshold": 2048}},  # or a YAML path
        milestone_epochs=None,  # start at once; e.g. 1 to fine-tune one more fp32 epoch first
    )
    trainer = L.Trainer(
        max_epochs=2, callbacks=[callback], logger=False, enable_checkpointing=False
    )
    trainer.fit(module, data)  # the callback prints the per-layer report
    print(trainer.test(module, data, verbose=False)[0])

    path = os.path.join(tempfile.mkdtemp(), "dkm.ckpt")
    trainer.save_checkpoint(path, weights_only=False)  # keep the callback state too
    restored = load_palettized_checkpoint(DigitsClassifier, path)  # keeps the Core ML metadata
    print(f"reloaded {path}: {restored.model.fc1.weight.unique().numel()} distinct fc1 values")


if __name__ == "__main__":
    main()
