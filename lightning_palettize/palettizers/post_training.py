"""PostTrainingPalettizer: data-free k-means palettization (coremltools-compatible API)."""

from __future__ import annotations

from typing import IO, Any

from torch import Tensor, nn

from lightning_palettize.config import PostTrainingPalettizerConfig, load_config
from lightning_palettize.palettizers._common import (
    ClusterSpec,
    PalettizedWeight,
    PlanItem,
    compress_model,
    palettize_many,
)
from lightning_palettize.report import PalettizationReport

__all__ = ["PostTrainingPalettizer"]


def lut_dtype_name(lut_dtype: str | None, weight: Tensor) -> str:
    """How the report names a LUT's storage: the quantized dtype, or the weight's float type."""
    if lut_dtype is not None:
        return lut_dtype
    return {"torch.float16": "f16", "torch.bfloat16": "bf16"}.get(str(weight.dtype), "f32")


class PostTrainingPalettizer:
    """Palettize a trained model's weights with exact k-means, no data needed.

    Each selected weight is clustered into ``2**n_bits`` centroids (per tensor, or per group of
    channels) and overwritten with its centroids, and the Core ML metadata coremltools'
    converter reads (``_COREML_/<param>/...`` buffers) is attached, so ``ct.convert(...,
    minimum_deployment_target=ct.target.iOS18)`` emits ``constexpr_lut_to_dense`` ops.

    The 1-D clustering is the exact optimum for the values it clusters (a dynamic program over
    the distinct values). ``enable_fast_kmeans_mode=True`` (the default) clusters fp32 weights
    by their 16-bit float codes (fp16/bf16 weights by their own values), solving LUT groups
    with over 2,048 codes coarse-to-fine: within 0.1% of the exact optimum (tested; equal to it
    in the fp16/bf16 tests); ``False`` clusters every distinct value with the plain DP, the
    proven optimum. Unlike coremltools,
    there is no decimal rounding, so ``rounding_precision`` is accepted and ignored: small
    weights keep their full relative precision.

    Args:
        model: the model to compress.
        config: a :class:`PostTrainingPalettizerConfig`, a dict, an OmegaConf DictConfig, a YAML
            path or stream, or ``None`` (4 bits per tensor for every supported module).

    Raises:
        ValueError / TypeError: for an invalid config.

    Example:
        >>> import torch
        >>> from lightning_palettize import PostTrainingPalettizer
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU())
        >>> cfg = {"global_config": {"n_bits": 4, "granularity": "per_grouped_channel",
        ...                          "group_size": 8}}
        >>> small = PostTrainingPalettizer(model, cfg).compress(progress=False)
        >>> len(torch.unique(small[0].weight[:8]))  <= 16
        True
    """

    def __init__(
        self,
        model: nn.Module,
        config: PostTrainingPalettizerConfig | dict | str | IO | Any | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self._model = model
        self._config = load_config(config, PostTrainingPalettizerConfig)
        self._report = PalettizationReport()

    @property
    def config(self) -> PostTrainingPalettizerConfig:
        """The validated config."""
        return self._config

    def _plan_many(self, items: list[PlanItem]) -> list[PalettizedWeight]:
        # all weights of a batch in one k-means call (one compiled call for the 1-D CPU ones)
        specs = [
            ClusterSpec(
                weight,
                layout,
                sel.config.n_bits,
                per_channel_scale="abs" if sel.config.enable_per_channel_scale else None,
                lut_dtype=sel.config.lut_dtype,
                exact=not sel.config.enable_fast_kmeans_mode,
            )
            for sel, weight, layout in items
        ]
        return [
            PalettizedWeight(sel, palette, None, lut_dtype_name(sel.config.lut_dtype, weight))
            for (sel, weight, _), palette in zip(items, palettize_many(specs))
        ]

    def compress(
        self, num_kmeans_workers: int = 1, inplace: bool = False, *, progress: bool = True
    ) -> nn.Module:
        """Palettize the model.

        Args:
            num_kmeans_workers: accepted for coremltools compatibility; the k-means kernel
                already runs its groups on two threads, so no worker processes are spawned.
            inplace: modify the model given to the constructor instead of a deep copy.
            progress: show a progress bar over weights (``False`` silences it).

        Returns:
            The palettized model (the original one when ``inplace``).

        Raises:
            ValueError: naming the weight when its shape does not fit the config (e.g.
                group_size does not divide the channel axis). The model is then unchanged.
        """
        if isinstance(num_kmeans_workers, bool) or not isinstance(num_kmeans_workers, int):
            raise TypeError(f"num_kmeans_workers: expected an int >= 1, got {num_kmeans_workers!r}")
        if num_kmeans_workers < 1:
            raise ValueError(f"num_kmeans_workers: expected an int >= 1, got {num_kmeans_workers}")
        model, self._report = compress_model(
            self._model,
            self._config,
            inplace=inplace,
            plan_many=self._plan_many,
            progress=progress,
            desc="k-means palettization",
        )
        return model

    def report(self) -> PalettizationReport:
        """Per-weight statistics of the last :meth:`compress` (empty before it)."""
        return self._report
