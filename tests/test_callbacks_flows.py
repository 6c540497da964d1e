"""Trainer flows around the callbacks: precision plugins, fit-then-test with ModelCheckpoint,
epoch-milestone resume, several dataloaders, loss_fn import paths, manual optimization."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from test_callbacks_models import BoringModule, boring_data, trainer
from torch import nn

from lightning_palettize import DKMPalettizer
from lightning_palettize.callbacks import (
    PalettizationCallback,
    PostTrainingPalettizationCallback,
    SKMPalettizationCallback,
    load_palettized_checkpoint,
    restore_palettization,
)

pytestmark = pytest.mark.usefixtures("one_thread")

KMEANS = {"global_config": {"n_bits": 2}}
SKM = {"global_config": {"n_bits": 2}, "calibration_nsamples": 2}


# -- 1. the precision plugin's input conversion ------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
@pytest.mark.parametrize("kind", ["ptp", "skm"])
def test_compare_and_calibration_convert_inputs_like_the_loops(precision, kind):
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=4)
    callback = (
        PostTrainingPalettizationCallback(KMEANS, compare=True, verbose=False)
        if kind == "ptp"
        else SKMPalettizationCallback(SKM, compare=True, verbose=False)
    )
    # fit stops mid-epoch: the data the callback asks for is built in float32 (a dataloader
    # hook called during Lightning's own loops would build it in the precision's dtype)
    trainer(precision=precision, max_steps=2, callbacks=[callback]).fit(model)
    assert model.net[0].weight.dtype == {"bf16-true": torch.bfloat16}.get(precision, torch.float64)
    assert len(torch.unique(model.net[0].weight)) <= 4
    assert {"before/val_loss", "after/val_loss"} <= callback.comparison.keys()


# -- 2. fit, then test/validate with the ModelCheckpoint files (mid-DKM) ------------------------

DKM = {
    "global_config": {"n_bits": 2, "weight_threshold": 0},
    "module_name_configs": {"net\\.2": {"n_bits": 3, "weight_threshold": 0, "milestone": 5}},
}


def _hard_palettized(path):
    """The checkpoint's DKM state, finalized outside the Trainer (the expected weights)."""
    model = load_palettized_checkpoint(BoringModule, path)
    DKMPalettizer(model, DKM).finalize(model, inplace=True)
    return model.state_dict()


@pytest.mark.parametrize("keep", [True, False])
def test_fit_then_test_with_checkpoint_files(tmp_path, keep):
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_last=True)
    t = trainer(
        max_epochs=2,
        enable_checkpointing=True,
        callbacks=[
            PalettizationCallback(DKM, verbose=False, keep_coreml_metadata=keep),
            checkpoint,
        ],
    )
    t.fit(model)
    for ckpt_path in ("best", "last", None):
        t.test(model, ckpt_path=ckpt_path, verbose=False)
        path = checkpoint.last_model_path if ckpt_path == "last" else checkpoint.best_model_path
        expected = _hard_palettized(path)
        if not keep:
            expected = {k: v for k, v in expected.items() if "_COREML_" not in k}
        state = model.state_dict()
        assert state.keys() == expected.keys()
        for key in expected:
            assert torch.equal(state[key], expected[key]), (ckpt_path, key)
    assert t.validate(model, ckpt_path="best", verbose=False)[0]["val_loss"] > 0
    if keep:
        assert any("_COREML_" in k for k in model.state_dict())
    assert len(torch.unique(model.net[0].weight)) <= 4


