"""Tests for lightning_palettize.config: coremltools signatures, round trips, validation."""

from __future__ import annotations

import ast
import copy
import dataclasses
import enum
import io
import json
import pathlib
import pickle
import re

import pytest
import torch
import torch.nn as nn
import yaml
from omegaconf import OmegaConf

from lightning_palettize.config import (
    DKM_DEFAULT_N_BITS,
    DKMPalettizerConfig,
    ModuleDKMPalettizerConfig,
    ModulePostTrainingPalettizerConfig,
    ModuleSKMPalettizerConfig,
    PostTrainingPalettizerConfig,
    SKMPalettizerConfig,
    load_config,
)

# Argument lists copied verbatim from the coremltools 9.0 API reference
# (shared/reference/palettization-api.txt). NOTHING is attrs' "use the factory" (an empty dict).
REFERENCE_SIGNATURES = {
    ModuleDKMPalettizerConfig: (
        "n_bits: int | None = None, weight_threshold: int = 2048, granularity='per_tensor', "
        "group_size: int | None = None, channel_axis: int = 0, enable_per_channel_scale: bool = "
        "False, milestone: int = 0, cluster_dim: int | None = None, quant_min: int = -128, "
        "quant_max: int = 127, dtype: str | dtype = torch.qint8, lut_dtype: str = 'f32', "
        "quantize_activations: bool = False, cluster_permute: tuple | None = None, palett_max_mem: "
        "float = 1.0, kmeans_max_iter: int = 3, prune_threshold: float = 1e-07, kmeans_init: str = "
        "'auto', kmeans_opt1d_threshold: int = 1024, enforce_zero: bool = False, palett_mode: str "
        "= 'dkm', palett_tau: float = 0.0001, palett_epsilon: float = 0.0001, palett_lambda: float "
        "= 0.0, add_extra_centroid: bool = False, palett_cluster_tol: float = 0.0, "
        "palett_min_tsize: int = 65536, palett_unique: bool = False, palett_shard: bool = False, "
        "palett_batch_mode: bool = False, palett_dist: bool = False, "
        "per_channel_scaling_factor_scheme: str = 'min_max', percentage_palett_enable: float = "
        "1.0, kmeans_batch_threshold: int = 4, kmeans_n_init: int = 10, zero_threshold: float = "
        "1e-07, kmeans_error_bnd: float = 0.0, partition_size: int | None = None, cluster_dtype: "
        "str | None = None"
    ),
    DKMPalettizerConfig: (
        "global_config: GlobalConfigType | None = None, module_type_configs: ModuleTypeConfigType "
        "= NOTHING, module_name_configs: ModuleNameConfigType = NOTHING"
    ),
    ModulePostTrainingPalettizerConfig: (
        "n_bits: int | None = 4, lut_dtype=None, granularity='per_tensor', group_size: int | None "
        "= None, channel_axis: int = 0, cluster_dim: int | None = None, enable_per_channel_scale: "
        "bool | None = False, enable_fast_kmeans_mode: bool | None = True, rounding_precision: int "
        "| None = 4"
    ),
    PostTrainingPalettizerConfig: (
        "global_config: ModulePostTrainingPalettizerConfig | None = None, module_type_configs: "
        "ModuleTypeConfigType = NOTHING, module_name_configs: Dict[str, "
        "ModulePostTrainingPalettizerConfig | None] = NOTHING"
    ),
    ModuleSKMPalettizerConfig: (
        "n_bits: int = 4, lut_dtype=None, granularity='per_tensor', group_size: int | None = None, "
        "channel_axis: int = 0, cluster_dim: int | None = None, enable_per_channel_scale: bool = "
        "False"
    ),
    SKMPalettizerConfig: (
        "global_config: ModuleSKMPalettizerConfig | None = None, module_type_configs: "
        "ModuleTypeConfigType = NOTHING, module_name_configs: Dict[str, ModuleSKMPalettizerConfig "
        "| None] = NOTHING, calibration_nsamples: int = 128"
    ),
}
# Documented extensions of ours, appended after coremltools' arguments.
EXTENSIONS = {ModuleSKMPalettizerConfig: [("outlier_fraction", 0.0)]}
MODULE_CLASSES = [
    ModuleDKMPalettizerConfig,
    ModulePostTrainingPalettizerConfig,
    ModuleSKMPalettizerConfig,
]
TOP_CLASSES = [DKMPalettizerConfig, PostTrainingPalettizerConfig, SKMPalettizerConfig]


def reference_arguments(cls: type) -> list[tuple[str, object]]:
    args = ast.parse(f"def f({REFERENCE_SIGNATURES[cls]}): pass").body[0].args
    names = [a.arg for a in args.args]
    scope = {"torch": torch, "NOTHING": {}}
    defaults = [eval(compile(ast.Expression(d), "<ref>", "eval"), scope) for d in args.defaults]
    return list(zip(names, defaults, strict=True)) + EXTENSIONS.get(cls, [])


def our_arguments(cls: type) -> list[tuple[str, object]]:
    result = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        result.append((f.name, default))
    return result


# ------------------------------------------------------------------------------------------------
# Signatures and defaults


@pytest.mark.parametrize("cls", list(REFERENCE_SIGNATURES), ids=lambda c: c.__name__)
def test_arguments_names_order_and_defaults_match_coremltools(cls):
    ours = our_arguments(cls)
    reference = reference_arguments(cls)
    assert [name for name, _ in ours] == [name for name, _ in reference]
    for (name, default), (_, expected) in zip(ours, reference, strict=True):
        assert default == expected and type(default) is type(expected), name


@pytest.mark.parametrize("cls", list(REFERENCE_SIGNATURES), ids=lambda c: c.__name__)
def test_constructed_defaults_match_coremltools(cls):
    instance = cls()
    # a top-level config created empty gets the palettizer's defaults written in (as in
    # coremltools; test_config_created_empty_holds_the_defaults_as_entries checks them)
    written = {"global_config", "module_type_configs"} if cls in TOP_CLASSES else set()
    for name, expected in reference_arguments(cls):
        if name not in written:
            assert getattr(instance, name) == expected, name
    # positional order works like coremltools' attrs __init__
    assert cls(*[getattr(instance, n) for n, _ in reference_arguments(cls)]) == instance


