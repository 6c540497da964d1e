"""``python -m lightning_palettize``: the same Hydra app as the ``lightning-palettize`` command."""

from lightning_palettize.cli import main

if __name__ == "__main__":
    main()
