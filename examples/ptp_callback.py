"""Post-training palettization with Lightning: measure a trained model palettized, in
trainer.test, with PostTrainingPalettizationCallback(when="test_start", compare=True).

Run: python examples/ptp_callback.py   (about 10 s on 2 cores)
"""

from __future__ import annotations

import lightning as L
import torch

from lightning_palettize.callbacks import PostTrainingPalettizationCallback
from lightning_palettize.data import DigitsClassifier, DigitsDataModule


def main() -> None:
    torch.set_num_threads(1)  # a model this small runs faster on one thread than on two
    L.seed_everything(0)
    data, module = DigitsDataModule(), DigitsClassifier()
    L.Trainer(max_epochs=8, logger=False, enable_checkpointing=False).fit(module, data)

    callback = PostTrainingPalettizationCallback(
        {"global_config": {"n_bits": 3}},
        when="test_start",  # or fit_end (default), validate_start, predict_start
        compare=True,  # validation metrics before / after, logged as palettization/ptp/...
    )
    trainer = L.Trainer(callbacks=[callback], logger=False)
    print(trainer.test(module, data, verbose=False)[0])  # the 3-bit model's test metrics
    print(callback.comparison)  # {'before/val_acc': ..., 'after/val_acc': ..., 'drop/...': ...}


if __name__ == "__main__":
    main()
