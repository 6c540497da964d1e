"""Trainer flows around the callbacks: precision plugins, fit-then-test with ModelCheckpoint,
epoch-milestone resume, several dataloaders, loss_fn import paths, manual optimization."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from test_callbacks_models import (
    KMEANS,
    SKM,
    BoringModule,
    assert_state,
    boring_data,
    checkpoint_state,
    coreml_state,
    fit_saving_each_epoch,
    holds_its_lut,
    ptp_of,
    trainer,
)
from torch import nn

from lightning_palettize import DKMPalettizer, PostTrainingPalettizer, SKMPalettizer
from lightning_palettize.callbacks import (
    PalettizationCallback,
    PostTrainingPalettizationCallback,
    SKMPalettizationCallback,
    load_palettized_checkpoint,
    restore_palettization,
)

pytestmark = pytest.mark.usefixtures("one_thread")


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


# -- 9. a module palettized before: a second pass, a second fit, a resume ------------------------


@pytest.mark.parametrize("kind", ["ptp", "skm"])
def test_pass_reused_for_a_second_fit_palettizes_the_newly_trained_weights(kind):
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=2)
    callback = (
        PostTrainingPalettizationCallback(KMEANS, verbose=False)
        if kind == "ptp"
        else SKMPalettizationCallback(SKM, verbose=False)
    )
    trainer(max_steps=2, callbacks=[callback]).fit(model)
    first, keys = callback.report, coreml_state(model).keys()
    trainer(max_steps=2, callbacks=[callback]).fit(model)  # trains the palettized weights on
    assert callback.report is not first and len(callback.report) == 2
    assert coreml_state(model).keys() == keys
    for name in ("net.0", "net.2"):
        assert len(torch.unique(model.get_submodule(name).weight)) <= 4
        assert holds_its_lut(model, f"{name}.weight"), name


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("second", ["ptp", "dkm"])
def test_a_second_pass_replaces_the_metadata_of_an_earlier_one(second, frozen):
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=2)
    scaled = {"global_config": {"n_bits": 3, "enable_per_channel_scale": True}}
    trainer(max_steps=2, callbacks=[PostTrainingPalettizationCallback(scaled, verbose=False)]).fit(
        model
    )
    assert "net.0._COREML_/weight/palettization_scale" in coreml_state(model)
    earlier = {k: v.clone() for k, v in coreml_state(model, "net.2.").items()}
    # the second run: 2 bits without a scale for net.0, nothing for net.2 (trained or frozen)
    model.net[2].requires_grad_(not frozen)
    if second == "ptp":
        config = {"global_config": {"n_bits": 2}, "module_name_configs": {"net\\.2": None}}
        callback = PostTrainingPalettizationCallback(config, verbose=False)
    else:
        config = {
            "global_config": {"n_bits": 2, "weight_threshold": 0},
            "module_name_configs": {"net\\.2": None},
        }
        callback = PalettizationCallback(config, verbose=False)
    if frozen:
        trainer(max_steps=2, callbacks=[callback]).fit(model)
    else:  # (a pass callback removes it when training starts, DKM when fit ends)
        with pytest.warns(UserWarning, match=r"_COREML_ metadata.*'net\.2\.weight'"):
            trainer(max_steps=2, callbacks=[callback]).fit(model)
    assert sorted(coreml_state(model, "net.0.")) == [
        "net.0._COREML_/weight/compression_type",
        "net.0._COREML_/weight/lut",
    ]
    assert coreml_state(model)["net.0._COREML_/weight/lut"].numel() == 4
    assert holds_its_lut(model, "net.0.weight")
    kept = coreml_state(model, "net.2.")
    if frozen:  # still exactly the earlier palettization of net.2: kept
        assert kept.keys() == earlier.keys()
        assert all(torch.equal(kept[k], earlier[k]) for k in earlier)
    else:  # trained since: the earlier LUT no longer describes it
        assert not kept
    assert "_COREML_/metadata_version" in coreml_state(model)


def test_test_start_pass_skips_only_an_unchanged_module():
    pl.seed_everything(0, verbose=False)
    model = BoringModule()
    callback = PostTrainingPalettizationCallback(KMEANS, when="test_start", verbose=False)
    t = trainer(callbacks=[callback])
    t.test(model, verbose=False)
    first = callback.report
    t.test(model, verbose=False)
    assert callback.report is first  # nothing changed: not palettized again
    with torch.no_grad():  # e.g. weights loaded or trained since
        model.net[0].weight.add_(0.01 * torch.randn_like(model.net[0].weight))
    t.test(model, verbose=False)
    assert callback.report is not first
    assert holds_its_lut(model, "net.0.weight") and len(torch.unique(model.net[0].weight)) <= 4


def test_dkm_fit_on_a_finalized_module_resumes_a_mid_dkm_checkpoint(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=4)
    fit_saving_each_epoch(model, tmp_path, [PalettizationCallback(DKM, verbose=False)])
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    assert any("_COREML_" in k for k in reference)
    # the same, finalized, module resumes DKM from the end of epoch 0 (net.2 not started yet)
    callback = PalettizationCallback(DKM, verbose=False)
    trainer(max_epochs=2, callbacks=[callback]).fit(model, ckpt_path=tmp_path / "epoch=0.ckpt")
    assert_state(model, reference)  # as the uninterrupted run: the first one
    assert len(callback.report) == 2


# -- 10. fit_end passes, then validate/test/predict with ModelCheckpoint's (dense) files ----------


def _mse(module, batch):
    return nn.functional.mse_loss(module(batch[0]), batch[1])


def _skm_of(state):
    """SKM of the checkpoint's weights, calibrated as the callback does (training data)."""
    model = BoringModule(n_batches=4)
    model.load_state_dict(state)
    SKMPalettizer(model, SKM).compress(model.train_dataloader(), _mse, inplace=True, progress=False)
    return model.state_dict()


