"""Sensitive k-means with Lightning: SKMPalettizationCallback calibrates on the training data
with the module's own training_step loss, then palettizes, at the end of fit.

Run: python examples/skm_callback.py   (about 10 s on 2 cores)
"""

from __future__ import annotations

import lightning as L
import torch

from lightning_palettize.callbacks import SKMPalettizationCallback
from lightning_palettize.data import DigitsClassifier, DigitsDataModule


def main() -> None:
    torch.set_num_threads(1)  # a model this small runs faster on one thread than on two
    L.seed_everything(0)
    data, module = DigitsDataModule(), DigitsClassifier()
    callback = SKMPalettizationCallback(
        {
            "global_config": {"n_bits": 2, "granularity": "per_grouped_channel", "group_size": 2},
            "calibration_nsamples": 8,  # training batches used for the Fisher information
        },
        when="fit_end",
    )
    trainer = L.Trainer(
        max_epochs=8, callbacks=[callback], logger=False, enable_checkpointing=False
    )
    trainer.fit(module, data)  # trains fp32, then palettizes to 2 bits at fit end
    print(trainer.test(module, data, verbose=False)[0])
    print(callback.report.summary())


if __name__ == "__main__":
    main()
