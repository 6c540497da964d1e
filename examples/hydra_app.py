"""Your own Hydra app with a palettization callback from YAML (``_target_`` instantiation).

The config (examples/hydra_app.yaml) builds the module, the datamodule and every entry of
``callbacks`` with ``hydra.utils.instantiate``; the callback accepts the nested DictConfig Hydra
passes, with or without ``_convert_``. DKM starts after 5 fp32 epochs of the same fit.

Run: python examples/hydra_app.py                      (about 10 s on 2 cores)
     python examples/hydra_app.py callbacks.palettize.config.global_config.n_bits=2
"""

from __future__ import annotations

import hydra
import lightning as L
import torch
from omegaconf import DictConfig


@hydra.main(config_path=".", config_name="hydra_app", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(1)  # a model this small runs faster on one thread than on two
    L.seed_everything(cfg.seed)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    trainer = L.Trainer(callbacks=callbacks, **cfg.trainer)
    module = hydra.utils.instantiate(cfg.model)
    data = hydra.utils.instantiate(cfg.data)
    trainer.fit(module, data)
    print(trainer.test(module, data, verbose=False)[0])


if __name__ == "__main__":
    main()