def test_dkm_n_bits_default_is_resolved_per_type():
    assert ModuleDKMPalettizerConfig().n_bits is None
    assert ModuleDKMPalettizerConfig().dtype is torch.qint8
    assert dict(DKM_DEFAULT_N_BITS) == {
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
    with pytest.raises(TypeError):
        DKM_DEFAULT_N_BITS[nn.Linear] = 8  # read-only


@pytest.mark.parametrize("cls", TOP_CLASSES, ids=lambda c: c.__name__)
def test_top_level_created_empty_is_never_unset(cls):
    # created empty, it holds the defaults; unset only once they are removed
    assert not cls().is_unset()
    assert not cls(module_name_configs={"fc": None}).is_unset()
    emptied = cls(module_name_configs={"fc": None})
    emptied.module_name_configs = {}
    assert emptied.is_unset()


# ------------------------------------------------------------------------------------------------
# Round trips


class MyLinear(nn.Linear):
    pass


def sample_configs():
    dkm = ModuleDKMPalettizerConfig
    ptp = ModulePostTrainingPalettizerConfig
    skm = ModuleSKMPalettizerConfig
    return {
        "dkm-module-default": dkm(),
        "dkm-module-custom": dkm(
            n_bits=3,
            weight_threshold=0,
            granularity="per_grouped_channel",
            group_size=8,
            enable_per_channel_scale=None,
            milestone=5,
            cluster_dim=2,
            dtype="quint8",
            lut_dtype="bf16",
            cluster_permute=[1, 0],
            palett_tau=1,
            kmeans_init="cpu.kmeans++",
            palett_mode="hard",
            per_channel_scaling_factor_scheme="abs",
            percentage_palett_enable=0.5,
            zero_threshold=0,
        ),
        "ptp-module-default": ptp(),
        "ptp-module-custom": ptp(
            n_bits=None,
            lut_dtype=torch.uint8,
            granularity="per_grouped_channel",
            group_size=4,
            channel_axis=1,
            cluster_dim=4,
            enable_fast_kmeans_mode=None,
            rounding_precision=None,
        ),
        "skm-module-default": skm(),
        "skm-module-custom": skm(
            n_bits=8, lut_dtype="i8", enable_per_channel_scale=True, outlier_fraction=0.01
        ),
        "dkm-default": DKMPalettizerConfig(),
        "dkm-full": DKMPalettizerConfig(
            global_config=[
                {"n_bits": 2, "weight_threshold": 100},
                dkm(n_bits=6, weight_threshold=9000),
            ],
            module_type_configs={
                nn.Conv2d: [
                    {"n_bits": 4, "cluster_dim": 4, "weight_threshold": 1000},
                    {"n_bits": 2, "cluster_dim": 2, "weight_threshold": 300},
                ],
                "Embedding": None,
                "torch.nn.LayerNorm": {"n_bits": 1},
                MyLinear: dkm(n_bits=5),
            },
            module_name_configs={r"layers\.\d+\.fc": {"milestone": 3}, "head": None},
        ),
        "ptp-full": PostTrainingPalettizerConfig(
            global_config={"n_bits": 3},
            module_type_configs={nn.Linear: {"lut_dtype": "int8"}, "Conv2d": None},
            module_name_configs={"emb.*": ptp(n_bits=2, enable_per_channel_scale=True)},
        ),
        "skm-full": SKMPalettizerConfig(
            global_config=skm(outlier_fraction=0.005),
            module_type_configs={"torch.nn.modules.linear.Linear": {"n_bits": 2}},
            module_name_configs={"lm_head": None},
            calibration_nsamples=16,
        ),
    }


SAMPLES = sample_configs()


def yaml_file_round_trip(config, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.as_dict()))
    return type(config).from_yaml(str(path)), type(config).from_yaml(path)


@pytest.mark.parametrize("key", list(SAMPLES))
def test_as_dict_is_plain_data_and_round_trips(key, tmp_path):
    config = SAMPLES[key]
    cls = type(config)
    data = config.as_dict()
    assert json.loads(json.dumps(data)) == data  # plain: no dtypes, classes or tuples
    assert cls.from_dict(data) == config
    assert cls.from_dict(json.loads(json.dumps(data))) == config
    from_str, from_path = yaml_file_round_trip(config, tmp_path)
    assert from_str == config and from_path == config
    assert cls.from_yaml(io.StringIO(yaml.safe_dump(data))) == config
    assert cls.from_dict(OmegaConf.create(data)) == config
    assert load_config(OmegaConf.create(data), cls) == config
    assert cls.from_dict(data).as_dict() == data


def test_round_trip_keeps_types_and_dtypes():
    config = SAMPLES["dkm-module-custom"]
    again = ModuleDKMPalettizerConfig.from_yaml(io.StringIO(yaml.safe_dump(config.as_dict())))
    assert again.dtype is torch.quint8 and again.as_dict()["dtype"] == "quint8"
    assert again.cluster_permute == (1, 0)
    assert isinstance(again.palett_tau, float) and again.palett_tau == 1.0
    assert ModuleDKMPalettizerConfig().as_dict()["dtype"] == "qint8"
    assert SAMPLES["ptp-module-custom"].as_dict()["lut_dtype"] == "uint8"


def test_type_keys_round_trip_as_dotted_strings():
    config = SAMPLES["dkm-full"]
    data = config.as_dict()
    assert set(data["module_type_configs"]) == {
        "torch.nn.modules.conv.Conv2d",
        "Embedding",
        "torch.nn.LayerNorm",
        f"{__name__}.MyLinear",
    }
    again = DKMPalettizerConfig.from_dict(data)
    assert "torch.nn.modules.conv.Conv2d" in again.module_type_configs  # strings stay strings
    assert again == config


def test_tier_lists_are_sorted_so_order_does_not_matter():
    low, high = {"n_bits": 4, "weight_threshold": 1000}, {"n_bits": 2, "weight_threshold": 10000}
    a = DKMPalettizerConfig(module_type_configs={nn.Linear: [high, low]})
    b = DKMPalettizerConfig(module_type_configs={nn.Linear: [low, high]})
    assert a == b
    assert [t.weight_threshold for t in a.module_type_configs[nn.Linear]] == [1000, 10000]


def test_reference_dkm_example_loads():
    custom_config = {
        nn.Conv2d: [
            {"n_bits": 4, "cluster_dim": 4, "weight_threshold": 1000},
            {"n_bits": 2, "cluster_dim": 2, "weight_threshold": 300},
        ]
    }
    config = DKMPalettizerConfig.from_dict({"module_type_configs": custom_config})
    tiers = config.module_type_configs[nn.Conv2d]
    assert [(t.n_bits, t.cluster_dim, t.weight_threshold) for t in tiers] == [
        (2, 2, 300),
        (4, 4, 1000),
    ]


def test_nested_dictconfig_values_are_accepted_as_hydra_passes_them():
    # hydra.utils.instantiate hands nested kwargs over as DictConfig / ListConfig.
    config = DKMPalettizerConfig(
        global_config=OmegaConf.create({"n_bits": 2, "cluster_permute": [1, 0]}),
        module_type_configs=OmegaConf.create({"Linear": [{"n_bits": 4, "weight_threshold": 10}]}),
    )
    assert config.global_config == ModuleDKMPalettizerConfig(n_bits=2, cluster_permute=(1, 0))
    assert config.module_type_configs["Linear"] == [
        ModuleDKMPalettizerConfig(n_bits=4, weight_threshold=10)
    ]
    interpolated = OmegaConf.create({"bits": 3, "cfg": {"global_config": {"n_bits": "${bits}"}}})
    assert PostTrainingPalettizerConfig.from_dict(interpolated.cfg).global_config.n_bits == 3


