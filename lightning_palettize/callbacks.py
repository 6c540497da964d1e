r"""
Lightning callbacks
===================

One callback turns an unchanged LightningModule into a palettized one:

- :class:`PalettizationCallback`: DKM (differentiable k-means) during ``trainer.fit``, with
  checkpoint resume, gradient accumulation, mixed precision and DDP.
- :class:`PostTrainingPalettizationCallback`: data-free k-means at the end of fit or at the start
  of ``trainer.validate`` / ``test`` / ``predict``.
- :class:`SKMPalettizationCallback`: sensitivity-weighted k-means, calibrated with the module's
  own ``training_step`` loss, at the same moments.

Every pass reports to each logger of ``trainer.loggers`` (rank zero only): scalars (per-layer
relative error, overall compression ratio, bytes before/after) and the per-layer table (a CSV
next to CSVLogger's metrics, a markdown text entry in TensorBoard, a W&B table, an MLflow
artifact), plus one console table.

Checkpoints: a checkpoint saved mid-DKM holds the DKM buffers (``<param>_dkm.centroids`` ...)
and loads with :func:`load_palettized_checkpoint`; one saved after palettization holds plain
weights plus the ``_COREML_`` metadata buffers, and loads into a freshly built module with
:func:`load_palettized_checkpoint` (metadata kept) or ``Module.load_from_checkpoint(path,
strict=False)`` (metadata dropped); with ``keep_coreml_metadata=False`` it loads strictly
anywhere. Inside a LightningModule, :func:`restore_palettization` in ``on_load_checkpoint``
makes plain ``load_from_checkpoint`` work for both.
"""

import importlib
import io
import logging
import os
import re
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import Metric
from typing_extensions import override

from lightning_palettize.config import (
    DKMPalettizerConfig,
    PostTrainingPalettizerConfig,
    SKMPalettizerConfig,
    load_config,
)
from lightning_palettize.export import _OUTLIER_WARN_FRACTION, _coreml_fields, _fit_palette
from lightning_palettize.palettizers._common import (
    COREML_PREFIX,
    METADATA_VERSION_KEY,
    remove_coreml_metadata,
    strip_coreml_metadata,
)
from lightning_palettize.palettizers.dkm import DKMPalettizer, FakePalettize, _attached
from lightning_palettize.palettizers.post_training import PostTrainingPalettizer
from lightning_palettize.palettizers.skm import SKMPalettizer
from lightning_palettize.report import PalettizationReport

__all__ = [
    "PalettizationCallback",
    "PostTrainingPalettizationCallback",
    "SKMPalettizationCallback",
    "load_palettized_checkpoint",
    "restore_palettization",
]

log = logging.getLogger(__name__)

_DKM_STATE_KIND = "lightning_palettize.dkm"
_DKM_KEY = re.compile(r"(^|\.)[^.]+_dkm\.(centroids|scale|enabled|steps)$")
_MOMENTS = ("fit_end", "validate_start", "test_start", "predict_start")
# the Trainer stage (``setup(stage=...)``) each moment happens in
_MOMENT_STAGE = {"fit_end": "fit", "validate_start": "validate", "test_start": "test"}
_MOMENT_STAGE["predict_start"] = "predict"
# set on an exception raised by the user's code we call (training_step, loss_fn), so that it is
# not relabelled as a configuration error
_USER_CODE = "_lightning_palettize_user_code"
# Strategies that shard parameters: a per-weight LUT needs the whole weight on every rank.
_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


# ----------------------------------------------------------------------------------------------
# argument checks (MisconfigurationException naming owner, key, value and what is accepted)


def _bad(owner: str, key: str, value: Any, accepted: str) -> MisconfigurationException:
    return MisconfigurationException(f"{owner}: {key}={value!r} is invalid; accepted: {accepted}")