def test_fit_then_test_best_with_restore_palettization(tmp_path):
    class Restoring(BoringModule):
        def on_load_checkpoint(self, checkpoint):
            restore_palettization(self, checkpoint)

    pl.seed_everything(0, verbose=False)
    model = Restoring(n_batches=4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")
    t = trainer(
        max_epochs=2,
        enable_checkpointing=True,
        callbacks=[PalettizationCallback(DKM, verbose=False), checkpoint],
    )
    t.fit(model)
    t.test(ckpt_path="best", verbose=False)
    expected = _hard_palettized(checkpoint.best_model_path)
    for key, value in expected.items():
        assert torch.equal(model.state_dict()[key], value), key
    # a fresh module still loads the mid-DKM checkpoint as a prepared module
    fresh = Restoring.load_from_checkpoint(checkpoint.best_model_path)
    assert hasattr(fresh.net[0], "weight_dkm")


# -- 3. milestone_epochs resumed from the last batch of an epoch --------------------------------


def test_milestone_epochs_resume_at_epoch_boundary_is_bitwise_identical(tmp_path):
    config = {"global_config": {"n_bits": 2, "weight_threshold": 0, "milestone": 1}}

    def fit(model, ckpt_path=None, dirpath=None):
        callbacks = [PalettizationCallback(config, milestone_epochs=1, verbose=False)]
        if dirpath is not None:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=dirpath, save_top_k=-1, every_n_train_steps=1, filename="{step}"
                )
            )
        t = trainer(max_epochs=3, enable_checkpointing=dirpath is not None, callbacks=callbacks)
        t.fit(model, ckpt_path=ckpt_path)

    pl.seed_everything(0, verbose=False)
    reference = BoringModule(n_batches=2)
    fit(reference, dirpath=tmp_path)
    pl.seed_everything(5, verbose=False)
    resumed = BoringModule(n_batches=2)
    fit(resumed, ckpt_path=str(tmp_path / "step=2.ckpt"))  # the last batch of epoch 0
    a, b = reference.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- 4. several dataloaders ----------------------------------------------------------------------


class TwoVal(BoringModule):
    def val_dataloader(self):
        return {"a": boring_data(16, seed=1), "b": boring_data(8, seed=3)}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))
        if dataloader_idx == 0:  # (Lightning rejects one such key from several loaders)
            self.log("shared", 1.0, add_dataloader_idx=False)


@pytest.mark.parametrize("when", ["fit_end", "validate_start"])
def test_compare_with_several_val_dataloaders(when):
    pl.seed_everything(0, verbose=False)
    model = TwoVal(n_batches=2)
    callback = PostTrainingPalettizationCallback(KMEANS, when=when, compare=True, verbose=False)
    t = trainer(max_steps=2, callbacks=[callback])
    t.fit(model) if when == "fit_end" else t.validate(model, verbose=False)
    names = {k.split("/", 1)[1] for k in callback.comparison}
    assert names == {"val_loss/dataloader_idx_0", "val_loss/dataloader_idx_1", "shared"}
    # the per-loader value is that loader's own mean (one batch of 8 here)
    x, y = next(iter(boring_data(8, seed=3)))
    with torch.no_grad():
        expected = float(nn.functional.mse_loss(model(x), y))
    assert callback.comparison["after/val_loss/dataloader_idx_1"] == pytest.approx(expected)
    assert callback.comparison["after/shared"] == 1.0


def test_compare_with_several_val_dataloaders_needs_dataloader_idx():
    class NoIdx(TwoVal):
        def validation_step(self, batch, batch_idx):
            return None

    callback = PostTrainingPalettizationCallback(KMEANS, compare=True, verbose=False)
    with pytest.raises(MisconfigurationException, match="dataloader_idx=0"):
        trainer(max_steps=1, callbacks=[callback], limit_val_batches=0).fit(NoIdx(n_batches=1))


def test_skm_calibration_with_several_train_dataloaders():
    class TwoTrain(BoringModule):
        def train_dataloader(self):
            return {"a": boring_data(16), "b": boring_data(16, seed=4)}

        def training_step(self, batch, batch_idx):
            # Lightning's default mode (max_size_cycle): one batch of each loader
            return sum(nn.functional.mse_loss(self(x), y) for x, y in batch.values())

    pl.seed_everything(0, verbose=False)
    model = TwoTrain()
    callback = SKMPalettizationCallback(SKM, verbose=False)
    trainer(max_steps=2, callbacks=[callback]).fit(model)
    assert len(callback.report) == 2