def test_equality_is_by_value():
    assert ModuleDKMPalettizerConfig(n_bits=4) == ModuleDKMPalettizerConfig(n_bits=4)
    assert ModuleDKMPalettizerConfig(n_bits=4) != ModuleDKMPalettizerConfig(n_bits=3)
    assert DKMPalettizerConfig(
        module_type_configs={nn.Linear: {"n_bits": 2}}
    ) == DKMPalettizerConfig(
        module_type_configs={"torch.nn.modules.linear.Linear": ModuleDKMPalettizerConfig(n_bits=2)}
    )
    assert DKMPalettizerConfig() != PostTrainingPalettizerConfig()
    assert SKMPalettizerConfig(calibration_nsamples=1) != SKMPalettizerConfig()


# ------------------------------------------------------------------------------------------------
# Normalisation of accepted spellings


@pytest.mark.parametrize("cls", [ModulePostTrainingPalettizerConfig, ModuleSKMPalettizerConfig])
@pytest.mark.parametrize(
    "given, stored",
    [
        (None, None),
        (torch.int8, "int8"),
        ("int8", "int8"),
        ("i8", "int8"),
        ("torch.int8", "int8"),
        (torch.uint8, "uint8"),
        ("uint8", "uint8"),
        ("u8", "uint8"),
    ],
)
def test_kmeans_lut_dtype_spellings_normalise(cls, given, stored):
    assert cls(lut_dtype=given).lut_dtype == stored
    assert cls(lut_dtype=given) == cls(lut_dtype=stored)


@pytest.mark.parametrize("given", [torch.qint8, "qint8", "torch.qint8"])
def test_dkm_activation_dtype_spellings(given):
    assert ModuleDKMPalettizerConfig(dtype=given).dtype is torch.qint8


def test_granularity_accepts_enum_with_string_value():
    class PalettizationGranularity(enum.Enum):  # the shape of coremltools' enum
        PER_TENSOR = "per_tensor"
        PER_GROUPED_CHANNEL = "per_grouped_channel"

    config = ModulePostTrainingPalettizerConfig(
        granularity=PalettizationGranularity.PER_GROUPED_CHANNEL, group_size=4
    )
    assert config.granularity == "per_grouped_channel"
    assert config.as_dict()["granularity"] == "per_grouped_channel"


def test_ints_are_accepted_for_float_fields_and_stored_as_float():
    config = ModuleDKMPalettizerConfig(palett_tau=2, palett_max_mem=1, prune_threshold=0)
    assert (config.palett_tau, config.palett_max_mem, config.prune_threshold) == (2.0, 1.0, 0.0)
    assert all(type(v) is float for v in (config.palett_tau, config.palett_max_mem))
    assert type(ModuleSKMPalettizerConfig(outlier_fraction=0).outlier_fraction) is float


# ------------------------------------------------------------------------------------------------
# Validation messages: key, bad value, what is accepted


def expect(key: str, shown: str, accepted: str) -> str:
    return re.escape(f"{key}: got {shown}; expected ") + ".*" + re.escape(accepted)


DKM, PTP, SKM = (
    ModuleDKMPalettizerConfig,
    ModulePostTrainingPalettizerConfig,
    ModuleSKMPalettizerConfig,
)

