"""Which weights of a model get palettized, and with which fully resolved module config.

Resolution follows coremltools (``get_module_config``), with subclass matching added:

1. ``module_name_configs``: keys are regexes, ``re.fullmatch``-ed against the module's qualified
   name in insertion order; the first match wins.
2. ``module_type_configs``: walk ``type(module).__mro__``; for each class try the class itself,
   its ``__name__``, its ``"module.qualname"`` and, for torch.nn classes, ``"torch.nn.<Name>"``.
   The first hit wins, so an exact subclass key beats its base and subclasses of ``nn.Linear``
   get the Linear config.
3. ``global_config``.
4. No match: the module is left alone. (A config created with nothing set holds the defaults
   as entries, as in coremltools: DKM the default table of
   :data:`~lightning_palettize.config.DKM_DEFAULT_N_BITS` in ``module_type_configs``, PTP / SKM
   the default module config as ``global_config``.)

A ``None`` found at any step means "do not palettize" and ends the search.

Example:
    >>> import torch.nn as nn
    >>> from lightning_palettize.config import PostTrainingPalettizerConfig
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> config = PostTrainingPalettizerConfig(global_config={"n_bits": 3})
    >>> config = config.set_module_name("2", {"n_bits": 2})
    >>> selected = select_weights(model, config, {nn.Linear: ("weight",)})
    >>> [(s.qualified_name, s.config.n_bits) for s in selected]
    [('0.weight', 3), ('2.weight', 2)]
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from lightning_palettize.config import (
    DKM_DEFAULT_N_BITS,
    DKMPalettizerConfig,
    ModuleDKMPalettizerConfig,
    ModulePostTrainingPalettizerConfig,
    ModuleSKMPalettizerConfig,
    PostTrainingPalettizerConfig,
    SKMPalettizerConfig,
)

__all__ = ["WeightSelection", "has_type_config", "resolve_module_config", "select_weights"]

ModuleConfig = (
    ModuleDKMPalettizerConfig | ModulePostTrainingPalettizerConfig | ModuleSKMPalettizerConfig
)
PalettizerConfig = DKMPalettizerConfig | PostTrainingPalettizerConfig | SKMPalettizerConfig
_TOP_LEVEL = (DKMPalettizerConfig, PostTrainingPalettizerConfig, SKMPalettizerConfig)


@dataclasses.dataclass(frozen=True)
class WeightSelection:
    """One weight to palettize: where it lives and the resolved config to use.

    Attributes:
        module_name: qualified name of the owning module (``""`` for the root).
        module: the owning module.
        param_name: attribute name of the weight on ``module`` (e.g. ``"in_proj_weight"``).
        config: the fully resolved module config (no ``None`` left in ``n_bits`` or
            ``cluster_dim``); shared by all weights of the same module.
    """

    module_name: str
    module: nn.Module = dataclasses.field(repr=False)
    param_name: str
    config: ModuleConfig = dataclasses.field(hash=False)

    @property
    def qualified_name(self) -> str:
        """``"<module_name>.<param_name>"``, or just ``param_name`` for the root module."""
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name


def resolve_module_config(
    config: PalettizerConfig,
    name: str,
    module: nn.Module,
    *,
    param_names: Sequence[str] | None = None,
) -> ModuleConfig | None:
    """Return the module config that applies to ``module``, or ``None`` to leave it alone.

    Args:
        config: a top-level config (DKM, post-training or SKM).
        name: the module's qualified name in the model (``""`` for the root).
        module: the module itself.
        param_names: its palettizable weights, used for DKM's ``weight_threshold`` (every one
            must have more elements than the threshold). Default: the module's own parameters
            whose name ends in ``"weight"``.

    Returns:
        A new config (the user's is never mutated) with ``None`` defaults filled in: DKM
        ``n_bits`` from :data:`DKM_DEFAULT_N_BITS` by type (2 for types outside it),
        ``cluster_dim`` 1 and ``enable_per_channel_scale`` False; PTP ``n_bits`` 4. ``None`` when
        the module is excluded or, for DKM, is too small for every applicable tier.

    Raises:
        TypeError: if ``config`` is not a top-level palettizer config.
        ValueError: if several ``module_type_configs`` keys name the same class of the module.
    """
    if not isinstance(config, _TOP_LEVEL):
        raise TypeError(
            f"resolve_module_config: got {type(config).__name__}; expected one of "
            f"{', '.join(c.__name__ for c in _TOP_LEVEL)}"
        )
    weights = _weights(module, param_names)
    # (_module_value: a raw dict or list put into the config's dicts after it was built gets
    # the validation the setters give, or a clear error; a built config passes through)
    for pattern, value in config.module_name_configs.items():
        if re.fullmatch(pattern, name):
            value = config._module_value(value, f"module_name_configs[{pattern!r}]")
            return _finish(value, module, weights)
    found, value = _match_type(config, type(module))
    if found:
        value = config._module_value(value, f"module_type_configs[{type(module).__name__!r}]")
        return _finish(value, module, weights)
    # (a config created empty holds the defaults as entries: the type table or global_config)
    if config.global_config is not None:
        return _finish(config._module_value(config.global_config, "global_config"), module, weights)
    return None


def select_weights(
    model: nn.Module,
    config: PalettizerConfig,
    supported: Mapping[type[nn.Module], Sequence[str]],
    *,
    pruned_ok: bool = False,
    attention_owns_out_proj: bool = False,
) -> list[WeightSelection]:
    """List the weights of ``model`` to palettize, in ``model.named_modules()`` order.

    Every module that is an instance of a key of ``supported`` is visited on its own, even when
    it is a child of a selected module (``nn.MultiheadAttention.out_proj`` is an ``nn.Linear``;
    unless ``attention_owns_out_proj``).
    A weight shared by several modules (tied embeddings) is listed once, for the first module.

    Args:
        model: the model.
        config: a top-level palettizer config.
        supported: module class -> names of its palettizable parameters; names missing or
            ``None`` on a module are skipped. The most specific class (first in the module's
            MRO) wins, then any other ``isinstance`` match.
        pruned_ok: accept a weight that ``torch.nn.utils.prune`` (or the legacy
            ``spectral_norm``) recomputes from ``<name>_orig`` in a forward pre-hook (DKM
            palettizes ``<name>_orig`` under the hook); otherwise such a weight is an error.
        attention_owns_out_proj: coremltools' DKM rule: ``nn.MultiheadAttention.out_proj.weight``
            belongs to the attention module (its config, which the ``weight_threshold`` test
            applies to all of the attention's weights) and is not visited as a Linear.

    Returns:
        One :class:`WeightSelection` per palettized weight.

    Raises:
        ValueError: if a ``module_name_configs`` key matches no module name (a typo would
            otherwise silently palettize nothing), a string ``module_type_configs`` key names
            no class in ``torch.nn`` or in the model, or a selected weight is not a parameter
            or buffer of its module but computed in forward (``torch.nn.utils.parametrize``,
            ``weight_norm``, pruning without ``pruned_ok``): palettizing it would only
            overwrite a temporary.
        TypeError: if ``config`` or ``supported`` has the wrong type.

    Example:
        >>> import torch.nn as nn
        >>> from lightning_palettize.config import DKMPalettizerConfig
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
        >>> selected = select_weights(model, DKMPalettizerConfig(), {nn.Linear: ["weight"]})
        >>> [(s.qualified_name, s.config.n_bits) for s in selected]  # 8 * 64 <= 2048: skipped
        [('0.weight', 4)]
    """
    if not isinstance(config, _TOP_LEVEL):
        raise TypeError(
            f"select_weights: got {type(config).__name__}; expected one of "
            f"{', '.join(c.__name__ for c in _TOP_LEVEL)}"
        )
    _check_supported(supported)
    named = list(model.named_modules())
    _check_name_keys(config, model, [name for name, _ in named])
    _check_type_keys(config, [module for _, module in named])

    selections: list[WeightSelection] = []
    seen: set[int] = set()
    owned = set()
    if attention_owns_out_proj:
        owned = {
            id(m.out_proj)
            for _, m in named
            if isinstance(m, nn.MultiheadAttention) and isinstance(m.out_proj, nn.Module)
        }
    for name, module in named:
        if id(module) in owned:
            continue  # (its attention module's)
        present = [
            param
            for param in _supported_params(module, supported)
            # (a parametrized weight is not computed here: spectral_norm's would update its
            # power-iteration buffers; _check_stored rejects it below)
            if parametrize.is_parametrized(module, param)
            or isinstance(getattr(module, param, None), torch.Tensor)
        ]
        if not present:
            continue
        held = [(name, module, param) for param in present]
        names = list(present)  # (relative to module: the weight_threshold test reads them)
        if id(getattr(module, "out_proj", None)) in owned:
            held.append((f"{name}.out_proj" if name else "out_proj", module.out_proj, "weight"))
            names.append("out_proj.weight")
        module_config = resolve_module_config(config, name, module, param_names=names)
        if module_config is None:
            continue
        for owner_name, owner, param in held:
            _check_stored(owner, owner_name, param, pruned_ok)
            tensor_id = id(getattr(owner, param))
            if tensor_id in seen:
                continue
            seen.add(tensor_id)
            selections.append(WeightSelection(owner_name, owner, param, module_config))
    return selections


def _check_stored(module: nn.Module, module_name: str, param: str, pruned_ok: bool) -> None:
    """Raise unless ``module.<param>`` is stored on the module (a parameter or buffer), or
    recomputed from ``<param>_orig`` by pruning when ``pruned_ok``."""
    if param in module._parameters or param in module._buffers:
        return
    where = f"{module_name + '.' if module_name else ''}{param}"
    exclude = f"or exclude the module (module_name_configs={{{module_name!r}: None}})"
    if parametrize.is_parametrized(module, param):
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations[param])
        raise ValueError(
            f"{where} ({type(module).__name__}): the weight is computed by a parametrization "
            f"({kinds}), so palettizing it would only overwrite a temporary; remove it first "
            f"(torch.nn.utils.parametrize.remove_parametrizations(module, {param!r})) {exclude}"
        )
    if f"{param}_orig" in module._parameters:
        if pruned_ok:
            return
        raise ValueError(
            f"{where} ({type(module).__name__}): the weight is recomputed from {param}_orig "
            f"in forward (torch.nn.utils.prune or spectral_norm), so palettizing it would only "
            f"overwrite a temporary; make it permanent first "
            f"(torch.nn.utils.prune.remove(module, {param!r})) {exclude}"
        )
    raise ValueError(
        f"{where} ({type(module).__name__}): the weight is neither a parameter nor a buffer "
        f"of the module but computed in forward (e.g. torch.nn.utils.weight_norm, from "
        f"{param}_g and {param}_v), so palettizing it would only overwrite a temporary; "
        f"remove the reparametrization first (torch.nn.utils.remove_weight_norm) {exclude}"
    )


# ----------------------------------------------------------------------------------------------


def _weights(module: nn.Module, param_names: Sequence[str] | None) -> list[torch.Tensor]:
    if param_names is None:
        return [
            p
            for n, p in module.named_parameters(recurse=False)
            if n.endswith("weight") and p is not None
        ]
    weights = [_read_weight(module, n) for n in param_names]
    return [w for w in weights if isinstance(w, torch.Tensor)]


def _read_weight(module: nn.Module, name: str) -> Any:
    """``module.<name>`` (a dotted name reads a submodule's), or for a parametrized weight (not
    computed: that could update the parametrization's state) its largest original tensor,
    which has its size."""
    if "." in name:
        path, name = name.rsplit(".", 1)
        module = module.get_submodule(path)
    if parametrize.is_parametrized(module, name):
        originals = module.parametrizations[name]._parameters.values()
        return max([p for p in originals if p is not None], key=torch.Tensor.numel, default=None)
    return getattr(module, name, None)


def _class_keys(klass: type) -> list[Any]:
    keys: list[Any] = [klass, klass.__name__, f"{klass.__module__}.{klass.__qualname__}"]
    if klass.__module__.startswith("torch.nn") and getattr(nn, klass.__name__, None) is klass:
        keys.append(f"torch.nn.{klass.__name__}")
    return keys


def _match_type(config: PalettizerConfig, cls: type) -> tuple[bool, Any]:
    types = config.module_type_configs
    if not types:
        return False, None
    for klass in cls.__mro__:
        hits = [key for key in _class_keys(klass) if key in types]
        if len(hits) > 1:
            raise ValueError(
                f"{type(config).__name__}.module_type_configs: keys "
                f"{', '.join(repr(h) for h in hits)} all name {klass.__module__}."
                f"{klass.__qualname__}; keep one"
            )
        if hits:
            return True, types[hits[0]]
    return False, None


def has_type_config(config: PalettizerConfig, cls: type) -> bool:
    """Whether ``config.module_type_configs`` has an entry for ``cls`` (or a base class).

    Args:
        config: a top-level palettizer config.
        cls: a module class.

    Returns:
        True when a type entry (class or class-name key) applies to ``cls``.

    Example:
        >>> from torch import nn
        >>> from lightning_palettize import DKMPalettizerConfig
        >>> cfg = DKMPalettizerConfig(module_type_configs={"Linear": {"n_bits": 3}})
        >>> has_type_config(cfg, nn.Linear), has_type_config(cfg, nn.Conv2d)
        (True, False)
    """
    return _match_type(config, cls)[0]


def _dkm_default_n_bits(cls: type) -> int | None:
    for klass in cls.__mro__:
        if klass in DKM_DEFAULT_N_BITS:
            return DKM_DEFAULT_N_BITS[klass]
    return None


def _exceeds(threshold: int, weights: Sequence[torch.Tensor]) -> bool:
    # coremltools: a module is palettized only if *every* weight is strictly larger.
    return all(w.numel() > threshold for w in weights)


def _finish(value: Any, module: nn.Module, weights: Sequence[torch.Tensor]) -> ModuleConfig | None:
    if value is None:
        return None
    if isinstance(value, list):
        # Tiers are sorted by weight_threshold; the largest threshold exceeded wins.
        satisfied = [tier for tier in value if _exceeds(tier.weight_threshold, weights)]
        if not satisfied:
            return None
        value = satisfied[-1]
    if isinstance(value, ModuleDKMPalettizerConfig):
        if not _exceeds(value.weight_threshold, weights):
            return None
        n_bits = _dkm_default_n_bits(type(module))
        return dataclasses.replace(
            value,
            n_bits=value.n_bits if value.n_bits is not None else (n_bits or 2),
            cluster_dim=value.cluster_dim or 1,
            enable_per_channel_scale=bool(value.enable_per_channel_scale),
        )
    if isinstance(value, ModulePostTrainingPalettizerConfig):
        return dataclasses.replace(
            value,
            n_bits=value.n_bits if value.n_bits is not None else 4,
            cluster_dim=value.cluster_dim or 1,
            enable_per_channel_scale=bool(value.enable_per_channel_scale),
        )
    return dataclasses.replace(value, cluster_dim=value.cluster_dim or 1)


def _check_supported(supported: Mapping[type[nn.Module], Sequence[str]]) -> None:
    if not isinstance(supported, Mapping):
        raise TypeError(
            f"select_weights: supported must map module classes to parameter names; got "
            f"{type(supported).__name__}"
        )
    for cls, names in supported.items():
        if not isinstance(cls, type):
            raise TypeError(f"select_weights: supported key {cls!r} is not a class")
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(
                f"select_weights: supported[{cls.__name__}] must be a sequence of parameter "
                f"names such as ('weight',); got {names!r}"
            )


def _supported_params(
    module: nn.Module, supported: Mapping[type[nn.Module], Sequence[str]]
) -> Sequence[str]:
    for klass in type(module).__mro__:
        if klass in supported:
            return supported[klass]
    for cls, names in supported.items():
        if isinstance(module, cls):
            return names
    return ()


def _check_name_keys(config: PalettizerConfig, model: nn.Module, names: list[str]) -> None:
    for pattern in config.module_name_configs:
        if any(re.fullmatch(pattern, name) for name in names):
            continue
        sample = [name for name in names if name][:10]
        close = difflib.get_close_matches(pattern, [name for name in names if name], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"{type(config).__name__}.module_name_configs: key {pattern!r} matches no module of "
            f"{type(model).__name__} (keys are regexes fully matched against qualified names, "
            f"e.g. {', '.join(repr(n) for n in sample) or 'none: the model has no submodules'})"
            f"{hint}"
        )


@functools.lru_cache(maxsize=1)
def _torch_nn_classes() -> tuple[type, ...]:
    return tuple(
        obj for obj in vars(nn).values() if isinstance(obj, type) and issubclass(obj, nn.Module)
    )


def _check_type_keys(config: PalettizerConfig, modules: list[nn.Module]) -> None:
    string_keys = [key for key in config.module_type_configs if isinstance(key, str)]
    if not string_keys:
        return
    classes = set(_torch_nn_classes())
    for module in modules:
        classes.update(type(module).__mro__)
    known = {key for klass in classes for key in _class_keys(klass) if isinstance(key, str)}
    for key in string_keys:
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"{type(config).__name__}.module_type_configs: key {key!r} names no class in "
            f"torch.nn or in the model (use a class, its name such as 'Linear', or a dotted path "
            f"such as 'torch.nn.Linear'){hint}"
        )
