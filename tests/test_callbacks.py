"""PalettizationCallback (DKM) with the real Trainer: hook timing, schedule, finalize, argument
validation, companions (precision, accumulation, clipping, other callbacks), reuse."""

from __future__ import annotations

import logging
import types

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelPruning,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from test_callbacks_models import DKM_CFG, BoringModule, trainer

from lightning_palettize.callbacks import (
    PalettizationCallback,
    PostTrainingPalettizationCallback,
    SKMPalettizationCallback,
)
from lightning_palettize.palettizers.dkm import FakePalettize


def _cfg(**module) -> dict:
    return {"global_config": {"n_bits": 2, "weight_threshold": 0, **module}}


def _prepared(module: torch.nn.Module) -> dict[str, FakePalettize]:
    return {n: m for n, m in module.named_modules() if isinstance(m, FakePalettize)}


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


class SpyModule(BoringModule):
    """Records what the module sees at each hook (module hooks run after the callbacks')."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: dict[str, object] = {}
        self.enabled_at: list[tuple[int, int, int]] = []  # (batch, global_step, enabled net.0)
        self.enabled2_at: list[int] = []

    def setup(self, stage):
        self.seen["setup"] = sorted(_prepared(self))

    def configure_optimizers(self):
        self.seen["optimizers"] = sorted(_prepared(self))
        return super().configure_optimizers()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.enabled_at.append(
            (batch_idx, self.trainer.global_step, int(self.net[0].weight_dkm.enabled))
        )
        self.enabled2_at.append(int(self.net[2].weight_dkm.enabled))

    def on_train_end(self):
        self.seen["train_end"] = sorted(_prepared(self))


def test_prepares_in_setup_steps_on_optimizer_steps_and_finalizes_on_fit_end():
    pl.seed_everything(0, verbose=False)
    model = SpyModule(n_batches=8)
    callback = PalettizationCallback(_cfg(milestone=3), verbose=False)
    trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[callback]).fit(model)

    names = ["net.0.weight_dkm", "net.2.weight_dkm"]
    # prepared before the module's own setup and before optimizers exist; kept until train end
    assert model.seen == {"setup": names, "optimizers": names, "train_end": names}
    # milestone 3 = the 3rd optimizer step = the 6th batch under accumulate_grad_batches=2
    assert [e for *_, e in model.enabled_at] == [0, 0, 0, 0, 0, 1, 1, 1]
    assert [s for _, s, _ in model.enabled_at] == [0, 1, 1, 2, 2, 3, 3, 4]
    # finalized: a plain module, palettized, with Core ML metadata
    assert not _prepared(model) and _hooks(model) == 0
    for layer in (model.net[0], model.net[2]):
        assert len(torch.unique(layer.weight)) <= 4
        assert any(k.startswith("_COREML_/weight/") for k in layer._buffers)
    assert model.training and callback.palettizer is None
    assert sorted(callback.report) == ["net.0.weight", "net.2.weight"]


def test_epoch_milestone_starts_palettizing_at_that_epoch(caplog):
    caplog.set_level(logging.DEBUG, logger="lightning_palettize.callbacks")
    pl.seed_everything(0, verbose=False)
    model = SpyModule(n_batches=4)
    config = {
        "global_config": {"n_bits": 2, "weight_threshold": 0},
        # net.2 starts 2 optimizer steps after the epoch milestone
        "module_name_configs": {"net\\.2": {"n_bits": 2, "weight_threshold": 0, "milestone": 2}},
    }
    callback = PalettizationCallback(config, milestone_epochs=1, verbose=False)
    trainer(max_epochs=3, callbacks=[callback]).fit(model)
    assert [e for *_, e in model.enabled_at] == [0] * 4 + [1] * 8
    assert model.enabled2_at == [0] * 5 + [1] * 7  # global step 6 = epoch 1 start (4) + 2
    started = [r.getMessage() for r in caplog.records if "DKM started" in r.getMessage()]
    assert started == [
        "DKM started on ['net.0.weight'] at global step 4",
        "DKM started on ['net.2.weight'] at global step 6",
    ]
    assert len(torch.unique(model.net[2].weight)) <= 4


def test_finalize_options_and_metadata_free_state_dict_loads_strictly():
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=2)
    callback = PalettizationCallback(DKM_CFG, keep_coreml_metadata=False, verbose=False)
    trainer(callbacks=[callback]).fit(model)
    assert not any("_COREML_" in k for k in model.state_dict())
    BoringModule().load_state_dict(model.state_dict(), strict=True)

    kept = BoringModule(n_batches=2)
    callback = PalettizationCallback(DKM_CFG, finalize_on_fit_end=False, verbose=False)
    trainer(callbacks=[callback]).fit(kept)
    assert len(_prepared(kept)) == 2  # still training-time DKM
    finalized = callback.palettizer.finalize(inplace=True)
    assert finalized is kept and not _prepared(kept) and _hooks(kept) == 0


def test_bf16_mixed_with_accumulation_and_clipping():
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=6)
    before = model.net[0].weight.detach().clone()
    trainer(
        max_epochs=1,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        gradient_clip_val=0.1,
        callbacks=[PalettizationCallback(DKM_CFG, verbose=False)],
    ).fit(model)
    w = model.net[0].weight
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    assert not torch.equal(w, before) and len(torch.unique(w)) <= 4
    assert len(torch.unique(model.net[2].weight)) <= 4


def test_with_checkpoint_early_stopping_and_lr_monitor(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, monitor="val_loss")
    stop = EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0)  # stops after epoch 1
    trainer(
        max_epochs=5,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=True,
        callbacks=[
            checkpoint,
            stop,
            LearningRateMonitor(),
            PalettizationCallback(DKM_CFG, verbose=False),
        ],
    ).fit(model)
    assert stop.stopped_epoch == 1
    saved = sorted(tmp_path.glob("*.ckpt"))
    assert len(saved) == 2
    state = torch.load(saved[-1], weights_only=True)["state_dict"]
    assert "net.0.weight_dkm.centroids" in state  # saved mid-DKM, resumable
    assert not _prepared(model) and len(torch.unique(model.net[0].weight)) <= 4


def test_joint_pruning_then_palettization_keeps_zeros():
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=4)
    trainer(
        max_epochs=2,
        callbacks=[
            ModelPruning("l1_unstructured", amount=0.3, parameter_names=["weight"]),
            PalettizationCallback(_cfg(enforce_zero=True), verbose=False),
        ],
    ).fit(model)
    for layer in (model.net[0], model.net[2]):
        w = layer.weight.detach()
        assert "weight" in layer._parameters and not hasattr(layer, "weight_orig")
        assert (w == 0).float().mean() >= 0.3  # pruned, and zeros stay exact
        assert len(torch.unique(w)) <= 4 and 0.0 in torch.unique(w)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: PalettizationCallback({"global_config": {"n_bits": 9}}), r"n_bits.*9.*1\.\.8"),
        (lambda: PalettizationCallback({"globl_config": {}}), "globl_config"),
        (lambda: PalettizationCallback(42), "config.*int"),
        (lambda: PalettizationCallback(milestone_epochs=-1), r"milestone_epochs=-1.*int >= 0"),
        (lambda: PalettizationCallback(milestone_epochs=1.5), r"milestone_epochs=1\.5"),
        (lambda: PalettizationCallback(finalize_on_fit_end="yes"), "finalize_on_fit_end='yes'"),
        (lambda: PalettizationCallback(keep_coreml_metadata=1), r"keep_coreml_metadata=1.*True"),
        (lambda: PalettizationCallback(log_every_n_steps=True), "log_every_n_steps=True"),
        (lambda: PalettizationCallback(verbose=None), "verbose=None"),
        (
            lambda: PostTrainingPalettizationCallback(when="fit_start"),
            r"when='fit_start'.*'fit_end', 'validate_start', 'test_start', 'predict_start'",
        ),
        (lambda: PostTrainingPalettizationCallback(compare="no"), "compare='no'"),
        (lambda: PostTrainingPalettizationCallback(compare_dataloader=3), "compare_dataloader=3"),
        (lambda: PostTrainingPalettizationCallback({"global_config": {"n_bit": 4}}), "n_bit"),
        (lambda: SKMPalettizationCallback({"calibration_nsamples": 0}), "calibration_nsamples"),
        (lambda: SKMPalettizationCallback(loss_fn="mse"), r"loss_fn='mse'.*callable"),
        (lambda: SKMPalettizationCallback(per_sample=1), "per_sample=1"),
        (lambda: SKMPalettizationCallback(calibration_dataloader=5), "calibration_dataloader=5"),
        (lambda: SKMPalettizationCallback(sensitivity=3), "sensitivity=3"),
    ],
)
def test_invalid_arguments_name_key_value_and_accepted(make, match):
    with pytest.raises(MisconfigurationException, match=match):
        make()


def test_config_that_does_not_fit_the_weights_fails_in_setup():
    bad = {
        "global_config": {
            "n_bits": 2,
            "weight_threshold": 0,
            "granularity": "per_grouped_channel",
            "group_size": 5,
        }
    }
    with pytest.raises(MisconfigurationException, match=r"PalettizationCallback: .*group_size"):
        trainer(callbacks=[PalettizationCallback(bad)]).fit(BoringModule())


@pytest.mark.parametrize("strategy_cls", [FSDPStrategy, DeepSpeedStrategy])
@pytest.mark.parametrize(
    "callback", [PalettizationCallback, PostTrainingPalettizationCallback, SKMPalettizationCallback]
)
def test_sharded_strategies_are_rejected_in_setup(strategy_cls, callback):
    # FSDP needs a GPU and DeepSpeed is not installed: a strategy object without __init__ is
    # enough for the type check, which is what setup does first
    fake_trainer = types.SimpleNamespace(strategy=strategy_cls.__new__(strategy_cls))
    with pytest.raises(MisconfigurationException, match=f"{strategy_cls.__name__} shards"):
        callback().setup(fake_trainer, BoringModule(), "fit")


def test_callbacks_reused_across_fits_share_nothing_and_leave_no_hooks():
    pl.seed_everything(0, verbose=False)
    first, second = BoringModule(n_batches=2), BoringModule(hidden=16, n_batches=2)
    callback = PalettizationCallback(DKM_CFG, verbose=False)
    trainer(callbacks=[callback]).fit(first)
    first_weights = {k: v.clone() for k, v in first.state_dict().items()}
    first_report = callback.report
    trainer(callbacks=[callback]).fit(second)
    # the first module is untouched by the second fit, and neither keeps DKM hooks/children
    assert all(torch.equal(first.state_dict()[k], v) for k, v in first_weights.items())
    for model in (first, second):
        assert not _prepared(model) and _hooks(model) == 0
    assert callback.palettizer is None
    assert first_report["net.0.weight"].num_params == 16 * 32
    assert callback.report["net.0.weight"].num_params == 16 * 16

    # two instances built from one dict do not share config objects
    config = {"global_config": {"n_bits": 2, "weight_threshold": 0}}
    a, b = PalettizationCallback(config), PalettizationCallback(config)
    assert a.config == b.config and a.config is not b.config
    assert a.config.global_config is not b.config.global_config

    # a post-training callback palettizes each module once, and another module afresh
    ptp = PostTrainingPalettizationCallback({"global_config": {"n_bits": 2}}, verbose=False)
    third = BoringModule(n_batches=2)
    trainer(callbacks=[ptp]).fit(third)
    trainer(callbacks=[ptp]).fit(BoringModule(n_batches=2))
    assert len(torch.unique(third.net[0].weight)) <= 4 and _hooks(third) == 0


def test_prepared_module_is_taken_over_by_a_second_fit():
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=2)
    first = PalettizationCallback(_cfg(milestone=3), finalize_on_fit_end=False, verbose=False)
    trainer(callbacks=[first]).fit(model)
    assert not model.net[0].weight_dkm.is_enabled and int(model.net[0].weight_dkm.steps) == 2
    second = PalettizationCallback(_cfg(milestone=3), verbose=False)
    trainer(max_epochs=2, callbacks=[second]).fit(model)  # a new Trainer: global_step restarts
    assert not _prepared(model) and _hooks(model) == 0
    assert len(torch.unique(model.net[0].weight)) <= 4
