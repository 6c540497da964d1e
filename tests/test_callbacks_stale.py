"""A module a PTP / SKM pass palettized, trained again or loaded: its ``_COREML_`` metadata.

1. A second fit trains the palettized weights dense again: with a pass callback attached the
   metadata of the trained weights is removed when training starts, so no checkpoint of that
   fit claims dense weights are palettized; a fit without one writes checkpoints with the stale
   metadata, which the module's load hook recognises and loads as dense weights.
2. A ``load_state_dict`` that fails leaves the module's metadata and the hook's state as they
   were (torch may have copied other tensors already: that is torch's, not undone).
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_callbacks_models import (
    KMEANS,
    SKM,
    BoringModule,
    assert_state,
    checkpoint_state,
    coreml_state,
    dense_state,
    fit_saving_each_epoch,
    holds_its_lut,
    ptp_of,
    trainer,
)

from lightning_palettize import PostTrainingPalettizer
from lightning_palettize.callbacks import (
    PostTrainingPalettizationCallback,
    SKMPalettizationCallback,
    _pass_on_load,
)

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = ("net.0.weight", "net.2.weight")


def _palettized(kind: str = "ptp", cls: type = BoringModule):
    """A module a ``when="fit_end"`` pass palettized, and the pass."""
    pl.seed_everything(0, verbose=False)
    model = cls(n_batches=2)
    callback = (
        PostTrainingPalettizationCallback(KMEANS, verbose=False)
        if kind == "ptp"
        else SKMPalettizationCallback(SKM, verbose=False)
    )
    trainer(max_steps=2, callbacks=[callback]).fit(model)
    assert set(coreml_state(model)) >= {w.replace("weight", "_COREML_/weight/lut") for w in WEIGHTS}
    return model, callback


def _second_fit(model, tmp_path, callbacks=()):
    """Train the module on for 2 epochs, a checkpoint per epoch; the checkpoints' states."""
    t = fit_saving_each_epoch(model, tmp_path, callbacks)
    paths = sorted(tmp_path.glob("epoch=*.ckpt"))
    assert len(paths) == 2
    return t, {p.stem: checkpoint_state(p) for p in paths}


# -- 1. a second fit -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ptp", "skm"])
def test_second_fit_with_the_pass_writes_no_stale_metadata_to_its_checkpoints(tmp_path, kind):
    model, callback = _palettized(kind)
    first = callback.report
    owner = type(callback).__name__
    with pytest.warns(UserWarning, match=rf"{owner}: training starts.*of 2 weight\(s\)"):
        t, states = _second_fit(model, tmp_path, [callback])
    for name, state in states.items():
        assert not coreml_state(state), name  # dense weights, and nothing that claims otherwise
        assert all(len(torch.unique(state[w])) > 4 for w in WEIGHTS), name
    # as documented: the reused callback palettizes the newly trained weights at fit end
    assert callback.report is not first and len(callback.report) == 2
    state = model.state_dict()
    assert all(holds_its_lut(state, w) for w in WEIGHTS)
    if kind == "ptp":  # and a dense checkpoint of that fit is palettized on load as before
        t.test(model, ckpt_path=tmp_path / "epoch=0.ckpt", verbose=False)
        assert_state(model, ptp_of(states["epoch=0"]))


class OnlyFirstLayerTrains(BoringModule):
    def configure_optimizers(self):
        return torch.optim.Adam(self.net[0].parameters(), lr=self.hparams.lr)


@pytest.mark.parametrize("how", ["requires_grad", "optimizer"])
def test_second_fit_keeps_the_metadata_of_weights_it_does_not_train(tmp_path, how):
    model, callback = _palettized(cls=OnlyFirstLayerTrains if how == "optimizer" else BoringModule)
    if how == "requires_grad":  # (else net.2 is in no optimizer)
        model.net[2].requires_grad_(False)
    earlier = coreml_state(model, "net.2.")
    with pytest.warns(UserWarning, match=r"of 1 weight\(s\).*\['net\.0\.weight'\]"):
        _, states = _second_fit(model, tmp_path, [callback])
    for name, state in states.items():
        assert not coreml_state(state, "net.0."), name
        kept = coreml_state(state, "net.2.")
        assert kept.keys() == earlier.keys(), name
        assert all(torch.equal(kept[k], earlier[k]) for k in earlier), name
        assert holds_its_lut(state, "net.2.weight") and "_COREML_/metadata_version" in state