def _fit_with_checkpoints(tmp_path, callback):
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=4)
    # "best": the highest val_loss (the first epoch: it decreases), not the last epoch's weights
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_loss", mode="max")
    latest = ModelCheckpoint(dirpath=tmp_path / "last", save_last=True)
    callbacks = [callback, checkpoint, latest]
    t = trainer(max_epochs=3, enable_checkpointing=True, callbacks=callbacks)
    t.fit(model)
    paths = {"best": checkpoint.best_model_path, "last": latest.last_model_path}
    best, last = checkpoint_state(paths["best"]), checkpoint_state(paths["last"])
    assert not torch.equal(best["net.0.weight"], last["net.0.weight"])
    assert not torch.equal(last["net.0.weight"], model.net[0].weight)  # palettized after it
    assert not any("_COREML_" in k for k in {**best, **last})
    return model, t, paths


@pytest.mark.parametrize("keep", [True, False])
def test_ptp_fit_end_then_test_best_palettizes_the_checkpoint(tmp_path, keep):
    callback = PostTrainingPalettizationCallback(KMEANS, keep_coreml_metadata=keep, verbose=False)
    model, t, paths = _fit_with_checkpoints(tmp_path, callback)
    first = callback.report
    for ckpt_path in ("best", "last", "best"):
        t.test(model, ckpt_path=ckpt_path, verbose=False)
        assert_state(model, ptp_of(checkpoint_state(paths[ckpt_path]), keep=keep), ckpt_path)
    assert callback.report is not first and len(callback.report) == 2
    # validate and predict restore the same way
    t.validate(model, ckpt_path="last", verbose=False)
    assert_state(model, ptp_of(checkpoint_state(paths["last"]), keep=keep), "validate")
    t.predict(model, ckpt_path="best")
    assert_state(model, ptp_of(checkpoint_state(paths["best"]), keep=keep), "predict")