INVALID = [
    (DKM, {"n_bits": "4"}, expect("n_bits", "'4' (str)", "an int in 1..8 or None")),
    (DKM, {"n_bits": True}, expect("n_bits", "True (bool)", "an int in 1..8 or None")),
    (DKM, {"n_bits": 0}, expect("n_bits", "0 (int)", "an int in 1..8")),
    (DKM, {"n_bits": 9}, expect("n_bits", "9 (int)", "an int in 1..8")),
    (DKM, {"n_bits": 4.0}, expect("n_bits", "4.0 (float)", "an int in 1..8")),
    (DKM, {"weight_threshold": -1}, expect("weight_threshold", "-1 (int)", "an int >= 0")),
    (DKM, {"weight_threshold": None}, expect("weight_threshold", "None (NoneType)", "an int >= 0")),
    (
        DKM,
        {"granularity": "per_channel"},
        expect("granularity", "'per_channel' (str)", "'per_grouped_channel'"),
    ),
    (DKM, {"group_size": 4}, expect("group_size", "4 (int)", "None with granularity='per_tensor'")),
    (
        DKM,
        {"granularity": "per_grouped_channel"},
        expect("group_size", "None (NoneType)", "a positive int"),
    ),
    (
        DKM,
        {"granularity": "per_grouped_channel", "group_size": 0},
        expect("group_size", "0 (int)", "an int >= 1"),
    ),
    (DKM, {"channel_axis": 2}, expect("channel_axis", "2 (int)", "an int in 0..1")),
    (DKM, {"cluster_dim": 0}, expect("cluster_dim", "0 (int)", "an int >= 1 or None")),
    (DKM, {"cluster_dim": "2"}, expect("cluster_dim", "'2' (str)", "an int >= 1 or None")),
    (DKM, {"milestone": -1}, expect("milestone", "-1 (int)", "an int >= 0")),
    (
        DKM,
        {"lut_dtype": "int8"},
        expect("lut_dtype", "'int8' (str)", "'bf16', 'f32'; DKM spells it 'i8'"),
    ),
    (
        DKM,
        {"lut_dtype": "int4"},
        expect("lut_dtype", "'int4' (str)", "one of 'i8', 'u8', 'f16', 'bf16', 'f32'"),
    ),
    (DKM, {"lut_dtype": None}, expect("lut_dtype", "None (NoneType)", "one of 'i8'")),
    (DKM, {"kmeans_init": "foo"}, expect("kmeans_init", "'foo' (str)", "'cpu.minibatch.kmeans++'")),
    (
        DKM,
        {"palett_mode": "topk"},
        expect("palett_mode", "'topk' (str)", "one of 'dkm', 'gsm', 'hard'"),
    ),
    (
        DKM,
        {"per_channel_scaling_factor_scheme": "max"},
        expect("per_channel_scaling_factor_scheme", "'max' (str)", "one of 'min_max', 'abs'"),
    ),
    (DKM, {"dtype": "int8"}, expect("dtype", "'int8' (str)", "torch.qint8, torch.quint8")),
    (
        DKM,
        {"dtype": torch.float32},
        expect("dtype", "torch.float32 (dtype)", "'qint8' or 'quint8'"),
    ),
    (DKM, {"kmeans_max_iter": 0}, expect("kmeans_max_iter", "0 (int)", "an int >= 1")),
    (DKM, {"kmeans_n_init": 0}, expect("kmeans_n_init", "0 (int)", "an int >= 1")),
    (
        DKM,
        {"kmeans_batch_threshold": 0},
        expect("kmeans_batch_threshold", "0 (int)", "an int >= 1"),
    ),
    (DKM, {"palett_tau": 0.0}, expect("palett_tau", "0.0 (float)", "a float > 0")),
    (
        DKM,
        {"palett_tau": "1e-4"},
        expect(
            "palett_tau", "'1e-4' (str)", "a float > 0; YAML reads 1e-4 as a string: write 1.0e-4"
        ),
    ),
    (DKM, {"palett_tau": float("nan")}, expect("palett_tau", "nan (float)", "a float > 0")),
    (DKM, {"palett_epsilon": -1.0}, expect("palett_epsilon", "-1.0 (float)", "a float >= 0")),
    (DKM, {"prune_threshold": -1e-3}, expect("prune_threshold", "-0.001 (float)", "a float >= 0")),
    (DKM, {"zero_threshold": True}, expect("zero_threshold", "True (bool)", "a float >= 0")),
    (DKM, {"palett_max_mem": 0}, expect("palett_max_mem", "0 (int)", "a float in (0, 1]")),
    (
        DKM,
        {"percentage_palett_enable": 0},
        expect("percentage_palett_enable", "0 (int)", "a float in (0, 1]"),
    ),
    (
        DKM,
        {"percentage_palett_enable": 1.5},
        expect("percentage_palett_enable", "1.5 (float)", "(0, 1]"),
    ),
    (
        DKM,
        {"enable_per_channel_scale": "yes"},
        expect("enable_per_channel_scale", "'yes' (str)", "a bool"),
    ),
    (DKM, {"quantize_activations": 1}, expect("quantize_activations", "1 (int)", "a bool")),
    (
        DKM,
        {"cluster_permute": [0, 0]},
        expect("cluster_permute", "[0, 0] (list)", "a permutation of 0..n-1"),
    ),
    (DKM, {"quant_min": 127}, expect("quant_min", "127 (int)", "an int below quant_max=127")),
    (
        DKM,
        {"partition_size": 4},
        expect("partition_size", "4 (int)", "None: it is deprecated") + ".*group_size instead",
    ),
    (
        DKM,
        {"cluster_dtype": "oc_last"},
        expect("cluster_dtype", "'oc_last' (str)", "None: it is deprecated") + ".*use lut_dtype",
    ),
    (
        PTP,
        {"lut_dtype": "int4"},
        expect(
            "lut_dtype",
            "'int4' (str)",
            "torch.int8, torch.uint8, or one of 'int8', 'uint8', 'i8', 'u8'",
        ),
    ),
    (PTP, {"lut_dtype": torch.float16}, expect("lut_dtype", "torch.float16 (dtype)", "torch.int8")),
    (PTP, {"lut_dtype": "f16"}, expect("lut_dtype", "'f16' (str)", "torch.int8")),
    (PTP, {"n_bits": 9}, expect("n_bits", "9 (int)", "an int in 1..8 or None")),
    (PTP, {"channel_axis": -1}, expect("channel_axis", "-1 (int)", "an int in 0..1")),
    (
        PTP,
        {"rounding_precision": -1},
        expect("rounding_precision", "-1 (int)", "an int >= 0 or None"),
    ),
    (
        PTP,
        {"rounding_precision": True},
        expect("rounding_precision", "True (bool)", "an int >= 0 or None"),
    ),
    (
        PTP,
        {"enable_fast_kmeans_mode": "true"},
        expect("enable_fast_kmeans_mode", "'true' (str)", "a bool"),
    ),
    (
        PTP,
        {"enable_per_channel_scale": True, "cluster_dim": 2},
        expect("enable_per_channel_scale", "True (bool)", "False with cluster_dim=2"),
    ),
    (
        PTP,
        {"granularity": "per_grouped_channel", "group_size": 2.0},
        expect("group_size", "2.0 (float)", "an int >= 1"),
    ),
    (SKM, {"n_bits": None}, expect("n_bits", "None (NoneType)", "an int in 1..8")),
    (
        SKM,
        {"outlier_fraction": 0.5},
        expect("outlier_fraction", "0.5 (float)", "a float in [0, 0.5)"),
    ),
    (
        SKM,
        {"outlier_fraction": -0.1},
        expect("outlier_fraction", "-0.1 (float)", "a float in [0, 0.5)"),
    ),
    (SKM, {"lut_dtype": "int3"}, expect("lut_dtype", "'int3' (str)", "'int8', 'uint8'")),
    (
        SKM,
        {"enable_per_channel_scale": None},
        expect("enable_per_channel_scale", "None (NoneType)", "a bool"),
    ),
    (
        SKM,
        {"enable_per_channel_scale": True, "cluster_dim": 4},
        expect("enable_per_channel_scale", "True (bool)", "False with cluster_dim=4"),
    ),
]


@pytest.mark.parametrize(
    "cls, kwargs, match",
    INVALID,
    ids=[f"{c.__name__[6:9]}-{'-'.join(map(str, k))}" for c, k, _ in INVALID],
)
def test_invalid_values_name_key_value_and_accepted(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
    with pytest.raises(ValueError, match=match):  # the same check through from_dict
        cls.from_dict(kwargs)


@pytest.mark.parametrize("cls", MODULE_CLASSES + TOP_CLASSES, ids=lambda c: c.__name__)
def test_unknown_key_lists_valid_keys(cls):
    valid = ", ".join(f.name for f in dataclasses.fields(cls))
    with pytest.raises(
        ValueError, match=re.escape("unknown key(s) 'nbits'") + ".*" + re.escape(valid)
    ):
        cls.from_dict({"nbits": 4})


def test_unknown_key_suggests_close_match():
    with pytest.raises(ValueError, match="did you mean 'n_bits'"):
        ModuleDKMPalettizerConfig.from_dict({"nbits": 4})


def test_from_dict_rejects_non_mappings():
    with pytest.raises(TypeError, match="expected a dict or an omegaconf DictConfig"):
        ModuleDKMPalettizerConfig.from_dict([("n_bits", 4)])


def test_nested_errors_give_the_path():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "DKMPalettizerConfig.module_type_configs['Linear'][1]: "
            "ModuleDKMPalettizerConfig.n_bits: got '4' (str)"
        ),
    ):
        DKMPalettizerConfig.from_dict(
            {
                "module_type_configs": {
                    "Linear": [{"weight_threshold": 1}, {"n_bits": "4", "weight_threshold": 2}]
                }
            }
        )
    with pytest.raises(
        ValueError,
        match=re.escape(
            "SKMPalettizerConfig.global_config: "
            "ModuleSKMPalettizerConfig: unknown key(s) 'weight_threshold'"
        ),
    ):
        SKMPalettizerConfig.from_dict({"global_config": {"weight_threshold": 10}})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"calibration_nsamples": 0}, expect("calibration_nsamples", "0 (int)", "an int >= 1")),
        (
            {"calibration_nsamples": True},
            expect("calibration_nsamples", "True (bool)", "an int >= 1"),
        ),
        (
            {"calibration_nsamples": "16"},
            expect("calibration_nsamples", "'16' (str)", "an int >= 1"),
        ),
    ],
)
def test_skm_calibration_nsamples_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SKMPalettizerConfig(**kwargs)


