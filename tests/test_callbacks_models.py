"""Small LightningModules, data and state helpers shared by the callback tests (no tests here).

Kept in an importable module (not a conftest) so ``ddp_spawn`` workers can unpickle them.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DKM_CFG = {"global_config": {"n_bits": 2, "weight_threshold": 0}}
KMEANS = {"global_config": {"n_bits": 2}}
SKM = {"global_config": {"n_bits": 2}, "calibration_nsamples": 2}


def trainer(**kwargs) -> pl.Trainer:
    """A quiet CPU Trainer; keyword arguments override the defaults."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def boring_data(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].sum(1, keepdim=True) > 0).float() * x[:, 4:8]
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class BoringModule(pl.LightningModule):
    """Two Linear layers, MSE, Adam: BoringModel-style, deterministic data order."""

    def __init__(self, hidden: int = 32, lr: float = 1e-2, n_batches: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        return boring_data(8 * self.hparams.n_batches)

    def val_dataloader(self):
        return boring_data(16, seed=1)

    def test_dataloader(self):
        return boring_data(16, seed=2)

    def predict_dataloader(self):
        return boring_data(16, seed=2)


def digits_tensors():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    return x, torch.tensor(d.target)


class DigitsData(pl.LightningDataModule):
    """load_digits, fixed split; the train set is only built in setup("fit")."""

    def __init__(self, batch_size: int = 64, n_train: int = 512) -> None:
        super().__init__()
        self.batch_size, self.n_train = batch_size, n_train

    def setup(self, stage: str) -> None:
        x, y = digits_tensors()
        if stage == "fit":
            self.train_set = TensorDataset(x[: self.n_train], y[: self.n_train])
        self.val_set = TensorDataset(x[1200:1500], y[1200:1500])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=100)

    def test_dataloader(self):
        return DataLoader(self.val_set, batch_size=100)


class DigitsCNN(pl.LightningModule):
    """A small CNN on 8x8 digits with torchmetrics accuracy in validation/test."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        import torchmetrics

        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU()
        )
        self.head = nn.Linear(16 * 6 * 6, 10)
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(
            num_classes=10, average="micro"
        )
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(
            num_classes=10, average="micro"
        )

    def forward(self, x):
        return self.head(self.features(x).flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return {"loss": loss}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


_TRAINED: dict[str, dict] = {}


def trained_digits_cnn(epochs: int = 4) -> DigitsCNN:
    """A DigitsCNN trained for a few epochs (cached per process: tests get a fresh copy)."""
    key = f"e{epochs}"
    if key not in _TRAINED:
        pl.seed_everything(0, verbose=False)
        model = DigitsCNN()
        trainer(max_epochs=epochs).fit(model, datamodule=DigitsData())
        _TRAINED[key] = {k: v.clone() for k, v in model.state_dict().items()}
    model = DigitsCNN()
    model.load_state_dict(_TRAINED[key])
    return model


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters only (what a user compares), cloned."""
    return {k: v.detach().clone() for k, v in module.named_parameters()}


class LUTRecorder(pl.Callback):
    """Saves, per rank, the DKM centroids after every optimizer step and the final weights.

    Put it after the PalettizationCallback so on_fit_end sees the finalized module.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.luts: dict[int, dict[str, torch.Tensor]] = {}

    def _record(self, trainer, pl_module) -> None:
        self.luts[trainer.global_step] = {
            k: v.detach().clone()
            for k, v in pl_module.state_dict().items()
            if k.endswith("_dkm.centroids") or k.endswith("_dkm.enabled")
        }

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        import os

        final = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(
            {"luts": self.luts, "final": final},
            os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"),
        )


def mse_loss(module: nn.Module, batch) -> torch.Tensor:
    """A loss_fn(module, batch) for SKM, importable by path (LightningCLI / Hydra)."""
    x, y = batch
    return nn.functional.mse_loss(module(x), y)


# -- state_dicts ----------------------------------------------------------------------------------


def _state(state_or_model) -> dict:
    return state_or_model if isinstance(state_or_model, dict) else state_or_model.state_dict()


def coreml_state(state_or_model, prefix: str = "") -> dict[str, torch.Tensor]:
    """Copies of the ``_COREML_`` entries (under ``prefix``) of a state_dict or a module's."""
    state = _state(state_or_model)
    return {k: v.clone() for k, v in state.items() if "_COREML_" in k and k.startswith(prefix)}


def dense_state(state: dict) -> dict:
    """``state`` without its ``_COREML_`` entries."""
    return {k: v for k, v in state.items() if "_COREML_" not in k}


def checkpoint_state(path) -> dict:
    """The module state_dict of a Lightning checkpoint file."""
    return torch.load(path, weights_only=False)["state_dict"]


def ptp_of(state: dict, config=KMEANS, keep: bool = True) -> dict:
    """``state``'s weights (its ``_COREML_`` entries left out) palettized outside the Trainer
    with PostTrainingPalettizer: the state a PTP pass or load gives (without the metadata
    unless ``keep``)."""
    from lightning_palettize import PostTrainingPalettizer

    model = BoringModule(n_batches=4)
    model.load_state_dict(dense_state(state))
    PostTrainingPalettizer(model, config).compress(inplace=True, progress=False)
    expected = model.state_dict()
    return expected if keep else dense_state(expected)


def assert_state(model, expected: dict, what: str = "") -> None:
    """``model``'s state_dict has exactly ``expected``'s keys and equal values."""
    state = model.state_dict()
    assert state.keys() == expected.keys(), what
    for key in expected:
        assert torch.equal(state[key], expected[key]), (what, key)


def holds_its_lut(state_or_model, weight: str) -> bool:
    """The weight (a state_dict name) takes only values of its own ``_COREML_`` lut (no
    per-channel scale here)."""
    state = _state(state_or_model)
    lut = state[weight.replace("weight", "_COREML_/weight/lut")]
    return bool(torch.isin(state[weight].detach(), lut.flatten()).all())


def fit_saving_each_epoch(model, tmp_path, callbacks=(), epochs: int = 2) -> pl.Trainer:
    """Fit ``model`` for ``epochs`` with ``callbacks`` and a ModelCheckpoint file per epoch
    (``tmp_path / "epoch=N.ckpt"``); the Trainer."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"
    )
    t = trainer(max_epochs=epochs, enable_checkpointing=True, callbacks=[*callbacks, checkpoint])
    t.fit(model)
    return t
