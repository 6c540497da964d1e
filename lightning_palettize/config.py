"""Palettization configs, argument for argument compatible with coremltools.

The six classes mirror ``coremltools.optimize.torch.palettization`` (class names, argument names,
order and defaults), so a coremltools config dict or YAML file loads here unchanged. Unlike
coremltools they validate strictly: no type coercion, no free-form strings, and every error names
the class, the key, the bad value and what would be accepted.

Module configs (``Module*PalettizerConfig``) say *how* to palettize one module. Top-level configs
(``*PalettizerConfig``) say *which* module gets which module config: ``module_name_configs``
(regex keys, first full match wins) beat ``module_type_configs`` (class or class-name keys), which
beat ``global_config``; a value of ``None`` means "do not palettize". Resolution itself lives in
:mod:`lightning_palettize.selection`.

Example:
    >>> import torch.nn as nn
    >>> config = DKMPalettizerConfig.from_dict(
    ...     {"module_type_configs": {nn.Linear: [{"n_bits": 4, "weight_threshold": 1000},
    ...                                          {"n_bits": 2, "weight_threshold": 10000}]}}
    ... )
    >>> DKMPalettizerConfig.from_dict(config.as_dict()) == config
    True
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import IO, Any, ClassVar, TypeVar

import torch
import torch.nn as nn
import yaml

try:
    from omegaconf import DictConfig, ListConfig, OmegaConf
except ImportError:  # pragma: no cover - a declared dependency; absent only on bare machines
    # Without omegaconf nothing can be a DictConfig: plain dicts and YAML still work.
    class DictConfig:  # type: ignore[no-redef]
        pass

    class ListConfig:  # type: ignore[no-redef]
        pass

    OmegaConf = None  # type: ignore[assignment]

__all__ = [
    "DKM_DEFAULT_N_BITS",
    "DKMPalettizerConfig",
    "ModuleDKMPalettizerConfig",
    "ModulePostTrainingPalettizerConfig",
    "ModuleSKMPalettizerConfig",
    "PostTrainingPalettizerConfig",
    "SKMPalettizerConfig",
    "load_config",
]

# coremltools' DEFAULT_PALETTIZATION_SCHEME n_bits column, plus the ConvTranspose layers we support.
DKM_DEFAULT_N_BITS: Mapping[type[nn.Module], int] = MappingProxyType(
    {
        nn.Linear: 4,
        nn.Conv1d: 2,
        nn.Conv2d: 2,
        nn.Conv3d: 2,
        nn.ConvTranspose1d: 2,
        nn.ConvTranspose2d: 2,
        nn.LayerNorm: 2,
        nn.MultiheadAttention: 2,
        nn.Embedding: 2,
    }
)

_GRANULARITIES = ("per_tensor", "per_grouped_channel")
_DKM_LUT_DTYPES = ("i8", "u8", "f16", "bf16", "f32")
_KMEANS_INITS = ("auto", "opt1d", "kmeans++", "cpu.kmeans++", "cpu.minibatch.kmeans++")
_PALETT_MODES = ("dkm", "gsm", "hard")
_SCALING_SCHEMES = ("min_max", "abs")
_ACTIVATION_DTYPES = {torch.qint8: torch.qint8, torch.quint8: torch.quint8}
_ACTIVATION_DTYPES.update({str(d): d for d in list(_ACTIVATION_DTYPES)})  # "torch.qint8"
_ACTIVATION_DTYPES.update({str(d).removeprefix("torch."): d for d in (torch.qint8, torch.quint8)})
_KMEANS_LUT_DTYPES: dict[Any, str | None] = {
    None: None,
    torch.int8: "int8",
    torch.uint8: "uint8",
    "int8": "int8",
    "uint8": "uint8",
    "i8": "int8",
    "u8": "uint8",
    "torch.int8": "int8",
    "torch.uint8": "uint8",
}


# ----------------------------------------------------------------------------------------------
# Field checks: each returns the normalised value or raises _Bad(expected, hint).


class _Bad(Exception):
    def __init__(self, expected: str, hint: str = "") -> None:
        super().__init__(expected)
        self.expected = expected
        self.hint = hint


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _bad_value(owner: str, key: str, value: Any, expected: str, hint: str = "") -> ValueError:
    message = f"{owner}.{key}: got {_describe(value)}; expected {expected}"
    return ValueError(f"{message}; {hint}" if hint else message)


def _or_none(expected: str, optional: bool) -> str:
    return f"{expected} or None" if optional else expected


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(lo: int | None = None, hi: int | None = None, optional: bool = False) -> Callable:
    if lo is not None and hi is not None:
        expected = f"an int in {lo}..{hi}"
    elif lo is not None:
        expected = f"an int >= {lo}"
    else:
        expected = "an int"
    expected = _or_none(expected, optional)

    def check(value: Any) -> Any:
        if value is None and optional:
            return None
        if not _is_int(value):
            hint = ""
            if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                hint = "write the number without quotes"
            raise _Bad(expected, hint)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise _Bad(expected)
        return value

    return check


def _float(
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    optional: bool = False,
) -> Callable:
    if lo is not None and hi is not None:
        expected = f"a float in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        expected = f"a float {'>' if lo_open else '>='} {lo:g}"
    else:
        expected = "a float"
    expected = _or_none(expected, optional)

    def check(value: Any) -> Any:
        if value is None and optional:
            return None
        if isinstance(value, str):
            raise _Bad(expected, _float_string_hint(value))
        # ints are fine because YAML and JSON write 1.0 as 1; bools are not numbers here.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(expected)
        value = float(value)
        if not math.isfinite(value):
            raise _Bad(expected)
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise _Bad(expected)
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise _Bad(expected)
        return value

    return check


def _float_string_hint(text: str) -> str:
    try:
        float(text)
    except ValueError:
        return ""
    mantissa, sep, exponent = text.strip().lower().partition("e")
    if sep and "." not in mantissa:
        # YAML 1.1 (PyYAML) only reads exponent floats that have a dot in the mantissa.
        return f"YAML reads {text} as a string: write {mantissa}.0e{exponent}"
    return "write the number without quotes"


def _bool(optional: bool = False) -> Callable:
    expected = _or_none("a bool (true/false)", optional)

    def check(value: Any) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, bool):
            raise _Bad(expected)
        return value

    return check


def _choice(options: tuple[str, ...], hints: Mapping[Any, str] | None = None) -> Callable:
    expected = "one of " + ", ".join(repr(o) for o in options)

    def check(value: Any) -> Any:
        if isinstance(value, str) and value in options:
            return value
        hint = ""
        if hints and isinstance(value, (str, torch.dtype)):
            hint = hints.get(value, "")
        raise _Bad(expected, hint)

    return check


def _granularity(value: Any) -> str:
    # coremltools' PalettizationGranularity enum is only ever written as its two string values.
    if isinstance(value, enum.Enum) and value.value in _GRANULARITIES:
        return value.value
    if isinstance(value, str) and value in _GRANULARITIES:
        return value
    raise _Bad("one of " + ", ".join(repr(g) for g in _GRANULARITIES))


def _kmeans_lut_dtype(value: Any) -> str | None:
    if (value is None or isinstance(value, (str, torch.dtype))) and value in _KMEANS_LUT_DTYPES:
        return _KMEANS_LUT_DTYPES[value]
    raise _Bad("None, torch.int8, torch.uint8, or one of 'int8', 'uint8', 'i8', 'u8'")


def _activation_dtype(value: Any) -> torch.dtype:
    if isinstance(value, (str, torch.dtype)) and value in _ACTIVATION_DTYPES:
        return _ACTIVATION_DTYPES[value]
    raise _Bad("torch.qint8, torch.quint8, 'qint8' or 'quint8'")


def _permutation(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    expected = "None or a permutation of 0..n-1 as a list/tuple of ints, e.g. [1, 0]"
    if not isinstance(value, (list, tuple)) or not value:
        raise _Bad(expected)
    if not all(_is_int(v) for v in value) or sorted(value) != list(range(len(value))):
        raise _Bad(expected)
    return tuple(value)


def _deprecated(instead: str) -> Callable:
    def check(value: Any) -> None:
        if value is not None:
            raise _Bad(f"None: it is deprecated (as in coremltools); use {instead} instead")
        return None

    return check


def _field(default: Any, check: Callable) -> Any:
    return dataclasses.field(default=default, metadata={"check": check})


def _unwrap(value: Any) -> Any:
    """Turn omegaconf containers (Hydra passes them to __init__) into plain dicts / lists."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


