"""LightningCLI with a palettization callback from YAML (``class_path`` / ``init_args``).

Run: python examples/lightning_cli.py fit --config examples/lightning_cli.yaml
     python examples/lightning_cli.py fit --config examples/lightning_cli.yaml \
         --trainer.callbacks.init_args.milestone_epochs=3
(under a minute on 2 cores). ``--print_config`` shows every argument the callback takes.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_palettize.data import DigitsClassifier, DigitsDataModule


def main() -> None:
    LightningCLI(DigitsClassifier, DigitsDataModule)


if __name__ == "__main__":
    main()
