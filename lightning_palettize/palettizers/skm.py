"""SKMPalettizer: sensitivity-weighted k-means palettization (SqueezeLLM), coremltools' API.

Each weight element's clustering error is weighted by its diagonal Fisher information (the
squared gradients of a calibration loss, :mod:`lightning_palettize.sensitivity`), so the
centroids settle where the loss is most sensitive. Optionally the most sensitive elements are
kept exact altogether (SqueezeLLM's dense-and-sparse decomposition, ``outlier_fraction``).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

import torch
from torch import Tensor, nn

from lightning_palettize.config import SKMPalettizerConfig, load_config
from lightning_palettize.kmeans import kmeans_1d
from lightning_palettize.palette import Layout, Palette
from lightning_palettize.palettizers._common import (
    KMEANS_SUPPORTED,
    PalettizedWeight,
    build_palette,
    compress_model,
    layout_for,
    palettize_weight,
    scaled_groups,
)
from lightning_palettize.palettizers.post_training import lut_dtype_name
from lightning_palettize.report import PalettizationReport
from lightning_palettize.selection import WeightSelection, select_weights
from lightning_palettize.sensitivity import (
    _FORMAT_VERSION,
    _HEADER_KEY,
    Sensitivity,
    compute_sensitivity,
    normalize_sensitivity,
)

__all__ = ["SKMPalettizer"]

# Auto mode, fp32 weights: the two-level k-means up to 4 bits and 2**22 elements per weight (it
# sorts the weight, ~60 bytes per element while it runs; with more clusters it was seen to miss
# the optimum); else the exact DP while (elements per LUT) * K <= 2**25 (its int32
# back-pointers: 128 MiB); else the 16-bit codes (at most 65,536 bins per LUT).
_TWO_LEVEL_MAX_NUMEL = 1 << 22
_TWO_LEVEL_MAX_BITS = 4
# Below this many values per LUT group nearly every value has its own 16-bit code: level 1 would
# not shrink the DP, so the plain exact DP runs (without sorting the weight twice).
_TWO_LEVEL_MIN_GROUP = 1 << 15
_EXACT_MAX_WORK = 1 << 25
# Sorted positions on each side of a level-1 boundary where level 2 may move it: N / (16 (K-1))
# within [32, 1024] (MiniLM's exact boundaries lie within ~500 positions of the code ones).
_WINDOW_MIN, _WINDOW_MAX = 32, 1024
# Level 1 must resolve the values: groups where the spread of the values inside their level-1
# blocks exceeds this fraction of the level-1 cost take the exact DP (see _kmeans_two_level).
_LEVEL1_MAX_SPREAD = 1e-3
_LUT_QDTYPES = {"int8": torch.int8, "uint8": torch.uint8}
_HALF = (torch.float16, torch.bfloat16)

SensitivityLike = Sensitivity | Mapping[str, Tensor] | str | os.PathLike


class SKMPalettizer:
    """Sensitive k-means: palettize a trained model with Fisher-weighted exact k-means.

    ``compress(dataloader, loss_fn)`` first runs ``calibration_nsamples`` calibration samples
    through ``loss_fn(model, item)`` and accumulates the diagonal Fisher information of every
    selected weight (see :func:`~lightning_palettize.sensitivity.compute_sensitivity`; the model
    is left exactly as it was, also when ``loss_fn`` raises). Each weight is then clustered by
    k-means that minimises ``sum(F_norm * (w - w_hat) ** 2)``, with ``F_norm`` the Fisher
    normalised by :func:`~lightning_palettize.sensitivity.normalize_sensitivity` (in (0, 1], so
    zero or tiny Fisher values never produce NaN or Inf, unlike coremltools 9.0), and
    overwritten with its centroids; Core ML metadata is attached as by
    :class:`~lightning_palettize.PostTrainingPalettizer`.

    Counting samples: by default one dataloader item is one sample whatever its batch size
    (coremltools: batch gradients); ``compress(per_sample=True)`` cuts items into individual
    samples (SqueezeLLM: per-sample gradients, the Fisher the method assumes).

    Clustering (``cluster_dim == 1``; ``exact_kmeans=None``, the default): the objective is
    solved to the optimum that coremltools' exact kmeans1d finds, faster:

    * fp32 weights up to 4 bits and 2**22 elements, LUT groups of 2**15 values or more: a
      two-level DP. Level 1 solves it over blocks of values sharing a 16-bit float code (each
      block at its true weighted mean), level 2 over the single values near each level-1
      boundary. It matched the DP over every distinct value on every weight and LUT group
      tried (all MiniLM layers at 2/3/4 bits, thousands of random groups) and is ~4x faster on
      large LUT groups; it is not a proof of optimality: ``exact_kmeans=True`` gives that.
    * otherwise the DP over every distinct value while ``elements per LUT * 2**n_bits <= 2**25``
      (``O(distinct values * K)`` memory), and over 16-bit float codes above that (at most
      65,536 bins per LUT whatever the layer size; the bins are the values of fp16/bf16
      weights, measured within 1e-5 of the optimum for fp32). ``exact_kmeans=True`` /
      ``False`` forces the first / the second for every weight.

    ``cluster_dim > 1`` uses weighted vector k-means (importance summed over each vector).

    Reusable sensitivity: :meth:`compute_sensitivity` returns (and with ``sensitivity_path``
    saves) the Fisher; pass it back as ``compress(sensitivity=...)``, a
    :class:`~lightning_palettize.sensitivity.Sensitivity`, a ``{name: tensor}`` mapping, or a
    file path (``sensitivity_path=`` works too, as in coremltools). A file written by
    :meth:`Sensitivity.save` is read one tensor at a time, so it never sits in memory whole; a
    coremltools sensitivity file (``torch.save`` of a dict) is accepted as well.

    Weights without a sensitivity (they got no gradient from ``loss_fn``, e.g. an unused pooler
    or a frozen branch) fall back to plain k-means, with one warning naming them (coremltools
    9.0 crashes with AttributeError on such a model).

    Outliers (``ModuleSKMPalettizerConfig.outlier_fraction``, a lightning_palettize extension):
    the ``int(outlier_fraction * numel)`` elements of each weight with the largest Fisher are
    left out of the k-means (importance 0) and written back exactly, and the report counts them
    (``ReportRow.outliers``; ``bytes_after`` adds 4 + itemsize bytes each for a sparse copy).
    The Core ML metadata attached to the model describes only the LUT, not the outliers: a
    weight with outliers must be exported with the sparse (dense-and-sparse) format, not with
    ``coremltools.convert``'s LUT path.

    Args:
        model: the model to compress.
        config: an :class:`SKMPalettizerConfig`, a dict, an OmegaConf DictConfig, a YAML path or
            stream, or ``None`` (4 bits per tensor for every supported module, 128 samples).

    Raises:
        TypeError / ValueError: for an invalid model or config.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_palettize import SKMPalettizer
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> data = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(4)]
        >>> loss_fn = lambda m, item: nn.functional.cross_entropy(m(item[0]), item[1])
        >>> cfg = {"global_config": {"n_bits": 2, "outlier_fraction": 0.01},
        ...        "calibration_nsamples": 4}
        >>> skm = SKMPalettizer(model, cfg)
        >>> small = skm.compress(data, loss_fn, progress=False)
        >>> [row.outliers for row in skm.report().rows]
        [5, 1]
        >>> len(torch.unique(small[2].weight)) <= 4 + 1  # 4 centroids + 1 exact outlier
        True
    """

    def __init__(
        self,
        model: nn.Module,
        config: SKMPalettizerConfig | dict | str | IO | Any | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self._model = model
        self._config = load_config(config, SKMPalettizerConfig)
        self._report = PalettizationReport()
        self._source: _FisherSource | None = None
        self._exact: bool | None = None

    @property
    def config(self) -> SKMPalettizerConfig:
        """The validated config."""
        return self._config

    def compute_sensitivity(
        self,
        dataloader: Iterable[Any],
        loss_fn: Callable[[nn.Module, Any], Tensor],
        sensitivity_path: str | os.PathLike[str] | None = None,
        *,
        per_sample: bool = False,
        progress: bool = True,
    ) -> Sensitivity:
        """Calibrate: the raw Fisher of every weight :meth:`compress` would palettize.

        Uses the first ``config.calibration_nsamples`` samples; the model is restored afterwards
        (parameters, buffers, train/eval mode, requires_grad, ``.grad``), also on errors.

        Args:
            dataloader: any iterable of items (a DataLoader, a list of batches, ...).
            loss_fn: ``loss_fn(model, item) -> Tensor`` with one element.
            sensitivity_path: if given, also save the result there (safetensors), for
                ``compress(sensitivity=path)`` later.
            per_sample: count and differentiate individual samples of each item (SqueezeLLM)
                instead of whole items (coremltools).
            progress: a progress bar over samples; ``False`` silences it.

        Returns:
            The :class:`~lightning_palettize.sensitivity.Sensitivity` (raw, not normalised).

        Raises:
            ValueError / TypeError: for bad arguments (see ``compute_sensitivity``), or when a
                weight's shape does not fit its config (checked before calibrating).
        """
        _check_bool("per_sample", per_sample)
        if not callable(loss_fn):
            raise TypeError(
                f"SKMPalettizer: loss_fn must be a callable loss_fn(model, item) -> Tensor, got "
                f"{type(loss_fn).__name__}"
            )
        selections = self._selections()
        sens = compute_sensitivity(
            self._model,
            dataloader,
            loss_fn,
            param_names=[s.qualified_name for s in selections],
            nsamples=self._config.calibration_nsamples,
            per_sample=per_sample,
            progress=progress,
        )
        if sensitivity_path is not None:
            sens.save(sensitivity_path)
        return sens

    def compress(
        self,
        dataloader: Iterable[Any] | None = None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        inplace: bool = False,
        *,
        sensitivity: SensitivityLike | None = None,
        sensitivity_path: str | os.PathLike[str] | None = None,
        per_sample: bool = False,
        progress: bool = True,
        num_kmeans_workers: int = 1,
        exact_kmeans: bool | None = None,
    ) -> nn.Module:
        """Calibrate (unless a sensitivity is given), then palettize the model.

        Args:
            dataloader: calibration data; needed unless ``sensitivity`` is given (then ignored).
            loss_fn: ``loss_fn(model, item) -> Tensor``; needed with ``dataloader``.
            inplace: modify the model given to the constructor instead of a deep copy.
            sensitivity: a precomputed sensitivity: a
                :class:`~lightning_palettize.sensitivity.Sensitivity`, a mapping from qualified
                parameter name to its Fisher (raw or normalised; it is normalised here), or the
                path of a file written by :meth:`Sensitivity.save` or by coremltools.
            sensitivity_path: coremltools' name for a sensitivity file; same as passing the path
                as ``sensitivity``.
            per_sample: per-sample instead of per-item gradients (see the class docstring).
            progress: progress bars over calibration samples and over weights.
            num_kmeans_workers: how many weights are clustered at once, on threads (the
                k-means kernel releases the GIL; coremltools spawns processes). The k-means
                kernel also runs the LUT groups of one weight on two threads.
            exact_kmeans: ``None`` (auto, see the class docstring), ``True`` (the DP over every
                distinct value: the proven optimum) or ``False`` (the DP over 16-bit codes:
                fastest, least memory) for ``cluster_dim == 1``.

        Returns:
            The palettized model (the original one when ``inplace``).

        Raises:
            ValueError: neither ``dataloader`` nor a sensitivity given, ``dataloader`` without
                ``loss_fn``, both ``sensitivity`` and ``sensitivity_path``, a sensitivity that
                knows none of the weights or has a wrong shape or NaN/Inf values, a weight whose
                shape does not fit its config, or a calibration error. The model is then
                unchanged.
            TypeError: an argument of the wrong type (e.g. a path passed positionally as
                ``inplace``, where coremltools has ``sensitivity_path``).
            FileNotFoundError: a sensitivity path that does not exist.
        """
        if not isinstance(inplace, bool):
            hint = (
                "; coremltools' third positional argument is sensitivity_path: pass "
                "sensitivity_path=... by keyword"
                if isinstance(inplace, (str, os.PathLike))
                else ""
            )
            raise TypeError(
                f"SKMPalettizer.compress: inplace must be a bool, got {inplace!r}{hint}"
            )
        _check_bool("per_sample", per_sample)
        _check_bool("progress", progress)
        if exact_kmeans is not None:
            _check_bool("exact_kmeans", exact_kmeans)
        if isinstance(num_kmeans_workers, bool) or not isinstance(num_kmeans_workers, int):
            raise TypeError(
                f"SKMPalettizer.compress: num_kmeans_workers must be an int >= 1, got "
                f"{num_kmeans_workers!r}"
            )
        if num_kmeans_workers < 1:
            raise ValueError(
                f"SKMPalettizer.compress: num_kmeans_workers must be >= 1, got {num_kmeans_workers}"
            )
        if sensitivity is not None and sensitivity_path is not None:
            raise ValueError(
                "SKMPalettizer.compress: got both sensitivity and sensitivity_path; pass one "
                "(sensitivity_path is coremltools' name for a sensitivity file)"
            )
        if sensitivity is None:
            sensitivity = sensitivity_path
        if sensitivity is None:
            if dataloader is None:
                raise ValueError(
                    "SKMPalettizer.compress: needs calibration data (dataloader=..., "
                    "loss_fn=...) or a precomputed sensitivity (sensitivity=Sensitivity, "
                    "mapping or file path); got neither"
                )
            if loss_fn is None:
                raise ValueError(
                    "SKMPalettizer.compress: dataloader given without loss_fn; pass "
                    "loss_fn(model, item) -> scalar Tensor"
                )

        source = (
            _as_source(sensitivity)
            if sensitivity is not None
            else _MappingSource.of(
                self.compute_sensitivity(
                    dataloader, loss_fn, per_sample=per_sample, progress=progress
                )
            )
        )
        self._check_coverage(source)
        self._source, self._exact = source, exact_kmeans
        plan = self._plan if num_kmeans_workers == 1 else _Ahead(self, num_kmeans_workers)
        try:
            model, self._report = compress_model(
                self._model,
                self._config,
                inplace=inplace,
                plan=plan,
                progress=progress,
                desc="sensitive k-means",
            )
        finally:
            if isinstance(plan, _Ahead):
                plan.close()
            self._source = self._exact = None
        return model

    def report(self) -> PalettizationReport:
        """Per-weight statistics of the last :meth:`compress` (empty before it): relative error
        (outliers included, exactly 0 there), bytes, LUT count and outliers kept exact."""
        return self._report

    # ------------------------------------------------------------------------------------------

    def _selections(self) -> list[WeightSelection]:
        """The weights to palettize, their layouts validated before any calibration."""
        selections = select_weights(self._model, self._config, KMEANS_SUPPORTED)
        for sel in selections:
            w = getattr(sel.module, sel.param_name)
            layout_for(w, sel.config, f"{sel.qualified_name} {tuple(w.shape)}")
        return selections

    def _check_coverage(self, source: _FisherSource) -> None:
        """Warn once about weights without a Fisher; refuse a sensitivity for another model."""
        selections = self._selections()
        names = [s.qualified_name for s in selections]
        for sel in selections:
            shape = source.shape(sel.qualified_name)
            want = tuple(getattr(sel.module, sel.param_name).shape)
            if shape is not None and shape != want:
                raise ValueError(
                    f"SKMPalettizer: the sensitivity of {sel.qualified_name!r} has shape {shape}, "
                    f"the weight has {want}; was the sensitivity computed for another model?"
                )
        no_grad = [n for n in names if n in source.missing]
        absent = [n for n in names if source.shape(n) is None and n not in source.missing]
        if names and len(absent) == len(names):
            raise ValueError(
                f"SKMPalettizer: the {source.what} has no entry for any of the {len(names)} "
                f"weights to palettize (e.g. {names[:3]}); it holds {source.sample_names()}. "
                "Was it computed for another model?"
            )
        if no_grad or absent:
            parts = []
            if no_grad:
                parts.append(f"received no gradient from loss_fn: {no_grad}")
            if absent:
                parts.append(f"are not in the {source.what}: {absent}")
            warnings.warn(
                f"SKMPalettizer: {len(no_grad) + len(absent)} weight(s) have no Fisher "
                f"sensitivity and are palettized with plain (unweighted) k-means, without "
                f"outliers; they {' and '.join(parts)}",
                stacklevel=3,
            )

    def _plan(self, sel: WeightSelection, weight: Tensor, layout: Layout) -> PalettizedWeight:
        cfg = sel.config
        name = sel.qualified_name
        importance = outliers = None
        fisher = self._source.fisher(name) if self._source is not None else None
        if fisher is not None:
            try:
                importance = normalize_sensitivity(fisher).to(weight.device)
            except ValueError as e:
                raise ValueError(f"SKMPalettizer: sensitivity of {name!r}: {e}") from None
            n_out = int(cfg.outlier_fraction * weight.numel())
            if n_out > 0:
                # Rank by the raw Fisher: normalising can flush the smallest values to one level.
                flat = fisher.detach().reshape(-1).to(weight.device, torch.float32)
                top = torch.topk(flat, n_out, sorted=False).indices
                del flat
                outliers = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
                outliers[top] = True
                outliers = outliers.view(weight.shape)
                importance.view(-1)[top] = 0.0
            del fisher
        mode = _kmeans_mode(self._exact, weight, layout, cfg)
        scheme = "abs" if cfg.enable_per_channel_scale else None
        if mode == "two_level":
            palette = _palettize_two_level(
                weight, layout, cfg.n_bits, scheme, cfg.lut_dtype, importance
            )
        else:
            palette = palettize_weight(
                weight,
                layout,
                cfg.n_bits,
                per_channel_scale=scheme,
                lut_dtype=cfg.lut_dtype,
                importance=importance,
                exact=mode == "exact",
            )
        return PalettizedWeight(
            sel,
            palette,
            _relative_error(palette, weight, outliers),
            lut_dtype_name(cfg.lut_dtype, weight),
            outliers=outliers,
        )


# ----------------------------------------------------------------------------------------------
# helpers


class _Ahead:
    """``_plan`` of every weight submitted to a thread pool up front; compress_model's calls,
    in its order, collect the results (re-raising a worker's error)."""

    def __init__(self, skm: SKMPalettizer, workers: int) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="skm-kmeans")
        self._futures = {}
        for sel in skm._selections():
            weight = getattr(sel.module, sel.param_name)
            layout = layout_for(weight, sel.config, sel.qualified_name)
            self._futures[sel.qualified_name] = self._pool.submit(skm._plan, sel, weight, layout)

    def __call__(self, sel: WeightSelection, weight: Tensor, layout: Layout) -> PalettizedWeight:
        return self._futures[sel.qualified_name].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"SKMPalettizer.compress: {name} must be a bool, got {value!r}")