def test_a_fit_without_the_pass_writes_stale_metadata_that_loads_as_dense(tmp_path):
    model, callback = _palettized()
    t, states = _second_fit(model, tmp_path)  # no pass callback: nothing of ours runs
    stale = states["epoch=0"]
    # the limit: the module and its checkpoints keep the first pass's metadata ...
    assert coreml_state(stale) and not holds_its_lut(stale, "net.0.weight")
    expected = ptp_of(stale)
    # ... but loading such a checkpoint does not present the dense weights as palettized
    report = callback.report
    with pytest.warns(UserWarning, match=r"metadata of 2 weight\(s\) does not describe"):
        model.load_state_dict(stale)
    assert_state(model, expected)  # loaded as dense weights, palettized at once (PTP)
    assert callback.report is not report
    # in a stage with the pass, the pass runs on them when the stage starts
    again = trainer(callbacks=[callback])
    with pytest.warns(UserWarning, match="does not describe"):
        again.test(model, ckpt_path=tmp_path / "epoch=1.ckpt", verbose=False)
    assert_state(model, ptp_of(states["epoch=1"]))
    # a state_dict whose metadata describes its weights still loads as it is, even from
    # another module (its values are not ones this module's history knows)
    pl.seed_everything(1, verbose=False)
    other = BoringModule(n_batches=2)
    PostTrainingPalettizer(other, KMEANS).compress(inplace=True, progress=False)
    model.load_state_dict(other.state_dict())
    assert_state(model, other.state_dict())


def test_skm_load_of_stale_metadata_outside_the_trainer_stays_dense(tmp_path):
    model, callback = _palettized("skm")
    _, states = _second_fit(model, tmp_path)
    stale = states["epoch=1"]
    with pytest.warns(UserWarning, match="does not describe"):
        model.load_state_dict(stale)  # (and SKM's "needs calibration data" warning)
    assert_state(model, dense_state(stale))
    assert _pass_on_load(model).pending  # palettized at the next stage with the callback


# -- 2. a load that fails --------------------------------------------------------------------------


def _snapshot(model) -> tuple[dict, dict, bool]:
    hook = _pass_on_load(model)
    return coreml_state(model), {k: list(v) for k, v in hook.weights.items()}, hook.pending


def _assert_unchanged(model, snapshot) -> None:
    metadata, weights, pending = snapshot
    hook = _pass_on_load(model)
    now = coreml_state(model)
    assert now.keys() == metadata.keys()
    assert all(torch.equal(now[k], metadata[k]) for k in metadata)
    assert hook.weights == weights and hook.pending == pending and hook._plan is None


def _broken(state: dict, how: str, prefix: str = "") -> dict:
    """``state`` with a size mismatch, an unexpected key or a missing key in ``net.2``."""
    state = dict(state)
    if how == "size":
        state[f"{prefix}net.2.bias"] = torch.zeros(5)
    elif how == "unexpected":
        state[f"{prefix}net.2.extra"] = torch.zeros(1)
    else:
        del state[f"{prefix}net.2.bias"]
    return state


