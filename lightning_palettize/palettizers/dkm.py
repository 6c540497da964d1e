"""DKMPalettizer: train-time differentiable k-means palettization (coremltools-compatible API).

``prepare`` attaches a :class:`FakePalettize` child (``<param>_dkm``) and a forward pre-hook to
every selected module. The weight stays the very same ``Parameter`` under its own name (an
optimizer built before ``prepare`` keeps working, state_dict keys of the weights do not change);
during each forward the hook shadows it with the soft-palettized weight computed from it by
:func:`lightning_palettize.soft_kmeans.soft_kmeans`, and a forward hook removes the shadow. The
child owns only buffers (centroids, per-channel scale, step counter), so a prepared model can be
deep-copied, pickled, checkpointed and resumed. (``torch.nn.utils.parametrize`` would rename the
weight and makes modules unpicklable, which is why it is not used.) ``finalize`` hard-assigns
every weight, writes the dense palettized values back into plain parameters and attaches the
same Core ML metadata as
:class:`~lightning_palettize.PostTrainingPalettizer`.
"""

from __future__ import annotations

import copy
from typing import IO, Any

import torch
from torch import Tensor, nn

from lightning_palettize.config import DKMPalettizerConfig, ModuleDKMPalettizerConfig, load_config
from lightning_palettize.kmeans import kmeans
from lightning_palettize.palette import Layout, Palette, channel_scale, quantize_lut
from lightning_palettize.palettizers._common import (
    KMEANS_SUPPORTED,
    attach_coreml_metadata,
    layout_for,
    set_metadata_version,
)
from lightning_palettize.report import PalettizationReport, ReportRow
from lightning_palettize.selection import select_weights
from lightning_palettize.soft_kmeans import hard_assign, soft_kmeans

__all__ = ["DKMPalettizer", "FakePalettize", "DKM_SUPPORTED"]

#: Modules DKM handles (and their subclasses): the k-means set plus LayerNorm's weight.
DKM_SUPPORTED: dict[type[nn.Module], tuple[str, ...]] = {
    **KMEANS_SUPPORTED,
    nn.LayerNorm: ("weight",),
}

# Options of coremltools' ModuleDKMPalettizerConfig that change the math and that we do not
# implement: any value but the default is rejected (coremltools ignores several of them).
_UNSUPPORTED = {
    "quantize_activations": "activation quantization is not part of palettization here",
    "cluster_permute": "weight permutations are not exported to Core ML",
    "palett_lambda": "coremltools 9.0 never uses it either",
    "add_extra_centroid": "it would not fit a 2**n_bits LUT",
    "percentage_palett_enable": "every LUT group is trained",
    "palett_shard": "no multi-GPU sharding of the k-means state (it is already O(N))",
    "palett_dist": "no distributed distance computation (the engine is O(N) per step)",
}
# Performance knobs whose effect our engine always has; accepted with any value (documented):
# palett_max_mem, palett_min_tsize, palett_unique, palett_batch_mode, kmeans_batch_threshold,
# kmeans_opt1d_threshold, kmeans_error_bnd.

_DEFAULTS = ModuleDKMPalettizerConfig()


def _check_supported_options(cfg: ModuleDKMPalettizerConfig, where: str) -> None:
    for key, why in _UNSUPPORTED.items():
        value, default = getattr(cfg, key), getattr(_DEFAULTS, key)
        if value != default:
            raise ValueError(
                f"{where}: {key}={value!r} is not supported by DKMPalettizer ({why}); "
                f"accepted: {default!r}"
            )


def _ste(c: Tensor, q: Tensor) -> Tensor:
    return c + (q - c).detach()