# ----------------------------------------------------------------------------------------------
# YAML and dict input.


def _plain_mapping(data: Any, owner: str) -> dict[Any, Any]:
    data = _unwrap(data)
    if not isinstance(data, Mapping):
        raise TypeError(
            f"{owner}.from_dict: got {type(data).__name__}; expected a dict or an omegaconf "
            "DictConfig"
        )
    return dict(data)


def _read_yaml(yml: IO | str | os.PathLike, owner: str) -> dict[Any, Any]:
    if isinstance(yml, (str, os.PathLike)):
        source = os.fspath(yml)
        with open(yml, encoding="utf-8") as stream:
            text = stream.read()
    elif hasattr(yml, "read"):
        source = getattr(yml, "name", "<stream>")
        text = yml.read()
    else:
        raise TypeError(
            f"{owner}.from_yaml: got {type(yml).__name__}; expected a path (str or pathlib.Path) "
            "or a text stream"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as error:
        raise ValueError(
            f"{owner}.from_yaml: {source} is not plain data ({error.problem}); only mappings, "
            "lists, strings, numbers, booleans and null are accepted, never !!python tags"
        ) from error
    except yaml.YAMLError as error:
        raise ValueError(f"{owner}.from_yaml: {source} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(
            f"{owner}.from_yaml: the top level of {source} must be a mapping of config keys; "
            f"got {type(data).__name__}"
        )
    return data


def _check_keys(owner: str, data: Mapping[Any, Any], valid: list[str]) -> None:
    unknown = [key for key in data if key not in valid]
    if not unknown:
        return
    close = difflib.get_close_matches(str(unknown[0]), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(
        f"{owner}: unknown key(s) {', '.join(repr(k) for k in unknown)}{hint}; "
        f"valid keys are {', '.join(valid)}"
    )


def _to_plain(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return list(value)
    return value


# ----------------------------------------------------------------------------------------------
# Module configs.

_Self = TypeVar("_Self", bound="_ModuleConfig")


@dataclasses.dataclass
class _ModuleConfig:
    """Shared machinery: per-field checks, cross-field checks, dict / YAML conversion."""

    def __setattr__(self, name: str, value: Any) -> None:
        # Every assignment is checked, in __init__ and later, as coremltools' attrs classes do.
        spec = type(self).__dataclass_fields__.get(name)
        if spec is not None and "check" in spec.metadata:
            value = _unwrap(value)
            try:
                value = spec.metadata["check"](value)
            except _Bad as bad:
                raise _bad_value(type(self).__name__, name, value, bad.expected, bad.hint) from None
        object.__setattr__(self, name, value)

    def __post_init__(self) -> None:
        # Cross-field checks run once the whole config exists (not on later assignments).
        self._check_granularity()

    def _check_granularity(self) -> None:
        owner = type(self).__name__
        if self.granularity == "per_tensor" and self.group_size is not None:
            raise _bad_value(
                owner,
                "group_size",
                self.group_size,
                "None with granularity='per_tensor'",
                "set granularity='per_grouped_channel' to use group_size",
            )
        if self.granularity == "per_grouped_channel" and self.group_size is None:
            raise _bad_value(
                owner,
                "group_size",
                None,
                "a positive int (channels per LUT) with granularity='per_grouped_channel'",
            )

    @classmethod
    def from_dict(cls: type[_Self], data_dict: Mapping[str, Any] | DictConfig) -> _Self:
        """Build the config from a dict (or omegaconf DictConfig) of argument names to values.

        Raises:
            ValueError: on an unknown key or an invalid value.
            TypeError: if ``data_dict`` is not a mapping.
        """
        data = _plain_mapping(data_dict, cls.__name__)
        valid = [f.name for f in dataclasses.fields(cls)]
        _check_keys(cls.__name__, data, valid)
        return cls(**data)

    @classmethod
    def from_yaml(cls: type[_Self], yml: IO | str | os.PathLike) -> _Self:
        """Build the config from a YAML file path or text stream (``yaml.safe_load`` only).

        Raises:
            ValueError: if the YAML is invalid, not plain data, not a mapping, or fails validation.
        """
        return cls.from_dict(_read_yaml(yml, cls.__name__))

    def as_dict(self) -> dict[str, Any]:
        """Return the config as plain YAML/JSON-serialisable data (dtypes become strings)."""
        return {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclasses.dataclass
class ModuleDKMPalettizerConfig(_ModuleConfig):
    """How to palettize one module with DKM (differentiable k-means, training time).

    Same arguments, order and defaults as coremltools' ``ModuleDKMPalettizerConfig``; see its
    documentation for the advanced ``palett_*`` / ``kmeans_*`` knobs. The ones most users set:

    Args:
        n_bits: LUT size is ``2**n_bits`` (1..8). ``None`` takes the module type's default from
            :data:`DKM_DEFAULT_N_BITS` (4 for Linear, 2 otherwise).
        weight_threshold: palettize only if every palettizable weight of the module has more
            than this many elements.
        granularity: ``"per_tensor"`` or ``"per_grouped_channel"`` (then ``group_size`` is
            required: channels per LUT along ``channel_axis``).
        milestone: step at which palettization starts.
        cluster_dim: length of the vectors clustered together (``None`` means 1).
        lut_dtype: one of ``"i8"``, ``"u8"``, ``"f16"``, ``"bf16"``, ``"f32"``.
        partition_size, cluster_dtype: deprecated in coremltools; any value but ``None`` raises.

    Raises:
        ValueError: naming the key, the bad value and what is accepted.
    """

    n_bits: int | None = _field(None, _int(1, 8, optional=True))
    weight_threshold: int = _field(2048, _int(0))
    granularity: str = _field("per_tensor", _granularity)
    group_size: int | None = _field(None, _int(1, optional=True))
    channel_axis: int = _field(0, _int(0, 1))
    enable_per_channel_scale: bool | None = _field(False, _bool(optional=True))
    milestone: int = _field(0, _int(0))
    cluster_dim: int | None = _field(None, _int(1, optional=True))
    quant_min: int = _field(-128, _int())
    quant_max: int = _field(127, _int())
    dtype: str | torch.dtype = _field(torch.qint8, _activation_dtype)
    lut_dtype: str = _field(
        "f32",
        _choice(
            _DKM_LUT_DTYPES,
            hints={
                "int8": "DKM spells it 'i8'",
                "uint8": "DKM spells it 'u8'",
                torch.int8: "DKM spells it 'i8'",
                torch.uint8: "DKM spells it 'u8'",
            },
        ),
    )
    quantize_activations: bool = _field(False, _bool())
    cluster_permute: tuple | None = _field(None, _permutation)
    palett_max_mem: float = _field(1.0, _float(0.0, 1.0, lo_open=True))
    kmeans_max_iter: int = _field(3, _int(1))
    prune_threshold: float = _field(1e-07, _float(0.0))
    kmeans_init: str = _field("auto", _choice(_KMEANS_INITS))
    kmeans_opt1d_threshold: int = _field(1024, _int(0))
    enforce_zero: bool = _field(False, _bool())
    palett_mode: str = _field("dkm", _choice(_PALETT_MODES))
    palett_tau: float = _field(0.0001, _float(0.0, lo_open=True))
    palett_epsilon: float = _field(0.0001, _float(0.0))
    palett_lambda: float = _field(0.0, _float(0.0))
    add_extra_centroid: bool = _field(False, _bool())
    palett_cluster_tol: float = _field(0.0, _float(0.0))
    palett_min_tsize: int = _field(65536, _int(0))
    palett_unique: bool = _field(False, _bool())
    palett_shard: bool = _field(False, _bool())
    palett_batch_mode: bool = _field(False, _bool())
    palett_dist: bool = _field(False, _bool())
    per_channel_scaling_factor_scheme: str = _field("min_max", _choice(_SCALING_SCHEMES))
    percentage_palett_enable: float = _field(1.0, _float(0.0, 1.0, lo_open=True))
    kmeans_batch_threshold: int = _field(4, _int(1))
    kmeans_n_init: int = _field(10, _int(1))
    zero_threshold: float = _field(1e-07, _float(0.0))
    kmeans_error_bnd: float = _field(0.0, _float(0.0))
    partition_size: int | None = _field(
        None, _deprecated("granularity='per_grouped_channel' with group_size")
    )
    cluster_dtype: str | None = _field(
        None, _deprecated("lut_dtype (and cluster_permute for the 'oc_last' layout)")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quant_min >= self.quant_max:
            raise _bad_value(
                type(self).__name__,
                "quant_min",
                self.quant_min,
                f"an int below quant_max={self.quant_max}",
            )


class _KMeansModuleConfig(_ModuleConfig):
    """Cross-field check shared by the post-training (PTP) and sensitive (SKM) k-means configs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.enable_per_channel_scale and self.cluster_dim is not None and self.cluster_dim > 1:
            raise _bad_value(
                type(self).__name__,
                "enable_per_channel_scale",
                True,
                f"False with cluster_dim={self.cluster_dim}",
                "per-channel scale is not supported with vector palettization (cluster_dim > 1)",
            )


@dataclasses.dataclass
class ModulePostTrainingPalettizerConfig(_KMeansModuleConfig):
    """How to palettize one module with post-training k-means (PTP).

    Same arguments, order and defaults as coremltools' ``ModulePostTrainingPalettizerConfig``.

    Args:
        n_bits: LUT size is ``2**n_bits`` (1..8); ``None`` means the default, 4.
        lut_dtype: quantize the LUT to int8 / uint8 (``torch.int8``, ``"int8"``, ``"i8"`` ...)
            or keep it float (``None``). Stored as ``None``, ``"int8"`` or ``"uint8"``.
        granularity: ``"per_tensor"`` or ``"per_grouped_channel"`` (needs ``group_size``).
        group_size: channels per LUT along ``channel_axis`` (0 or 1).
        cluster_dim: vector length (``None`` means 1).
        enable_per_channel_scale: normalise each output channel first; not with cluster_dim > 1.
        enable_fast_kmeans_mode: cluster the unique fp16-rounded values (fast).
        rounding_precision: decimals kept by fast mode.

    Raises:
        ValueError: naming the key, the bad value and what is accepted.
    """

    n_bits: int | None = _field(4, _int(1, 8, optional=True))
    lut_dtype: Any = _field(None, _kmeans_lut_dtype)
    granularity: str = _field("per_tensor", _granularity)
    group_size: int | None = _field(None, _int(1, optional=True))
    channel_axis: int = _field(0, _int(0, 1))
    cluster_dim: int | None = _field(None, _int(1, optional=True))
    enable_per_channel_scale: bool | None = _field(False, _bool(optional=True))
    enable_fast_kmeans_mode: bool | None = _field(True, _bool(optional=True))
    rounding_precision: int | None = _field(4, _int(0, optional=True))


@dataclasses.dataclass
class ModuleSKMPalettizerConfig(_KMeansModuleConfig):
    """How to palettize one module with sensitive k-means (SKM, SqueezeLLM-style).

    Same arguments, order and defaults as coremltools' ``ModuleSKMPalettizerConfig``, plus one
    extension of ours, appended last.

    Args:
        n_bits: LUT size is ``2**n_bits`` (1..8).
        lut_dtype: as in :class:`ModulePostTrainingPalettizerConfig`.
        granularity, group_size, channel_axis, cluster_dim, enable_per_channel_scale: as in
            :class:`ModulePostTrainingPalettizerConfig`.
        outlier_fraction: **lightning_palettize extension.** Fraction in [0, 0.5) of the most
            sensitive weights kept exact (SqueezeLLM dense-and-sparse); coremltools defines
            but never uses this step.

    Raises:
        ValueError: naming the key, the bad value and what is accepted.
    """

    n_bits: int = _field(4, _int(1, 8))
    lut_dtype: Any = _field(None, _kmeans_lut_dtype)
    granularity: str = _field("per_tensor", _granularity)
    group_size: int | None = _field(None, _int(1, optional=True))
    channel_axis: int = _field(0, _int(0, 1))
    cluster_dim: int | None = _field(None, _int(1, optional=True))
    enable_per_channel_scale: bool = _field(False, _bool())
    outlier_fraction: float = _field(0.0, _float(0.0, 0.5, hi_open=True))


# ----------------------------------------------------------------------------------------------
# Top-level configs.

_Top = TypeVar("_Top", bound="_PalettizerConfig")


def _type_key_name(key: type | str) -> str:
    """The plain-data form of a module_type_configs key: a class becomes its dotted path."""
    return key if isinstance(key, str) else f"{key.__module__}.{key.__qualname__}"


def _class_named_by(key: type | str) -> type | None:
    """The class a module_type_configs key names, where that is known without the model.

    A class is itself; a string is matched the way selection matches it against torch.nn
    classes (``"Linear"``, ``"torch.nn.Linear"``, ``"torch.nn.modules.linear.Linear"``), or is a
    dotted path to a class of a module already imported (nothing is imported). Other strings
    (e.g. the bare name of a user's class) give None: only the model can resolve them.
    """
    if isinstance(key, type):
        return key
    # selection imports this module, so import its resolver here, when both are loaded
    from lightning_palettize.selection import _class_keys, _torch_nn_classes

    for klass in _torch_nn_classes():
        if key in _class_keys(klass):
            return klass
    module_name, _, attr = key.rpartition(".")
    found = getattr(sys.modules.get(module_name), attr, None) if module_name else None
    return found if isinstance(found, type) and issubclass(found, nn.Module) else None


def _same_class(a: type | str, b: type | str) -> bool:
    """Whether two module_type_configs keys name the same class (so one replaces the other)."""
    if a == b:
        return True
    from lightning_palettize.selection import _class_keys

    class_a, class_b = _class_named_by(a), _class_named_by(b)
    if class_a is not None and class_b is not None:
        return class_a is class_b
    if class_a is not None:  # b: a string only the model can resolve, e.g. "MyLinear"
        return b in _class_keys(class_a)
    if class_b is not None:
        return a in _class_keys(class_b)
    return False


def _dkm_default_table() -> dict[type, ModuleDKMPalettizerConfig]:
    """coremltools' default DKM scheme (plus the ConvTranspose layers), as module_type_configs
    entries written the way coremltools writes them."""
    return {
        cls: ModuleDKMPalettizerConfig(n_bits=bits, cluster_dim=1)
        for cls, bits in DKM_DEFAULT_N_BITS.items()
    }


def _type_label(value: Any, cls: type) -> str:
    """The type name of ``value`` for an error; module-qualified if only named like ``cls``."""
    kind = type(value)
    if kind.__name__ == cls.__name__ and not isinstance(value, cls):
        return f"{kind.__module__}.{kind.__qualname__}"
    return kind.__name__


def _expected_class(value: Any, cls: type) -> str:
    """``cls`` named for an error: module-qualified when ``value``'s class has the same name."""
    if type(value).__name__ == cls.__name__ and not isinstance(value, cls):
        return f"{cls.__module__}.{cls.__qualname__}"
    return cls.__name__


def _from_coremltools(value: Any, cls: type[_Config]) -> _Config | None:
    """Convert a coremltools config object into ``cls`` through its ``as_dict()``.

    Only an object whose class has ``cls``'s name (coremltools' class of the same config) and an
    ``as_dict`` method is converted; anything else gives None, for the caller's own error.
    """
    if type(value).__name__ != cls.__name__ or isinstance(value, cls):
        return None
    as_dict = getattr(value, "as_dict", None)
    if not callable(as_dict):
        return None
    return cls.from_dict(as_dict())


@dataclasses.dataclass(eq=False)
class _PalettizerConfig:
    """Shared machinery of the three top-level configs."""

    _module_config: ClassVar[type[_ModuleConfig]]
    _allow_lists: ClassVar[bool] = False
    _extra_checks: ClassVar[Mapping[str, Callable]] = {}

    global_config: Any = None
    module_type_configs: dict[Any, Any] = dataclasses.field(default_factory=dict)
    module_name_configs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # As coremltools: a config *created* with nothing set gets the palettizer's defaults
        # written in, as ordinary entries that later set_* calls replace and as_dict writes out.
        if self.is_unset():
            self._write_defaults()

    def _write_defaults(self) -> None:
        # PTP / SKM: the default module config as global_config (DKM overrides this).
        self.global_config = self._module_config()

    def __setattr__(self, name: str, value: Any) -> None:
        # Normalise on every assignment (in __init__ and later): dicts become module configs.
        if name == "global_config":
            value = self._module_value(value, name)
        elif name == "module_type_configs":
            types: dict[Any, Any] = {}
            for key, item in self._mapping(value, name).items():
                self._put_type(types, key, item)
            value = types
        elif name == "module_name_configs":
            names: dict[str, Any] = {}
            given: dict[str, Any] = {}
            for key, item in self._mapping(value, name).items():
                text = self._name_key(key)
                if text in names:
                    raise ValueError(
                        f"{type(self).__name__}.module_name_configs: keys {given[text]!r} and "
                        f"{key!r} both name {text!r}; keep one"
                    )
                given[text] = key
                names[text] = self._module_value(item, f"{name}[{text!r}]")
            value = names
        elif name in self._extra_checks:
            try:
                self._extra_checks[name](value)
            except _Bad as bad:
                raise _bad_value(type(self).__name__, name, value, bad.expected) from None
        object.__setattr__(self, name, value)

    # -- validation helpers --------------------------------------------------------------------

    def _accepted(self) -> str:
        lists = ", a list of them tiered by weight_threshold" if self._allow_lists else ""
        return f"a {self._module_config.__name__}, a dict of its arguments{lists}, or None"

    def _mapping(self, value: Any, key: str) -> dict[Any, Any]:
        value = _unwrap(value)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise _bad_value(type(self).__name__, key, value, "a dict")
        return dict(value)

    def _module_value(self, value: Any, where: str) -> Any:
        owner = type(self).__name__
        value = _unwrap(value)
        if value is None or isinstance(value, self._module_config):
            return value
        try:
            if isinstance(value, Mapping):
                return self._module_config.from_dict(value)
            # coremltools' module config of the same name, converted through its as_dict()
            converted = _from_coremltools(value, self._module_config)
        except ValueError as error:
            raise ValueError(f"{owner}.{where}: {error}") from None
        if converted is not None:
            return converted
        if self._allow_lists and isinstance(value, (list, tuple)):
            return self._tiers(value, where)
        expected = self._accepted().replace(
            self._module_config.__name__, _expected_class(value, self._module_config), 1
        )
        message = f"{owner}.{where}: got {value!r} ({_type_label(value, self._module_config)})"
        raise ValueError(f"{message}; expected {expected}")

    def _tiers(self, items: list | tuple, where: str) -> list[Any]:
        owner = type(self).__name__
        if not items:
            raise _bad_value(owner, where, items, "a non-empty list of configs (or None)")
        tiers = []
        for index, item in enumerate(items):
            if isinstance(item, (list, tuple)) or item is None:
                raise _bad_value(
                    owner, f"{where}[{index}]", item, f"a {self._module_config.__name__} or a dict"
                )
            tiers.append(self._module_value(item, f"{where}[{index}]"))
        thresholds = [tier.weight_threshold for tier in tiers]
        repeated = sorted({t for t in thresholds if thresholds.count(t) > 1})
        if repeated:
            raise ValueError(
                f"{owner}.{where}: weight_threshold {repeated[0]} appears more than once; each "
                "config in a list needs its own weight_threshold (the largest one exceeded wins)"
            )
        # Canonical order (coremltools sorts too), so equality and round trips ignore list order.
        return sorted(tiers, key=lambda tier: tier.weight_threshold)

    def _type_key(self, key: Any) -> type | str:
        if isinstance(key, type) and issubclass(key, nn.Module):
            return key
        if isinstance(key, str) and key:
            return key
        raise _bad_value(
            type(self).__name__,
            "module_type_configs",
            key,
            "keys that are nn.Module subclasses or non-empty class names such as 'Linear', "
            "'torch.nn.Linear' or 'torch.nn.modules.linear.Linear'",
        )

    def _put_type(self, types: dict[Any, Any], key: Any, value: Any) -> None:
        key = self._type_key(key)
        for existing in types:
            # Spellings that only resolution can tie to one class ("Linear" and nn.Linear) are
            # reported by selection, naming the class; set_module_type replaces them.
            if _type_key_name(existing) == _type_key_name(key):
                raise ValueError(
                    f"{type(self).__name__}.module_type_configs: keys {existing!r} and {key!r} "
                    "name the same class; keep one"
                )
        types[key] = self._module_value(value, f"module_type_configs[{_type_key_name(key)!r}]")

    def _name_key(self, key: Any) -> str:
        owner = type(self).__name__
        if _is_int(key):
            # YAML / OmegaConf read nn.Sequential child names (``0: null``) as ints
            key = str(key)
        if not isinstance(key, str):
            raise _bad_value(
                owner,
                "module_name_configs",
                key,
                "str keys (module name regexes) or int keys (child indices such as 0, read as '0')",
            )
        try:
            re.compile(key)
        except re.error as error:
            raise ValueError(
                f"{owner}.module_name_configs: key {key!r} is not a valid regex ({error}); "
                "keys are matched with re.fullmatch against qualified module names, so escape "
                "special characters (re.escape)"
            ) from None
        return key

    # -- public API ----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls: type[_Top], config_dict: Mapping[str, Any] | DictConfig) -> _Top:
        """Build the config from a nested dict (or omegaconf DictConfig) of plain data.

        Module configs may be given as dicts; ``module_type_configs`` keys may be classes or
        strings (kept as given: resolution understands both).

        Raises:
            ValueError: on an unknown key or an invalid value (the message gives the path).
            TypeError: if ``config_dict`` is not a mapping.
        """
        data = _plain_mapping(config_dict, cls.__name__)
        valid = [f.name for f in dataclasses.fields(cls)]
        _check_keys(cls.__name__, data, valid)
        return cls(**data)

    @classmethod
    def from_yaml(cls: type[_Top], yml: IO | str | os.PathLike) -> _Top:
        """Build the config from a YAML file path or text stream (``yaml.safe_load`` only).

        Raises:
            ValueError: if the YAML is invalid, not plain data, not a mapping, or fails validation.
        """
        return cls.from_dict(_read_yaml(yml, cls.__name__))

    def as_dict(self) -> dict[str, Any]:
        """Return the config as plain YAML/JSON-serialisable data.

        Class keys of ``module_type_configs`` become dotted paths such as
        ``"torch.nn.modules.linear.Linear"``; module configs become dicts. The defaults written
        in at creation are ordinary entries, so they are written out too (as coremltools does)
        and ``from_dict(config.as_dict())`` palettizes exactly what ``config`` does. A config
        with nothing configured at all (:meth:`is_unset`: it palettizes nothing) is written with
        the catch-all ``module_name_configs`` entry ``{".*": None}``, because plain data with
        nothing set means "the defaults" when loaded.
        """

        def plain(value: Any) -> Any:
            if isinstance(value, list):
                return [tier.as_dict() for tier in value]
            return None if value is None else value.as_dict()

        data = {
            "global_config": plain(self.global_config),
            "module_type_configs": {
                _type_key_name(key): plain(value) for key, value in self.module_type_configs.items()
            },
            "module_name_configs": {
                key: plain(value) for key, value in self.module_name_configs.items()
            },
        }
        if self.is_unset():
            data["module_name_configs"] = {".*": None}
        for f in dataclasses.fields(self)[3:]:
            data[f.name] = getattr(self, f.name)
        return data

    def __eq__(self, other: object) -> bool:
        # Compare the plain form, so nn.Linear and "torch.nn.modules.linear.Linear" keys agree
        # (and equal configs palettize the same: the defaults are entries, see as_dict).
        if type(other) is not type(self):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    __hash__ = None  # mutable

    def set_global(self: _Top, global_config: Any) -> _Top:
        """Set the config for every module not matched by name or type (``None``: none).

        It replaces the default ``global_config`` that PTP / SKM configs created empty hold, so
        ``PostTrainingPalettizerConfig().set_global(None)`` palettizes nothing (as in
        coremltools). DKM's default table is in ``module_type_configs`` and stays.

        Returns:
            self, for chaining.
        """
        self.global_config = self._module_value(global_config, "global_config")
        return self

    def set_module_type(self: _Top, object_type: type | str, opt_config: Any) -> _Top:
        """Set (or replace) the config for a module class or class name (``None``: skip it).

        An existing key that names the same class is replaced, whatever its spelling:
        ``nn.Linear``, ``"Linear"``, ``"torch.nn.Linear"`` and
        ``"torch.nn.modules.linear.Linear"`` are one key (and so are a user's class, its
        ``__name__`` and its dotted path).

        Returns:
            self, for chaining.
        """
        key = self._type_key(object_type)
        types = {
            existing: value
            for existing, value in self.module_type_configs.items()
            if not _same_class(existing, key)
        }
        self._put_type(types, key, opt_config)
        self.module_type_configs = types
        return self

    def set_module_name(self: _Top, module_name: str | int, opt_config: Any) -> _Top:
        """Set (or replace) the config for modules whose qualified name fully matches a regex.

        An int (a child index of ``nn.Sequential``, as YAML reads ``0:``) is taken as its string.

        Returns:
            self, for chaining.
        """
        key = self._name_key(module_name)
        self.module_name_configs[key] = self._module_value(
            opt_config, f"module_name_configs[{key!r}]"
        )
        return self

    def fills_defaults(self) -> bool:
        """True when the config holds the palettizer's defaults, as one created with nothing set
        does: as in coremltools they are written in at creation (PTP/SKM: the default module
        config as ``global_config``; DKM: coremltools' per-type table in
        ``module_type_configs``), so they apply to every module that a later
        ``set_module_name`` / ``set_module_type`` call does not configure, until replaced.

        Returns:
            Whether the default entries are there (all of them, unchanged).

        Example:
            >>> DKMPalettizerConfig().set_module_name("head", None).fills_defaults()
            True
            >>> DKMPalettizerConfig(module_name_configs={"head": None}).fills_defaults()
            False
            >>> PostTrainingPalettizerConfig().set_global(None).fills_defaults()
            False
        """
        return self.global_config == self._module_config()

    def is_unset(self) -> bool:
        """True when nothing is configured (no global, type or name entry): nothing is
        palettized. A config created so gets the defaults instead (:meth:`fills_defaults`); it is
        unset only once they are removed, e.g. ``PostTrainingPalettizerConfig().set_global(None)``.
        """
        return (
            self.global_config is None
            and not self.module_type_configs
            and not self.module_name_configs
        )


@dataclasses.dataclass(eq=False)
class DKMPalettizerConfig(_PalettizerConfig):
    """Which modules DKM palettizes, and how (coremltools' ``DKMPalettizerConfig``).

    Args:
        global_config: applied to every supported module not matched below.
        module_type_configs: per class (``nn.Linear``) or class name (``"Linear"``,
            ``"torch.nn.Linear"``, ``"torch.nn.modules.linear.Linear"``).
        module_name_configs: per module, keyed by regexes fully matched against qualified names.

    Each value is a :class:`ModuleDKMPalettizerConfig`, a dict of its arguments, ``None`` (do not
    palettize) or a list of configs tiered by ``weight_threshold`` (the largest threshold that
    every weight of the module exceeds wins). Created with nothing set, the config gets
    coremltools' default table written into ``module_type_configs`` (as coremltools does):
    one entry per class of :data:`DKM_DEFAULT_N_BITS` with its bits and
    ``weight_threshold=2048``. ``set_global`` leaves those entries alone; ``set_module_type``
    replaces one.

    Example:
        >>> import torch.nn as nn
        >>> config = DKMPalettizerConfig().set_module_type(nn.Linear, {"n_bits": 3})
        >>> config.module_type_configs[nn.Linear].n_bits
        3
    """

    _module_config: ClassVar[type[_ModuleConfig]] = ModuleDKMPalettizerConfig
    _allow_lists: ClassVar[bool] = True

    global_config: ModuleDKMPalettizerConfig | list[ModuleDKMPalettizerConfig] | None = None
    module_type_configs: dict[type | str, Any] = dataclasses.field(default_factory=dict)
    module_name_configs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def _write_defaults(self) -> None:
        self.module_type_configs = _dkm_default_table()

    def fills_defaults(self) -> bool:
        """True when ``module_type_configs`` holds coremltools' default entry, unchanged, for
        every class of :data:`DKM_DEFAULT_N_BITS` (see the base class)."""
        types = self.module_type_configs
        missing = object()
        for cls, default in _dkm_default_table().items():
            found = next((v for k, v in types.items() if _same_class(k, cls)), missing)
            if found != default:
                return False
        return True


@dataclasses.dataclass(eq=False)
class PostTrainingPalettizerConfig(_PalettizerConfig):
    """Which modules post-training k-means palettizes, and how.

    Same arguments as coremltools' ``PostTrainingPalettizerConfig``; values are
    :class:`ModulePostTrainingPalettizerConfig`, dicts of its arguments, or ``None`` (skip).
    Created with nothing set, the config gets the default module config (4 bits) as
    ``global_config`` (as coremltools does), so every supported module not configured later by
    name or type gets it; ``set_global(None)`` removes it.
    """

    _module_config: ClassVar[type[_ModuleConfig]] = ModulePostTrainingPalettizerConfig

    global_config: ModulePostTrainingPalettizerConfig | None = None
    module_type_configs: dict[type | str, Any] = dataclasses.field(default_factory=dict)
    module_name_configs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(eq=False)
class SKMPalettizerConfig(_PalettizerConfig):
    """Which modules sensitive k-means palettizes, and how.

    Same arguments as coremltools' ``SKMPalettizerConfig``; values are
    :class:`ModuleSKMPalettizerConfig`, dicts of its arguments, or ``None`` (skip). Created
    with nothing set, the config gets the default module config (4 bits) as ``global_config``
    (as coremltools does); ``set_global(None)`` removes it.

    Args:
        calibration_nsamples: number of calibration items used to estimate sensitivity (>= 1).
    """

    _module_config: ClassVar[type[_ModuleConfig]] = ModuleSKMPalettizerConfig
    _extra_checks: ClassVar[Mapping[str, Callable]] = {"calibration_nsamples": _int(1)}

    global_config: ModuleSKMPalettizerConfig | None = None
    module_type_configs: dict[type | str, Any] = dataclasses.field(default_factory=dict)
    module_name_configs: dict[str, Any] = dataclasses.field(default_factory=dict)
    calibration_nsamples: int = 128


_Config = TypeVar("_Config", _ModuleConfig, _PalettizerConfig)


def load_config(obj: Any, cls: type[_Config]) -> _Config:
    """Turn whatever a user or a CLI handed us into a config of class ``cls``.

    Args:
        obj: an instance of ``cls`` (returned as is), coremltools' config object of the same
            class name (converted through its ``as_dict()``), a dict (nested dicts fine), an
            omegaconf ``DictConfig``, a YAML file path (``str`` or ``pathlib.Path``), a text
            stream of YAML, or ``None`` (the defaults, ``cls()``).
        cls: one of the six config classes of this module.

    Returns:
        An instance of ``cls``.

    Raises:
        TypeError: if ``obj`` is none of the accepted kinds.
        ValueError: if the content is invalid.

    Example:
        >>> config = load_config({"global_config": {"n_bits": 2}}, PostTrainingPalettizerConfig)
        >>> config.global_config.n_bits
        2
    """
    if not (isinstance(cls, type) and issubclass(cls, (_ModuleConfig, _PalettizerConfig))):
        raise TypeError(f"load_config: cls must be a config class of {__name__}; got {cls!r}")
    if isinstance(obj, cls):
        return obj
    if obj is None:
        return cls()
    converted = _from_coremltools(obj, cls)
    if converted is not None:
        return converted
    if isinstance(obj, (Mapping, DictConfig)):
        return cls.from_dict(obj)
    if isinstance(obj, (str, os.PathLike)) or hasattr(obj, "read"):
        return cls.from_yaml(obj)
    raise TypeError(
        f"load_config: got {_type_label(obj, cls)}; expected a {_expected_class(obj, cls)}, "
        "a dict, an omegaconf DictConfig, a YAML path (str or pathlib.Path), a text stream, or None"
    )
