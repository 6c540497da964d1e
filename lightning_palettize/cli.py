"""``lightning-palettize``: the main job, a Hydra app over the configs in ``conf/``.

The default run trains the small CNN of :mod:`lightning_palettize.data` on the shipped UCI
digits in fp32, palettizes it with DKM (2 bits for convolutions, 4 for Linear layers) through
:class:`~lightning_palettize.callbacks.PalettizationCallback`, and prints fp32 vs palettized test
accuracy, the per-layer report and the model's size fp32 vs its compact file. ``algorithm=ptp``
and ``algorithm=skm`` palettize the warmed-up model with the post-training and SKM callbacks
instead; ``experiment=minilm`` palettizes the pretrained all-MiniLM-L6-v2 and reports the cosine
of its sentence embeddings to fp32.

The run folder (``output_dir``) receives the finalized Lightning checkpoint
(``palettized.ckpt``), the compact file (``model.palettized.safetensors``, see
:func:`~lightning_palettize.save_palettized`), the report (``report.csv``), one figure with each
layer's weight histogram and its LUT (``palettization.png``, with matplotlib), every number
printed (``summary.json``), the Lightning logs and Hydra's ``.hydra/`` record of the config.

Bad overrides stop the run before any training with the config's own message on stderr and exit
status 2 (Hydra's own errors, such as an unknown key or group option, exit with status 1).

Example:
    .. code-block:: bash

        lightning-palettize                                      # digits, DKM
        lightning-palettize algorithm=ptp n_bits=3 output_dir=runs/ptp3
        python -m lightning_palettize experiment=minilm algorithm=skm

    From Python (same arguments as the command line)::

        from lightning_palettize.cli import main
        main(["algorithm=ptp", "experiment.warmup_epochs=1", "output_dir=/tmp/run"])
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from typing_extensions import override

from lightning_palettize.callbacks import (
    PalettizationCallback,
    PostTrainingPalettizationCallback,
    SKMPalettizationCallback,
)
from lightning_palettize.config import (
    DKMPalettizerConfig,
    PostTrainingPalettizerConfig,
    SKMPalettizerConfig,
    load_config,
)
from lightning_palettize.export import save_palettized
from lightning_palettize.palettizers._common import COREML_PREFIX, KMEANS_SUPPORTED, layout_for
from lightning_palettize.palettizers.dkm import DKM_SUPPORTED, DKMPalettizer
from lightning_palettize.palettizers.post_training import PostTrainingPalettizer
from lightning_palettize.palettizers.skm import SKMPalettizer
from lightning_palettize.report import PalettizationReport
from lightning_palettize.selection import select_weights

__all__ = ["CONFIG_DIR", "ConfigError", "main", "palettizer_config", "run"]

PROG = "lightning-palettize"
CHECKPOINT_FILE = "palettized.ckpt"
COMPACT_FILE = "model.palettized.safetensors"
REPORT_FILE = "report.csv"
FIGURE_FILE = "palettization.png"
SUMMARY_FILE = "summary.json"
#: The Hydra config tree shipped in the package.
CONFIG_DIR = Path(__file__).resolve().parent / "conf"

_ALGORITHMS = {
    "dkm": (DKMPalettizerConfig, DKM_SUPPORTED),
    "ptp": (PostTrainingPalettizerConfig, KMEANS_SUPPORTED),
    "skm": (SKMPalettizerConfig, KMEANS_SUPPORTED),
}
_EXPERIMENTS = ("digits", "minilm")
# Shortcut key -> ModuleXPalettizerConfig key it sets in algorithm.global_config.
_SHORTCUTS = {
    "n_bits": "n_bits",
    "granularity": "granularity",
    "group_size": "group_size",
    "cluster_dim": "cluster_dim",
    "per_channel_scale": "enable_per_channel_scale",
    "lut_dtype": "lut_dtype",
}
# The lut_dtype shortcut: what each algorithm accepts, spelled as its palettizer config wants
# it. DKM stores the LUT as f32, f16, bf16, i8 or u8; PTP/SKM (coremltools' k-means) keep a
# float LUT (f32) or quantize it to int8 / uint8: no f16 / bf16 there.
_DKM_LUT_DTYPES = {"f32": "f32", "fp32": "f32", "float32": "f32", "f16": "f16", "fp16": "f16",
                   "float16": "f16", "bf16": "bf16", "bfloat16": "bf16", "i8": "i8",
                   "int8": "i8", "u8": "u8", "uint8": "u8"}  # fmt: skip
_KMEANS_LUT_DTYPES = {"f32": None, "fp32": None, "float32": None, "i8": "int8", "int8": "int8",
                      "u8": "uint8", "uint8": "uint8"}  # fmt: skip
_LUT_DTYPES_ACCEPTED = {
    "dkm": "f32, f16, bf16, int8/i8 or uint8/u8",
    "ptp": "f32 (a float LUT), int8/i8 or uint8/u8 (f16/bf16 LUTs are DKM only)",
    "skm": "f32 (a float LUT), int8/i8 or uint8/u8 (f16/bf16 LUTs are DKM only)",
}
# Phase epochs come from experiment.warmup_epochs and algorithm.epochs, not from trainer.
_PHASE_KEYS = ("max_epochs", "min_epochs")


class ConfigError(ValueError):
    """A config value the run cannot use; the CLI prints its message and exits with status 2."""


# ---------------------------------------------------------------------------------------------
# config -> validated objects


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def palettizer_config(cfg: DictConfig) -> Any:
    """The validated palettizer config of ``cfg.algorithm`` with the shortcuts applied.

    Raises:
        ConfigError: naming the key, the bad value and what is accepted.
    """
    algo = cfg.algorithm
    if algo.name not in _ALGORITHMS:
        raise ConfigError(f"algorithm.name: got {algo.name!r}; expected one of dkm, ptp, skm")
    cls, _ = _ALGORITHMS[algo.name]
    data = {
        key: _plain(algo.get(key))
        for key in ("global_config", "module_type_configs", "module_name_configs")
    }
    shortcuts = {key: cfg.get(key) for key in _SHORTCUTS if cfg.get(key) is not None}
    if shortcuts:
        if data["global_config"] is None:
            raise ConfigError(
                f"{', '.join(shortcuts)}: the shortcuts set algorithm.global_config, which is "
                "null; set algorithm.global_config instead of null"
            )
        for key, value in shortcuts.items():
            if key == "lut_dtype":
                table = _DKM_LUT_DTYPES if algo.name == "dkm" else _KMEANS_LUT_DTYPES
                if not isinstance(value, str) or value.lower() not in table:
                    raise ConfigError(
                        f"lut_dtype: got {value!r}; algorithm={algo.name} accepts "
                        f"{_LUT_DTYPES_ACCEPTED[algo.name]}"
                    )
                value = table[value.lower()]
            data["global_config"][_SHORTCUTS[key]] = value
    if algo.name == "skm" and algo.get("calibration_nsamples") is not None:
        data["calibration_nsamples"] = algo.calibration_nsamples
    try:
        return load_config(data, cls)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"algorithm ({algo.name}): {error}") from None


def _positive_int(cfg: DictConfig, key: str, optional: bool = False) -> int | None:
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if optional else 1):
        expected = "an int >= 0 or null" if optional else "an int >= 1"
        raise ConfigError(f"{key}: got {value!r}; expected {expected}")
    return value


def _positive_float(cfg: DictConfig, key: str) -> float:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{key}: got {value!r}; expected a number > 0 (e.g. 1.0e-3)")
    return float(value)


def _check_selection(model: nn.Module, pcfg: Any, algo: str) -> list[str]:
    """Names of the weights ``pcfg`` palettizes, each checked against its shape."""
    _, supported = _ALGORITHMS[algo]
    try:
        selections = select_weights(model, pcfg, supported)
        for sel in selections:
            layout_for(getattr(sel.module, sel.param_name), sel.config, sel.qualified_name)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"algorithm ({algo}): {error}") from None
    if not selections:
        raise ConfigError(
            f"algorithm ({algo}): the config selects no weight of the model to palettize "
            "(check global_config, weight_threshold and module_name_configs)"
        )
    return [sel.qualified_name for sel in selections]


def _dry_run(model: nn.Module, pcfg: Any, algo: str) -> None:
    """Palettize a copy of a small model once, so that every config error shows before training."""
    names = _check_selection(model, pcfg, algo)
    probe = copy.deepcopy(model)
    try:
        if algo == "dkm":
            palettizer = DKMPalettizer(probe, pcfg)
            palettizer.prepare(inplace=True)
            palettizer.finalize(inplace=True)
        elif algo == "ptp":
            PostTrainingPalettizer(probe, pcfg).compress(inplace=True, progress=False)
        else:
            params = dict(probe.named_parameters())
            ones = {name: torch.ones_like(params[name]) for name in names}
            SKMPalettizer(probe, pcfg).compress(inplace=True, sensitivity=ones, progress=False)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"algorithm ({algo}): {error}") from None


def _trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kwargs = _plain(cfg.trainer) or {}
    bad = [key for key in _PHASE_KEYS if key in kwargs]
    if bad:
        raise ConfigError(
            f"trainer.{bad[0]}: each phase sets its own epochs; set experiment.warmup_epochs "
            "(fp32 warm-up) and algorithm.epochs (DKM) instead"
        )
    if "callbacks" in kwargs or "logger" in kwargs:
        # Hydra _target_ entries: loggers and extra callbacks built from the config.
        try:
            built = hydra.utils.instantiate(
                {k: kwargs[k] for k in ("callbacks", "logger") if k in kwargs}, _convert_="all"
            )
        except Exception as error:  # any failure of a user's _target_
            raise ConfigError(f"trainer: could not build callbacks/logger: {error}") from None
        kwargs.update(built)
    return kwargs


def _make_trainer(
    kwargs: dict[str, Any], out: Path, phase: str, callbacks: list, max_epochs: int | None
) -> L.Trainer:
    kwargs = dict(kwargs)
    extra = kwargs.pop("callbacks", None) or []
    extra = extra if isinstance(extra, list) else [extra]
    kwargs.setdefault("logger", CSVLogger(str(out), name="logs", version=phase))
    kwargs.setdefault("default_root_dir", str(out))
    try:
        with _quiet_tips():
            return L.Trainer(callbacks=[*callbacks, *extra], max_epochs=max_epochs, **kwargs)
    except (MisconfigurationException, TypeError, ValueError) as error:
        raise ConfigError(f"trainer: {error}") from None


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


@contextlib.contextmanager
def _quiet_tips() -> Iterator[None]:
    """Hide the advertising tip every new Trainer prints (twice per run here)."""
    loggers = [
        logging.getLogger(f"lightning.{p}.utilities.rank_zero") for p in ("pytorch", "fabric")
    ]
    tip_filter = _DropTips()
    for logger in loggers:
        logger.addFilter(tip_filter)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(tip_filter)


def _make_callback(cfg: DictConfig, pcfg: Any, calibration_loader: Any) -> Any:
    algo = cfg.algorithm
    if algo.name == "skm" and algo.get("calibration_nsamples") is None:
        pcfg.calibration_nsamples = max(len(calibration_loader), 1)  # one pass over the data
    try:
        if algo.name == "dkm":
            return PalettizationCallback(
                pcfg,
                milestone_epochs=_positive_int(cfg, "algorithm.milestone_epochs", True),
                verbose=False,  # the run prints the report itself, once
            )
        if algo.name == "ptp":
            return PostTrainingPalettizationCallback(pcfg, when="test_start", verbose=False)
        return SKMPalettizationCallback(
            pcfg,
            when="test_start",
            calibration_dataloader=calibration_loader,
            per_sample=algo.get("per_sample", False),
            verbose=False,
        )
    except MisconfigurationException as error:
        raise ConfigError(str(error)) from None


class _WeightSnapshot(L.Callback):
    """Copies the weights right before the palettization callback (listed after it) acts."""

    def __init__(self, moment: str) -> None:
        self.moment = moment
        self.weights: dict[str, Tensor] = {}

    def _take(self, pl_module: nn.Module) -> None:
        self.weights = {
            name: p.detach().to("cpu", copy=True)
            for name, p in pl_module.named_parameters()
            if name.endswith("weight")
        }

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called when fit ends, before a DKM callback listed later finalizes."""
        if self.moment == "fit_end":
            self._take(pl_module)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called when testing starts, before a PTP / SKM callback listed later palettizes."""
        if self.moment == "test_start" and not self.weights:
            self._take(pl_module)


# ---------------------------------------------------------------------------------------------
# experiments


def _run_digits(cfg: DictConfig, out: Path, pcfg: Any) -> dict[str, Any]:
    from lightning_palettize.data import DigitsClassifier, DigitsDataModule

    exp, algo = cfg.experiment, cfg.algorithm
    batch_size = _positive_int(cfg, "experiment.batch_size")
    warmup_epochs = _positive_int(cfg, "experiment.warmup_epochs", optional=True)
    lr = _positive_float(cfg, "experiment.lr")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = DigitsDataModule(batch_size=batch_size, seed=exp.split_seed)
    module = DigitsClassifier(lr=lr)
    _dry_run(module, pcfg, algo.name)

    kwargs = _trainer_kwargs(cfg)
    dkm = algo.name == "dkm"
    snapshot = _WeightSnapshot("fit_end" if dkm else "test_start")
    if dkm:
        dkm_epochs = _positive_int(cfg, "algorithm.epochs")
        dkm_lr = _positive_float(cfg, "algorithm.lr")
    callback = _make_callback(cfg, pcfg, dm.train_dataloader())
    warmup = _make_trainer(kwargs, out, "warmup", [], warmup_epochs)
    phase = _make_trainer(kwargs, out, algo.name, [snapshot, callback], dkm_epochs if dkm else 1)

    times: dict[str, float] = {}
    tick = time.perf_counter()
    if warmup_epochs:
        print(f"[1/2] fp32 warm-up: {warmup_epochs} epoch(s)", flush=True)
        warmup.fit(module, datamodule=dm)
    fp32_acc = warmup.test(module, datamodule=dm, verbose=False)[0]["test_acc"]
    times["warmup_s"] = time.perf_counter() - tick
    dense_model = copy.deepcopy(module.model)

    tick = time.perf_counter()
    if dkm:
        print(f"[2/2] DKM: {dkm_epochs} epoch(s) of palettized fine-tuning", flush=True)
        module.hparams.lr = dkm_lr
        phase.fit(module, datamodule=dm)
    else:
        print(f"[2/2] {algo.name.upper()} palettization of the fp32 model", flush=True)
    palettized_acc = phase.test(module, datamodule=dm, verbose=False)[0]["test_acc"]
    times["palettize_s"] = time.perf_counter() - tick

    results = {
        "metric": "test accuracy",
        "fp32": float(fp32_acc),
        "palettized": float(palettized_acc),
    }
    return _finish(cfg, out, phase, module, module.model, dense_model, callback, snapshot,
                   results, times)  # fmt: skip


def _minilm_config(cfg: DictConfig, pcfg: Any, module: nn.Module) -> Any:
    """Leave out the pooler (unused) and, for quick checks, all but the first Linear layers.

    Weight names are those of the LightningModule: ``model.encoder.layer.0...``.
    """
    from lightning_palettize.data import minilm_linear_names

    exp = cfg.experiment
    data = pcfg.as_dict()
    names = data["module_name_configs"]
    max_layers = _positive_int(cfg, "experiment.max_layers", optional=True)
    if max_layers is not None:
        module_cfg = data["global_config"]
        keep = minilm_linear_names(module)[:max_layers]
        data["global_config"], data["module_type_configs"] = None, {}
        names.update({re.escape(name): module_cfg for name in keep if re.escape(name) not in names})
    elif not exp.include_pooler:
        names.setdefault(r"model\.pooler\..*", None)
    try:
        return load_config(data, type(pcfg))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"algorithm ({cfg.algorithm.name}): {error}") from None


def _run_minilm(cfg: DictConfig, out: Path, pcfg: Any) -> dict[str, Any]:
    from lightning_palettize.data import (
        SentenceEmbedder,
        SentencePairsDataModule,
        embedding_cosine,
        load_minilm,
        load_sentence_pairs,
        pair_retrieval_accuracy,
    )

    exp, algo = cfg.experiment, cfg.algorithm
    if algo.name == "dkm":
        raise ConfigError(
            "experiment=minilm: algorithm=dkm is not offered (it needs a fine-tuning task); "
            "use algorithm=ptp or algorithm=skm"
        )
    batch_size = _positive_int(cfg, "experiment.batch_size")
    max_length = _positive_int(cfg, "experiment.max_length")
    num_pairs = _positive_int(cfg, "experiment.num_pairs", optional=True)
    try:
        pairs = load_sentence_pairs(exp.pairs_file)
    except (OSError, ValueError) as error:
        raise ConfigError(f"experiment.pairs_file: {error}") from None
    pairs = pairs[:num_pairs] if num_pairs else pairs
    if len(pairs) < 2 or batch_size < 2:
        raise ConfigError(
            f"experiment: got {len(pairs)} pair(s) and batch_size={batch_size}; the contrastive "
            "loss needs at least 2 of each"
        )
    try:
        model, tokenizer = load_minilm()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None
    module = SentenceEmbedder(model, tokenizer, max_length=max_length)
    pcfg = _minilm_config(cfg, pcfg, module)
    _check_selection(module, pcfg, algo.name)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = SentencePairsDataModule(pairs, batch_size=batch_size)
    sentences = [s for pair in pairs for s in pair]

    tick = time.perf_counter()
    dense_model = copy.deepcopy(model)
    with torch.no_grad():
        reference = module.embed(sentences)
    times = {"reference_s": time.perf_counter() - tick}
    snapshot = _WeightSnapshot("test_start")
    callback = _make_callback(cfg, pcfg, calibration_loader=dm.train_dataloader())
    trainer = _make_trainer(_trainer_kwargs(cfg), out, algo.name, [snapshot, callback], None)
    print(f"{algo.name.upper()} palettization of all-MiniLM-L6-v2", flush=True)
    tick = time.perf_counter()
    trainer.test(module, datamodule=dm, verbose=False)
    with torch.no_grad():
        after = module.embed(sentences)
    times["palettize_s"] = time.perf_counter() - tick
    results = {
        "metric": f"embedding cosine to fp32 ({len(sentences)} sentences)",
        "fp32": 1.0,
        "palettized": embedding_cosine(reference, after),
        "pair_retrieval_fp32": pair_retrieval_accuracy(reference[0::2], reference[1::2]),
        "pair_retrieval_palettized": pair_retrieval_accuracy(after[0::2], after[1::2]),
    }
    return _finish(cfg, out, trainer, module, module.model, dense_model, callback, snapshot,
                   results, times)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# outputs


def _finish(
    cfg: DictConfig,
    out: Path,
    trainer: L.Trainer,
    module: L.LightningModule,
    net: nn.Module,
    dense_net: nn.Module,
    callback: Any,
    snapshot: _WeightSnapshot,
    results: dict[str, Any],
    times: dict[str, float],
) -> dict[str, Any]:
    report: PalettizationReport = callback.report or PalettizationReport()
    files: dict[str, str] = {}
    if cfg.save_checkpoint:
        trainer.save_checkpoint(str(out / CHECKPOINT_FILE), weights_only=False)
        files["checkpoint"] = CHECKPOINT_FILE
    compact = save_palettized(
        net,
        out / COMPACT_FILE,
        metadata={"experiment": cfg.experiment.name, "algorithm": cfg.algorithm.name},
    )
    files["compact"] = COMPACT_FILE
    (out / REPORT_FILE).write_text(report.to_csv(), encoding="utf-8")
    files["report"] = REPORT_FILE
    if cfg.plot:
        prefix = _prefix_of(module, net)
        if _plot(out / FIGURE_FILE, report, snapshot.weights, module, prefix):
            files["figure"] = FIGURE_FILE
    summary = {
        "experiment": cfg.experiment.name,
        "algorithm": cfg.algorithm.name,
        **results,
        "fp32_bytes": int(compact["dense_bytes"]),
        "compact_file_bytes": int(compact["file_bytes"]),
        "palettized_bytes": int(compact["palettized_bytes"]),
        "ideal_palettized_bytes": int(compact["ideal_bytes"]),
        "report": report.summary(),
        "palettizer_config": callback.config.as_dict(),
        "times_s": times,
        "output_dir": str(out),
        "files": files,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    _print_summary(summary, report)
    del dense_net
    return summary


def _prefix_of(module: nn.Module, net: nn.Module) -> str:
    for name, child in module.named_modules():
        if child is net:
            return f"{name}." if name else ""
    return ""


def _print_summary(summary: dict[str, Any], report: PalettizationReport) -> None:
    fp32, pal = summary["fp32"], summary["palettized"]
    ratio = summary["fp32_bytes"] / max(summary["compact_file_bytes"], 1)
    lines = [
        "",
        f"== {PROG}: {summary['experiment']} / {summary['algorithm']} ==",
        f"{summary['metric']}: fp32 {fp32:.4f} -> palettized {pal:.4f} ({pal - fp32:+.4f})",
    ]
    if "pair_retrieval_fp32" in summary:
        lines.append(
            f"pair retrieval accuracy: fp32 {summary['pair_retrieval_fp32']:.4f} -> "
            f"palettized {summary['pair_retrieval_palettized']:.4f}"
        )
    lines += [
        "",
        report.to_table(),
        "",
        f"model bytes: fp32 {summary['fp32_bytes']:,} -> compact file "
        f"{summary['compact_file_bytes']:,} ({ratio:.2f}x smaller)",
        f"run folder: {summary['output_dir']}",
    ]
    lines += [f"  {kind:<10} {name}" for kind, name in summary["files"].items()]
    print("\n".join(lines), flush=True)


def _plot(
    path: Path,
    report: PalettizationReport,
    before: dict[str, Tensor],
    module: nn.Module,
    prefix: str,
) -> bool:
    """One panel per palettized weight: histogram before palettization, LUT entries on top."""
    try:
        # A bare Figure draws with Agg and leaves pyplot's global backend and state alone.
        from matplotlib.figure import Figure
    except ImportError:
        print(
            f"{PROG}: matplotlib is not installed; no figure "
            "(pip install 'lightning-palettize[plot]')",
            file=sys.stderr,
        )
        return False
    rows = report.rows
    if not rows:
        return False
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    ncols = min(4, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 2.8 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(rows) :]:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        after = params[row.name].detach().float().flatten().cpu()
        original = before.get(row.name)
        values = (original if original is not None else after).float().flatten()
        lo, hi = values.min().item(), values.max().item()
        ax.hist(
            values.numpy(),
            bins=120,
            range=(lo, hi),
            color="0.65",
            label="weights before palettizing",
        )
        lut = _single_lut(buffers, row.name)
        if lut is not None:
            for i, c in enumerate(lut.tolist()):
                ax.axvline(c, color="tab:red", lw=1.0, label="LUT entries" if i == 0 else None)
            ax.legend(fontsize=6, loc="upper right")
        else:
            # Many LUTs: the palettized values' histogram, on its own scale (it is spiky).
            twin = ax.twinx()
            twin.hist(after.numpy(), bins=240, range=(lo, hi), histtype="step", color="tab:red")
            twin.tick_params(labelsize=7, colors="tab:red")
            twin.set_ylabel(f"palettized values ({row.num_luts} LUTs)", fontsize=7, color="tab:red")
            ax.legend(fontsize=6, loc="upper left")
        short = row.name[len(prefix) :] if row.name.startswith(prefix) else row.name
        ax.set_title(f"{short}: {row.n_bits}-bit, rel err {row.rel_error:.2e}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("weight histogram and LUT per palettized layer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _single_lut(buffers: dict[str, Tensor], weight_name: str) -> Tensor | None:
    """The LUT entries of a weight with one scalar LUT and no per-channel scale, else None."""
    owner, _, param = weight_name.rpartition(".")
    key = f"{owner}.{COREML_PREFIX}/{param}" if owner else f"{COREML_PREFIX}/{param}"
    lut = buffers.get(f"{key}/lut")
    if lut is None or f"{key}/palettization_scale" in buffers:
        return None
    # coremltools' LUT shape: [groups per dim..., K, cluster_dim]
    if lut.shape[-1] != 1 or lut[..., 0].numel() != lut.shape[-2]:
        return None
    return lut.flatten().float().cpu()


# ---------------------------------------------------------------------------------------------
# entry points


def run(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run the job described by a composed config (what the Hydra app calls).

    Args:
        cfg: the composed config (``conf/config.yaml`` plus overrides).
        output_dir: the run folder (created if missing).

    Returns:
        The summary also written to ``summary.json``: accuracies (or embedding cosine), bytes,
        report totals, the palettizer config, timings and file names.

    Raises:
        ConfigError: for a value the run cannot use, before any training starts.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.experiment.name not in _EXPERIMENTS:
        raise ConfigError(
            f"experiment.name: got {cfg.experiment.name!r}; expected one of digits, minilm"
        )
    pcfg = palettizer_config(cfg)
    threads = _positive_int(cfg, "num_threads", optional=True)
    if threads == 0:
        raise ConfigError("num_threads: got 0; expected an int >= 1 or null")
    print(f"{PROG}: {cfg.experiment.name} / {cfg.algorithm.name} -> {out}", flush=True)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if cfg.experiment.name == "digits":
            return _run_digits(cfg, out, pcfg)
        return _run_minilm(cfg, out, pcfg)
    finally:
        torch.set_num_threads(previous)


# An absolute path: Hydra then reads the folder directly (a relative one would need conf/ to be
# an importable package when the app runs as ``python -m``).
@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as error:
        print(f"{PROG}: config error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``lightning-palettize`` (and ``python -m lightning_palettize``).

    Args:
        argv: Hydra overrides and flags such as ``["algorithm=ptp", "n_bits=3"]``;
            ``None`` reads ``sys.argv``.

    Raises:
        SystemExit: status 2 for a config error (message on stderr), 1 for Hydra's own errors.
    """
    saved = sys.argv
    if argv is not None:
        sys.argv = [saved[0] if saved else PROG, *argv]
    try:
        _hydra_main()
    except BrokenPipeError:
        # `lightning-palettize --help | head`: the reader left; end quietly, as POSIX tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    finally:
        sys.argv = saved
