"""LightningCLI with a palettization callback from YAML (``class_path`` / ``init_args``).

Run: python examples/lightning_cli.py fit --config examples/lightning_cli.yaml
     python examples/lightning_cli.py fit --config examples/lightning_cli.yaml \
         --trainer.callbacks.init_args.milestone_epochs=3
(about 10 s on 2 cores). ``--print_config`` shows every argument the callback takes.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LightningCLI

from lightning_palettize.data import DigitsClassifier, DigitsDataModule


def main() -> None:
    torch.set_num_threads(1)  # a model this small runs faster on one thread than on two
    # overwrite: a second run in the same folder replaces the config.yaml LightningCLI saves
    LightningCLI(DigitsClassifier, DigitsDataModule, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