@pytest.mark.parametrize("cls", TOP_CLASSES, ids=lambda c: c.__name__)
def test_top_level_value_and_key_validation(cls):
    name = cls.__name__
    module_cls = cls._module_config
    with pytest.raises(ValueError, match=re.escape("key 'fc[' is not a valid regex")):
        cls(module_name_configs={"fc[": None})
    with pytest.raises(
        ValueError, match=re.escape(f"{name}.module_name_configs: got b'3' (bytes); expected str")
    ):
        cls(module_name_configs={b"3": None})
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{name}.module_type_configs: got 3 (int); expected keys that are nn.Module subclasses"
        ),
    ):
        cls(module_type_configs={3: None})
    with pytest.raises(
        ValueError, match=re.escape(f"{name}.module_type_configs: got <class 'int'> (type)")
    ):
        cls(module_type_configs={int: None})
    with pytest.raises(ValueError, match="name the same class; keep one"):
        cls(module_type_configs={nn.Linear: None, "torch.nn.modules.linear.Linear": {}})
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{name}.global_config: got 4 (int); expected a {module_cls.__name__}, a dict"
        ),
    ):
        cls(global_config=4)
    with pytest.raises(
        ValueError, match=re.escape(f"{name}.module_type_configs: got [] (list); expected a dict")
    ):
        cls(module_type_configs=[])
    other = (
        ModuleSKMPalettizerConfig()
        if cls is not SKMPalettizerConfig
        else ModuleDKMPalettizerConfig()
    )
    with pytest.raises(ValueError, match=re.escape(f"expected a {module_cls.__name__}")):
        cls(global_config=other)


def test_lists_only_for_dkm_and_must_be_sane():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "PostTrainingPalettizerConfig.module_type_configs['Linear']: got [{'n_bits': 2}] (list)"
        ),
    ):
        PostTrainingPalettizerConfig(module_type_configs={"Linear": [{"n_bits": 2}]})
    with pytest.raises(ValueError, match=re.escape("weight_threshold 5 appears more than once")):
        DKMPalettizerConfig(
            global_config=[{"weight_threshold": 5}, {"weight_threshold": 5, "n_bits": 2}]
        )
    with pytest.raises(
        ValueError, match=re.escape("global_config: got [] (list); expected a non-empty list")
    ):
        DKMPalettizerConfig(global_config=[])
    with pytest.raises(
        ValueError, match=re.escape("module_name_configs['fc'][0]: got None (NoneType)")
    ):
        DKMPalettizerConfig(module_name_configs={"fc": [None]})


def test_validation_errors_are_raised_by_post_init_not_only_from_dict():
    with pytest.raises(ValueError, match="n_bits"):
        DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(n_bits=4)).set_global(
            {"n_bits": 12}
        )


# ------------------------------------------------------------------------------------------------
# YAML