@pytest.mark.parametrize("how", ["size", "unexpected", "missing"])
def test_a_failed_load_keeps_the_metadata_and_the_hook_state(tmp_path, how):
    model, callback = _palettized()
    dense = dense_state(BoringModule(n_batches=2).state_dict())
    snapshot = _snapshot(model)
    report = callback.report
    message = {"size": "size mismatch", "unexpected": "Unexpected key", "missing": "Missing key"}
    with pytest.raises(RuntimeError, match=message[how]):
        model.load_state_dict(_broken(dense, how))
    _assert_unchanged(model, snapshot)
    assert callback.report is report  # nothing was palettized
    # the same call without strict succeeds (except a size mismatch): palettized on load
    if how != "size":
        expected = ptp_of(dense)
        if how == "missing":  # the module keeps the bias the state_dict lacks
            expected["net.2.bias"] = model.net[2].bias.detach().clone()
        result = model.load_state_dict(_broken(dense, how), strict=False)
        assert result.unexpected_keys == (["net.2.extra"] if how == "unexpected" else [])
        assert_state(model, expected)
    # and a load that works afterwards goes on as ever
    model.load_state_dict(dense)
    assert_state(model, ptp_of(dense))


def test_a_failed_load_through_a_parent_module_keeps_the_metadata():
    model, _ = _palettized()
    parent = torch.nn.ModuleDict({"model": model})
    dense = {
        f"model.{k}": v for k, v in dense_state(BoringModule(n_batches=2).state_dict()).items()
    }
    snapshot = _snapshot(model)
    for how, message in [("size", "size mismatch"), ("unexpected", "Unexpected key")]:
        with pytest.raises(RuntimeError, match=message):
            parent.load_state_dict(_broken(dense, how, prefix="model."))
        _assert_unchanged(model, snapshot)
    parent.load_state_dict({**dense, "extra": torch.zeros(1)}, strict=False)
    assert_state(model, ptp_of({k.removeprefix("model."): v for k, v in dense.items()}))


def test_a_failed_trainer_restore_keeps_the_metadata(tmp_path):
    model, callback = _palettized()
    dense = dense_state(BoringModule(n_batches=2).state_dict())
    checkpoint = {
        "state_dict": _broken(dense, "unexpected"),
        "pytorch-lightning_version": pl.__version__,
    }
    path = tmp_path / "broken.ckpt"
    torch.save(checkpoint, path)
    snapshot = _snapshot(model)
    t = trainer(callbacks=[callback])
    with pytest.raises(RuntimeError, match="Unexpected key"):
        t.test(model, ckpt_path=path, verbose=False)
    _assert_unchanged(model, snapshot)  # not pending: no pass on the next stage
    # Lightning's non-strict loading of the same file succeeds: the pass runs on it
    model.strict_loading = False
    t.test(model, ckpt_path=path, verbose=False)
    assert_state(model, ptp_of(dense))


def test_a_failed_load_removes_the_buffers_it_registered():
    # SKM outside the Trainer leaves a dense load dense, without metadata, pending; a
    # palettized state_dict brings the metadata buffers back, unless its load fails
    model, callback = _palettized("skm")
    palettized = {k: v.clone() for k, v in model.state_dict().items()}
    dense = dense_state(BoringModule(n_batches=2).state_dict())
    with pytest.warns(UserWarning, match="SKM needs calibration data"):
        model.load_state_dict(dense)
    assert not coreml_state(model) and _pass_on_load(model).pending
    snapshot = _snapshot(model)
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(_broken(palettized, "size"))
    _assert_unchanged(model, snapshot)  # no _COREML_ buffer, still pending
    model.load_state_dict(palettized)
    assert_state(model, palettized)
    assert not _pass_on_load(model).pending


def test_a_load_that_raises_between_the_hooks_keeps_the_metadata():
    model, _ = _palettized()
    dense = dense_state(BoringModule(n_batches=2).state_dict())
    snapshot = _snapshot(model)

    def raising(*args):
        raise ValueError("a hook of the user's fails")

    handle = model.net[2].register_load_state_dict_pre_hook(raising)
    with pytest.raises(ValueError, match="the user's"):
        model.load_state_dict(dense)
    handle.remove()
    metadata, weights, pending = snapshot
    now = coreml_state(model)  # the pre-hook changed nothing the post-hook would have to undo
    assert now.keys() == metadata.keys() and all(torch.equal(now[k], metadata[k]) for k in now)
    model.load_state_dict(dense)  # the next load sets the abandoned plan aside
    assert_state(model, ptp_of(dense))