def _lut_fn(lut_dtype: str):
    """Straight-through LUT quantizer used inside the soft k-means for lut_dtype != f32."""
    if lut_dtype == "f32":
        return None
    if lut_dtype in ("f16", "bf16"):
        dt = torch.float16 if lut_dtype == "f16" else torch.bfloat16
        return lambda c: _ste(c, c.to(dt).float())
    qdtype = torch.int8 if lut_dtype == "i8" else torch.uint8
    return lambda c: _ste(c, quantize_lut(c.detach(), qdtype)[0])


class FakePalettize(nn.Module):
    """Parametrization computing the DKM soft-palettized weight from the live weight.

    Buffers (all in the state_dict): ``centroids`` [G, K, d], ``scale`` (per-channel, or
    empty), ``enabled`` (0/1), ``steps`` (step() calls seen). Before it is enabled the weight
    passes through unchanged, so the module computes exactly what it did before ``prepare``.
    In eval mode the weight is hard-assigned to its nearest centroid.
    """

    def __init__(
        self, weight: Tensor, layout: Layout, cfg: ModuleDKMPalettizerConfig, param_name: str
    ) -> None:
        super().__init__()
        self.param_name = param_name
        self.layout = layout
        self.cfg = cfg
        self.n_bits = cfg.n_bits
        g, d, k = layout.num_groups, layout.cluster_dim, 1 << cfg.n_bits
        self.register_buffer("centroids", torch.zeros(g, k, d, device=weight.device))
        shape = (layout.shape[0],) + (1,) * (len(layout.shape) - 1)
        n_scale = shape if cfg.enable_per_channel_scale else (0,)
        self.register_buffer("scale", torch.ones(n_scale, device=weight.device))
        self.register_buffer("enabled", torch.zeros((), dtype=torch.uint8, device=weight.device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=weight.device))
        self._lut_fn = _lut_fn(cfg.lut_dtype)

    def __getstate__(self) -> dict[str, Any]:
        # lambdas do not pickle: rebuild the LUT quantizer from the config
        state = self.__dict__.copy()
        state["_lut_fn"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lut_fn = _lut_fn(self.cfg.lut_dtype)

    @property
    def is_enabled(self) -> bool:
        return bool(self.enabled)

    @torch.no_grad()
    def initialize(self, weight: Tensor) -> None:
        """Enable palettization: per-channel scale and centroids from the exact k-means."""
        cfg = self.cfg
        w = weight.detach().float()
        if cfg.enable_per_channel_scale:
            self.scale.copy_(channel_scale(w, cfg.per_channel_scaling_factor_scheme))
            w = w / self.scale
        x = self.layout.to_groups(w)
        cent = kmeans(x, 1 << cfg.n_bits).centroids.float()  # sorted for d == 1
        if cfg.enforce_zero:
            # the centroid nearest 0 moves to slot 0 and becomes exactly 0
            near = cent.norm(dim=-1).argmin(dim=1)
            rows = torch.arange(cent.shape[0], device=cent.device)
            first = cent[:, 0].clone()
            cent[rows, near] = first
            cent[:, 0] = 0.0
        if self._lut_fn is not None:
            cent = self._lut_fn(cent)
        self.centroids.copy_(cent)
        self.enabled.fill_(1)

    def _prepare_input(self, weight: Tensor) -> Tensor:
        w = weight.float() if weight.dtype != torch.float32 else weight
        if self.cfg.enable_per_channel_scale:
            w = w / self.scale
        return self.layout.to_groups(w)

    def _finish(self, xg: Tensor, dtype: torch.dtype) -> Tensor:
        w = self.layout.from_groups(xg)
        if self.cfg.enable_per_channel_scale:
            w = w * self.scale
        return w.to(dtype)

    def hard_labels(self, weight: Tensor) -> Tensor:
        cfg = self.cfg
        with torch.no_grad():
            return hard_assign(
                self._prepare_input(weight.detach()),
                self.centroids,
                prune_threshold=cfg.prune_threshold,
                enforce_zero=cfg.enforce_zero,
                zero_threshold=cfg.zero_threshold,
            )

    def forward(self, weight: Tensor) -> Tensor:
        if not self.is_enabled:
            return weight
        cfg = self.cfg
        if not self.training:
            labels = self.hard_labels(weight)
            hard = torch.gather(
                self.centroids, 1, labels.unsqueeze(-1).expand(-1, -1, self.centroids.shape[-1])
            )
            return self._finish(hard, weight.dtype)
        xg = self._prepare_input(weight)
        xhat, cent = soft_kmeans(
            xg,
            self.centroids.clone(),  # the kernel may save it for backward; we update in place
            tau=cfg.palett_tau,
            max_iter=cfg.kmeans_max_iter,
            epsilon=cfg.palett_epsilon,
            mode=cfg.palett_mode,
            enforce_zero=cfg.enforce_zero,
            prune_threshold=cfg.prune_threshold,
            zero_threshold=cfg.zero_threshold,
            lut_fn=self._lut_fn,
        )
        with torch.no_grad():
            self.centroids.copy_(cent)
        return self._finish(xhat, weight.dtype)

    def live_weight(self, module: nn.Module) -> tuple[str, Tensor]:
        """The parameter this palettizes and its current name on ``module``.

        ``<param>``, or ``<param>_orig`` while ``torch.nn.utils.prune`` (e.g. Lightning's
        ModelPruning) reparametrizes it: the palettized value then shadows ``<param>_orig`` and
        pruning's own pre-hook, registered after ours, multiplies its mask on top.
        """
        name = self.param_name
        if name not in module._parameters and f"{name}_orig" in module._parameters:
            name = f"{name}_orig"
        return name, module._parameters[name]

    # -- hooks on the owning module: shadow the parameter with its palettized value in forward
    def pre_hook(self, module: nn.Module, args: Any) -> None:
        if self.is_enabled:
            name, weight = self.live_weight(module)
            module.__dict__[name] = self(weight)

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        module.__dict__.pop(self.live_weight(module)[0], None)

    def attach(self, module: nn.Module) -> None:
        module.add_module(f"{self.param_name}_dkm", self)
        module.register_forward_pre_hook(self.pre_hook)
        module.register_forward_hook(self.post_hook)

    def detach_from(self, module: nn.Module) -> None:
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "__self__", None) is self]:
                del hooks[key]
        module.__dict__.pop(self.live_weight(module)[0], None)
        delattr(module, f"{self.param_name}_dkm")

    @torch.no_grad()
    def to_palette(self, weight: Tensor) -> Palette:
        """Hard-assigned palette of the current weight (finalize / report)."""
        cfg = self.cfg
        labels = self.hard_labels(weight).to(torch.uint8)
        lut = self.centroids.float().clone()
        qdtype = qscale = zp = None
        if cfg.lut_dtype in ("i8", "u8"):
            qdtype = torch.int8 if cfg.lut_dtype == "i8" else torch.uint8
            lut, qscale, zp = quantize_lut(lut, qdtype)
        elif cfg.lut_dtype in ("f16", "bf16"):
            lut = lut.to(torch.float16 if cfg.lut_dtype == "f16" else torch.bfloat16).float()
        return Palette(
            self.layout,
            cfg.n_bits,
            lut,
            labels,
            scale=self.scale.clone() if cfg.enable_per_channel_scale else None,
            lut_qdtype=qdtype,
            lut_qscale=qscale,
            lut_zero_point=zp,
            dtype=weight.dtype,
        )