@pytest.mark.parametrize("cls", MODULE_CLASSES + TOP_CLASSES, ids=lambda c: c.__name__)
def test_yaml_python_tags_are_refused_and_never_executed(cls, tmp_path):
    marker = tmp_path / "executed"
    text = f"n_bits: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(ValueError, match="not plain data"):
        cls.from_yaml(io.StringIO(text))
    path = tmp_path / "evil.yaml"
    path.write_text(f"global_config: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError, match="not plain data"):
        cls.from_yaml(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "text, kind", [("- 1\n- 2\n", "list"), ("4\n", "int"), ("", "NoneType"), ("just text", "str")]
)
def test_yaml_top_level_must_be_a_mapping(text, kind):
    with pytest.raises(
        ValueError, match=re.escape(f"must be a mapping of config keys; got {kind}")
    ):
        DKMPalettizerConfig.from_yaml(io.StringIO(text))


def test_yaml_syntax_error_is_value_error():
    with pytest.raises(ValueError, match="not valid YAML"):
        ModuleDKMPalettizerConfig.from_yaml(io.StringIO("n_bits: [4\n"))


def test_yaml_exponent_without_dot_gets_a_hint():
    text = "global_config:\n  palett_tau: 1e-4\n"
    with pytest.raises(
        ValueError, match=re.escape("palett_tau: got '1e-4' (str)") + ".*write 1.0e-4"
    ):
        DKMPalettizerConfig.from_yaml(io.StringIO(text))
    ok = DKMPalettizerConfig.from_yaml(io.StringIO("global_config:\n  palett_tau: 1.0e-4\n"))
    assert ok.global_config.palett_tau == 1e-4


def test_yaml_hand_written_config(tmp_path):
    path = tmp_path / "dkm.yaml"
    path.write_text(
        """
global_config:
  n_bits: 4
  palett_tau: 1
module_type_configs:
  Conv2d:
    - {n_bits: 4, cluster_dim: 4, weight_threshold: 1000}
    - {n_bits: 2, cluster_dim: 2, weight_threshold: 300}
  torch.nn.Embedding: null
module_name_configs:
  'layers\\.\\d+\\.attn': {n_bits: 3}
"""
    )
    config = load_config(path, DKMPalettizerConfig)
    assert config.global_config == ModuleDKMPalettizerConfig(n_bits=4, palett_tau=1.0)
    assert [t.n_bits for t in config.module_type_configs["Conv2d"]] == [2, 4]
    assert config.module_type_configs["torch.nn.Embedding"] is None
    assert config.module_name_configs[r"layers\.\d+\.attn"].n_bits == 3


# ------------------------------------------------------------------------------------------------
# load_config


@pytest.mark.parametrize("cls", MODULE_CLASSES + TOP_CLASSES, ids=lambda c: c.__name__)
def test_load_config_accepts_every_documented_form(cls, tmp_path):
    key = {
        ModuleDKMPalettizerConfig: "dkm-module-custom",
        ModulePostTrainingPalettizerConfig: "ptp-module-custom",
        ModuleSKMPalettizerConfig: "skm-module-custom",
        DKMPalettizerConfig: "dkm-full",
        PostTrainingPalettizerConfig: "ptp-full",
        SKMPalettizerConfig: "skm-full",
    }[cls]
    config = SAMPLES[key]
    data = config.as_dict()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_config(config, cls) is config
    assert load_config(None, cls) == cls()
    assert load_config(data, cls) == config
    assert load_config(OmegaConf.create(data), cls) == config
    assert load_config(str(path), cls) == config
    assert load_config(pathlib.Path(path), cls) == config
    with path.open() as stream:
        assert load_config(stream, cls) == config


@pytest.mark.parametrize("bad", [3, ["n_bits", 4], b"n_bits: 4", 2.5])
def test_load_config_rejects_other_types(bad):
    accepted = (
        "expected a DKMPalettizerConfig, a dict, an omegaconf DictConfig, "
        "a YAML path (str or pathlib.Path), a text stream, or None"
    )
    with pytest.raises(TypeError, match=re.escape(f"got {type(bad).__name__}; {accepted}")):
        load_config(bad, DKMPalettizerConfig)


def test_load_config_rejects_wrong_config_class_and_bad_cls():
    with pytest.raises(TypeError, match="got PostTrainingPalettizerConfig"):
        load_config(PostTrainingPalettizerConfig(), DKMPalettizerConfig)
    with pytest.raises(TypeError, match="cls must be a config class"):
        load_config({}, dict)


def test_load_config_missing_file():
    with pytest.raises(FileNotFoundError):
        load_config("/nonexistent/config.yaml", DKMPalettizerConfig)


# ------------------------------------------------------------------------------------------------
# set_* methods


def test_set_methods_chain_and_convert_dicts():
    config = (
        DKMPalettizerConfig()
        .set_global({"n_bits": 2})
        .set_module_type(nn.Linear, {"n_bits": 4})
        .set_module_type(
            "Conv2d", [{"weight_threshold": 10}, {"weight_threshold": 5000, "n_bits": 1}]
        )
        .set_module_name(r"head", None)
    )
    assert isinstance(config, DKMPalettizerConfig)
    assert config.global_config == ModuleDKMPalettizerConfig(n_bits=2)
    assert config.module_type_configs[nn.Linear] == ModuleDKMPalettizerConfig(n_bits=4)
    assert [t.weight_threshold for t in config.module_type_configs["Conv2d"]] == [10, 5000]
    assert config.module_name_configs == {"head": None}
    assert DKMPalettizerConfig.from_dict(config.as_dict()) == config


def test_set_module_type_replaces_an_equivalent_key():
    config = PostTrainingPalettizerConfig().set_module_type(nn.Linear, {"n_bits": 4})
    config.set_module_type("torch.nn.modules.linear.Linear", {"n_bits": 2})
    assert config.module_type_configs == {
        "torch.nn.modules.linear.Linear": ModulePostTrainingPalettizerConfig(n_bits=2)
    }
    config.set_module_name("fc", {"n_bits": 1}).set_module_name("fc", None)
    assert config.module_name_configs == {"fc": None}


def test_set_methods_validate():
    config = SKMPalettizerConfig()
    with pytest.raises(
        ValueError,
        match=re.escape(
            "SKMPalettizerConfig.global_config: ModuleSKMPalettizerConfig.n_bits: got 0 (int)"
        ),
    ):
        config.set_global({"n_bits": 0})
    with pytest.raises(ValueError, match="keys that are nn.Module subclasses"):
        config.set_module_type(42, None)
    with pytest.raises(ValueError, match=re.escape("key '(unclosed' is not a valid regex")):
        config.set_module_name("(unclosed", None)
    with pytest.raises(ValueError, match="list"):
        config.set_module_name("fc", [{"n_bits": 2}])  # tiers are DKM-only
    assert config == SKMPalettizerConfig()  # failed calls changed nothing


def test_assignments_are_validated_and_normalised_too():
    module = ModulePostTrainingPalettizerConfig()
    with pytest.raises(ValueError, match=expect("n_bits", "'4' (str)", "an int in 1..8 or None")):
        module.n_bits = "4"
    module.lut_dtype = torch.int8
    assert module.lut_dtype == "int8" and module.n_bits == 4

    config = DKMPalettizerConfig()
    config.global_config = {"n_bits": 2}
    config.module_type_configs = {nn.Linear: [{"weight_threshold": 9}, {"weight_threshold": 1}]}
    assert config.global_config == ModuleDKMPalettizerConfig(n_bits=2)
    assert [t.weight_threshold for t in config.module_type_configs[nn.Linear]] == [1, 9]
    with pytest.raises(ValueError, match=re.escape("key '[' is not a valid regex")):
        config.module_name_configs = {"[": None}
    skm = SKMPalettizerConfig()
    with pytest.raises(ValueError, match=expect("calibration_nsamples", "0 (int)", "an int >= 1")):
        skm.calibration_nsamples = 0


@pytest.mark.parametrize("key", ["dkm-module-custom", "dkm-full", "ptp-full", "skm-full"])
def test_configs_survive_deepcopy_and_pickle(key):
    config = SAMPLES[key]
    assert copy.deepcopy(config) == config
    assert pickle.loads(pickle.dumps(config)) == config


# ------------------------------------------------------------------------------------------------
# Defaults written in at creation (as coremltools does), and round trips that keep behaviour


def _selected(config, model=None):
    from lightning_palettize.selection import select_weights

    if model is None:
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Conv1d(64, 64, 1))
    supported = {nn.Linear: ("weight",), nn.Conv1d: ("weight",)}
    return {s.qualified_name: s.config.n_bits for s in select_weights(model, config, supported)}


@pytest.mark.parametrize("cls", [PostTrainingPalettizerConfig, SKMPalettizerConfig])
def test_set_global_none_on_a_config_created_empty_palettizes_nothing(cls):
    assert _selected(cls()) == {"0.weight": 4, "2.weight": 4, "3.weight": 4}
    assert _selected(cls().set_global(None)) == {}
    config = cls()
    config.global_config = None
    assert _selected(config) == {}
    # what is set by name or type still applies
    assert _selected(cls().set_global(None).set_module_type(nn.Linear, {"n_bits": 2})) == {
        "0.weight": 2,
        "2.weight": 2,
    }


def test_dkm_set_global_none_keeps_the_default_table_like_coremltools():
    # coremltools writes DKM's defaults into module_type_configs, which set_global leaves alone
    assert _selected(DKMPalettizerConfig().set_global(None)) == {
        "0.weight": 4,
        "2.weight": 4,
        "3.weight": 2,
    }


@pytest.mark.parametrize("cls", TOP_CLASSES, ids=lambda c: c.__name__)
def test_config_created_empty_holds_the_defaults_as_entries(cls):
    config = cls()
    if cls is DKMPalettizerConfig:
        assert config.global_config is None
        assert config.module_type_configs == {
            klass: ModuleDKMPalettizerConfig(n_bits=bits, cluster_dim=1)
            for klass, bits in DKM_DEFAULT_N_BITS.items()
        }
    else:
        assert config.global_config == cls._module_config()
        assert config.module_type_configs == {}
    assert config.module_name_configs == {}
    assert config.fills_defaults() and not config.is_unset()
    # only a config created with nothing set gets them
    assert not cls(module_name_configs={"fc": None}).fills_defaults()
    assert cls(module_name_configs={"fc": None}).global_config is None