def test_test_best_evaluates_the_palettized_checkpoint(tmp_path):
    callback = PostTrainingPalettizationCallback(KMEANS, verbose=False)
    model, t, paths = _fit_with_checkpoints(tmp_path, callback)
    loss = t.test(model, ckpt_path="best", verbose=False)[0]["test_loss"]
    expected = BoringModule(n_batches=4)
    expected.load_state_dict(checkpoint_state(paths["best"]))
    PostTrainingPalettizer(expected, KMEANS).compress(inplace=True, progress=False)
    x, y = (torch.cat(t) for t in zip(*expected.test_dataloader()))  # equal-sized batches
    with torch.no_grad():
        assert loss == pytest.approx(float(nn.functional.mse_loss(expected(x), y)))


@pytest.mark.parametrize("keep", [True, False])
def test_a_checkpoint_saved_after_the_pass_loads_unchanged(tmp_path, keep):
    config = {"global_config": {"n_bits": 3, "enable_per_channel_scale": True}}  # not idempotent
    callback = PostTrainingPalettizationCallback(config, keep_coreml_metadata=keep, verbose=False)
    model, t, paths = _fit_with_checkpoints(tmp_path, callback)
    t.save_checkpoint(tmp_path / "palettized.ckpt")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    assert any("_COREML_" in k for k in saved) == keep
    first = callback.report
    t.test(model, ckpt_path="best", verbose=False)  # dense: palettized again
    assert not torch.equal(model.net[0].weight, saved["net.0.weight"])
    t.test(model, ckpt_path=tmp_path / "palettized.ckpt", verbose=False)
    assert_state(model, saved)
    # outside the Trainer too, and with the module still as the pass left it: nothing runs
    report = callback.report
    model.load_state_dict(saved)
    assert_state(model, saved)
    assert callback.report is report and report is not first


def test_ptp_dense_load_outside_the_trainer_and_copies_of_the_module(tmp_path):
    import copy
    import io

    callback = PostTrainingPalettizationCallback(KMEANS, verbose=False)
    model, t, paths = _fit_with_checkpoints(tmp_path, callback)
    best = checkpoint_state(paths["best"])
    expected = ptp_of(best)
    model.load_state_dict(best)
    assert_state(model, expected)
    # a deep copy and a pickled copy keep the hook (the pickled one without the callback)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    report = callback.report
    for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        copied.load_state_dict(checkpoint_state(paths["last"]))
        assert_state(copied, ptp_of(checkpoint_state(paths["last"])))
        copied.load_state_dict(best)
        assert_state(copied, expected)
    assert_state(model, expected)
    assert callback.report is report  # the copies' loads are not this callback's passes
    # the pass running again takes its hook over instead of adding one
    hooks = len(model._load_state_dict_pre_hooks), len(model._load_state_dict_post_hooks)
    t.test(model, ckpt_path="last", verbose=False)
    scaled = {"global_config": {"n_bits": 3, "enable_per_channel_scale": True}}
    trainer(callbacks=[PostTrainingPalettizationCallback(scaled, when="test_start")]).test(
        model, verbose=False
    )
    assert (len(model._load_state_dict_pre_hooks), len(model._load_state_dict_post_hooks)) == hooks
    # metadata made inside trainer.test (inference mode) takes a later load
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(saved)
    assert_state(model, saved)
    model.load_state_dict(best)  # the last pass's config now
    assert_state(model, ptp_of(best, scaled))