# -- 6. loss_fn as an import path (Hydra instantiate passes the string) --------------------------


@pytest.mark.parametrize("path", ["lossmod_for_tests.mse", "lossmod_for_tests:mse"])
def test_skm_loss_fn_import_path(path):
    import lossmod_for_tests

    callback = SKMPalettizationCallback(SKM, loss_fn=path, verbose=False)
    assert callback._loss_fn is lossmod_for_tests.mse


def test_skm_loss_fn_from_hydra_yaml():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "_target_": "lightning_palettize.SKMPalettizationCallback",
            "config": SKM,
            "loss_fn": "lossmod_for_tests.mse",
        }
    )
    import lossmod_for_tests

    assert instantiate(cfg)._loss_fn is lossmod_for_tests.mse


@pytest.mark.parametrize("path", ["no_such_module_xyz.fn", "lossmod_for_tests.nope", "mse"])
def test_skm_loss_fn_bad_import_path_names_it(path):
    with pytest.raises(MisconfigurationException, match=f"loss_fn={path!r}"):
        SKMPalettizationCallback(SKM, loss_fn=path)


# -- 8. manual optimization; the user's own errors ------------------------------------------------


class Manual(BoringModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = nn.functional.mse_loss(self(batch[0]), batch[1])
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


@pytest.mark.parametrize("when", ["fit_end", "test_start"])
def test_skm_manual_optimization_needs_loss_fn_up_front(when):
    model = Manual(n_batches=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = trainer(max_steps=1, callbacks=[SKMPalettizationCallback(SKM, when=when)])
    with pytest.raises(MisconfigurationException, match="manual optimization.*loss_fn="):
        t.fit(model) if when == "fit_end" else t.test(model, verbose=False)
    if when == "fit_end":  # rejected in setup: nothing trained
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # with a loss_fn it calibrates
    callback = SKMPalettizationCallback(SKM, when=when, loss_fn="lossmod_for_tests.mse")
    t = trainer(max_steps=1, callbacks=[callback])
    t.fit(model) if when == "fit_end" else t.test(model, verbose=False)
    assert len(callback.report) == 2


def test_value_error_of_training_step_is_not_relabelled():
    class Raising(BoringModule):
        def training_step(self, batch, batch_idx):
            raise ValueError("user bug")

    model = Raising(n_batches=1)
    t = trainer(callbacks=[SKMPalettizationCallback(SKM, when="test_start")])
    with pytest.raises(ValueError, match="user bug") as info:
        t.test(model, verbose=False)
    assert not isinstance(info.value, MisconfigurationException)


def test_dkm_fit_resumed_from_a_plain_checkpoint_starts_from_its_weights(tmp_path):
    # fine-tuning with DKM from an fp32 run's checkpoint via ckpt_path: the callback prepares
    # before the restore, and the centroids then start from the restored weights
    from lightning_palettize.kmeans import kmeans

    torch.manual_seed(0)
    first = trainer(max_steps=8)
    plain = BoringModule()
    first.fit(plain, boring_data())
    path = tmp_path / "plain.ckpt"
    first.save_checkpoint(path)
    config = {"global_config": {"n_bits": 2, "weight_threshold": 0}}
    callback = PalettizationCallback(config, finalize_on_fit_end=False)
    module = BoringModule()
    trainer(max_steps=8, callbacks=[callback]).fit(module, boring_data(), ckpt_path=path)
    fp = module.net[0].weight_dkm  # max_steps reached at once: restored, not trained
    weight = torch.load(path, weights_only=False)["state_dict"]["net.0.weight"]
    assert torch.equal(module.net[0].weight.detach(), weight)
    assert torch.equal(fp.centroids, kmeans(fp.layout.to_groups(weight), 4).centroids.float())