ROUND_TRIPS = {
    "ptp-name-none": lambda: PostTrainingPalettizerConfig().set_module_name("0", None),
    "skm-name-none": lambda: SKMPalettizerConfig().set_module_name("0", None),
    "dkm-name-none": lambda: DKMPalettizerConfig().set_module_name("0", None),
    "dkm-set-global": lambda: DKMPalettizerConfig().set_global({"n_bits": 3}),
    "dkm-set-type": lambda: DKMPalettizerConfig().set_module_type("Linear", {"n_bits": 3}),
    "ptp-global-none": lambda: PostTrainingPalettizerConfig().set_global(None),
    "skm-global-none": lambda: SKMPalettizerConfig().set_global(None),
    "dkm-cleared": lambda: DKMPalettizerConfig(module_type_configs={}).set_module_type(
        nn.Conv1d, None
    ),
}


@pytest.mark.parametrize("key", list(ROUND_TRIPS))
def test_round_trip_through_as_dict_keeps_behaviour(key):
    config = ROUND_TRIPS[key]()
    data = config.as_dict()
    for again in (
        type(config).from_dict(data),
        type(config).from_yaml(io.StringIO(yaml.safe_dump(data))),
        type(config).from_dict(json.loads(json.dumps(data))),
    ):
        assert again == config
        assert again.as_dict() == data
        assert _selected(again) == _selected(config)


def test_round_trip_cases_differ_from_the_defaults():
    # the round-trip cases above are not trivially "the defaults again"
    assert _selected(ROUND_TRIPS["ptp-name-none"]()) == {"2.weight": 4, "3.weight": 4}
    assert _selected(ROUND_TRIPS["dkm-set-global"]()) == {
        "0.weight": 4,
        "2.weight": 4,
        "3.weight": 2,
    }
    assert _selected(ROUND_TRIPS["dkm-set-type"]()) == {"0.weight": 3, "2.weight": 3, "3.weight": 2}
    assert _selected(ROUND_TRIPS["ptp-global-none"]()) == {}


def test_equality_follows_behaviour():
    assert PostTrainingPalettizerConfig() == PostTrainingPalettizerConfig(global_config={})
    assert PostTrainingPalettizerConfig() != PostTrainingPalettizerConfig().set_global(None)
    assert DKMPalettizerConfig() != DKMPalettizerConfig().set_module_type(nn.Linear, None)
    assert DKMPalettizerConfig().set_global({"n_bits": 3}) != DKMPalettizerConfig(
        global_config={"n_bits": 3}
    )


# ------------------------------------------------------------------------------------------------
# module_type_configs keys that name the same class


def test_set_module_type_replaces_every_spelling_of_the_same_class():
    for spelling in ("Linear", "torch.nn.Linear", "torch.nn.modules.linear.Linear", nn.Linear):
        config = PostTrainingPalettizerConfig().set_module_type(nn.Linear, {"n_bits": 4})
        config.set_module_type(spelling, {"n_bits": 2})
        assert list(config.module_type_configs) == [spelling]
        assert _selected(config) == {"0.weight": 2, "2.weight": 2, "3.weight": 4}
        config.set_module_type(nn.Linear, {"n_bits": 3})  # and back
        assert list(config.module_type_configs) == [nn.Linear]
    # a class of the user's: by class, bare name or dotted path
    config = PostTrainingPalettizerConfig().set_module_type(MyLinear, {"n_bits": 4})
    config.set_module_type("MyLinear", {"n_bits": 2})
    assert config.module_type_configs == {"MyLinear": ModulePostTrainingPalettizerConfig(n_bits=2)}
    config.set_module_type(f"{__name__}.MyLinear", None)
    assert config.module_type_configs == {f"{__name__}.MyLinear": None}
    # different classes stay apart, also a subclass and its base
    config.set_module_type(nn.Linear, {"n_bits": 3}).set_module_type("Conv1d", None)
    assert len(config.module_type_configs) == 3


def test_dkm_set_module_type_by_name_replaces_the_default_entry():
    config = DKMPalettizerConfig().set_module_type("Linear", {"n_bits": 3})
    assert "Linear" in config.module_type_configs and nn.Linear not in config.module_type_configs
    assert _selected(config) == {"0.weight": 3, "2.weight": 3, "3.weight": 2}


# ------------------------------------------------------------------------------------------------
# int module_name_configs keys (YAML / OmegaConf read nn.Sequential child names as ints)


@pytest.mark.parametrize("cls", TOP_CLASSES, ids=lambda c: c.__name__)
def test_int_module_name_keys_are_read_as_strings(cls):
    text = "global_config: {n_bits: 2}\nmodule_name_configs:\n  0: null\n  2: {n_bits: 3}\n"
    from_yaml = cls.from_yaml(io.StringIO(text))
    from_omegaconf = cls.from_dict(OmegaConf.create(text))
    assert from_yaml == from_omegaconf
    assert list(from_yaml.module_name_configs) == ["0", "2"]
    assert from_yaml.module_name_configs["0"] is None
    assert _selected(
        from_yaml, nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    ) == {
        "1.weight": 2,
        "2.weight": 3,
    }
    assert list(cls().set_module_name(1, None).module_name_configs) == ["1"]
    with pytest.raises(ValueError, match=re.escape("keys '0' and 0 both name '0'; keep one")):
        cls(module_name_configs={"0": None, 0: None})
    with pytest.raises(
        ValueError,
        match=re.escape(f"{cls.__name__}.module_name_configs: got 1.5 (float); expected str keys")
        + ".*or int keys",
    ):
        cls(module_name_configs={1.5: None})
    with pytest.raises(ValueError, match=re.escape("got True (bool); expected str keys")):
        cls().set_module_name(True, None)


# ------------------------------------------------------------------------------------------------
# coremltools config objects


def _coremltools_palettization():
    pytest.importorskip("coremltools")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools.optimize.torch.palettization as ctp
    return ctp