def test_fit_resumed_on_a_palettized_module_trains_the_dense_checkpoint(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=4)
    fit_saving_each_epoch(
        model, tmp_path, [PostTrainingPalettizationCallback(KMEANS, verbose=False)]
    )
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    # the same, palettized, module resumes from the end of epoch 0: epoch 1 trains the dense
    # weights of the checkpoint, as in the uninterrupted run, and the pass runs at the end
    callback = PostTrainingPalettizationCallback(KMEANS, verbose=False)
    t = trainer(max_epochs=2, callbacks=[callback])
    t.fit(model, ckpt_path=tmp_path / "epoch=0.ckpt")
    assert_state(model, reference)
    # without a pass in that fit, the module keeps the trained dense weights, no metadata
    trainer(max_epochs=2).fit(model, ckpt_path=tmp_path / "epoch=0.ckpt")
    assert not any("_COREML_" in k for k in model.state_dict())
    assert len(torch.unique(model.net[0].weight)) > 4
    model.load_state_dict(checkpoint_state(tmp_path / "epoch=1.ckpt"))  # the hook is spent
    assert len(torch.unique(model.net[0].weight)) > 4


def test_skm_fit_end_then_test_best_calibrates_the_checkpoint(tmp_path):
    callback = SKMPalettizationCallback(SKM, verbose=False)
    model, t, paths = _fit_with_checkpoints(tmp_path, callback)
    first = callback.report
    t.test(model, ckpt_path="best", verbose=False)
    best = checkpoint_state(paths["best"])
    assert_state(model, _skm_of(best))
    assert callback.report is not first and len(callback.report) == 2
    # outside the Trainer SKM has no calibration data: dense as loaded, no metadata, a warning
    palettized = {k: v.clone() for k, v in model.state_dict().items()}
    last = checkpoint_state(paths["last"])
    with pytest.warns(UserWarning, match="SKM needs calibration data.*stay dense"):
        model.load_state_dict(last)
    assert_state(model, last)
    model.load_state_dict(palettized)  # saved after palettization: its metadata comes back
    assert_state(model, palettized)
    with pytest.warns(UserWarning, match="SKM needs calibration data"):
        model.load_state_dict(last)
    # ... until the next stage with the callback
    t.validate(model, verbose=False)
    assert_state(model, _skm_of(last))


def test_skm_with_a_sensitivity_file_palettizes_on_load(tmp_path):
    pl.seed_everything(0, verbose=False)
    data = BoringModule(n_batches=4)
    path = str(tmp_path / "fisher.safetensors")
    SKMPalettizer(data, SKM).compute_sensitivity(
        data.train_dataloader(), _mse, path, progress=False
    )
    callback = SKMPalettizationCallback(SKM, sensitivity=path, verbose=False)
    model, t, paths = _fit_with_checkpoints(tmp_path / "ckpts", callback)
    best = checkpoint_state(paths["best"])
    model.load_state_dict(best)
    expected = BoringModule(n_batches=4)
    expected.load_state_dict(best)
    SKMPalettizer(expected, SKM).compress(inplace=True, sensitivity=path, progress=False)
    assert_state(model, expected.state_dict())


_DDP_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_callbacks_models import BoringModule, trainer
from lightning_palettize.callbacks import SKMPalettizationCallback

if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=4)
    best = ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), monitor="val_loss", mode="max")
    callback = SKMPalettizationCallback({skm!r}, verbose=False)
    t = trainer(
        strategy="ddp", devices=2, max_epochs=2, enable_checkpointing=True,
        callbacks=[callback, best],
    )
    t.fit(model)
    t.test(model, ckpt_path="best", verbose=False)
    state = {{k: v.detach().clone() for k, v in model.state_dict().items()}}
    path = os.path.join(out, f"rank{{t.global_rank}}.pt")
    torch.save({{"state": state, "best": best.best_model_path}}, path)
"""


@pytest.mark.slow
def test_ddp_skm_fit_end_then_test_best(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_test_best.py"
    script.write_text(_DDP_SCRIPT.format(tests=os.path.dirname(__file__), skm=SKM))
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    expected = _skm_of(checkpoint_state(ranks[0]["best"]))
    for rank in ranks:
        assert rank["state"].keys() == expected.keys()
        for key in expected:
            assert torch.equal(rank["state"][key], expected[key]), key