def _kmeans_mode(exact: bool | None, weight: Tensor, layout: Layout, cfg: Any) -> str:
    """How the 1-D k-means runs: "exact" (DP on every distinct value), "codes" (DP on 16-bit
    codes) or "two_level" (see :func:`_kmeans_two_level`)."""
    if layout.cluster_dim > 1:
        return "codes"  # vector k-means: not a 1-D DP at all
    if exact is not None:
        return "exact" if exact else "codes"
    if weight.dtype in _HALF and not cfg.enable_per_channel_scale:
        return "codes"  # the 16-bit codes *are* the distinct values: already exact
    if weight.dtype == torch.float64:
        return "exact"
    if weight.numel() > _TWO_LEVEL_MAX_NUMEL:
        return "codes"
    if cfg.n_bits <= _TWO_LEVEL_MAX_BITS and layout.vectors_per_group >= _TWO_LEVEL_MIN_GROUP:
        return "two_level"
    return "exact" if layout.vectors_per_group << cfg.n_bits <= _EXACT_MAX_WORK else "codes"


@torch.no_grad()
def _relative_error(palette: Palette, weight: Tensor, outliers: Tensor | None) -> float:
    """``||W - W_hat||^2 / ||W||^2`` of the weight as written back (outliers exact)."""
    if outliers is None:
        return palette.relative_error(weight)
    w = weight.detach().to(palette.lut.device)
    diff = w.double() - palette.dequantize(dtype=weight.dtype).double()
    diff[outliers.to(diff.device)] = 0.0
    ref = float(w.double().square().sum())
    return 0.0 if ref == 0.0 else float(diff.square().sum()) / ref