def test_dkm_fit_drops_the_metadata_of_weights_it_trains_without_dkm(tmp_path):
    # DKM on net.0 only, on a module a PTP pass palettized: net.2 trains dense under DKM's fit;
    # its stale metadata goes when training starts (before: at fit end, so this fit's
    # checkpoints held the trained net.2 under the old LUT); net.0's went at setup
    from lightning_palettize.callbacks import PalettizationCallback

    model, _ = _palettized()
    dkm = PalettizationCallback(
        {"module_name_configs": {"net.0": {"n_bits": 2, "weight_threshold": 0}}}, verbose=False
    )
    with pytest.warns(UserWarning, match=r"PalettizationCallback: training starts.*net\.2\.weight"):
        _, states = _second_fit(model, tmp_path, [dkm])
    for name, state in states.items():
        assert not [k for k in coreml_state(state) if k.startswith("net.2.")], name
        assert len(torch.unique(state["net.2.weight"])) > 4, name
    state = model.state_dict()  # finalized: net.0 palettized by DKM, net.2 dense
    assert holds_its_lut(state, "net.0.weight")
    assert not [k for k in coreml_state(state) if k.startswith("net.2.")]


@pytest.mark.parametrize("fault", ["shape", "missing"])
def test_failed_mid_dkm_load_into_a_finalized_module_leaves_it_as_it_was(tmp_path, fault):
    # a finalized module palettizes a mid-DKM state_dict on load (prepare, load, finalize);
    # one that does not fit raises before anything is copied, and the module keeps its
    # finalized weights, metadata, mode and structure (before: left prepared, without metadata)
    from lightning_palettize.callbacks import PalettizationCallback
    from lightning_palettize.palettizers.dkm import _fake_palettizers

    pl.seed_everything(0, verbose=False)
    model = BoringModule(n_batches=2)
    dkm = PalettizationCallback({"global_config": {"n_bits": 2, "weight_threshold": 0}})
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_steps=2, enable_checkpointing=True, callbacks=[dkm, checkpoint]).fit(model)
    mid = checkpoint_state(checkpoint.last_model_path)
    assert any("_dkm." in k for k in mid)
    bad = dict(mid)
    if fault == "shape":
        bad["net.2.bias"] = torch.zeros(5)
    else:
        del bad["net.0.bias"]
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any("_COREML_" in k for k in before)
    match = "size mismatch for net.2.bias" if fault == "shape" else r"Missing key.*net\.0\.bias"
    with pytest.raises(RuntimeError, match=match):
        model.load_state_dict(bad)
    assert_state(model, before)
    assert not list(_fake_palettizers(model)) and not model.training
    model.load_state_dict(mid)  # and the checkpoint itself still loads, palettized
    assert holds_its_lut(model.state_dict(), "net.0.weight")
    assert not list(_fake_palettizers(model))


def test_skm_state_dict_with_its_outliers_loads_with_its_metadata():
    # SKM's outlier_fraction keeps that fraction of each weight exact: a state_dict saved after
    # such a pass (here another module's, so not one this hook recorded) holds its LUT's
    # values but for those, and loads with its metadata, not as stale dense weights
    config = {"global_config": {"n_bits": 2, "outlier_fraction": 0.1}, "calibration_nsamples": 2}

    def palettized(seed):
        pl.seed_everything(seed, verbose=False)
        model = BoringModule(n_batches=2)
        callback = SKMPalettizationCallback(config, verbose=False)
        trainer(max_steps=2, callbacks=[callback]).fit(model)
        return model

    a, b = palettized(0), palettized(1)
    state = b.state_dict()
    lut = state["net.0._COREML_/weight/lut"].flatten()
    assert float((~torch.isin(state["net.0.weight"], lut)).float().mean()) > 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "does not describe their values" warning
        a.load_state_dict(state)
    assert_state(a, state)