def _fake_palettizers(model: nn.Module):
    """(module name, module, param name, FakePalettize) for every prepared weight."""
    for name, module in model.named_modules():
        for child in module.children():
            if isinstance(child, FakePalettize):
                yield name, module, child.param_name, child


class DKMPalettizer:
    """Differentiable k-means palettization during training (DKM, Cho et al. 2022).

    Same API as ``coremltools.optimize.torch.palettization.DKMPalettizer``: ``prepare`` the
    model, train as usual calling ``step()`` after each optimizer step, then ``finalize``.
    Centroids start from the exact k-means of the weights at the milestone, so the model right
    after the milestone is as accurate as post-training palettization, and training moves on
    from there. The soft k-means costs O(N) memory and time per step (see
    :mod:`lightning_palettize.soft_kmeans`), not coremltools' several N x K tensors.

    Args:
        model: the model to palettize.
        config: a :class:`DKMPalettizerConfig`, dict, DictConfig, YAML path/stream, or ``None``
            (coremltools' defaults: 4 bits for Linear, 2 for the other supported types).

    Raises:
        ValueError: for an invalid config, or an option we do not implement set to a
            non-default value (e.g. ``quantize_activations=True``).

    Example:
        >>> import torch
        >>> from lightning_palettize import DKMPalettizer
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
        ...                             torch.nn.Linear(64, 4))
        >>> palettizer = DKMPalettizer(model, {"global_config": {"n_bits": 2,
        ...                                     "weight_threshold": 0}})
        >>> model = palettizer.prepare(inplace=True)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> for _ in range(3):
        ...     loss = model(torch.randn(8, 64)).square().mean()
        ...     opt.zero_grad(); loss.backward(); opt.step(); palettizer.step()
        >>> model = palettizer.finalize(inplace=True)
        >>> len(torch.unique(model[0].weight)) <= 4
        True
    """

    def __init__(
        self,
        model: nn.Module,
        config: DKMPalettizerConfig | dict | str | IO | Any | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self._model = model
        self._config = load_config(config, DKMPalettizerConfig)
        self._prepared: nn.Module | None = None

    @property
    def config(self) -> DKMPalettizerConfig:
        """The validated config."""
        return self._config

    def prepare(self, inplace: bool = False) -> nn.Module:
        """Attach DKM to every selected weight.

        Modules with ``milestone == 0`` start palettizing at once (centroids from the exact
        k-means of the current weights); others pass their weights through unchanged until
        ``step()`` has been called ``milestone`` times.

        Args:
            inplace: modify the model given to the constructor instead of a deep copy.

        Returns:
            The prepared model (in train mode).

        Raises:
            ValueError: naming the weight when its shape does not fit the config, or for an
                unsupported option; the model is then unchanged.
        """
        selections = select_weights(self._model, self._config, DKM_SUPPORTED)
        plans = []
        for sel in selections:
            weight = getattr(sel.module, sel.param_name)
            where = f"{sel.qualified_name} {tuple(weight.shape)}"
            _check_supported_options(sel.config, where)
            cfg = sel.config
            if cfg.cluster_dim > 1 and cfg.enable_per_channel_scale:
                raise ValueError(
                    f"{where}: enable_per_channel_scale=True is not supported with "
                    f"cluster_dim={cfg.cluster_dim}; accepted: False"
                )
            plans.append((sel, layout_for(weight, cfg, sel.qualified_name)))
        target = self._model if inplace else copy.deepcopy(self._model)
        modules = dict(target.named_modules(remove_duplicate=False))
        for sel, layout in plans:
            module = modules[sel.module_name] if sel.module_name else target
            weight = getattr(module, sel.param_name)
            fp = FakePalettize(weight, layout, sel.config, sel.param_name)
            if sel.config.milestone == 0:
                fp.initialize(weight)
            fp.attach(module)
        target.train()
        self._prepared = target
        return target

    def _require_prepared(self) -> nn.Module:
        if self._prepared is None:
            raise RuntimeError("DKMPalettizer: call prepare() first")
        return self._prepared

    @torch.no_grad()
    def step(self) -> None:
        """Count one optimizer step; modules reaching their milestone start palettizing."""
        model = self._require_prepared()
        self.set_step(self.steps + 1)

    @torch.no_grad()
    def set_step(self, step: int) -> None:
        """Set the step counter of every weight to ``step`` (e.g. a trainer's global step).

        Weights whose milestone is ``<= step`` and that are not yet palettizing start now.
        Use it instead of :meth:`step` when an external counter (restored on resume) is the
        source of truth.

        Raises:
            ValueError: if ``step`` is negative.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"set_step: step must be an int >= 0, got {step!r}")
        model = self._require_prepared()
        for _, module, _pname, fp in _fake_palettizers(model):
            fp.steps.fill_(step)
            if not fp.is_enabled and step >= fp.cfg.milestone:
                fp.initialize(fp.live_weight(module)[1])

    @property
    def steps(self) -> int:
        """``step()`` calls so far (restored with the model's state_dict)."""
        model = self._require_prepared()
        counts = [int(fp.steps) for *_, fp in _fake_palettizers(model)]
        return max(counts) if counts else 0

    def finalize(self, model: nn.Module | None = None, inplace: bool = False) -> nn.Module:
        """Turn every soft-palettized weight into a hard palette and a plain parameter.

        Each weight becomes ``scale * lut[argmin distance]`` (at most ``2**n_bits`` values or
        vectors per LUT group), gets the ``_COREML_`` metadata ``ct.convert`` reads, and the
        DKM hooks and ``<param>_dkm`` children are removed: the result is a plain torch model
        whose state_dict, apart from the ``_COREML_`` buffers (drop them with
        :func:`~lightning_palettize.strip_coreml_metadata`), loads strictly into a freshly
        built model. Weights whose milestone was never reached are left as they are.

        Args:
            model: the prepared model (default: the one ``prepare`` returned).
            inplace: modify it instead of a deep copy.

        Returns:
            The finalized model (in eval mode).
        """
        model = self._require_prepared() if model is None else model
        target = model if inplace else copy.deepcopy(model)
        any_palette = False
        for _, module, pname, fp in list(_fake_palettizers(target)):
            live = fp.live_weight(module)[1]
            palette = fp.to_palette(live) if fp.is_enabled else None
            fp.detach_from(module)
            if palette is not None:
                with torch.no_grad():
                    palette.dequantize(out=live.data)
                attach_coreml_metadata(module, pname, palette)
                any_palette = True
        if any_palette:
            set_metadata_version(target)
        if inplace and model is self._prepared:
            self._prepared = None
        return target.eval()

    def report(self) -> PalettizationReport:
        """Per-weight state: error of the hard-assigned weight against the live weight, bytes."""
        model = self._require_prepared()
        rows = []
        for name, module, pname, fp in _fake_palettizers(model):
            original = fp.live_weight(module)[1]
            qualified = f"{name}.{pname}" if name else pname
            if not fp.is_enabled:
                continue
            palette = fp.to_palette(original)
            rows.append(
                ReportRow(
                    name=qualified,
                    n_bits=fp.n_bits,
                    cluster_dim=fp.layout.cluster_dim,
                    num_luts=fp.layout.num_groups,
                    num_params=original.numel(),
                    rel_error=palette.relative_error(original),
                    bytes_before=palette.dense_nbytes(),
                    bytes_after=palette.nbytes(),
                    lut_dtype=fp.cfg.lut_dtype,
                )
            )
        return PalettizationReport(rows)


def load_prepared_state_dict(
    model: nn.Module, state_dict: dict[str, Tensor], config: Any, strict: bool = True
) -> DKMPalettizer:
    """Re-prepare a freshly built model with ``config`` and load a mid-DKM state_dict into it.

    The way to resume a prepared (mid-training) checkpoint outside a training loop: builds
    the same DKM hooks and buffers (the centroids then come from the checkpoint) and loads the
    state.

    Returns:
        The palettizer (its ``prepare``d model is ``model`` itself).
    """
    cfg = load_config(config, DKMPalettizerConfig)
    palettizer = DKMPalettizer(model, cfg)
    palettizer.prepare(inplace=True)
    model.load_state_dict(state_dict, strict=strict)
    return palettizer
