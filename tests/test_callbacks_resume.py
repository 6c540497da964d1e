"""Checkpoints of PalettizationCallback runs: resume equality, loading outside the Trainer."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_callbacks_models import BoringModule, trainer

from lightning_palettize import DKMPalettizer
from lightning_palettize.callbacks import (
    PalettizationCallback,
    load_palettized_checkpoint,
    restore_palettization,
)
from lightning_palettize.palettizers.dkm import FakePalettize

# net.0 palettizes from the start, net.2 from optimizer step 6 (in the middle of epoch 1)
CONFIG = {
    "global_config": {"n_bits": 2, "weight_threshold": 0},
    "module_name_configs": {"net\\.2": {"n_bits": 3, "weight_threshold": 0, "milestone": 6}},
}


def _fit(model, ckpt_path=None, dirpath=None, **kwargs):
    callbacks = [PalettizationCallback(CONFIG, verbose=False)]
    if dirpath is not None:
        callbacks.append(ModelCheckpoint(dirpath=dirpath, save_top_k=-1, every_n_epochs=1))
    t = trainer(
        max_epochs=3, enable_checkpointing=dirpath is not None, callbacks=callbacks, **kwargs
    )
    t.fit(model, ckpt_path=ckpt_path)
    return t


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One full 3-epoch run (4 optimizer steps per epoch) saving a checkpoint every epoch."""
    dirpath = tmp_path_factory.mktemp("ckpts")
    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=4)
    _fit(model, dirpath=dirpath)
    ckpts = {p.name.split("-")[0]: p for p in dirpath.glob("*.ckpt")}
    return model, ckpts


@pytest.mark.parametrize("epoch", ["epoch=0", "epoch=1"])  # before / after net.2's milestone
def test_resume_mid_dkm_is_bitwise_equal_to_an_uninterrupted_run(uninterrupted, epoch):
    reference, ckpts = uninterrupted
    pl.seed_everything(123, verbose=False)  # other initial weights: all must come from the ckpt
    resumed = BoringModule(n_batches=4)
    _fit(resumed, ckpt_path=ckpts[epoch])
    ref, got = reference.state_dict(), resumed.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    assert len(torch.unique(got["net.2.weight"])) <= 8


def test_mid_dkm_checkpoint_loads_outside_the_trainer(uninterrupted):
    _, ckpts = uninterrupted
    saved = torch.load(ckpts["epoch=1"], weights_only=True)["state_dict"]
    assert "net.2.weight_dkm.centroids" in saved

    # the one call, from the class (hyper-parameters from the checkpoint) or an instance
    for target in (BoringModule, BoringModule(n_batches=4)):
        model = load_palettized_checkpoint(target, ckpts["epoch=1"])
        assert isinstance(model, BoringModule)
        got = model.state_dict()
        assert got.keys() == saved.keys()
        assert all(torch.equal(got[k], saved[k]) for k in saved)
        assert isinstance(model.net[2].weight_dkm, FakePalettize)

    # a prepared module in eval mode computes with hard-assigned weights; finalize makes it plain
    x = torch.randn(5, 16)
    model.eval()
    with torch.no_grad():
        prepared_out = model(x)
    DKMPalettizer(model).finalize(model, inplace=True)
    assert not any(isinstance(m, FakePalettize) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), prepared_out, atol=1e-6)

    # the on_load_checkpoint pattern makes the stock load_from_checkpoint work too
    class Restoring(BoringModule):
        def on_load_checkpoint(self, checkpoint):
            restore_palettization(self, checkpoint)

    model = Restoring.load_from_checkpoint(ckpts["epoch=1"], weights_only=True)
    assert torch.equal(model.net[2].weight_dkm.centroids, saved["net.2.weight_dkm.centroids"])


def test_checkpoint_after_finalize_loads_into_a_never_prepared_module(uninterrupted, tmp_path):
    reference, _ = uninterrupted  # finalized on fit end
    t = trainer()
    t.strategy.connect(reference)
    path = tmp_path / "final.ckpt"
    t.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    coreml = sorted(k for k in state if "_COREML_" in k)
    assert coreml and not any("_dkm." in k for k in state)

    # strict except for the metadata: the stock loader names exactly those keys
    with pytest.raises(RuntimeError, match="Unexpected key.*_COREML_") as error:
        BoringModule.load_from_checkpoint(path, weights_only=True)
    assert "Missing key" not in str(error.value)
    # keep the metadata (Core ML conversion): the one call registers the buffers first
    model = load_palettized_checkpoint(BoringModule, path)
    assert sorted(k for k in model.state_dict() if "_COREML_" in k) == coreml
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # or drop it
    plain = BoringModule.load_from_checkpoint(path, strict=False, weights_only=True)
    assert torch.equal(plain.net[0].weight, reference.net[0].weight)
    assert not any("_COREML_" in k for k in plain.state_dict())
