"""configs/*_callback.yaml: Hydra ``_target_`` instantiation and LightningCLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from test_callbacks_models import BoringModule, mse_loss, trainer

from lightning_palettize import (
    DKMPalettizerConfig,
    PostTrainingPalettizerConfig,
    SKMPalettizerConfig,
    load_config,
)
from lightning_palettize.callbacks import (
    PalettizationCallback,
    PostTrainingPalettizationCallback,
    SKMPalettizationCallback,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CASES = [
    ("dkm_callback.yaml", PalettizationCallback, DKMPalettizerConfig),
    ("ptp_callback.yaml", PostTrainingPalettizationCallback, PostTrainingPalettizerConfig),
    ("skm_callback.yaml", SKMPalettizationCallback, SKMPalettizerConfig),
]


@pytest.mark.parametrize("convert", [None, "none", "partial", "all", "object"])
@pytest.mark.parametrize("file, cls, config_cls", CASES)
def test_hydra_instantiates_each_callback_yaml(file, cls, config_cls, convert):
    hydra_utils = pytest.importorskip("hydra.utils")
    cfg = OmegaConf.load(CONFIGS / file)
    if convert is not None:
        cfg._convert_ = convert
    callback = hydra_utils.instantiate(cfg)
    assert type(callback) is cls
    expected = load_config(OmegaConf.to_container(cfg.config), config_cls)
    assert callback.config == expected and not isinstance(callback.config, DictConfig)


def test_hydra_callback_trains_with_nested_dictconfig():
    hydra_utils = pytest.importorskip("hydra.utils")
    cfg = OmegaConf.load(CONFIGS / "dkm_callback.yaml")
    cfg.config.global_config.weight_threshold = 0
    cfg.config.global_config.n_bits = 2
    cfg.verbose = False
    callback = hydra_utils.instantiate(cfg)  # no _convert_: config arrives as a DictConfig
    model = BoringModule(n_batches=2)
    trainer(max_steps=2, callbacks=[callback]).fit(model)
    assert len(torch.unique(model.net[0].weight)) <= 4


def test_config_as_yaml_path():
    callback = PostTrainingPalettizationCallback(str(CONFIGS / "ptp.yaml"))
    assert callback.config == PostTrainingPalettizerConfig.from_yaml(CONFIGS / "ptp.yaml")


def test_lightning_cli_with_callbacks_from_yaml_and_arguments(tmp_path):
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    init_args = yaml.safe_load((CONFIGS / "dkm_callback.yaml").read_text())
    class_path = init_args.pop("_target_")
    init_args["config"]["global_config"].update(n_bits=2, weight_threshold=0)
    init_args["verbose"] = False
    config_file = tmp_path / "cli.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [{"class_path": class_path, "init_args": init_args}],
                    "max_steps": 2,
                    "logger": False,
                    "enable_checkpointing": False,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                },
                "model": {"n_batches": 2},
            }
        )
    )
    args = [
        f"--config={config_file}",
        # more callbacks on the command line: a YAML path and an import path as values
        "--trainer.callbacks+=lightning_palettize.callbacks.PostTrainingPalettizationCallback",
        "--trainer.callbacks.when=test_start",
        f"--trainer.callbacks.config={CONFIGS / 'ptp.yaml'}",
        "--trainer.callbacks+=lightning_palettize.callbacks.SKMPalettizationCallback",
        "--trainer.callbacks.when=predict_start",
        "--trainer.callbacks.loss_fn=test_callbacks_models.mse_loss",
        '--trainer.callbacks.config={"global_config": {"n_bits": 3}, "calibration_nsamples": 2}',
    ]
    cli = LightningCLI(BoringModule, args=args, run=False, save_config_callback=None)
    ours = [c for c in cli.trainer.callbacks if "Palettization" in type(c).__name__]
    dkm, ptp, skm = ours
    assert dkm.config.global_config.n_bits == 2
    assert ptp.config == PostTrainingPalettizerConfig.from_yaml(CONFIGS / "ptp.yaml")
    assert skm.config.global_config.n_bits == 3 and skm._loss_fn is mse_loss
    cli.trainer.fit(cli.model)
    assert cli.trainer.global_step == 2
    assert len(torch.unique(cli.model.net[0].weight)) <= 4


def test_milestone_shift_keeps_the_defaults_of_a_config_created_empty():
    from collections import OrderedDict

    from torch import nn

    from lightning_palettize.callbacks import _shift_milestones
    from lightning_palettize.config import DKMPalettizerConfig
    from lightning_palettize.palettizers._common import KMEANS_SUPPORTED
    from lightning_palettize.selection import select_weights

    model = nn.Sequential(
        OrderedDict(a=nn.Linear(64, 64), b=nn.Linear(64, 64), c=nn.Conv1d(64, 64, 1))
    )
    config = (
        DKMPalettizerConfig().set_module_name("a", None).set_module_type("Linear", {"n_bits": 3})
    )
    shifted = _shift_milestones(config, 5)
    got = {
        s.qualified_name: (s.config.n_bits, s.config.milestone)
        for s in select_weights(model, shifted, KMEANS_SUPPORTED)
    }
    # "a" disabled by name, "b" by the user's Linear entry, "c" by the default table (2 bits)
    assert got == {"b.weight": (3, 5), "c.weight": (2, 5)}
