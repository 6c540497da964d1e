"""Runners around coremltools 9.0's torch palettization (the side we compare against), plus the
error helpers that are computed identically for ours and theirs.

coremltools is imported lazily (``import_ct``), with its import-time chatter (untested torch
version, missing libcoremlpython, unsupported scikit-learn) silenced.

Config dicts
------------
``ptp_config_dict`` builds a config in coremltools' dict format (``from_dict``) that names each
module to palettize explicitly in ``module_name_configs`` (regex-escaped, no global config).
lightning_palettize accepts the same dict, so both sides palettize exactly the same layers. For
``per_grouped_channel`` a module whose channel axis is not divisible by ``group_size`` (the 10-way
heads of the MLP and conv net) is left out: coremltools silently skips it, ours raises.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

_CT = None


def import_ct():
    """Import coremltools quietly; returns the module (raises ImportError if missing)."""
    global _CT
    if _CT is None:
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        os.environ.setdefault("COREMLTOOLS_OPTIMIZE_TORCH_LOG_LEVEL", "warning")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coremltools
            import coremltools.optimize.torch._utils.k_means as ct_k_means
            import coremltools.optimize.torch.palettization  # noqa: F401

        # coremltools.optimize.torch installs its own INFO-level stream handler (one line per
        # layer) and a tqdm bar per compress; both are noise in benchmark output and cost the
        # same on every run. Our palettizers run with their progress bars off as well.
        logging.getLogger("coremltools.optimize.torch").setLevel(logging.WARNING)
        ct_k_means.tqdm = functools.partial(ct_k_means.tqdm, disable=True)
        _CT = coremltools
    return _CT


def ct_available() -> bool:
    try:
        import_ct()
    except ImportError:
        return False
    return True


def ct_version() -> str | None:
    try:
        return import_ct().__version__
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------
# configs

PTP_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv2d)


def target_modules(
    model: nn.Module,
    module_names: Sequence[str] | None = None,
    types: tuple[type, ...] = PTP_TYPES,
) -> list[str]:
    """``module_names`` if given, else every module of ``types`` (in model order)."""
    if module_names is not None:
        return list(module_names)
    return [n for n, m in model.named_modules() if isinstance(m, types)]


def module_config(
    n_bits: int,
    granularity: str = "per_tensor",
    group_size: int | None = None,
    channel_axis: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {"n_bits": n_bits, "granularity": granularity}
    if granularity == "per_grouped_channel":
        if group_size is None:
            raise ValueError("per_grouped_channel needs group_size")
        cfg["group_size"] = group_size
    elif group_size is not None:
        raise ValueError(f"group_size={group_size} given with granularity={granularity!r}")
    if channel_axis is not None:
        cfg["channel_axis"] = channel_axis
    cfg.update(extra)
    return cfg


def ptp_config_dict(
    model: nn.Module,
    n_bits: int = 4,
    granularity: str = "per_tensor",
    group_size: int | None = None,
    module_names: Sequence[str] | None = None,
    types: tuple[type, ...] = PTP_TYPES,
    channel_axis: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """A PostTrainingPalettizerConfig / SKMPalettizerConfig dict naming each palettized module.
    Modules whose channel axis ``group_size`` does not divide are left out (see module doc)."""
    mods = dict(model.named_modules())
    cfg = module_config(
        n_bits,
        granularity,
        group_size,
        channel_axis if granularity == "per_grouped_channel" else None,
        **extra,
    )
    names = {}
    for name in target_modules(model, module_names, types):
        w = mods[name].weight
        if granularity == "per_grouped_channel" and w.shape[channel_axis] % group_size:
            continue
        names[re.escape(name)] = dict(cfg)
    return {"module_name_configs": names}


def configured_param_names(model: nn.Module, config: dict[str, Any]) -> list[str]:
    """Qualified weight names selected by a ``ptp_config_dict`` (module_name_configs only)."""
    pats = [(re.compile(k), v) for k, v in config.get("module_name_configs", {}).items()]
    out = []
    for name, _m in model.named_modules():
        for pat, v in pats:
            if pat.fullmatch(name):
                if v is not None:
                    out.append(f"{name}.weight")
                break
    return out


# ---------------------------------------------------------------------------------------------
# PTP


def ct_ptp(
    model: nn.Module,
    n_bits: int = 4,
    granularity: str = "per_tensor",
    group_size: int | None = None,
    module_names: Sequence[str] | None = None,
    config: dict[str, Any] | None = None,
    inplace: bool = False,
) -> tuple[nn.Module, float]:
    """coremltools PostTrainingPalettizer (default fast k-means mode, 1 worker).

    Returns (compressed model, seconds of ``PostTrainingPalettizer(model, cfg).compress()``,
    including its deep copy of the model when ``inplace=False``: the same call our side times).
    """
    ct = import_ct()
    pal = ct.optimize.torch.palettization
    if config is None:
        config = ptp_config_dict(model, n_bits, granularity, group_size, module_names)
    cfg = pal.PostTrainingPalettizerConfig.from_dict(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        out = pal.PostTrainingPalettizer(model, cfg).compress(inplace=inplace)
        seconds = time.perf_counter() - t0
    return out, seconds


# ---------------------------------------------------------------------------------------------
# SKM


def _calibration_copy(model: nn.Module, grad_params: set[str] | None) -> nn.Module:
    m = copy.deepcopy(model)
    if grad_params is not None:
        # coremltools 9.0 reads ``param.grad`` of every trainable parameter and crashes with
        # AttributeError on one that got no gradient (e.g. MiniLM's unused pooler). Only the
        # palettized weights need a sensitivity, so only they keep requires_grad.
        for name, p in m.named_parameters():
            p.requires_grad_(name in grad_params)
    return m


def ct_skm(
    model: nn.Module,
    n_bits: int = 4,
    granularity: str = "per_tensor",
    group_size: int | None = None,
    dataloader: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    nsamples: int = 128,
    module_names: Sequence[str] | None = None,
    config: dict[str, Any] | None = None,
    sensitivity_path: str | None = None,
    measure_full: bool = False,
    details: dict[str, Any] | None = None,
) -> tuple[nn.Module, float, float]:
    """coremltools SKMPalettizer. Returns (compressed model, total seconds, k-means seconds).

    coremltools' ``compress(dataloader, loss_fn)`` = deep copy + ``compute_sensitivity`` (one
    forward/backward per dataloader item, ``nsamples`` items) + weighted k-means. To time the
    k-means part alone we run the two halves separately, exactly as coremltools does inside
    compress:

    1. ``SKMPalettizer(copy, cfg).compute_sensitivity(dataloader, loss_fn, sensitivity_path=p)``
       writes the processed sensitivity to ``p`` (calibration time);
    2. ``SKMPalettizer(model, cfg).compress(sensitivity_path=p)`` loads it and only clusters
       (k-means time; includes the deep copy and the small torch.load, as our side's would).

    total = calibration + k-means. With ``measure_full=True`` one more, untouched
    ``compress(dataloader, loss_fn)`` is timed and reported as ``details["full_seconds"]`` (the
    returned total stays calibration + k-means so the two parts add up). If
    ``sensitivity_path`` names an existing file, calibration is skipped (total = k-means).
    ``details`` (a dict) receives calibration_seconds, sensitivity_path and the sensitivity dict.
    """
    ct = import_ct()
    pal = ct.optimize.torch.palettization
    if config is None:
        config = ptp_config_dict(model, n_bits, granularity, group_size, module_names)
    config = dict(config)
    config["calibration_nsamples"] = nsamples
    cfg = pal.SKMPalettizerConfig.from_dict(config)
    grad_params = set(configured_param_names(model, config))

    tmp = None
    if sensitivity_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="lp_bench_skm_")
        sensitivity_path = os.path.join(tmp.name, "sensitivity.pt")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calib_s = 0.0
            if not os.path.exists(sensitivity_path):
                if dataloader is None or loss_fn is None:
                    raise ValueError("ct_skm needs dataloader and loss_fn (or a sensitivity_path)")
                calib_model = _calibration_copy(model, grad_params)
                t0 = time.perf_counter()
                pal.SKMPalettizer(calib_model, cfg).compute_sensitivity(
                    dataloader, loss_fn, sensitivity_path=sensitivity_path
                )
                calib_s = time.perf_counter() - t0
                del calib_model
            t0 = time.perf_counter()
            out = pal.SKMPalettizer(model, cfg).compress(sensitivity_path=sensitivity_path)
            kmeans_s = time.perf_counter() - t0
            if details is not None:
                details["calibration_seconds"] = calib_s
                details["kmeans_seconds"] = kmeans_s
                details["sensitivity"] = torch.load(sensitivity_path)
                details["sensitivity_path"] = None if tmp is not None else sensitivity_path
            if measure_full:
                full_model = _calibration_copy(model, grad_params)
                t0 = time.perf_counter()
                pal.SKMPalettizer(full_model, cfg).compress(dataloader=dataloader, loss_fn=loss_fn)
                full_s = time.perf_counter() - t0
                del full_model
                if details is not None:
                    details["full_seconds"] = full_s
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out, calib_s + kmeans_s, kmeans_s


# ---------------------------------------------------------------------------------------------
# DKM


def ct_dkm_steps(
    model: nn.Module,
    config_dict: dict[str, Any] | None,
    batches: Sequence[Any],
    optimizer_fn: Callable[[nn.Module], torch.optim.Optimizer],
    n_steps: int,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    finalize: bool = False,
) -> dict[str, Any]:
    """coremltools DKMPalettizer: ``prepare()`` (on a copy), then ``n_steps`` training steps
    (zero_grad, loss, backward, optimizer.step, palettizer.step), each timed.

    ``optimizer_fn(prepared_model)`` builds the optimizer; ``loss_fn(model, batch)`` defaults to
    cross-entropy on ``(x, y)`` batches. Returns prepare_s, first_step_s (includes coremltools'
    k-means init, which happens in the first palettized forward), steady_step_s (median of the
    later steps), step_s, losses, and when ``finalize`` finalize_s and the finalized ``model``.
    The palettizer is returned under ``palettizer``.

    Expect minutes: on the MLP the first step alone takes 22-186 s here.
    """
    from bench._harness import train_steps

    ct = import_ct()
    pal = ct.optimize.torch.palettization
    cfg = pal.DKMPalettizerConfig.from_dict(config_dict) if config_dict is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        palettizer = pal.DKMPalettizer(model, cfg)
        t0 = time.perf_counter()
        prepared = palettizer.prepare(inplace=False)
        prepare_s = time.perf_counter() - t0
        res = train_steps(prepared, batches, optimizer_fn, n_steps, loss_fn, palettizer.step)
        res["prepare_s"] = prepare_s
        res["palettizer"] = palettizer
        if finalize:
            t0 = time.perf_counter()
            res["model"] = palettizer.finalize(inplace=False)
            res["finalize_s"] = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------------------------
# error helpers (identical for ours and theirs)


def palettized_param_names(model: nn.Module) -> list[str]:
    """Qualified names of weights that carry Core ML palettization metadata
    (``<module>._COREML_/<param>/compression_type`` containing 2). Both coremltools and
    lightning_palettize write these buffers."""
    out = []
    for bname, buf in model.named_buffers():
        mod, sep, rest = bname.rpartition("._COREML_/")
        if not sep:
            if not bname.startswith("_COREML_/"):
                continue
            mod, rest = "", bname[len("_COREML_/") :]
        param, _, field = rest.partition("/")
        if field == "compression_type" and 2 in buf.flatten().tolist():
            out.append(f"{mod}.{param}" if mod else param)
    return out


def _params(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    return {n: model.get_parameter(n).detach() for n in names}


def per_layer_relative_error(
    original: nn.Module,
    compressed: nn.Module,
    names: Sequence[str] | None = None,
) -> dict[str, float]:
    """{qualified param name: ||W - W_hat||^2 / ||W||^2} in float64 for every palettized weight.

    ``names`` defaults to the weights with palettization metadata in ``compressed``.
    """
    if names is None:
        names = palettized_param_names(compressed)
        if not names:
            raise ValueError("no palettization metadata found in the compressed model; pass names")
    w0, w1 = _params(original, names), _params(compressed, names)
    out = {}
    for n in names:
        a, b = w0[n].double(), w1[n].double()
        if a.shape != b.shape:
            raise ValueError(f"{n}: shape {tuple(a.shape)} != {tuple(b.shape)}")
        den = a.square().sum().item()
        num = (a - b).square().sum().item()
        out[n] = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
    return out


def per_layer_weighted_error(
    original: nn.Module,
    compressed: nn.Module,
    sensitivity: dict[str, torch.Tensor],
    names: Sequence[str] | None = None,
) -> dict[str, float]:
    """{name: sum(S * (W - W_hat)^2) / sum(S * W^2)}: the Fisher-weighted error SKM minimises."""
    if names is None:
        names = [n for n in palettized_param_names(compressed) if n in sensitivity]
    w0, w1 = _params(original, names), _params(compressed, names)
    out = {}
    for n in names:
        s = sensitivity[n].double()
        a, b = w0[n].double(), w1[n].double()
        den = (s * a.square()).sum().item()
        num = (s * (a - b).square()).sum().item()
        out[n] = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
    return out


def error_ratios(ours: dict[str, float], theirs: dict[str, float]) -> dict[str, float]:
    """{name: ours / theirs} over the common names (1.0 where both are 0)."""
    out = {}
    for n in ours.keys() & theirs.keys():
        a, b = ours[n], theirs[n]
        out[n] = 1.0 if a == b else (a / b if b > 0 else float("inf"))
    return out


def max_unique_per_group(weight: torch.Tensor, group_size: int | None = None, axis: int = 0) -> int:
    """Largest number of distinct values in one LUT group (the whole tensor when ``group_size``
    is None; otherwise blocks of ``group_size`` slices along ``axis``)."""
    w = weight.detach()
    if group_size is None:
        return int(torch.unique(w).numel())
    w = w.movedim(axis, 0)
    return max(
        int(torch.unique(w[i : i + group_size]).numel()) for i in range(0, w.shape[0], group_size)
    )


def dense_bytes(model: nn.Module, names: Sequence[str]) -> int:
    """Bytes of the named parameters as stored densely (numel * element size)."""
    params = [model.get_parameter(n) for n in names]
    return sum(p.numel() * p.element_size() for p in params)