class _FisherSource:
    """Where the Fisher of each weight comes from (in memory, or a file read tensor by tensor)."""

    what = "sensitivity"
    missing: frozenset[str] = frozenset()

    def shape(self, name: str) -> tuple[int, ...] | None:
        raise NotImplementedError

    def fisher(self, name: str) -> Tensor | None:
        raise NotImplementedError

    def sample_names(self) -> list[str]:
        raise NotImplementedError


class _MappingSource(_FisherSource):
    def __init__(
        self, fisher: Mapping[str, Tensor], missing: Iterable[str] = (), what: str = ""
    ) -> None:
        bad = [k for k, v in fisher.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
        if bad:
            raise TypeError(
                f"SKMPalettizer: a sensitivity mapping must map parameter names (str) to "
                f"tensors; bad entries: {bad[:3]}"
            )
        self._fisher = fisher
        self.missing = frozenset(missing)
        self.what = what or "sensitivity"

    @classmethod
    def of(cls, sens: Sensitivity, what: str = "") -> _MappingSource:
        return cls(sens.fisher, sens.missing, what)

    def shape(self, name: str) -> tuple[int, ...] | None:
        t = self._fisher.get(name)
        return None if t is None else tuple(t.shape)

    def fisher(self, name: str) -> Tensor | None:
        return self._fisher.get(name)

    def sample_names(self) -> list[str]:
        return list(self._fisher)[:3]


class _FileSource(_FisherSource):
    """A :meth:`Sensitivity.save` file, opened once per tensor: each mapping is released with
    its tensor, so the file never counts against memory as a whole."""

    def __init__(self, path: str, shapes: dict[str, tuple[int, ...]], missing: list[str]) -> None:
        self._path = path
        self._shapes = shapes
        self.missing = frozenset(missing)
        self.what = f"sensitivity file {path!r}"

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self._shapes.get(name)

    def fisher(self, name: str) -> Tensor | None:
        if name not in self._shapes:
            return None
        from safetensors import safe_open

        with safe_open(self._path, framework="pt", device="cpu") as f:
            return f.get_tensor(name)

    def sample_names(self) -> list[str]:
        return list(self._shapes)[:3]


def _as_source(sensitivity: Any) -> _FisherSource:
    if isinstance(sensitivity, Sensitivity):
        return _MappingSource.of(sensitivity)
    if isinstance(sensitivity, (str, os.PathLike)):
        return _open_file(os.fspath(sensitivity))
    if isinstance(sensitivity, Mapping):
        return _MappingSource(sensitivity)
    raise TypeError(
        f"SKMPalettizer.compress: sensitivity must be a Sensitivity, a mapping of parameter "
        f"name to tensor, or a file path; got {type(sensitivity).__name__}"
    )


def _open_file(path: str) -> _FisherSource:
    """Our safetensors file (lazily), else a coremltools ``torch.save`` dict (loaded whole)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SKMPalettizer: no such sensitivity file: {path!r}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except SafetensorError:
        return _open_torch_file(path)
    try:
        header = json.loads(metadata[_HEADER_KEY])
        ok = header.get("format_version") == _FORMAT_VERSION and isinstance(
            header.get("missing"), list
        )
    except (KeyError, ValueError, AttributeError):
        ok = False
    if not ok:
        # Sensitivity.load names exactly what is wrong with the file.
        sens = Sensitivity.load(path)
        return _MappingSource.of(sens, f"sensitivity file {path!r}")
    return _FileSource(path, shapes, [str(m) for m in header["missing"]])


def _open_torch_file(path: str) -> _FisherSource:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"SKMPalettizer: {path!r} is neither a sensitivity file written by "
            f"Sensitivity.save (safetensors) nor a coremltools sensitivity file (torch.save of "
            f"a dict of tensors): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"SKMPalettizer: {path!r} holds a {type(obj).__name__}; a coremltools sensitivity "
            "file holds a dict of parameter name -> tensor"
        )
    return _MappingSource(obj, what=f"sensitivity file {path!r}")


# ----------------------------------------------------------------------------------------------
# two-level exact weighted 1-D k-means


@torch.no_grad()
def _palettize_two_level(
    weight: Tensor,
    layout: Layout,
    n_bits: int,
    per_channel_scale: str | None,
    lut_dtype: str | None,
    importance: Tensor | None,
) -> Palette:
    """:func:`palettize_weight` for ``cluster_dim == 1`` with :func:`_kmeans_two_level`."""
    x, scale = scaled_groups(weight, layout, per_channel_scale)
    imp = None
    if importance is not None:
        imp = layout.to_groups(importance.to(x.device, torch.float32))[..., 0]
    cent, labels = _kmeans_two_level(x[..., 0], imp, 1 << n_bits)
    return build_palette(weight, layout, n_bits, cent.unsqueeze(-1), labels, scale, lut_dtype)


def _kmeans_two_level(x: Tensor, w: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """Weighted 1-D k-means of each group of ``x[G, N]``: float32 centroids ``[G, k]`` and
    uint8 labels ``[G, N]``, equal to the exact DP over every distinct value in every test and
    on every MiniLM weight, at a fraction of its cost on large groups.

    A block of sorted values that stays in one cluster adds a constant to the cost, so it can be
    replaced by one point at its weighted mean carrying its total weight without changing the
    optimal partition of the blocks. Level 1 solves the DP exactly over the blocks of values
    sharing a 16-bit float code (true means, unlike the code values of ``kmeans_1d``); level 2
    solves it exactly over single values within a window around each level-1 boundary, the rest
    merged into blocks. Level 2 contains the level-1 solution, so it is never worse; while one
    of its boundaries touches a window's edge the windows widen x4, and where level 1 would not
    shrink the problem (small groups) or the windows cover it, the plain exact DP runs. So do the
    groups that level 1 does not resolve: it leaves a cluster without weight (at most k blocks,
    e.g. fewer distinct values than k; level 2 could not grow such a cluster from its
    boundaries), or the values' spread inside its blocks exceeds ``_LEVEL1_MAX_SPREAD`` of its
    cost (the optimum may split a block far from every level-1 boundary).
    """
    g_total, n = x.shape
    dev = x.device
    xs, perm = _sort(x)
    ws = torch.ones_like(xs, dtype=torch.float64) if w is None else torch.gather(w, 1, perm)
    ws = ws.double()
    # Level-1 blocks: a power-of-two scale per group (exact) puts its largest magnitude at the
    # top of the fp16 range, so every value keeps 11 significant bits.
    amax = xs.abs().amax(dim=1).double()
    e = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-300))), 0.0)
    codes = (xs.double() * torch.exp2(14.0 - e).unsqueeze(1)).half().view(torch.int16)
    cuts = torch.zeros(g_total, n, dtype=torch.long, device=dev)
    cuts[:, 1:] = codes[:, 1:] != codes[:, :-1]
    del codes
    window = min(max(n // (16 * max(k - 1, 1)), _WINDOW_MIN), _WINDOW_MAX)
    ncuts = cuts.sum(dim=1)
    if 2 * int(ncuts.max()) > n or 4 * window * (k - 1) >= n:
        return _exact(x, w, k)
    xs = xs.double()
    labels, r, (within, cluster_w) = _solve_blocks(xs, ws, cuts, k, stats=True)
    # Level 2 only moves the level-1 boundaries, so level 1 must already resolve the values.
    # It does not where it leaves a cluster without weight (at most k blocks: few distinct
    # codes, e.g. a weight palettized before, ternary or integer values, or values packed into
    # a few codes): such a cluster has no place to grow from. Nor where the values' spread
    # inside their blocks is a sizeable part of the level-1 cost (values sharing a code that
    # the optimum splits, e.g. a narrow bulk next to a few far values; ~1e-5 on real and random
    # weights). Such groups get the exact DP (cheap when they hold few distinct values); one
    # host sync for the whole batch.
    degenerate = (ncuts < k) | (cluster_w <= 0).any(dim=1)
    degenerate |= within > _LEVEL1_MAX_SPREAD * (r.inertia + within)
    del cluster_w, ncuts, within
    n_degenerate = int(degenerate.sum())
    if n_degenerate == g_total:
        return _exact(x, w, k)
    rows = None
    if n_degenerate:
        rows = (~degenerate).nonzero().squeeze(1)
        xs, ws, perm, labels = xs[rows], ws[rows], perm[rows], labels[rows]
    while True:
        cuts = _near(_starts(labels, k), window, n)
        labels, r, _ = _solve_blocks(xs, ws, cuts, k)
        if not _touches_edge(_starts(labels, k), cuts, n):
            break
        window *= 4
        if 4 * window * (k - 1) >= n:
            return _exact(x, w, k)
    # Centroids from the values themselves (float64 sums), empty clusters from the DP.
    g_two = xs.shape[0]
    flat = (labels + torch.arange(g_two, device=dev).unsqueeze(1) * k).reshape(-1)
    cw = torch.zeros(g_two * k, dtype=torch.float64, device=dev)
    cx = torch.zeros_like(cw).index_add_(0, flat, (ws * xs).reshape(-1)).view(g_two, k)
    cw = cw.index_add_(0, flat, ws.reshape(-1)).view(g_two, k)
    cent = torch.where(cw > 0, cx / cw.clamp_min(1e-300), r.centroids.double()).float()
    out = torch.empty((g_two, n), dtype=torch.uint8, device=dev)
    out.scatter_(1, perm, labels.to(torch.uint8))
    if rows is None:
        return cent, out
    # the degenerate groups exactly, the others from the two levels
    bad = degenerate.nonzero().squeeze(1)
    cent_bad, out_bad = _exact(x[bad], None if w is None else w[bad], k)
    cent_all = torch.empty((g_total, k), dtype=torch.float32, device=dev)
    out_all = torch.empty((g_total, n), dtype=torch.uint8, device=dev)
    cent_all[rows], out_all[rows] = cent, out
    cent_all[bad], out_all[bad] = cent_bad, out_bad
    return cent_all, out_all


def _exact(x: Tensor, w: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """The DP over every distinct value (the reference the two levels match)."""
    r = kmeans_1d(x, k, w, exact=True)
    return r.centroids, r.labels


def _sort(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row of a float32 ``x`` by an order-preserving int32 key (a faster sort than
    on floats); other dtypes sort directly. The order of equal values is irrelevant here."""
    if x.dtype != torch.float32:
        return torch.sort(x, dim=1)
    bits = x.view(torch.int32)
    # -0.0 and +0.0 get different keys, ordered like the floats (a cut between them is allowed)
    _, perm = torch.sort(bits ^ ((bits >> 31) & 0x7FFFFFFF), dim=1)
    return torch.gather(x, 1, perm), perm


def _solve_blocks(
    xs: Tensor, ws: Tensor, cuts: Tensor, k: int, stats: bool = False
) -> tuple[Tensor, Any, tuple[Tensor, Tensor] | None]:
    """Exact DP over the blocks of sorted values that ``cuts`` (1 = a block starts here)
    delimit. Returns each sorted value's label, the DP result over the blocks and, with
    ``stats``, per group the weighted squared error of the values around their blocks' means
    (the cost the blocks hide from the DP) ``[G]`` and the weight of each cluster ``[G, k]``
    (else None)."""
    g_total, n = xs.shape
    block = torch.cumsum(cuts, dim=1)
    m = int(block[:, -1].max()) + 1
    flat = (block + torch.arange(g_total, device=xs.device).unsqueeze(1) * m).reshape(-1)

    def total(v: Tensor) -> Tensor:
        out = torch.zeros(g_total * m, dtype=torch.float64, device=xs.device)
        return out.index_add_(0, flat, v.reshape(-1)).view(g_total, m)

    sw, swx = total(ws), total(ws * xs)
    value = swx / sw.clamp_min(1e-300)
    if bool((sw <= 0).any()):
        # Weightless blocks sit at their plain mean; padding (a group with fewer blocks) sits
        # on the group's largest value without weight, which changes nothing.
        count, sx = total(torch.ones_like(xs)), total(xs)
        value = torch.where(sw > 0, value, sx / count.clamp_min(1))
        value = torch.where(count > 0, value, xs[:, -1:])
    r = kmeans_1d(value, k, sw, exact=True)
    labels = torch.gather(r.labels.long(), 1, block)
    if not stats:
        return labels, r, None
    d = xs - torch.gather(value, 1, block)
    within = d.mul_(d).mul_(ws).sum(dim=1)
    del d
    cluster_w = torch.zeros(g_total, k, dtype=torch.float64, device=xs.device)
    cluster_w.scatter_add_(1, r.labels.long(), sw)
    return labels, r, (within, cluster_w)


def _starts(sorted_labels: Tensor, k: int) -> Tensor:
    """``[G, k-1]``: the sorted position where each cluster after the first starts."""
    counts = torch.zeros(sorted_labels.shape[0], k, dtype=torch.long, device=sorted_labels.device)
    counts.scatter_add_(1, sorted_labels, torch.ones_like(sorted_labels))
    return torch.cumsum(counts, dim=1)[:, :-1]


def _near(starts: Tensor, window: int, n: int) -> Tensor:
    """``[G, n]`` long: 1 where a cut before that sorted position is within ``window`` of a
    cluster start (never before position 0)."""
    diff = torch.zeros(starts.shape[0], n + 1, dtype=torch.long, device=starts.device)
    ones = torch.ones_like(starts)
    diff.scatter_add_(1, (starts - window + 1).clamp(1, n), ones)
    diff.scatter_add_(1, (starts + window).clamp(1, n), -ones)
    return (torch.cumsum(diff, dim=1)[:, :n] > 0).long()


def _touches_edge(starts: Tensor, cuts: Tensor, n: int) -> bool:
    """Whether a cluster start inside the values has a neighbouring position where no cut was
    allowed (the window's edge; the ends of the values do not count)."""
    inner = (starts > 0) & (starts < n)
    allowed = torch.nn.functional.pad(cuts, (1, 1), value=1)  # index j: cut before j - 1
    allowed[:, 1] = 1
    # empty clusters at the end start at n: clamp before gathering (``inner`` drops them)
    before = torch.gather(allowed, 1, starts)
    after = torch.gather(allowed, 1, (starts + 2).clamp_max(n + 1))
    return bool((inner & ((before == 0) | (after == 0))).any())