def _check_bool(owner: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(owner, key, value, "True or False")
    return value


def _check_int(owner: str, key: str, value: Any, optional: bool = True) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(owner, key, value, "an int >= 0" + (" or None" if optional else ""))
    return value


def _check_choice(owner: str, key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _bad(owner, key, value, ", ".join(repr(c) for c in choices))
    return value


def _import_object(owner: str, key: str, path: str) -> Any:
    """``"pkg.mod.attr"`` or ``"pkg.mod:attr"`` (attr may be dotted: ``"mod:Cls.fn"``)."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise _bad(
            owner, key, path, "a callable, or its import path 'pkg.module.name' / 'pkg.module:name'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as error:
        raise MisconfigurationException(
            f"{owner}: {key}={path!r} cannot be imported ({type(error).__name__}: {error}); "
            "accepted: the import path of a callable, 'pkg.module.name' or 'pkg.module:name', "
            "importable from the running process (check sys.path / PYTHONPATH)"
        ) from error
    return obj


def _load(owner: str, config: Any, cls: type) -> Any:
    try:
        return load_config(config, cls)
    except (TypeError, ValueError) as error:
        raise MisconfigurationException(f"{owner}: config: {error}") from error


def _reject_sharded(trainer: "Trainer", owner: str) -> None:
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, _SHARDED):
        raise MisconfigurationException(
            f"{owner}: strategy {type(strategy).__name__} shards parameters, which palettization "
            "does not support yet (every rank needs whole weights to cluster them); accepted: "
            "single-device or DDP strategy='ddp'"
        )


def _reject_spawn(trainer: "Trainer", owner: str) -> None:
    """ddp_spawn / ddp_fork / ddp_notebook: the palettized module stays in the worker processes.

    Lightning sends the workers' weights back to the main process with a non-strict
    ``load_state_dict`` into the main process's (never palettized) module, which drops the
    ``_COREML_`` metadata, and no callback hook runs in the main process afterwards (the
    callback's report stays in the workers too).
    """
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    if isinstance(launcher, _MultiProcessingLauncher):
        raise MisconfigurationException(
            f"{owner}: strategy {type(trainer.strategy).__name__} with start method "
            f"{launcher._start_method!r} (ddp_spawn / ddp_fork / ddp_notebook) runs the Trainer "
            "in worker processes and hands at most the weights back, so the main process would "
            "lose the "
            "Core ML metadata (_COREML_ buffers) and the palettization report; accepted: "
            "strategy='ddp' (the main process is rank 0), or a single device"
        )


# ----------------------------------------------------------------------------------------------
# reports: scalars and tables to every logger, one console table


def _report_scalars(report: PalettizationReport, kind: str) -> dict[str, float]:
    summary = report.summary()
    prefix = f"palettization/{kind}"
    scalars = {
        f"{prefix}/compression_ratio": float(summary["compression_ratio"]),
        f"{prefix}/bytes_before": float(summary["bytes_before"]),
        f"{prefix}/bytes_after": float(summary["bytes_after"]),
        f"{prefix}/mean_rel_error": float(summary["mean_rel_error"]),
    }
    for row in report.rows:
        scalars[f"{prefix}/rel_error/{row.name}"] = float(row.rel_error)
    return scalars


def _log_table(logger: Any, report: PalettizationReport, kind: str, step: int) -> bool:
    """Write the per-layer table the way ``logger`` shows tables; False if it has no way."""
    tag = f"palettization/{kind}/report"
    if isinstance(logger, CSVLogger):
        os.makedirs(logger.log_dir, exist_ok=True)
        path = os.path.join(logger.log_dir, f"palettization_{kind}_step{step}.csv")
        with open(path, "w", newline="") as f:
            f.write(report.to_csv())
        return True
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(tag, report.to_table(markdown=True), global_step=step)
        logger.experiment.flush()
        return True
    if isinstance(logger, WandbLogger):
        rows = report.as_dicts()
        columns = list(rows[0]) if rows else ["name"]
        logger.log_table(key=tag, columns=columns, data=[list(r.values()) for r in rows], step=step)
        return True
    if isinstance(logger, MLFlowLogger):
        base = f"palettization/{kind}_report_step{step}"
        logger.experiment.log_text(logger.run_id, report.to_csv(), f"{base}.csv")
        logger.experiment.log_text(logger.run_id, report.to_table(markdown=True), f"{base}.md")
        return True
    return False


def _publish(
    trainer: "Trainer",
    report: PalettizationReport,
    kind: str,
    title: str,
    *,
    extra: Mapping[str, float] | None = None,
    verbose: bool = True,
    after_teardown: bool = False,
) -> None:
    """Send one pass's report to every logger at the current step, and one console table.

    Rank zero only (the loggers are rank-zero-only themselves; the guard also keeps the console
    table single). ``after_teardown``: the Trainer already finalized its loggers (we are in
    ``on_fit_end``), so finalize them again to flush what we wrote.
    """
    if not trainer.is_global_zero:
        return
    if not len(report):
        rank_zero_info(f"{title}: no weight was palettized")
        return
    step = int(trainer.global_step)
    scalars = _report_scalars(report, kind)
    scalars.update(extra or {})
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=step)
        _log_table(logger, report, kind, step)
        if after_teardown:
            logger.finalize("success")
        else:
            logger.save()
    if verbose:
        lines = [f"{title} (step {step})", report.to_table()]
        if extra:
            lines += [f"  {k} = {v:.6g}" for k, v in extra.items()]
        rank_zero_info("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# running a LightningModule's own steps outside the Trainer's loops


class _LogCapture:
    """Stands in for ``LightningModule.log`` / ``log_dict`` while we run validation_step ourselves.

    torchmetrics objects are kept and computed at the end of each dataloader (so the module's
    own metrics, with their own reduction, give the number); plain values are averaged over
    samples. With several dataloaders every name gets Lightning's ``/dataloader_idx_N`` suffix
    (unless logged with ``add_dataloader_idx=False``).
    """

    def __init__(self) -> None:
        self.metrics: dict[str, Any] = {}
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.done: dict[str, float] = {}
        self.batch_size = 1
        self.suffix = ""

    def log(
        self,
        name: str,
        value: Any,
        *args: Any,
        batch_size: int | None = None,
        add_dataloader_idx: bool = True,
        **_: Any,
    ) -> None:
        if add_dataloader_idx:
            name += self.suffix
        if isinstance(value, Metric):
            self.metrics[name] = value
            return
        n = batch_size or self.batch_size
        self.sums[name] = self.sums.get(name, 0.0) + float(value) * n
        self.counts[name] = self.counts.get(name, 0) + n

    def log_dict(self, dictionary: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        for name, value in dictionary.items():
            self.log(
                name,
                value,
                batch_size=kwargs.get("batch_size"),
                add_dataloader_idx=kwargs.get("add_dataloader_idx", True),
            )

    def end_dataloader(self) -> None:
        """Compute (and forget) the torchmetrics objects logged from the dataloader just run."""
        for name, metric in self.metrics.items():
            value = metric.compute()
            if isinstance(value, Tensor) and value.numel() == 1:  # scalar metrics only
                self.done[name] = float(value)
            metric.reset()
        self.metrics = {}

    def results(self) -> dict[str, float]:
        self.end_dataloader()
        out = {name: self.sums[name] / max(self.counts[name], 1) for name in self.sums}
        out.update(self.done)
        return out


@contextmanager
def _module_logging(pl_module: LightningModule, capture: _LogCapture | None) -> Iterator[None]:
    """Route (or, with ``capture=None``, silence) ``self.log`` of the module for a while.

    ``self.log`` is not allowed from the hooks we run in, and calibration must not add training
    metrics to the user's logs.
    """
    noop = lambda *args, **kwargs: None
    saved = {k: pl_module.__dict__[k] for k in ("log", "log_dict") if k in pl_module.__dict__}
    pl_module.__dict__["log"] = capture.log if capture else noop
    pl_module.__dict__["log_dict"] = capture.log_dict if capture else noop
    try:
        yield
    finally:
        for k in ("log", "log_dict"):
            pl_module.__dict__.pop(k, None)
        pl_module.__dict__.update(saved)


def _reset_metrics(pl_module: nn.Module) -> None:
    for module in pl_module.modules():
        if isinstance(module, Metric):
            module.reset()


def _to_module_device(
    trainer: "Trainer", pl_module: LightningModule, batch: Any, dataloader_idx: int = 0
) -> Any:
    """What Lightning's loops do to a batch before a step: the precision plugin's input
    conversion (``"bf16-true"`` / ``"16-true"`` / ``"64-true"`` cast float inputs to the module's
    dtype), then the module's own transfer hooks, to wherever the module is now (CPU in
    ``on_fit_end``)."""
    plugin = getattr(trainer, "precision_plugin", None)
    if plugin is not None:
        batch = plugin.convert_input(batch)
    batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=dataloader_idx)
    return pl_module._apply_batch_transfer_handler(
        batch, device=pl_module.device, dataloader_idx=dataloader_idx
    )


def _dataloader(trainer: "Trainer", kind: Literal["train", "val"], owner: str, what: str) -> Any:
    """The train / val dataloader the user gave the Trainer (datamodule, module hook or fit arg).

    In validate/test/predict a datamodule may build its train set only in ``setup("fit")``:
    then that is called once and the hook retried.
    """
    loop = trainer.fit_loop if kind == "train" else trainer.fit_loop.epoch_loop.val_loop
    sources = [loop._data_source]
    if kind == "val":
        sources.append(trainer.validate_loop._data_source)
    for source in sources:
        if source.instance is None or not source.is_defined():
            continue
        try:
            return source.dataloader()
        except AttributeError:
            datamodule = trainer.datamodule
            if datamodule is None or trainer.state.fn == TrainerFn.FITTING:
                raise
            datamodule.setup("fit")
            return source.dataloader()
    raise MisconfigurationException(
        f"{owner}: {what} needs a {kind} dataloader and found none; accepted: a datamodule or "
        f"LightningModule with {kind}_dataloader(), {kind} dataloaders passed to trainer.fit, or "
        f"the callback's own {'calibration' if kind == 'train' else 'compare'}_dataloader=..."
    )


@contextmanager
def _step_context(trainer: "Trainer", train: bool) -> Iterator[None]:
    plugin = getattr(trainer, "precision_plugin", None)
    if plugin is None:
        yield
        return
    with plugin.train_step_context() if train else plugin.val_step_context():
        yield


def _val_loaders(dataloader: Any, from_trainer: bool) -> list[Iterable[Any]]:
    """The dataloaders of a validation source, in Lightning's order (``dataloader_idx``).

    From the Trainer, a list/tuple/dict is several dataloaders (as in Lightning's loops), and a
    ``CombinedLoader`` is flattened. A ``compare_dataloader`` given to the callback is one
    iterable of batches, unless it is a ``CombinedLoader`` or a list/tuple/dict of DataLoaders.
    """
    if isinstance(dataloader, CombinedLoader):
        return list(dataloader.flattened)
    values = list(dataloader.values()) if isinstance(dataloader, Mapping) else dataloader
    if isinstance(dataloader, (list, tuple, Mapping)) and (
        from_trainer or (values and all(isinstance(v, DataLoader) for v in values))
    ):
        return list(values)
    return [dataloader]


def _evaluate(
    trainer: "Trainer", pl_module: LightningModule, dataloader: Any, from_trainer: bool = True
) -> dict:
    """Run ``validation_step`` over the dataloader(s) in eval mode; the logged values, reduced.

    Several dataloaders are run one after the other, as Lightning's validation loop does:
    ``validation_step(batch, batch_idx, dataloader_idx)`` and per-dataloader metric names
    (``<name>/dataloader_idx_<N>``).
    """
    loaders = _val_loaders(dataloader, from_trainer)
    several = len(loaders) > 1
    if several and not is_param_in_hook_signature(pl_module.validation_step, "dataloader_idx"):
        raise MisconfigurationException(
            f"compare=True: there are {len(loaders)} validation dataloaders but "
            f"{type(pl_module).__name__}.validation_step() has no `dataloader_idx` argument; "
            "add `dataloader_idx=0` to its signature, or pass compare_dataloader=<one loader>"
        )
    capture = _LogCapture()
    was_training = pl_module.training
    pl_module.eval()
    _reset_metrics(pl_module)
    try:
        with torch.no_grad(), _module_logging(pl_module, capture), _step_context(trainer, False):
            for loader_idx, loader in enumerate(loaders):
                capture.suffix = f"/dataloader_idx_{loader_idx}" if several else ""
                for index, batch in enumerate(loader):
                    try:
                        capture.batch_size = extract_batch_size(batch)
                    except Exception:  # batch of an unknown structure: count batches instead
                        capture.batch_size = 1
                    batch = _to_module_device(trainer, pl_module, batch, loader_idx)
                    if several:
                        pl_module.validation_step(batch, index, loader_idx)
                    else:
                        pl_module.validation_step(batch, index)
                capture.end_dataloader()
        return capture.results()
    finally:
        _reset_metrics(pl_module)
        pl_module.train(was_training)


class _TrainBatches:
    """The batches ``training_step`` gets from the Trainer's training data (re-iterable).

    Several train dataloaders (a list/tuple/dict) are combined as Lightning combines them (its
    default mode ``"max_size_cycle"``: each batch is a list/dict with one batch per
    dataloader); a ``CombinedLoader`` keeps its own mode.
    """

    def __init__(self, dataloader: Any) -> None:
        if isinstance(dataloader, (list, tuple, Mapping)):
            dataloader = CombinedLoader(dataloader, "max_size_cycle")
        self.dataloader = dataloader

    def __iter__(self) -> Iterator[Any]:
        loader = self.dataloader
        if not isinstance(loader, CombinedLoader):
            yield from loader
            return
        for item in loader:  # (batch, batch_idx, dataloader_idx)
            yield item[0]


def _broadcast_from_rank_zero(trainer: "Trainer", pl_module: nn.Module, keys: list[str]) -> None:
    """Copy rank 0's values of these state_dict entries to every rank (no-op on one process)."""
    if getattr(trainer, "world_size", 1) <= 1 or not keys:
        return
    state = pl_module.state_dict()
    payload = {k: state[k].detach().cpu() for k in keys}
    payload = trainer.strategy.broadcast(payload, src=0)
    with torch.no_grad():
        for k, value in payload.items():
            state[k].copy_(value.to(state[k].device))


# ----------------------------------------------------------------------------------------------
# Core ML metadata an earlier palettization left on the module


def _remove_metadata(module: nn.Module, weights: Iterable[str]) -> None:
    """Remove the ``_COREML_`` buffers of these weights (state_dict names), and the root's
    ``_COREML_/metadata_version`` once no weight has any."""
    modules = dict(module.named_modules(remove_duplicate=False))
    for key in weights:
        path, _, param_name = key.rpartition(".")
        owner = modules.get(path)
        if owner is not None:
            remove_coreml_metadata(owner, param_name)
    if not any(
        name.startswith(COREML_PREFIX) and (child is not module or name != METADATA_VERSION_KEY)
        for child in module.modules()
        for name in child._buffers
    ):
        module._buffers.pop(METADATA_VERSION_KEY, None)


def _drop_stale_metadata(module: nn.Module, owner: str, fresh: Iterable[str]) -> list[str]:
    """Remove the ``_COREML_`` metadata that no longer describes its weight; the weights named.

    The weights in ``fresh`` were just palettized (their metadata is new). Any other weight's
    LUT metadata comes from an earlier palettization: it stays where the weight still holds
    exactly the values of that LUT (e.g. a frozen layer), and is removed, with a warning, where
    it does not (the weight was trained or loaded since: Core ML would rebuild it from the
    stale LUT). The weight then stays dense in Core ML.
    """
    fresh = set(fresh)
    state = module.state_dict()
    stale = []
    for key, fields in _coreml_fields(state).items():
        weight = state.get(key)
        if key in fresh or "lut" not in fields.tensors or not isinstance(weight, Tensor):
            continue
        if not _holds_lut_values(owner, key, weight, fields, 0.0):
            stale.append(key)
    if stale:
        _remove_metadata(module, stale)
        rank_zero_warn(
            f"{owner}: removed the _COREML_ metadata an earlier palettization left on "
            f"{len(stale)} weight(s) whose values no longer match its LUT (trained or loaded "
            f"since): {stale[:5]}{' ...' if len(stale) > 5 else ''}; Core ML keeps them dense; "
            "to palettize them, select them in this callback's config"
        )
    return stale


def _holds_lut_values(owner: str, key: str, weight: Tensor, fields: Any, allowed: float) -> bool:
    """Whether ``weight`` holds the values of the ``_COREML_`` LUT ``fields`` (an entry of
    ``_coreml_fields``) describes, all its elements but at most the fraction ``allowed`` (0:
    exactly). A dense weight, trained since or saved with the metadata of an earlier
    palettization, misses nearly all of them."""
    try:
        fit = _fit_palette(owner, key, weight, fields)
    except ValueError:
        return False
    return fit.outlier_index.numel() <= allowed * weight.numel()


def _largest(config: Any, key: str) -> float:
    """The largest value of ``key`` anywhere in ``config.as_dict()`` (0 without one)."""

    def walk(value: Any) -> float:
        if isinstance(value, Mapping):
            own = value.get(key)
            here = float(own) if isinstance(own, (int, float)) else 0.0
            return max([here, *(walk(v) for v in value.values())])
        if isinstance(value, (list, tuple)):
            return max([0.0, *(walk(v) for v in value)])
        return 0.0

    as_dict = getattr(config, "as_dict", None)
    return walk(as_dict()) if callable(as_dict) else 0.0


def _trained_weights(trainer: "Trainer", module: nn.Module) -> set[str]:
    """The state_dict names of the parameters ``trainer.fit`` trains: those that require grad
    and, when the optimizers hold any parameter, are among the optimizers' parameters."""
    optimized = {
        id(param)
        for optimizer in getattr(trainer, "optimizers", None) or []
        for group in getattr(optimizer, "param_groups", None) or []
        for param in group.get("params", [])
    }
    return {
        name
        for name, param in module.named_parameters(remove_duplicate=False)
        if param.requires_grad and (not optimized or id(param) in optimized)
    }


def _drop_trained_metadata(trainer: "Trainer", module: nn.Module, owner: str, again: str) -> None:
    """Remove, with a warning (``again``: what becomes of them), the ``_COREML_`` metadata of
    the weights ``trainer.fit`` trains (:func:`_trained_weights`): it describes a weight only
    until the weight is trained, and this fit's checkpoints would hold the trained, dense
    weights under the old LUT (a wrong Core ML model if exported)."""
    trained = _trained_weights(trainer, module)
    carried = [key for key in _coreml_fields(module.state_dict()) if key in trained]
    if not carried:
        return
    _remove_metadata(module, carried)
    rank_zero_warn(
        f"{owner}: training starts on a module palettized before: removed the _COREML_ "
        f"metadata of {len(carried)} weight(s) the optimizers train, which would describe the "
        "trained weights (and this fit's checkpoints) with the old LUT: "
        f"{carried[:5]}{' ...' if len(carried) > 5 else ''}; {again}"
    )


# ----------------------------------------------------------------------------------------------
# DKM during fit


def _fake_palettizers(module: nn.Module) -> list[tuple[str, FakePalettize]]:
    out = []
    for name, child in module.named_modules():
        if isinstance(child, FakePalettize):
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            out.append((f"{owner}.{child.param_name}" if owner else child.param_name, child))
    return out


def _shift_milestones(config: DKMPalettizerConfig, by: int) -> DKMPalettizerConfig:
    """The same config with every module milestone + ``by``."""

    def shift(value: Any) -> Any:
        if isinstance(value, list):
            return [shift(v) for v in value]
        if isinstance(value, dict):
            return {**value, "milestone": value.get("milestone", 0) + by}
        return value

    data = config.as_dict()  # (coremltools' default table, if any, is in it as entries)
    data["global_config"] = shift(data["global_config"])
    for key in ("module_type_configs", "module_name_configs"):
        data[key] = {k: shift(v) for k, v in data[key].items()}
    return DKMPalettizerConfig.from_dict(data)


class PalettizationCallback(Callback):
    r"""Palettize a LightningModule with DKM (differentiable k-means) while ``trainer.fit`` trains.

    Hooks, and why each is where it is:

    - ``setup(stage="fit")``: attaches DKM to the selected weights *in place*
      (:meth:`DKMPalettizer.prepare`), before Lightning restores a checkpoint (so a mid-DKM
      checkpoint finds its buffers) and before DDP wraps the module and optimizers are built.
    - ``on_train_batch_end``: when ``trainer.global_step`` advanced (an optimizer step happened,
      so gradient accumulation is respected), sets the DKM step to it; weights whose milestone
      is reached start palettizing. ``global_step`` is restored on resume, so is the schedule.
    - ``on_fit_end``: hard-assigns every weight, removes the DKM hooks and buffers, and attaches
      the Core ML metadata: the module is a plain palettized LightningModule again.

    Milestones: per weight in optimizer steps (``milestone`` of the module config), and
    optionally in epochs: with ``milestone_epochs=E`` nothing palettizes before epoch ``E``
    (0-based) starts, and the step milestones count from there.

    Resume: ``trainer.fit(model, ckpt_path=...)`` with a checkpoint saved mid-DKM continues
    bitwise identically (on CPU, same seed and data order) to an uninterrupted run. Outside the
    Trainer, load such a checkpoint with :func:`load_palettized_checkpoint`. (A checkpoint saved
    after finalize holds no DKM state: it is not for resuming DKM.)

    Checkpoints after palettization: ModelCheckpoint saves during training, i.e. mid-DKM; save
    the finalized module with ``trainer.save_checkpoint(path)`` after fit. It loads into a freshly
    built module with :func:`load_palettized_checkpoint` (keeping the ``_COREML_`` metadata
    ``coremltools.convert`` reads), or strictly with ``load_from_checkpoint`` when the callback
    has ``keep_coreml_metadata=False``.

    Joint pruning (``ModelPruning``): prune first, palettize second. Put the callbacks in that
    order (``callbacks=[ModelPruning(...), PalettizationCallback(...)]``), let ModelPruning make
    its pruning permanent (the default, in ``on_train_end``) before this callback finalizes in
    ``on_fit_end``, and set ``enforce_zero: true`` so pruned zeros keep an exact zero centroid.
    While both are active, the pruning mask is applied on top of the palettized weight.

    Distributed: DDP (``strategy="ddp"``) is supported; the centroids are broadcast from rank 0
    whenever weights start palettizing, and DDP keeps the buffers in sync. ``ddp_spawn`` /
    ``ddp_fork`` / ``ddp_notebook`` are rejected in ``setup``: they hand only the weights back to
    the main process, which would lose the ``_COREML_`` metadata and the report. FSDP,
    DeepSpeed and ModelParallel are rejected in ``setup`` too.

    Args:
        config: a :class:`~lightning_palettize.DKMPalettizerConfig`, a dict of its arguments, an
            OmegaConf DictConfig, a YAML file path, or ``None`` (coremltools' defaults).
        milestone_epochs: start palettizing at the start of this epoch (0-based; step
            milestones then count from it); ``None``: step milestones only.
        finalize_on_fit_end: finalize in ``on_fit_end``; with ``False`` the module stays
            prepared (call ``callback.palettizer.finalize(inplace=True)`` later).
        keep_coreml_metadata: keep the ``_COREML_`` buffers after finalize; ``False`` strips them
            (the state_dict then loads strictly into a never-palettized module, but
            ``coremltools.convert`` no longer emits LUT ops).
        log_every_n_steps: log the scalars of the DKM state every this many optimizer steps
            (``None``: the Trainer's ``log_every_n_steps``; 0: only at the end).
        verbose: print the console table at the end.

    Raises:
        MisconfigurationException: for a bad argument, naming it, its value and what is
            accepted; in ``setup`` for a sharded strategy or a config that does not fit the
            module's weights.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_palettize.callbacks import PalettizationCallback
        >>> callback = PalettizationCallback(
        ...     {"global_config": {"n_bits": 4, "milestone": 100, "weight_threshold": 1024}}
        ... )
        >>> trainer = pl.Trainer(max_epochs=3, callbacks=[callback])  # doctest: +SKIP
        >>> trainer.fit(model)  # doctest: +SKIP
        >>> trainer.save_checkpoint("palettized.ckpt")  # doctest: +SKIP
    """

    _OWNER: ClassVar[str] = "PalettizationCallback"

    def __init__(
        self,
        config: dict[str, Any] | str | DKMPalettizerConfig | None = None,
        *,
        milestone_epochs: int | None = None,
        finalize_on_fit_end: bool = True,
        keep_coreml_metadata: bool = True,
        log_every_n_steps: int | None = None,
        verbose: bool = True,
    ) -> None:
        owner = self._OWNER
        self._config: DKMPalettizerConfig = _load(owner, config, DKMPalettizerConfig)
        self._milestone_epochs = _check_int(owner, "milestone_epochs", milestone_epochs)
        self._finalize_on_fit_end = _check_bool(owner, "finalize_on_fit_end", finalize_on_fit_end)
        self._keep_metadata = _check_bool(owner, "keep_coreml_metadata", keep_coreml_metadata)
        self._log_every_n_steps = _check_int(owner, "log_every_n_steps", log_every_n_steps)
        self._verbose = _check_bool(owner, "verbose", verbose)
        # With an epoch milestone every step milestone moves up by one: nothing starts in
        # prepare, and "DKM step 1" is the start of epoch E (see _advance).
        self._effective = (
            self._config if self._milestone_epochs is None else _shift_milestones(self._config, 1)
        )
        self._palettizer: DKMPalettizer | None = None
        self._epoch_start_step: int | None = None
        self._last_step = -1
        self._report: PalettizationReport | None = None

    @property
    def config(self) -> DKMPalettizerConfig:
        """The validated config, as given."""
        return self._config

    @property
    def palettizer(self) -> DKMPalettizer | None:
        """The palettizer of the current fit (``None`` before setup and after finalize)."""
        return self._palettizer

    @property
    def report(self) -> PalettizationReport | None:
        """The report of the last finalize (``None`` before)."""
        return self._report

    # -- hooks ---------------------------------------------------------------------------------

    @override
    def setup(self, trainer: "Trainer", pl_module: LightningModule, stage: str) -> None:
        """Called when fit/validate/test/predict begins: on fit, attach DKM to the module.

        Runs before checkpoint restore and DDP wrapping (see the class docstring). A module
        that is already prepared (a previous fit with ``finalize_on_fit_end=False``, or
        :func:`load_palettized_checkpoint`) is taken over as it is. A module finalized by a
        previous fit is prepared again without the ``_COREML_`` metadata of the weights DKM
        trains (``on_fit_end`` writes it anew), so it resumes a mid-DKM checkpoint
        (``ckpt_path=...``) as a freshly built module does.
        """
        if stage != TrainerFn.FITTING.value:
            return
        _reject_sharded(trainer, self._OWNER)
        _reject_spawn(trainer, self._OWNER)
        if is_overridden("configure_model", pl_module):
            rank_zero_warn(
                f"{self._OWNER}: the module overrides configure_model(); it is called now, before "
                "prepare, so the layers it builds can be palettized; make it idempotent"
            )
            pl_module.configure_model()
        self._epoch_start_step, self._last_step, self._report = None, -1, None
        palettizer = DKMPalettizer(pl_module, self._effective)
        if _fake_palettizers(pl_module):
            palettizer._prepared = pl_module  # adopt: prepare would attach a second set
            rank_zero_info(f"{self._OWNER}: the module is already prepared; continuing DKM")
        else:
            try:
                palettizer.prepare(inplace=True)
            except ValueError as error:
                raise MisconfigurationException(f"{self._OWNER}: {error}") from error
        prepared = _fake_palettizers(pl_module)
        # A module finalized before (a previous fit): the _COREML_ metadata of the weights DKM
        # trains again is stale (finalize writes new), and the module must have the structure
        # of a freshly prepared one for a mid-DKM checkpoint (ckpt_path=...) to load strictly.
        _remove_metadata(pl_module, [name for name, _ in prepared])
        hook = _pass_on_load(pl_module)
        if hook is not None:  # DKM palettizes the module from now on
            hook.disarm()
        if not prepared:
            rank_zero_warn(
                f"{self._OWNER}: the config selects no weight of {type(pl_module).__name__} "
                "(check weight_threshold and the module names/types); nothing will be palettized"
            )
        self._palettizer = palettizer
        self._sync_dkm_state(trainer, pl_module)

    @override
    def on_train_start(self, trainer: "Trainer", pl_module: LightningModule) -> None:
        """Called when training begins (loops already restored): align DKM with global_step,
        and remove the stale ``_COREML_`` metadata of weights this fit trains without DKM.

        With ``milestone_epochs``, also the epoch milestone: a checkpoint saved on the last
        batch of epoch ``E - 1`` resumes at ``current_epoch == E`` without Lightning calling
        ``on_train_epoch_start`` for it, so epoch ``E`` starts here (at the same global step
        as in the uninterrupted run).
        """
        # weights DKM does not train that carry an earlier palettization's metadata (the ones
        # it prepared lost theirs at setup): trained from here, their metadata goes now, not
        # at fit end, so that no checkpoint of this fit holds them under the old LUT
        _drop_trained_metadata(
            trainer,
            pl_module,
            self._OWNER,
            "they stay dense unless this callback's config selects them",
        )
        self._last_step = trainer.global_step
        if self._milestone_epochs is None:
            self._advance(trainer, pl_module)
        else:
            self._start_epoch_milestone(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: "Trainer", pl_module: LightningModule) -> None:
        """Called when a training epoch begins: start the epoch milestone, if there is one."""
        self._start_epoch_milestone(trainer, pl_module)

    @override
    def on_train_batch_end(
        self,
        trainer: "Trainer",
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Called after each training batch: act only when an optimizer step happened."""
        step = trainer.global_step
        if step <= self._last_step or self._palettizer is None:
            return
        self._last_step = step
        self._advance(trainer, pl_module)
        n = (
            trainer.log_every_n_steps
            if self._log_every_n_steps is None
            else self._log_every_n_steps
        )
        if n and step % n == 0 and trainer.is_global_zero and trainer.loggers:
            scalars = _report_scalars(self._palettizer.report(), "dkm")
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)

    @override
    def on_fit_end(self, trainer: "Trainer", pl_module: LightningModule) -> None:
        """Called when fit ends (module unwrapped, on CPU): finalize and report."""
        palettizer = self._palettizer
        if palettizer is None:
            return
        report = palettizer.report()
        never = [name for name, fp in _fake_palettizers(pl_module) if not fp.is_enabled]
        if never and self._finalize_on_fit_end:
            rank_zero_warn(
                f"{self._OWNER}: {len(never)} weight(s) never reached their milestone and "
                f"stay unpalettized: {never[:5]}{' ...' if len(never) > 5 else ''}"
            )
        if not self._finalize_on_fit_end:
            _publish(
                trainer,
                report,
                "dkm",
                f"{self._OWNER}: DKM state at fit end (not finalized)",
                verbose=self._verbose,
                after_teardown=True,
            )
            return
        was_training = pl_module.training
        trained = [name for name, _ in _fake_palettizers(pl_module)]
        palettizer.finalize(pl_module, inplace=True)
        pl_module.train(was_training)
        if self._keep_metadata:
            _drop_stale_metadata(pl_module, self._OWNER, trained)
        else:
            strip_coreml_metadata(pl_module)
        # trainer.test/validate/predict(ckpt_path=<a ModelCheckpoint file, mid-DKM>) next
        _palettize_on_load(pl_module, self._effective.as_dict(), self._keep_metadata)
        self._palettizer, self._report = None, report
        _publish(
            trainer,
            report,
            "dkm",
            f"{self._OWNER}: palettized {len(report)} weight(s)",
            verbose=self._verbose,
            after_teardown=True,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        """The config the module was prepared with and the epoch-milestone step (small)."""
        return {
            "kind": _DKM_STATE_KIND,
            "config": self._effective.as_dict(),
            "milestone_epochs": self._milestone_epochs,
            "epoch_start_step": self._epoch_start_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the epoch-milestone step (the DKM buffers come back with the module)."""
        self._epoch_start_step = state_dict.get("epoch_start_step")

    # -- internals -----------------------------------------------------------------------------

    def _start_epoch_milestone(self, trainer: "Trainer", pl_module: LightningModule) -> None:
        if (
            self._milestone_epochs is not None
            and self._epoch_start_step is None
            and trainer.current_epoch >= self._milestone_epochs
        ):
            self._epoch_start_step = trainer.global_step
            self._advance(trainer, pl_module)

    def _advance(self, trainer: "Trainer", pl_module: LightningModule) -> None:
        """Set the DKM step from trainer.global_step; sync newly initialised centroids."""
        if self._palettizer is None:
            return
        if self._milestone_epochs is None:
            step = trainer.global_step
        elif self._epoch_start_step is None:
            return
        else:
            step = trainer.global_step - self._epoch_start_step + 1
        # one unnamed walk per step (the palettizer prepared pl_module in place); names only
        # when a weight starts
        started = {id(fp) for fp in DKMPalettizer._set_step(_attached(pl_module), step)}
        if started:
            self._sync_dkm_state(trainer, pl_module)
            names = [n for n, fp in _fake_palettizers(pl_module) if id(fp) in started]
            log.debug("DKM started on %s at global step %d", names, trainer.global_step)

    def _sync_dkm_state(self, trainer: "Trainer", pl_module: LightningModule) -> None:
        keys = [k for k in pl_module.state_dict() if _DKM_KEY.search(k)]
        _broadcast_from_rank_zero(trainer, pl_module, keys)


def _check_load(module: nn.Module, state: Mapping[str, Any], strict: bool) -> None:
    """Raise as ``module.load_state_dict(state, strict)`` would, before it copies anything:
    shapes that differ, and with ``strict`` missing or unexpected keys."""
    own = module.state_dict()
    errors = [
        f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
        f"checkpoint, the shape in current model is {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and isinstance(value, Tensor) and value.shape != own[key].shape
    ]
    if strict:
        missing = [key for key in own if key not in state]
        unexpected = [key for key in state if key not in own]
        if missing:
            errors.append(f"Missing key(s) in state_dict: {missing[:5]}")
        if unexpected:
            errors.append(f"Unexpected key(s) in state_dict: {unexpected[:5]}")
    if errors:
        raise RuntimeError(
            f"Error(s) in loading a mid-DKM state_dict into the prepared {type(module).__name__} "
            "(the module is left as it was):\n\t" + "\n\t".join(errors)
        )


class _PalettizeOnLoad:
    """``load_state_dict`` pre-hook of a finalized module: palettize a mid-DKM state_dict on load.

    The checkpoints ModelCheckpoint writes during fit are mid-DKM (``<param>_dkm.*`` keys), the
    module after fit is finalized (``_COREML_`` keys): ``trainer.test(ckpt_path="best")`` would
    load one into the other. With this hook the module is prepared with the DKM config, loads
    the checkpoint's DKM state, and is finalized again, i.e. it gets the hard-palettized weights
    of that checkpoint and their ``_COREML_`` metadata; the load then goes on with that state.
    A state_dict that does not fit the prepared module (a shape, or with ``strict`` a missing
    or unexpected key) raises before anything is copied, and the module stays as it was.
    """

    def __init__(self, config: Mapping[str, Any], keep_metadata: bool) -> None:
        self.config = dict(config)
        self.keep_metadata = keep_metadata

    def __call__(
        self, module: nn.Module, state_dict: dict, prefix: str, _meta: Any, strict: bool, *_: Any
    ) -> None:
        own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not any(_DKM_KEY.search(k) for k in own) or _fake_palettizers(module):
            return
        was_training = module.training
        metadata = [
            (owner, name, buf)
            for owner in module.modules()
            for name, buf in owner._buffers.items()
            if COREML_PREFIX in name or (owner is module and name == METADATA_VERSION_KEY)
        ]
        strip_coreml_metadata(module)
        try:
            palettizer = DKMPalettizer(module, self.config)
            palettizer.prepare(inplace=True)
            _check_load(module, own, strict)  # (before anything is copied)
            module.load_state_dict(own, strict=strict)  # mid-DKM into prepared: its structure
            palettizer.finalize(module, inplace=True)
        except BaseException:
            # the load fails: the module as it was (finalized, its metadata, its mode)
            for owner in list(module.modules()):
                for child in list(owner._modules.values()):
                    if isinstance(child, FakePalettize):
                        child.detach_from(owner)
            for owner, name, buf in metadata:
                owner._buffers[name] = buf
            module.train(was_training)
            raise
        if not self.keep_metadata:
            strip_coreml_metadata(module)
        module.train(was_training)
        for key in own:
            del state_dict[prefix + key]
        state_dict.update({prefix + k: v for k, v in module.state_dict().items()})


_ON_LOAD_ATTR = "_lightning_palettize_on_load"


def _palettize_on_load(module: nn.Module, config: Mapping[str, Any], keep_metadata: bool) -> None:
    """Register (or update) the :class:`_PalettizeOnLoad` hook of ``module``."""
    hook = module.__dict__.get(_ON_LOAD_ATTR)
    if isinstance(hook, _PalettizeOnLoad):
        hook.config, hook.keep_metadata = dict(config), keep_metadata
        return
    hook = _PalettizeOnLoad(config, keep_metadata)
    module.register_load_state_dict_pre_hook(hook)
    module.__dict__[_ON_LOAD_ATTR] = hook


def _is_finalized(module: nn.Module) -> bool:
    return not _fake_palettizers(module) and any(
        COREML_PREFIX in name for name, _ in module.named_buffers()
    )


# ----------------------------------------------------------------------------------------------
# one-shot passes: post-training k-means and SKM


def _summary(value: Any) -> tuple[Any, ...] | None:
    """A floating tensor's shape, dtype, float64 sum and float64 norm (``None`` otherwise)."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        return None
    with torch.no_grad():
        total = value.detach().sum(dtype=torch.float64)
        norm = torch.linalg.vector_norm(value.detach(), dtype=torch.float64)
    return tuple(value.shape), value.dtype, float(total), float(norm)


def _fingerprint(module: nn.Module, weights: list[str]) -> tuple[Any, ...]:
    """What tells a pass whether ``module`` is still as it left it: the names of its ``_COREML_``
    buffers, the palettized weights, and each one's shape, dtype, float64 sum and float64 norm
    (training or a checkpoint load changes them; moving the module between devices does not)."""
    state = module.state_dict()
    sums = tuple(_summary(state.get(key)) for key in weights)
    return tuple(k for k in state if COREML_PREFIX in k), weights, sums


def _running_trainer(module: nn.Module) -> "Trainer | None":
    """The Trainer running a stage with ``module`` as its LightningModule, if any."""
    trainer = getattr(module, "_trainer", None)
    if (
        isinstance(trainer, Trainer)
        and trainer.state.status == TrainerStatus.RUNNING
        and trainer.lightning_module is module
    ):
        return trainer
    return None


def _strict_of_load(errors: list[str]) -> bool | None:
    """The ``strict`` argument of the ``Module.load_state_dict`` call that collects ``errors``.

    Load hooks are not told it (torch passes the pre-hooks ``strict=True`` whatever the caller
    gave), yet it decides whether missing or unexpected keys make the call raise. ``errors`` is
    the list a pre-hook received, the call's own ``error_msgs``: the frame of torch's
    ``Module.load_state_dict`` that holds that very list is the call (found by that identity,
    so a wrapper of the method in between does not matter). ``None`` when there is no such
    frame (a ``load_state_dict`` that does not run torch's).
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "load_state_dict":
            local = frame.f_locals
            if local.get("error_msgs") is errors:
                return bool(local.get("strict", True))
        frame = frame.f_back
    return None


@dataclass
class _LoadPlan:
    """What :meth:`_PassOnLoad.before` found in one ``load_state_dict`` call; its post-hook
    applies it if the call succeeds and undoes ``added`` if it fails."""

    missing: list[str]  # the call's own lists: their identity ties the post-hook to the call
    unexpected: list[str]
    errors: list[str]
    dense: list[str]  # weights loaded dense whose _COREML_ buffers go (state_dict names)
    added: list[tuple[nn.Module, str]]  # buffers the pre-hook registered for the copy
    overwrites: bool  # the state_dict holds a weight of the pass: ``pending`` is cleared
    action: Literal["fit", "pending", "palettize"] | None  # what the dense weights get

    def failure(self) -> str | None:
        """Why the call raises (called from the post-hook), or ``None`` if it succeeds.

        Every post-hook of the call sees its error messages (size mismatches, copy errors) and
        its missing/unexpected keys; those raise with ``strict=True`` only (read by
        :func:`_strict_of_load`; torch's default ``True`` is assumed where it cannot be read).
        """
        if self.errors:
            return f"{len(self.errors)} error(s) copying the state_dict"
        if (self.missing or self.unexpected) and _strict_of_load(self.errors) is not False:
            return (
                f"strict, with {len(self.missing)} missing and {len(self.unexpected)} "
                "unexpected key(s)"
            )
        return None

    def undo(self) -> None:
        """Remove the buffers the pre-hook registered."""
        for owner, name in self.added:
            owner._buffers.pop(name, None)


class _PassOnLoad:
    """``load_state_dict`` hooks of a module a PTP / SKM pass palettized: palettize dense
    weights on load.

    The checkpoints ModelCheckpoint writes during fit hold the dense weights, without their
    ``_COREML_`` metadata; a ``when="fit_end"`` pass palettizes the module after the last one:
    ``trainer.test(ckpt_path="best")`` would load one into the other. The pre-hook finds the
    weights the state_dict overwrites without metadata (the pass's weights, and any other weight
    the module has metadata for) or with metadata that does not describe them (below); if the
    load succeeds, the post-hook removes their ``_COREML_`` buffers from the module; then, by
    where the load happens:

    - in ``trainer.fit`` (``ckpt_path=...``, resuming training): nothing more; the module holds
      the checkpoint's dense weights to train, as a freshly built one would, and the hook is
      spent (a ``when="fit_end"`` pass palettizes the module again at the end).
    - in a ``trainer.validate`` / ``test`` / ``predict`` whose callbacks include the pass that
      palettized the module: the pass runs again at the start of the stage, after the restore
      (``pending``): the report, the loggers, SKM's calibration data and DDP's broadcast from
      rank 0 as in any pass.
    - elsewhere (``module.load_state_dict`` outside the Trainer, another Trainer): the
      post-hook palettizes the loaded weights at once with the pass's config: PTP's k-means,
      SKM with the callback's ``sensitivity`` file. SKM calibrated on data cannot: the weights
      stay dense (without metadata) with a warning, until the next validate / test / predict
      with the callback (it calibrates then).

    A state_dict with the metadata of the pass's weights (saved after palettization) loads as
    before, and so does, with ``keep_coreml_metadata=False``, one whose weights are exactly the
    ones the pass left. A mid-DKM state_dict is left to :class:`_PalettizeOnLoad`.

    Stale metadata in the state_dict: a fit of the palettized module without a pass callback
    (nothing of ours runs then; a pass callback removes the metadata of the weights a fit
    trains in ``on_train_start``) writes checkpoints of dense weights that still carry the
    earlier pass's ``_COREML_`` buffers. A weight whose values are neither a palettization the
    pass gave this module (the summaries in ``weights``) nor, within export's outlier
    tolerance, the values of the LUT it comes with is loaded as a dense weight (with a
    warning): that metadata is not loaded, and the weight is palettized as above.

    A load that fails leaves the module's metadata and this hook's state (``weights``,
    ``pending``) as they were: the pre-hook changes nothing the post-hook cannot undo (it only
    registers the metadata buffers a state_dict saved after palettization needs, and gives the
    copy the module's own values of the metadata it plans to remove), and the post-hook applies
    the plan only when the call succeeds. It can tell: it sees the call's error messages (the
    pre-hook's ``error_msgs``, the same list) and missing/unexpected keys, and reads the
    caller's ``strict`` from the frame of torch's ``Module.load_state_dict``
    (:func:`_strict_of_load`). Limits: (1) with the module loaded as a submodule of the module
    whose ``load_state_dict`` is called, errors of the modules loaded after it, and a post-hook
    registered after this one that raises or changes the keys, are not seen; (2) if the load
    raises between the two hooks (another hook's exception), the buffers the pre-hook
    registered stay until the next load of the module removes them. torch's own copies of the
    other tensors cannot be undone either way.

    No collective runs inside a load: under DDP the stage-start pass broadcasts rank 0's
    result; a load elsewhere palettizes on each process alike (same weights, same config).
    Pickling or deep-copying the module keeps the hook; the copy forgets the callback (its loads
    always palettize at once, and leave the callback's report alone).
    """

    _HISTORY: ClassVar[int] = 8
    _plan: _LoadPlan | None = None  # the load in progress (a class default for older pickles)

    def __init__(self) -> None:
        self.owner: Callable[[], Any] | None = None
        self.owner_name = ""
        self.kind = ""
        self.config: Any = None
        self.keep_metadata = True
        self.sensitivity: Any = None
        # the weights the pass palettized (state_dict names) -> the _summary of the values
        # palettizations of the module gave them (the latest few)
        self.weights: dict[str, list[Any]] = {}
        self.pending = False  # dense weights loaded in a stage the owner runs again in
        self._plan = None

    def record(self, callback: "_PalettizationPass", module: nn.Module, weights: list[str]) -> None:
        """Take over ``module`` as ``callback`` just palettized these weights of it."""
        self.owner = weakref.ref(callback)
        self.owner_name, self.kind = callback._OWNER, callback._KIND
        self.config, self.keep_metadata = callback._config, callback._keep_metadata
        self.sensitivity = getattr(callback, "_sensitivity", None)
        self._remember(module, weights)
        self.pending = False

    def _remember(self, module: nn.Module, weights: list[str]) -> None:
        state = module.state_dict()
        seen = self.weights
        self.weights = {}
        for key in weights:
            summary = _summary(state.get(key))
            earlier = [s for s in seen.get(key, []) if s != summary]
            self.weights[key] = [summary, *earlier[: self._HISTORY - 1]]

    def disarm(self) -> None:
        """The module is no longer (only) this pass's palettization: do nothing on load."""
        self.weights, self.pending = {}, False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["owner"] = None  # weak references do not pickle
        state["_plan"] = None  # one load's lists and modules, not the module's state
        return state

    def callback(self) -> "_PalettizationPass | None":
        return self.owner() if self.owner is not None else None

    def _stale(self, own: Mapping[str, Any], described: Mapping[str, Any]) -> list[str]:
        """The weights of ``own`` whose ``_COREML_`` metadata in ``own`` does not describe them:
        neither values a palettization of this module gave them nor those of that LUT, all but
        the outliers export accepts, or SKM's ``outlier_fraction`` (which keeps that fraction
        exact) and a margin if that is more."""
        allowed = _OUTLIER_WARN_FRACTION
        outliers = _largest(self.config, "outlier_fraction") if self.kind == "skm" else 0.0
        if outliers > 0:
            allowed = max(allowed, outliers + 0.01)
        stale = []
        for key, fields in described.items():
            weight = own.get(key)
            if not isinstance(weight, Tensor) or "lut" not in fields.tensors:
                continue
            if _summary(weight) in self.weights.get(key, []):
                continue
            if not _holds_lut_values(self.owner_name, key, weight, fields, allowed):
                stale.append(key)
        return stale

    def before(
        self,
        module: nn.Module,
        state_dict: dict[str, Any],
        prefix: str,
        _meta: Any,
        _strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Pre-hook: plan what the load changes; the module keeps its metadata for now."""
        self._abandon()
        if not self.weights:
            return
        own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if any(_DKM_KEY.search(k) for k in own):
            return  # mid-DKM: _PalettizeOnLoad's (or load_palettized_checkpoint's)
        described = _coreml_fields(own)
        stale = {key: described.pop(key) for key in self._stale(own, described)}
        if stale:
            names = list(stale)
            rank_zero_warn(
                f"{self.owner_name}: the state_dict's _COREML_ metadata of {len(names)} "
                "weight(s) does not describe their values (dense weights saved with the "
                "metadata of an earlier palettization, e.g. by a fit without this callback): "
                f"{names[:5]}{' ...' if len(names) > 5 else ''}; they load as dense weights, "
                "without that metadata"
            )
        mine = module.state_dict()
        carried = _coreml_fields(mine)
        added: list[tuple[nn.Module, str]] = []
        if self.keep_metadata:
            # saved after palettization, into a module an earlier load left dense: its metadata
            # buffers come back (as load_palettized_checkpoint gives them to a fresh module)
            fields = [described[k] for k in self.weights if k in described]
            added = _add_metadata_buffers(module, own, fields)
        dense = [
            key
            for key in [*self.weights, *(k for k in carried if k not in self.weights)]
            if key in own
            and key not in described
            and (key in carried or _summary(own[key]) not in self.weights.get(key, [None]))
        ]
        _keep_through_copy(
            module,
            state_dict,
            prefix,
            mine,
            [carried[k] for k in dense if k in carried],
            list(stale.values()),
        )
        action: Literal["fit", "pending", "palettize"] | None = None
        if dense:
            trainer = _running_trainer(module)
            callback = self.callback()
            if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
                action = "fit"
            elif trainer is not None and any(cb is callback for cb in trainer.callbacks):
                action = "pending"  # the owner runs the pass when the stage starts
            else:
                action = "palettize"
        self._plan = _LoadPlan(
            missing=missing_keys,
            unexpected=unexpected_keys,
            errors=error_msgs,
            dense=dense,
            added=added,
            overwrites=any(key in own for key in self.weights),
            action=action,
        )

    def _abandon(self) -> None:
        """Undo the pre-hook of a load that raised before this post-hook ran."""
        plan, self._plan = self._plan, None
        if plan is not None:
            plan.undo()

    def after(self, module: nn.Module, incompatible: Any) -> None:
        """Post-hook: apply this call's plan if the call succeeds, undo it if it fails."""
        plan = self._plan
        if plan is None or plan.missing is not incompatible.missing_keys:
            return
        self._plan = None
        failure = plan.failure()
        if failure is not None:
            plan.undo()
            rank_zero_info(
                f"{self.owner_name}: load_state_dict fails ({failure}); the module keeps its "
                "_COREML_ metadata as before the call"
            )
            return
        if plan.overwrites:
            self.pending = False  # what an earlier load left dense is overwritten now
        if not plan.dense:
            return
        _remove_metadata(module, plan.dense)
        if plan.action == "fit":
            rank_zero_info(
                f"{self.owner_name}: fit loads dense weights into the module it palettized: "
                f"they are trained as loaded ({len(plan.dense)} weight(s) lose their _COREML_ "
                "metadata)"
            )
            self.disarm()
        elif plan.action == "pending":
            self.pending = True
        else:
            self._palettize(module)

    def _palettize(self, module: nn.Module) -> None:
        """Palettize the weights a load outside the owner's stages left dense, at once."""
        was_training = module.training
        if self.kind == "ptp":
            palettizer: Any = PostTrainingPalettizer(module, self.config)
            with torch.inference_mode(False):  # plain metadata buffers (see _run)
                palettizer.compress(inplace=True, progress=False)
        elif self.sensitivity is not None:
            palettizer = SKMPalettizer(module, self.config)
            with torch.inference_mode(False):
                palettizer.compress(inplace=True, sensitivity=self.sensitivity, progress=False)
        else:
            self.pending = True
            rank_zero_warn(
                f"{self.owner_name}: loaded dense weights into the module it palettized, "
                f"outside a Trainer stage it is part of: SKM needs calibration data, so the "
                f"{len(self.weights)} weight(s) stay dense as loaded, without _COREML_ metadata, "
                "until the next trainer.validate/test/predict with this callback (it "
                "calibrates and palettizes them when the stage starts); or palettize them with "
                "SKMPalettizer(module, config).compress(...), or give the callback "
                "sensitivity=<file> to palettize on load"
            )
            return
        module.train(was_training)
        report = palettizer.report()
        names = [row.name for row in report.rows]
        if self.keep_metadata:
            _drop_stale_metadata(module, self.owner_name, names)
        else:
            strip_coreml_metadata(module)
        callback = self.callback()
        if callback is not None:
            callback._done[module] = _fingerprint(module, names)
            callback._report = report
            self.record(callback, module, names)
        else:
            self._remember(module, names)
        rank_zero_info(f"{self.owner_name}: palettized the {len(report)} loaded weight(s)")


_PASS_ON_LOAD_ATTR = "_lightning_palettize_pass_on_load"


def _add_metadata_buffers(
    module: nn.Module, state: Mapping[str, Any], fields: list[Any]
) -> list[tuple[nn.Module, str]]:
    """Register the ``_COREML_`` buffers of these weights' fields (``_coreml_fields(state)``
    values) that ``module`` lacks, and the root's ``metadata_version`` with them, holding the
    state's values; the (owner, name) of each buffer registered."""
    keys = [key for entry in fields for key in entry.keys.values()]
    if keys and METADATA_VERSION_KEY in state:
        keys.append(METADATA_VERSION_KEY)
    modules = dict(module.named_modules(remove_duplicate=False))
    added = []
    for key in keys:
        head, _, name = key.partition(COREML_PREFIX)
        owner = modules.get(head[:-1] if head else "")
        name = COREML_PREFIX + name
        if owner is not None and name not in owner._buffers and isinstance(state[key], Tensor):
            owner.register_buffer(name, state[key].detach().to("cpu", copy=True))
            added.append((owner, name))
    return added


def _keep_through_copy(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    mine: Mapping[str, Any],
    kept: list[Any],
    stale: list[Any],
) -> None:
    """Let a load go on without touching the ``_COREML_`` buffers its post-hook may remove.

    ``state_dict`` is the load's own copy (the pre-hook's argument), ``mine`` the module's
    state_dict. ``kept``: the module's fields (``_coreml_fields(mine)`` values) of the weights
    loaded dense: the copy gets the module's own values (it leaves the buffers as they are and
    reports no missing key). ``stale``: the state_dict's fields that describe no weight: not
    loaded (the module's value where it has the buffer, dropped where it has none).
    """
    for entry in kept:
        for key in entry.keys.values():
            state_dict[prefix + key] = mine[key]
    for entry in stale:
        for key in entry.keys.values():
            if key in mine:
                state_dict[prefix + key] = mine[key]
            else:
                state_dict.pop(prefix + key, None)
    version = prefix + METADATA_VERSION_KEY
    if METADATA_VERSION_KEY in module._buffers:
        if kept and version not in state_dict:
            state_dict[version] = mine[METADATA_VERSION_KEY]
    elif stale and version in state_dict:
        fields = [k for k in state_dict if k.startswith(prefix) and COREML_PREFIX in k]
        if fields == [version]:  # nothing left for it to describe
            del state_dict[version]


def _pass_on_load(module: nn.Module) -> _PassOnLoad | None:
    hook = module.__dict__.get(_PASS_ON_LOAD_ATTR)
    return hook if isinstance(hook, _PassOnLoad) else None


def _record_pass(module: nn.Module, callback: "_PalettizationPass", weights: list[str]) -> None:
    """Register (or take over) the :class:`_PassOnLoad` hooks of ``module``."""
    hook = _pass_on_load(module)
    if hook is None:
        hook = _PassOnLoad()
        module.register_load_state_dict_pre_hook(hook.before)
        module.register_load_state_dict_post_hook(hook.after)
        module.__dict__[_PASS_ON_LOAD_ATTR] = hook
    hook.record(callback, module, weights)


class _PalettizationPass(Callback):
    """Shared moment handling, comparison and reporting of the PTP and SKM callbacks."""

    _OWNER: ClassVar[str] = ""
    _KIND: ClassVar[str] = ""
    _CONFIG: ClassVar[type] = PostTrainingPalettizerConfig

    def __init__(
        self,
        config: Any,
        when: str,
        compare: bool,
        compare_dataloader: Iterable[Any] | None,
        keep_coreml_metadata: bool,
        verbose: bool,
    ) -> None:
        owner = self._OWNER
        self._config = _load(owner, config, self._CONFIG)
        self._when = _check_choice(owner, "when", when, _MOMENTS)
        self._compare = _check_bool(owner, "compare", compare)
        if compare_dataloader is not None and not isinstance(compare_dataloader, Iterable):
            raise _bad(owner, "compare_dataloader", compare_dataloader, "an iterable or None")
        self._compare_dataloader = compare_dataloader
        self._keep_metadata = _check_bool(owner, "keep_coreml_metadata", keep_coreml_metadata)
        self._verbose = _check_bool(owner, "verbose", verbose)
        # module -> its _fingerprint right after this callback palettized it
        self._done: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._report: PalettizationReport | None = None
        self._comparison: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles callbacks; weak references do not pickle
        state = self.__dict__.copy()
        state["_done"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._done = weakref.WeakKeyDictionary()

    @property
    def config(self) -> Any:
        """The validated config."""
        return self._config

    @property
    def report(self) -> PalettizationReport | None:
        """The report of the last pass (``None`` before)."""
        return self._report

    @property
    def comparison(self) -> dict[str, float]:
        """With ``compare=True``: ``before/<metric>``, ``after/<metric>``, ``drop/<metric>``."""
        return dict(self._comparison)

    @override
    def setup(self, trainer: "Trainer", pl_module: LightningModule, stage: str) -> None:
        """Called when fit/validate/test/predict begins: reject unsupported strategies early."""
        _reject_sharded(trainer, self._OWNER)
        if stage == _MOMENT_STAGE[self._when]:
            _reject_spawn(trainer, self._OWNER)

    @override
    def on_train_start(self, trainer: "Trainer", pl_module: LightningModule) -> None:
        """Called when training begins (checkpoint restored, optimizers built): remove the
        ``_COREML_`` metadata of the weights this fit trains.

        A module palettized before (an earlier fit with a pass, another callback) carries
        metadata that describes its weights only until they are trained: the checkpoints of
        this fit would hold the trained, dense weights under the old LUT (a wrong Core ML
        model if exported). Weights that do not train (``requires_grad=False``, or in no
        optimizer) keep theirs.
        """
        _drop_trained_metadata(
            trainer,
            pl_module,
            self._OWNER,
            "this callback palettizes those its config selects again when fit ends"
            if self._when == "fit_end"
            else f"they stay dense until palettized again (this callback: when={self._when!r})",
        )

    @override
    def on_fit_end(self, trainer: "Trainer", pl_module: LightningModule) -> None:
        """Called when fit ends (module unwrapped, on CPU): the pass, if ``when="fit_end"``."""
        if self._when == "fit_end":
            self._run(trainer, pl_module, after_teardown=True)

    @override
    def on_validation_start(self, trainer: "Trainer", pl_module: LightningModule) -> None:
        """Called when validation begins: the pass, in ``trainer.validate`` only (not in fit)."""
        if trainer.state.fn == TrainerFn.VALIDATING and (
            self._when == "validate_start" or self._loaded_dense(pl_module)
        ):
            self._run(trainer, pl_module)

    @override
    def on_test_start(self, trainer: "Trainer", pl_module: LightningModule) -> None:
        """Called when ``trainer.test`` begins (weights already restored): the pass."""
        if self._when == "test_start" or self._loaded_dense(pl_module):
            self._run(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: "Trainer", pl_module: LightningModule) -> None:
        """Called when ``trainer.predict`` begins (weights already restored): the pass."""
        if self._when == "predict_start" or self._loaded_dense(pl_module):
            self._run(trainer, pl_module)

    def _compress(self, trainer: "Trainer", pl_module: LightningModule) -> PalettizationReport:
        raise NotImplementedError

    def _loaded_dense(self, pl_module: nn.Module) -> bool:
        """A load in this stage (``ckpt_path=...``) gave dense weights to the module this
        callback palettized (see :class:`_PassOnLoad`): the pass runs on them."""
        hook = _pass_on_load(pl_module)
        return hook is not None and hook.pending and hook.callback() is self

    def _run(self, trainer: "Trainer", pl_module: LightningModule, after_teardown=False) -> None:
        done = self._done.get(pl_module)
        if done is not None and done == _fingerprint(pl_module, done[1]):
            rank_zero_info(f"{self._OWNER}: the module is as this callback palettized it; skipping")
            return
        compare_loader = None
        before: dict[str, float] = {}
        from_trainer = self._compare_dataloader is None
        if self._compare:
            compare_loader = self._compare_dataloader
            if from_trainer:
                compare_loader = _dataloader(trainer, "val", self._OWNER, "compare=True")
            before = _evaluate(trainer, pl_module, compare_loader, from_trainer)
        was_training = pl_module.training
        try:
            # test/predict run in inference mode: buffers made there (the _COREML_ metadata)
            # would be inference tensors, which no later load_state_dict can copy into
            with torch.inference_mode(False):
                report = self._compress(trainer, pl_module)
        except ValueError as error:
            if getattr(error, _USER_CODE, False):  # the user's training_step / loss_fn: as is
                raise
            raise MisconfigurationException(f"{self._OWNER}: {error}") from error
        pl_module.train(was_training)
        keys = [row.name for row in report.rows]
        keys += [k for k in pl_module.state_dict() if COREML_PREFIX in k]
        _broadcast_from_rank_zero(trainer, pl_module, keys)
        if self._keep_metadata:
            _drop_stale_metadata(pl_module, self._OWNER, [row.name for row in report.rows])
        else:
            strip_coreml_metadata(pl_module)
        extra: dict[str, float] = {}
        if self._compare:
            after = _evaluate(trainer, pl_module, compare_loader, from_trainer)
            prefix = f"palettization/{self._KIND}"
            for name in before:
                if name in after:
                    extra[f"{prefix}/before/{name}"] = before[name]
                    extra[f"{prefix}/after/{name}"] = after[name]
                    extra[f"{prefix}/drop/{name}"] = before[name] - after[name]
        names = [row.name for row in report.rows]
        self._done[pl_module] = _fingerprint(pl_module, names)
        # a load of dense weights (trainer.test(ckpt_path="best"), ...) palettizes them
        _record_pass(pl_module, self, names)
        self._report = report
        self._comparison = {k.split("/", 2)[2]: v for k, v in extra.items()}
        _publish(
            trainer,
            report,
            self._KIND,
            f"{self._OWNER}: palettized {len(report)} weight(s)",
            extra=extra,
            verbose=self._verbose,
            after_teardown=after_teardown,
        )


class PostTrainingPalettizationCallback(_PalettizationPass):
    r"""Data-free k-means palettization of a trained LightningModule, at a chosen moment.

    ``when="fit_end"`` (default) palettizes after ``trainer.fit``; ``"validate_start"``,
    ``"test_start"`` or ``"predict_start"`` palettize a trained model (weights of ``ckpt_path``
    already restored) just before ``trainer.validate`` / ``test`` / ``predict`` measure it::

        trainer = Trainer(callbacks=[PostTrainingPalettizationCallback(
            {"global_config": {"n_bits": 4}}, when="test_start", compare=True)])
        trainer.test(model, datamodule=dm)   # tests the palettized model

    Each moment palettizes the module as it is then; the Core ML metadata it carries from an
    earlier palettization (another fit, another callback) is replaced, and metadata of weights
    this pass does not select is kept only where it still describes the weight exactly. A
    module this callback palettized, unchanged since (e.g. a second ``trainer.test`` with
    ``when="test_start"``), is not palettized again.

    A further ``trainer.fit`` of a palettized module with this callback (any ``when``) removes
    the metadata of the weights the optimizers train when training starts, with a warning: the
    trained weights are dense, and the checkpoints of that fit must not claim they hold the old
    LUT's values (frozen weights keep theirs); a ``"fit_end"`` pass palettizes the module again
    at the end. A fit without this callback cannot do that: its checkpoints carry the stale
    metadata, which a load into the module this callback palettized recognises (the weights
    are not the LUT's values) and loads as dense weights.

    Checkpoints: ModelCheckpoint saves during fit, before a ``"fit_end"`` pass, i.e. dense
    weights without ``_COREML_`` metadata. Loading such a state_dict into the module this
    callback palettized palettizes its weights again with this config (a load_state_dict hook
    the pass leaves on the module): ``trainer.test(model, ckpt_path="best")`` (``"last"``,
    ``validate``, ``predict``) with this callback runs the pass on the checkpoint's weights at
    the start of the stage, after the restore (report, loggers and DDP as in any pass), and
    ``model.load_state_dict(dense)`` outside the Trainer palettizes them at once.
    ``trainer.fit(model, ckpt_path=...)`` trains the checkpoint's dense weights as they are
    (their old metadata removed). A state_dict saved after the pass (with its metadata, or,
    with ``keep_coreml_metadata=False``, with the exact weights a pass gave this module)
    loads unchanged. A ``load_state_dict`` that fails (size mismatch, strict key mismatch)
    leaves the module's metadata as it was. Deep copies and pickles of the module keep the hook.

    Args:
        config: a :class:`~lightning_palettize.PostTrainingPalettizerConfig`, a dict of its
            arguments, an OmegaConf DictConfig, a YAML file path, or ``None`` (4 bits).
        when: ``"fit_end"``, ``"validate_start"``, ``"test_start"`` or ``"predict_start"``.
        compare: run the module's ``validation_step`` over the validation data before and after
            palettization and log ``palettization/ptp/{before,after,drop}/<metric>`` for every
            value it logs (its torchmetrics objects are computed as usual).
        compare_dataloader: the data for ``compare`` (default: the Trainer's validation data).
        keep_coreml_metadata: keep the ``_COREML_`` buffers ``coremltools.convert`` reads;
            ``False`` strips them so the state_dict loads strictly into a fresh module.
        verbose: print the console table.

    Raises:
        MisconfigurationException: for a bad argument (naming it, its value and what is
            accepted), a sharded strategy, or a config that does not fit the weights.
    """

    _OWNER: ClassVar[str] = "PostTrainingPalettizationCallback"
    _KIND: ClassVar[str] = "ptp"
    _CONFIG: ClassVar[type] = PostTrainingPalettizerConfig

    def __init__(
        self,
        config: dict[str, Any] | str | PostTrainingPalettizerConfig | None = None,
        *,
        when: Literal["fit_end", "validate_start", "test_start", "predict_start"] = "fit_end",
        compare: bool = False,
        compare_dataloader: Iterable[Any] | None = None,
        keep_coreml_metadata: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__(config, when, compare, compare_dataloader, keep_coreml_metadata, verbose)

    @override
    def _compress(self, trainer: "Trainer", pl_module: LightningModule) -> PalettizationReport:
        palettizer = PostTrainingPalettizer(pl_module, self._config)
        palettizer.compress(inplace=True, progress=False)
        return palettizer.report()


def _loss_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise MisconfigurationException(
        "SKMPalettizationCallback: training_step returned "
        f"{type(output).__name__}; calibration needs a loss tensor or a dict with a 'loss' "
        "tensor; accepted alternative: SKMPalettizationCallback(loss_fn=fn) with "
        "fn(module, batch) -> scalar tensor"
    )


class SKMPalettizationCallback(_PalettizationPass):
    r"""Sensitivity-weighted k-means (SqueezeLLM / coremltools SKM) of a trained LightningModule.

    Calibration: the Fisher information of each weight is accumulated over
    ``config.calibration_nsamples`` batches of the Trainer's *training* data (datamodule,
    ``train_dataloader()`` hook or the dataloader given to fit), or of ``calibration_dataloader``;
    the loss is ``training_step``'s (a tensor or a dict with ``"loss"``; what it ``self.log``\ s
    is discarded), or ``loss_fn(module, batch)``. Batches are moved to the module's device with
    its own transfer hooks first. Gradients are enabled for calibration even inside
    ``trainer.test`` / ``predict`` (inference mode), and the module's parameters, buffers,
    modes and ``.grad`` are restored afterwards (torchmetrics states are reset).

    Moments, comparison and checkpoint loads as in :class:`PostTrainingPalettizationCallback`.
    Re-palettizing a loaded dense checkpoint needs calibration on its weights: in a
    ``trainer.validate`` / ``test`` / ``predict`` with this callback (e.g.
    ``trainer.test(model, ckpt_path="best")`` after fit) the pass calibrates with the same data
    and loss at the start of the stage; with ``sensitivity=<file>`` a load anywhere palettizes
    at once with that file. A plain ``model.load_state_dict(dense)`` otherwise leaves the
    weights dense as loaded, their ``_COREML_`` metadata removed, with a warning, until the next
    validate / test / predict with this callback. (The sensitivities of the earlier pass are
    not reused: they belong to other weights, and would hold a copy of every weight.)

    Args:
        config: an :class:`~lightning_palettize.SKMPalettizerConfig`, a dict of its arguments,
            an OmegaConf DictConfig, a YAML file path, or ``None`` (4 bits, 128 samples).
        when: ``"fit_end"``, ``"validate_start"``, ``"test_start"`` or ``"predict_start"``.
        calibration_dataloader: calibration data (default: the Trainer's training data).
        loss_fn: ``loss_fn(module, batch) -> scalar tensor`` (default: ``training_step``'s loss);
            an import path string from YAML / LightningCLI.
        sensitivity: a precomputed sensitivity file (skips calibration).
        per_sample: per-sample Fisher (SqueezeLLM) instead of per-batch (coremltools).
        compare: log the validation metrics before/after and their drop (``palettization/skm/``).
        compare_dataloader: the data for ``compare`` (default: the Trainer's validation data).
        keep_coreml_metadata: keep the ``_COREML_`` buffers (see the PTP callback).
        verbose: print the console table.

    Raises:
        MisconfigurationException: for a bad argument, a sharded strategy, missing calibration
            data, or a training_step that returns no loss.
    """

    _OWNER: ClassVar[str] = "SKMPalettizationCallback"
    _KIND: ClassVar[str] = "skm"
    _CONFIG: ClassVar[type] = SKMPalettizerConfig

    def __init__(
        self,
        config: dict[str, Any] | str | SKMPalettizerConfig | None = None,
        *,
        when: Literal["fit_end", "validate_start", "test_start", "predict_start"] = "fit_end",
        calibration_dataloader: Iterable[Any] | None = None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        sensitivity: str | None = None,
        per_sample: bool = False,
        compare: bool = False,
        compare_dataloader: Iterable[Any] | None = None,
        keep_coreml_metadata: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__(config, when, compare, compare_dataloader, keep_coreml_metadata, verbose)
        owner = self._OWNER
        if calibration_dataloader is not None and not isinstance(calibration_dataloader, Iterable):
            raise _bad(owner, "calibration_dataloader", calibration_dataloader, "an iterable")
        if isinstance(loss_fn, str):
            loss_fn = _import_object(owner, "loss_fn", loss_fn)
        if loss_fn is not None and not callable(loss_fn):
            raise _bad(
                owner,
                "loss_fn",
                loss_fn,
                "a callable loss_fn(module, batch), its import path ('pkg.mod.fn' or "
                "'pkg.mod:fn'), or None",
            )
        if sensitivity is not None and not isinstance(sensitivity, (str, os.PathLike)):
            raise _bad(owner, "sensitivity", sensitivity, "a sensitivity file path or None")
        self._calibration_dataloader = calibration_dataloader
        self._loss_fn = loss_fn
        self._sensitivity = sensitivity
        self._per_sample = _check_bool(owner, "per_sample", per_sample)

    @override
    def setup(self, trainer: "Trainer", pl_module: LightningModule, stage: str) -> None:
        """Called when fit/validate/test/predict begins: reject what cannot calibrate, early."""
        super().setup(trainer, pl_module, stage)
        if stage == _MOMENT_STAGE[self._when]:
            self._check_calibration(pl_module)

    def _check_calibration(self, pl_module: LightningModule) -> None:
        # With manual optimization training_step runs its own backward and optimizer steps:
        # calling it for calibration would train the model (and backward twice).
        if (
            self._sensitivity is None
            and self._loss_fn is None
            and not pl_module.automatic_optimization
        ):
            raise MisconfigurationException(
                f"{self._OWNER}: {type(pl_module).__name__} uses manual optimization "
                "(automatic_optimization=False), so its training_step steps its optimizers and "
                "cannot give the calibration loss; accepted: pass loss_fn=fn with "
                "fn(module, batch) -> scalar loss tensor (or a precomputed sensitivity=...)"
            )

    @override
    def _compress(self, trainer: "Trainer", pl_module: LightningModule) -> PalettizationReport:
        self._check_calibration(pl_module)
        palettizer = SKMPalettizer(pl_module, self._config)
        if self._sensitivity is not None:
            palettizer.compress(inplace=True, sensitivity=self._sensitivity, progress=False)
            return palettizer.report()
        loader = self._calibration_dataloader
        if loader is None:
            loader = _TrainBatches(_dataloader(trainer, "train", self._OWNER, "calibration"))
        user_loss = self._loss_fn

        def loss_fn(module: nn.Module, batch: Any) -> Tensor:
            batch = _to_module_device(trainer, pl_module, batch)
            with _step_context(trainer, True):
                try:
                    if user_loss is not None:
                        return user_loss(module, batch)
                    output = module.training_step(batch, 0)
                except Exception as error:
                    setattr(error, _USER_CODE, True)
                    raise
                return _loss_of(output)

        # Calibration needs autograd even inside trainer.test / predict (inference mode).
        with torch.inference_mode(False), torch.enable_grad(), _module_logging(pl_module, None):
            try:
                palettizer.compress(
                    loader, loss_fn, inplace=True, per_sample=self._per_sample, progress=False
                )
            finally:
                _reset_metrics(pl_module)
        return palettizer.report()


# ----------------------------------------------------------------------------------------------
# loading palettized checkpoints outside the Trainer


def _dkm_config_of(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, Mapping) and state.get("kind") == _DKM_STATE_KIND:
            return state["config"]
    return None


def restore_palettization(
    module: nn.Module,
    checkpoint: Mapping[str, Any],
    config: dict[str, Any] | str | DKMPalettizerConfig | None = None,
) -> nn.Module:
    """Give ``module`` the structure a palettized checkpoint's state_dict expects, in place.

    - Mid-DKM checkpoint (``*_dkm.centroids`` keys): prepares DKM with the config stored by
      :class:`PalettizationCallback` in the checkpoint (or ``config``).
    - After palettization (``_COREML_`` keys): registers the Core ML metadata buffers, so a
      strict load keeps them.

    Call it from ``LightningModule.on_load_checkpoint`` to make the stock
    ``Module.load_from_checkpoint(path)`` work with such checkpoints::

        def on_load_checkpoint(self, checkpoint):
            restore_palettization(self, checkpoint)

    Args:
        module: a freshly built module (a module that is already prepared is left as it is).
        checkpoint: a Lightning checkpoint dict, or a bare state_dict.
        config: the DKM config, if the checkpoint does not carry the callback's state.

    Returns:
        ``module``.

    Raises:
        ValueError: a mid-DKM state_dict without a config in the checkpoint or the arguments.
    """
    state = checkpoint.get("state_dict", checkpoint)
    if any(_DKM_KEY.search(k) for k in state) and not _fake_palettizers(module):
        config = config if config is not None else _dkm_config_of(checkpoint)
        if config is None:
            raise ValueError(
                "restore_palettization: the state_dict was saved mid-DKM but the checkpoint has "
                "no PalettizationCallback state; pass config=<the DKM config>"
            )
        if _is_finalized(module):
            # finalized module, mid-DKM checkpoint: palettize the checkpoint's state on load
            config = load_config(config, DKMPalettizerConfig).as_dict()
            _palettize_on_load(module, config, keep_metadata=True)
            return module
        was_training = module.training
        DKMPalettizer(module, config).prepare(inplace=True)
        module.train(was_training)
    modules = dict(module.named_modules())
    for key, value in state.items():
        head, sep, tail = key.partition(COREML_PREFIX)
        if not sep:
            continue
        owner = modules.get(head[:-1] if head else "")
        name = COREML_PREFIX + tail
        if owner is not None and name not in owner._buffers:
            owner.register_buffer(name, torch.empty_like(value, device="cpu"))
    return module


def load_palettized_checkpoint(
    model: LightningModule | type[LightningModule],
    checkpoint_path: str | os.PathLike,
    *,
    map_location: Any = None,
    strict: bool = True,
    **kwargs: Any,
) -> LightningModule:
    """Load a checkpoint saved mid-DKM or after palettization, outside the Trainer.

    The one call for both kinds: the module is built (from the class, with the checkpoint's
    hyper-parameters, as ``load_from_checkpoint`` does) or taken as given, given the structure
    the checkpoint expects by :func:`restore_palettization`, and loaded strictly. A mid-DKM
    module can go on training (``trainer.fit`` with the same :class:`PalettizationCallback`
    takes it over) or be finalized with ``DKMPalettizer(model).finalize(model, inplace=True)``.

    Args:
        model: the LightningModule class, or an instance built like the saved one.
        checkpoint_path: the checkpoint file.
        map_location: as for ``torch.load`` (default: CPU).
        strict: strict state_dict loading.
        **kwargs: hyper-parameter overrides, as for ``load_from_checkpoint`` (class only).

    Returns:
        The loaded module.

    Example:
        >>> model = load_palettized_checkpoint(MyModule, "epoch=3.ckpt")  # doctest: +SKIP
    """
    location = map_location if map_location is not None else "cpu"
    checkpoint = torch.load(checkpoint_path, map_location=location, weights_only=False)
    state = checkpoint["state_dict"]
    if isinstance(model, type):
        plain = {
            k: v for k, v in state.items() if not _DKM_KEY.search(k) and COREML_PREFIX not in k
        }
        skeleton = {k: v for k, v in checkpoint.items() if k not in ("optimizer_states", "loops")}
        skeleton["state_dict"] = plain
        buffer = io.BytesIO()
        torch.save(skeleton, buffer)
        buffer.seek(0)
        model = model.load_from_checkpoint(
            buffer, map_location=location, strict=strict, weights_only=False, **kwargs
        )
    elif kwargs:
        raise TypeError(
            f"load_palettized_checkpoint: hyper-parameter overrides {sorted(kwargs)} need the "
            "module class, not an instance"
        )
    restore_palettization(model, checkpoint)
    model.load_state_dict(state, strict=strict)
    return model