def test_coremltools_top_level_objects_load_and_behave_the_same():
    ctp = _coremltools_palettization()
    pairs = [
        (ctp.PostTrainingPalettizerConfig(), PostTrainingPalettizerConfig()),
        (ctp.SKMPalettizerConfig(), SKMPalettizerConfig()),
        (ctp.DKMPalettizerConfig(), DKMPalettizerConfig()),
        (
            ctp.PostTrainingPalettizerConfig().set_module_name("0", None),
            PostTrainingPalettizerConfig().set_module_name("0", None),
        ),
        (
            ctp.DKMPalettizerConfig().set_global(ctp.ModuleDKMPalettizerConfig(n_bits=3)),
            DKMPalettizerConfig().set_global({"n_bits": 3}),
        ),
        (
            ctp.PostTrainingPalettizerConfig.from_dict(
                {
                    "global_config": {
                        "n_bits": 2,
                        "lut_dtype": "int8",
                        "granularity": "per_grouped_channel",
                        "group_size": 4,
                    },
                    "module_type_configs": {"Linear": {"n_bits": 3}},
                }
            ),
            PostTrainingPalettizerConfig(
                global_config={
                    "n_bits": 2,
                    "lut_dtype": "int8",
                    "granularity": "per_grouped_channel",
                    "group_size": 4,
                },
                module_type_configs={nn.Linear: {"n_bits": 3}},
            ),
        ),
        (
            ctp.SKMPalettizerConfig(calibration_nsamples=16),
            SKMPalettizerConfig(calibration_nsamples=16),
        ),
    ]
    for theirs, ours in pairs:
        loaded = load_config(theirs, type(ours))
        assert type(loaded) is type(ours)
        assert _selected(loaded) == _selected(ours)
        if isinstance(ours, DKMPalettizerConfig):
            # our default table also covers the ConvTranspose layers, coremltools' does not
            for extra in (nn.ConvTranspose1d, nn.ConvTranspose2d):
                del ours.module_type_configs[extra]
        assert loaded == ours
        # the defaults written at creation agree with coremltools' as plain data too
        assert type(ours).from_dict(theirs.as_dict()) == ours


def test_coremltools_module_configs_are_accepted_everywhere_a_module_config_is():
    ctp = _coremltools_palettization()
    theirs = ctp.ModulePostTrainingPalettizerConfig(n_bits=2, enable_per_channel_scale=True)
    ours = ModulePostTrainingPalettizerConfig(n_bits=2, enable_per_channel_scale=True)
    assert load_config(theirs, ModulePostTrainingPalettizerConfig) == ours
    config = PostTrainingPalettizerConfig(global_config=theirs)
    config.set_module_type(nn.Linear, theirs).set_module_name("0", theirs)
    assert config.global_config == ours
    assert config.module_type_configs[nn.Linear] == ours
    assert config.module_name_configs["0"] == ours
    dkm = DKMPalettizerConfig().set_global(
        [
            ctp.ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=10),
            ctp.ModuleDKMPalettizerConfig(n_bits=4, weight_threshold=100),
        ]
    )
    assert [t.n_bits for t in dkm.global_config] == [2, 4]
    skm = SKMPalettizerConfig(global_config=ctp.ModuleSKMPalettizerConfig(n_bits=3))
    assert skm.global_config == ModuleSKMPalettizerConfig(n_bits=3)
    # a coremltools config of another class is still refused, naming both classes
    with pytest.raises(
        ValueError,
        match=re.escape(
            "PostTrainingPalettizerConfig.global_config: got ModuleDKMPalettizerConfig("
        )
        + ".*expected a ModulePostTrainingPalettizerConfig",
    ):
        PostTrainingPalettizerConfig(global_config=ctp.ModuleDKMPalettizerConfig())
    with pytest.raises(TypeError, match="got PostTrainingPalettizerConfig; expected a DKMPalett"):
        load_config(ctp.PostTrainingPalettizerConfig(), DKMPalettizerConfig)
    # values coremltools lets through are validated by ours, with the path
    with pytest.raises(
        ValueError,
        match=re.escape(
            "PostTrainingPalettizerConfig.global_config: "
            "ModulePostTrainingPalettizerConfig.n_bits: got 9 (int); expected an int in 1..8"
        ),
    ):
        PostTrainingPalettizerConfig(global_config=ctp.ModulePostTrainingPalettizerConfig(n_bits=9))
    with pytest.raises(ValueError, match=re.escape("palett_tau: got 0.0 (float)")):
        load_config(
            ctp.DKMPalettizerConfig(global_config=ctp.ModuleDKMPalettizerConfig(palett_tau=0.0)),
            DKMPalettizerConfig,
        )


@pytest.mark.parametrize(
    "build",
    [
        lambda lib, module: lib.PostTrainingPalettizerConfig().set_global(None),
        lambda lib, module: lib.SKMPalettizerConfig().set_global(None),
        lambda lib, module: lib.DKMPalettizerConfig().set_global(None),
        lambda lib, module: lib.PostTrainingPalettizerConfig().set_module_name("0", None),
        lambda lib, module: lib.SKMPalettizerConfig().set_module_name("0", None),
        lambda lib, module: lib.DKMPalettizerConfig().set_module_name("0", None),
        lambda lib, module: lib.DKMPalettizerConfig().set_global(
            module(lib.ModuleDKMPalettizerConfig, n_bits=3)
        ),
        lambda lib, module: (
            lib.PostTrainingPalettizerConfig()
            .set_global(None)
            .set_module_type(nn.Conv1d, module(lib.ModulePostTrainingPalettizerConfig, n_bits=2))
        ),
    ],
    ids=[
        "ptp-global-none",
        "skm-global-none",
        "dkm-global-none",
        "ptp-name-none",
        "skm-name-none",
        "dkm-name-none",
        "dkm-set-global",
        "ptp-global-none-type",
    ],
)
def test_configs_created_empty_select_what_coremltools_selects(build):
    ctp = _coremltools_palettization()
    import lightning_palettize.config as ours_lib

    ours = build(ours_lib, lambda cls, **kw: kw)
    theirs = build(ctp, lambda cls, **kw: cls(**kw))
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Conv1d(64, 64, 1))
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            found = theirs.get_module_config(name, module)
            if found is not None:
                expected[f"{name}.weight"] = found.n_bits
    assert _selected(ours, model) == expected
    # and both survive a plain-data round trip unchanged
    assert _selected(type(ours).from_dict(ours.as_dict()), model) == expected


def test_same_named_object_without_as_dict_gets_a_clear_error():
    # A class named like ours but from elsewhere, without as_dict(): the message says whose.
    PostTrainingPalettizerConfig_ = type("PostTrainingPalettizerConfig", (), {})
    ModulePostTrainingPalettizerConfig_ = type("ModulePostTrainingPalettizerConfig", (), {})
    with pytest.raises(
        TypeError,
        match=re.escape(f"load_config: got {__name__}.PostTrainingPalettizerConfig; expected a ")
        + re.escape("lightning_palettize.config.PostTrainingPalettizerConfig"),
    ):
        load_config(PostTrainingPalettizerConfig_(), PostTrainingPalettizerConfig)
    with pytest.raises(
        ValueError,
        match=re.escape(f"({__name__}.ModulePostTrainingPalettizerConfig); expected a ")
        + re.escape("lightning_palettize.config.ModulePostTrainingPalettizerConfig"),
    ):
        PostTrainingPalettizerConfig(global_config=ModulePostTrainingPalettizerConfig_())
