"""PostTrainingPalettizationCallback and SKMPalettizationCallback: moments, calibration data
and loss, gradients inside test/predict, restored state, before/after comparison."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from test_callbacks_models import (
    BoringModule,
    DigitsData,
    digits_tensors,
    trained_digits_cnn,
    trainer,
)
from torch import nn

from lightning_palettize import PostTrainingPalettizer, SKMPalettizer
from lightning_palettize.callbacks import (
    PostTrainingPalettizationCallback,
    SKMPalettizationCallback,
)

PTP_CFG = {"global_config": {"n_bits": 2}}
SKM_CFG = {"global_config": {"n_bits": 2}, "calibration_nsamples": 3}

pytest.importorskip("sklearn")


def _accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_ptp_on_fit_end_by_default():
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=2)
    callback = PostTrainingPalettizationCallback(PTP_CFG, verbose=False)
    trainer(callbacks=[callback]).fit(model)
    reference = PostTrainingPalettizer(model, PTP_CFG)  # palettizing again changes nothing
    again = reference.compress(progress=False)
    assert _same_params(model, again)
    assert sorted(callback.report) == ["net.0.weight", "net.2.weight"]


def test_ptp_at_test_start_tests_the_palettized_model_and_logs_the_drop():
    model = trained_digits_cnn()
    x, y = digits_tensors()
    xv, yv = x[1200:1500], y[1200:1500]
    dense_acc = _accuracy(model, xv, yv)
    expected = PostTrainingPalettizer(model, PTP_CFG).compress(progress=False)
    palettized_acc = _accuracy(expected, xv, yv)

    callback = PostTrainingPalettizationCallback(
        PTP_CFG, when="test_start", compare=True, verbose=False
    )
    t = trainer(callbacks=[callback])
    # nothing happens in fit, at validation or at predict
    t.validate(model, datamodule=DigitsData())
    assert callback.report is None
    (result,) = t.test(model, datamodule=DigitsData())
    assert _same_params(model, expected)
    assert result["test_acc"] == pytest.approx(palettized_acc, abs=1e-6)
    # the comparison reuses the module's torchmetrics accuracy (same val set as test here)
    cmp = callback.comparison
    assert cmp["before/val_acc"] == pytest.approx(dense_acc, abs=1e-6)
    assert cmp["after/val_acc"] == pytest.approx(palettized_acc, abs=1e-6)
    assert cmp["drop/val_acc"] == pytest.approx(dense_acc - palettized_acc, abs=1e-6)
    assert cmp["after/val_loss"] > 0 and "drop/val_loss" in cmp


def test_ptp_at_validate_start_only_in_validate_and_at_predict_start():
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=2)
    on_validate = PostTrainingPalettizationCallback(PTP_CFG, when="validate_start", verbose=False)
    trainer(callbacks=[on_validate]).fit(model)  # validates during fit: not palettized yet
    assert on_validate.report is None and len(torch.unique(model.net[0].weight)) > 4
    trainer(callbacks=[on_validate]).validate(model)
    assert len(torch.unique(model.net[0].weight)) <= 4

    fresh = BoringModule(n_batches=2)
    expected = PostTrainingPalettizer(fresh, PTP_CFG).compress(progress=False)
    on_predict = PostTrainingPalettizationCallback(PTP_CFG, when="predict_start", verbose=False)
    predictions = trainer(callbacks=[on_predict]).predict(fresh)
    x = torch.cat([b[0] for b in fresh.predict_dataloader()])
    with torch.no_grad():
        assert torch.equal(torch.cat(predictions), expected(x))


def test_skm_at_test_start_calibrates_on_datamodule_train_data_with_training_step_loss():
    model = trained_digits_cnn()
    reference = copy.deepcopy(model)
    dm = DigitsData()
    dm.setup("fit")
    loss_fn = lambda m, batch: nn.functional.cross_entropy(m(batch[0]), batch[1])
    expected = SKMPalettizer(reference, SKM_CFG).compress(
        dm.train_dataloader(), loss_fn, progress=False
    )

    callback = SKMPalettizationCallback(SKM_CFG, when="test_start", verbose=False)
    # DigitsData builds its train set only in setup("fit"): the callback asks for it
    (result,) = trainer(callbacks=[callback]).test(model, datamodule=DigitsData())
    # same Fisher (training_step's dict loss, first 3 train batches, gradients enabled inside
    # the test loop's inference mode) => the very same palettized weights
    assert _same_params(model, expected)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    x, y = digits_tensors()
    assert result["test_acc"] == pytest.approx(_accuracy(expected, x[1200:1500], y[1200:1500]))


def test_skm_on_fit_end_with_given_dataloader_and_loss_fn_restores_module_state():
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=2)
    calls = []

    def loss_fn(module, batch):
        calls.append(module.training)
        x, y = batch
        return (module(x) - y).abs().mean()

    data = [(torch.randn(4, 16), torch.randn(4, 4)) for _ in range(3)]
    callback = SKMPalettizationCallback(
        SKM_CFG, calibration_dataloader=data, loss_fn=loss_fn, verbose=False
    )
    snapshot = {}

    class Snapshot(pl.Callback):  # runs just before the SKM callback's on_fit_end
        def on_fit_end(self, trainer, pl_module):
            snapshot["model"] = copy.deepcopy(pl_module)

    trainer(callbacks=[Snapshot(), callback]).fit(model)
    expected = SKMPalettizer(snapshot["model"], SKM_CFG).compress(data, loss_fn, progress=False)
    assert len(calls) == 2 * 3 and _same_params(model, expected)
    # unselected parameters (biases), mode and grads are as before
    assert torch.equal(model.net[0].bias, snapshot["model"].net[0].bias)
    assert model.training == snapshot["model"].training
    assert all(p.grad is None for p in model.parameters())


def test_skm_needs_a_loss_and_calibration_data():
    class NoLoss(BoringModule):
        def training_step(self, batch, batch_idx):
            return {"output": self(batch[0])}

    model = NoLoss(n_batches=2)
    callback = SKMPalettizationCallback(SKM_CFG, when="test_start")
    with pytest.raises(MisconfigurationException, match="training_step returned dict.*loss_fn"):
        trainer(callbacks=[callback]).test(model)
    # the module is left exactly as it was before the failed calibration
    assert len(torch.unique(model.net[0].weight)) > 4

    class NoTrainData(BoringModule):
        train_dataloader = pl.LightningModule.train_dataloader

    callback = SKMPalettizationCallback(SKM_CFG, when="test_start")
    with pytest.raises(MisconfigurationException, match="calibration needs a train dataloader"):
        trainer(callbacks=[callback]).test(NoTrainData())
