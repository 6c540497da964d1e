"""Tests for lightning_palettize.selection: which weights get palettized, with which config."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest
import torch.nn as nn

from lightning_palettize.config import (
    DKMPalettizerConfig,
    ModuleDKMPalettizerConfig,
    ModulePostTrainingPalettizerConfig,
    ModuleSKMPalettizerConfig,
    PostTrainingPalettizerConfig,
    SKMPalettizerConfig,
)
from lightning_palettize.selection import WeightSelection, resolve_module_config, select_weights

SUPPORTED = {
    nn.Linear: ("weight",),
    nn.Conv1d: ("weight",),
    nn.Conv2d: ("weight",),
    nn.ConvTranspose2d: ("weight",),
    nn.Embedding: ("weight",),
    nn.LayerNorm: ("weight",),
    nn.MultiheadAttention: ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
}


class MyLinear(nn.Linear):
    pass


class Gate(nn.Module):
    """A custom module type, absent from coremltools' default table."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(nn.init.normal_(nn.Linear(64, 64).weight.detach().clone()))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 64)


def make_model() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            emb=nn.Embedding(100, 64),
            layers=nn.ModuleList([Block(), Block()]),
            norm=nn.LayerNorm(64),
            head=nn.Linear(64, 64),
        )
    )


def bits(selections: list[WeightSelection]) -> dict[str, int]:
    return {s.qualified_name: s.config.n_bits for s in selections}


PTP = PostTrainingPalettizerConfig
MPTP = ModulePostTrainingPalettizerConfig


# ------------------------------------------------------------------------------------------------
# Name configs


def test_name_keys_are_fullmatched_regexes():
    model = make_model()
    config = PTP(global_config={"n_bits": 4}, module_name_configs={"layers.0.fc": {"n_bits": 2}})
    result = bits(select_weights(model, config, SUPPORTED))
    # "layers.0.fc" must not match "layers.0.fc2" (fullmatch, not match/search)
    assert result["layers.0.fc.weight"] == 2
    assert result["layers.0.fc2.weight"] == 4
    assert result["layers.1.fc.weight"] == 4  # "." in a regex matches "."; "0" does not match "1"

    config = PTP(
        global_config={"n_bits": 4}, module_name_configs={r"layers\.\d+\.fc2?": {"n_bits": 1}}
    )
    result = bits(select_weights(model, config, SUPPORTED))
    assert [k for k, v in result.items() if v == 1] == [
        "layers.0.fc.weight",
        "layers.0.fc2.weight",
        "layers.1.fc.weight",
        "layers.1.fc2.weight",
    ]


def test_first_matching_name_key_wins_in_insertion_order():
    model = make_model()
    config = PTP(
        module_name_configs={r"layers\.0\..*": {"n_bits": 1}, r"layers\..*": {"n_bits": 3}}
    )
    assert bits(select_weights(model, config, SUPPORTED)) == {
        "layers.0.fc.weight": 1,
        "layers.0.fc2.weight": 1,
        "layers.1.fc.weight": 3,
        "layers.1.fc2.weight": 3,
    }
    swapped = PTP(
        module_name_configs={r"layers\..*": {"n_bits": 3}, r"layers\.0\..*": {"n_bits": 1}}
    )
    assert set(bits(select_weights(model, swapped, SUPPORTED)).values()) == {3}


def test_name_beats_type_beats_global():
    model = make_model()
    config = PTP(
        global_config={"n_bits": 8},
        module_type_configs={nn.Linear: {"n_bits": 4}},
        module_name_configs={"head": {"n_bits": 2}},
    )
    result = bits(select_weights(model, config, SUPPORTED))
    assert result["head.weight"] == 2
    assert result["layers.0.fc.weight"] == 4
    assert result["emb.weight"] == 8 and result["norm.weight"] == 8


def test_typo_in_name_key_raises_and_lists_module_names():
    model = make_model()
    config = PTP(module_name_configs={r"layers\.\d+\.fc3": None})
    with pytest.raises(
        ValueError, match=r"key 'layers\\\\.\\\\d\+\\\\.fc3' matches no module"
    ) as info:
        select_weights(model, config, SUPPORTED)
    message = str(info.value)
    assert all(repr(n) in message for n, _ in model.named_modules() if n)

    wide = nn.Sequential(*[nn.Linear(2, 2) for _ in range(15)])
    with pytest.raises(ValueError, match="matches no module of Sequential") as info:
        select_weights(wide, PTP(module_name_configs={"16": None}), SUPPORTED)
    assert "'9'" in str(info.value) and "'10'" not in str(info.value)  # at most 10 listed

    with pytest.raises(ValueError, match="did you mean 'head'"):
        select_weights(model, PTP(module_name_configs={"haed": {"n_bits": 2}}), SUPPORTED)


# ------------------------------------------------------------------------------------------------
# Type configs


@pytest.mark.parametrize(
    "key", [nn.Linear, "Linear", "torch.nn.Linear", "torch.nn.modules.linear.Linear"], ids=str
)
def test_type_key_spellings(key):
    model = make_model()
    config = PTP(global_config={"n_bits": 8}, module_type_configs={key: {"n_bits": 3}})
    result = bits(select_weights(model, config, SUPPORTED))
    assert result["head.weight"] == 3 and result["layers.1.fc2.weight"] == 3
    assert result["emb.weight"] == 8


def test_subclasses_get_the_base_config_and_exact_subclass_key_wins():
    model = nn.Sequential(nn.Linear(64, 64), MyLinear(64, 64))
    only_base = PTP(module_type_configs={nn.Linear: {"n_bits": 3}})
    assert bits(select_weights(model, only_base, SUPPORTED)) == {"0.weight": 3, "1.weight": 3}
    for sub_key in (MyLinear, "MyLinear", f"{__name__}.MyLinear"):
        both = PTP(module_type_configs={nn.Linear: {"n_bits": 3}, sub_key: {"n_bits": 5}})
        assert bits(select_weights(model, both, SUPPORTED)) == {"0.weight": 3, "1.weight": 5}
        # insertion order does not matter: the MRO decides
        reverse = PTP(module_type_configs={sub_key: {"n_bits": 5}, nn.Linear: {"n_bits": 3}})
        assert bits(select_weights(model, reverse, SUPPORTED)) == {"0.weight": 3, "1.weight": 5}


def test_mha_out_proj_is_visited_as_a_linear():
    model = nn.Sequential(nn.MultiheadAttention(64, 4))
    config = PTP(
        module_type_configs={nn.MultiheadAttention: {"n_bits": 2}, nn.Linear: {"n_bits": 6}}
    )
    assert bits(select_weights(model, config, SUPPORTED)) == {
        "0.in_proj_weight": 2,
        "0.out_proj.weight": 6,  # NonDynamicallyQuantizableLinear is a Linear subclass
    }


def test_unknown_string_type_key_raises():
    model = make_model()
    with pytest.raises(ValueError, match="key 'Lineer' names no class in torch.nn or in the model"):
        select_weights(model, PTP(module_type_configs={"Lineer": None}), SUPPORTED)
    with pytest.raises(ValueError, match="did you mean"):
        select_weights(model, PTP(module_type_configs={"torch.nn.Linaer": None}), SUPPORTED)
    # classes of torch.nn absent from the model are fine, and so are the model's own classes
    select_weights(model, PTP(module_type_configs={"GRU": None, "Block": None}), SUPPORTED)


def test_two_keys_naming_the_same_class_conflict():
    config = PTP(module_type_configs={nn.Linear: {"n_bits": 2}, "Linear": {"n_bits": 3}})
    with pytest.raises(ValueError, match="all name torch.nn.modules.linear.Linear; keep one"):
        resolve_module_config(config, "fc", nn.Linear(4, 4))


# ------------------------------------------------------------------------------------------------
# None disables, at every level


def test_none_disables_at_each_level():
    model = make_model()
    by_name = PTP(
        global_config={"n_bits": 4},
        module_type_configs={nn.Linear: {"n_bits": 2}},
        module_name_configs={"head": None},
    )
    assert "head.weight" not in bits(select_weights(model, by_name, SUPPORTED))
    assert bits(select_weights(model, by_name, SUPPORTED))["layers.0.fc.weight"] == 2

    by_type = PTP(global_config={"n_bits": 4}, module_type_configs={nn.Linear: None})
    assert set(bits(select_weights(model, by_type, SUPPORTED))) == {"emb.weight", "norm.weight"}

    # global None while something else is configured: unmatched modules stay float
    only_head = PTP(module_name_configs={"head": {"n_bits": 2}})
    assert bits(select_weights(model, only_head, SUPPORTED)) == {"head.weight": 2}

    # explicit None for a name beats a type config and the global config
    assert resolve_module_config(by_name, "head", model.head) is None


# ------------------------------------------------------------------------------------------------
# DKM: weight_threshold tiers and the default table


def test_dkm_tiers_largest_satisfied_threshold_wins():
    # Measured with coremltools 9.0: 1600 / 4000 / 20000 elements -> 4, 4, 2 bits.
    model = nn.Sequential(
        nn.Linear(40, 40), nn.Linear(40, 100), nn.Linear(100, 200), nn.Linear(20, 40)
    )
    tiers = [{"n_bits": 4, "weight_threshold": 1000}, {"n_bits": 2, "weight_threshold": 10000}]
    for tiered in (tiers, tiers[::-1]):
        config = DKMPalettizerConfig(module_type_configs={nn.Linear: tiered})
        assert bits(select_weights(model, config, SUPPORTED)) == {
            "0.weight": 4,
            "1.weight": 4,
            "2.weight": 2,
        }  # 800 elements exceed no threshold: not palettized


def test_dkm_threshold_is_strict_and_applies_to_single_configs():
    config = DKMPalettizerConfig(global_config={"n_bits": 3, "weight_threshold": 4096})
    assert resolve_module_config(config, "a", nn.Linear(64, 64)) is None  # 4096 is not > 4096
    assert resolve_module_config(config, "b", nn.Linear(64, 65)).n_bits == 3
    # PTP / SKM have no threshold: tiny modules are palettized
    assert resolve_module_config(PTP(), "c", nn.Linear(2, 2)).n_bits == 4
    assert resolve_module_config(SKMPalettizerConfig(), "c", nn.Linear(2, 2)).n_bits == 4


def test_dkm_mha_every_weight_must_exceed_the_threshold():
    packed = nn.MultiheadAttention(32, 4)  # in_proj_weight: 96 x 32 = 3072 > 2048
    resolved = resolve_module_config(
        DKMPalettizerConfig(), "attn", packed, param_names=["in_proj_weight"]
    )
    assert resolved.n_bits == 2

    split = nn.MultiheadAttention(32, 4, kdim=16, vdim=8)  # q 1024, k 512, v 256 elements
    model = nn.Sequential(split)

    def selected_mha_weights(threshold: int) -> list[str]:
        config = DKMPalettizerConfig(global_config={"weight_threshold": threshold})
        return [
            s.param_name for s in select_weights(model, config, SUPPORTED) if s.module_name == "0"
        ]

    assert selected_mha_weights(255) == ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    for threshold in (256, 500, 1000):  # v (256) does not exceed: the whole module is skipped
        assert selected_mha_weights(threshold) == []
    # default param_names: every own weight of the module, here q/k/v (in_proj_weight is None)
    config = DKMPalettizerConfig(global_config={"weight_threshold": 300})
    assert resolve_module_config(config, "attn", split) is None
    config = DKMPalettizerConfig(global_config={"weight_threshold": 255})
    assert resolve_module_config(config, "attn", split).n_bits == 2


def test_dkm_default_table_when_nothing_is_set():
    model = nn.Sequential(
        OrderedDict(
            fc=nn.Linear(64, 64),  # 4096 elements
            sub=MyLinear(64, 64),
            conv=nn.Conv2d(16, 16, 3),  # 2304
            conv1d=nn.Conv1d(64, 64, 1),  # 4096
            deconv=nn.ConvTranspose2d(16, 16, 3),
            emb=nn.Embedding(100, 32),  # 3200
            norm=nn.LayerNorm(4096),
            attn=nn.MultiheadAttention(32, 4),  # 3072; out_proj 1024 is too small
            small=nn.Linear(32, 64),  # 2048 is not > 2048
            gate=Gate(),  # not in the table
        )
    )
    supported = {**SUPPORTED, Gate: ("weight",)}
    selections = select_weights(model, DKMPalettizerConfig(), supported)
    assert bits(selections) == {
        "fc.weight": 4,
        "sub.weight": 4,
        "conv.weight": 2,
        "conv1d.weight": 2,
        "deconv.weight": 2,
        "emb.weight": 2,
        "norm.weight": 2,
        "attn.in_proj_weight": 2,
    }
    assert all(s.config.cluster_dim == 1 and s.config.weight_threshold == 2048 for s in selections)


def test_dkm_n_bits_none_filled_by_type_without_mutating_user_config():
    user = ModuleDKMPalettizerConfig(weight_threshold=0)
    before = dataclasses.replace(user)
    config = DKMPalettizerConfig(global_config=user)
    model = nn.Sequential(nn.Linear(8, 8), MyLinear(8, 8), nn.Conv2d(2, 2, 1), Gate())
    result = select_weights(model, config, {**SUPPORTED, Gate: ("weight",)})
    assert bits(result) == {"0.weight": 4, "1.weight": 4, "2.weight": 2, "3.weight": 2}
    assert all(
        s.config.cluster_dim == 1 and s.config.enable_per_channel_scale is False for s in result
    )
    assert all(s.config is not user for s in result)
    assert user == before and user.n_bits is None and user.cluster_dim is None
    assert config.global_config is user


def test_explicit_values_are_kept():
    config = DKMPalettizerConfig(
        global_config={"n_bits": 6, "cluster_dim": 2, "weight_threshold": 0}
    )
    resolved = resolve_module_config(config, "fc", nn.Linear(4, 4))
    assert (resolved.n_bits, resolved.cluster_dim) == (6, 2)


def test_dkm_tier_list_at_name_level():
    config = DKMPalettizerConfig(
        module_name_configs={
            "fc": [{"n_bits": 1, "weight_threshold": 10}, {"n_bits": 2, "weight_threshold": 100}]
        }
    )
    assert resolve_module_config(config, "fc", nn.Linear(5, 5)).n_bits == 1
    assert resolve_module_config(config, "fc", nn.Linear(5, 2)) is None  # 10 is not > 10
    assert resolve_module_config(config, "fc", nn.Linear(5, 1)) is None  # 5 elements
    assert resolve_module_config(config, "fc", nn.Linear(20, 20)).n_bits == 2
    assert resolve_module_config(config, "other", nn.Linear(20, 20)) is None


# ------------------------------------------------------------------------------------------------
# PTP / SKM fill-in and defaults


@pytest.mark.parametrize(
    "top, module_cls",
    [(PostTrainingPalettizerConfig, MPTP), (SKMPalettizerConfig, ModuleSKMPalettizerConfig)],
)
def test_kmeans_defaults_when_nothing_is_set(top, module_cls):
    model = make_model()
    selections = select_weights(model, top(), SUPPORTED)
    assert [s.qualified_name for s in selections] == [
        "emb.weight",
        "layers.0.fc.weight",
        "layers.0.fc2.weight",
        "layers.1.fc.weight",
        "layers.1.fc2.weight",
        "norm.weight",
        "head.weight",
    ]
    assert all(s.config == dataclasses.replace(module_cls(), cluster_dim=1) for s in selections)


def test_config_created_empty_keeps_its_defaults_after_setters_like_coremltools():
    # coremltools 9.0 (checked side by side): DKMPalettizerConfig() fills its default table into
    # module_type_configs at creation, so set_module_name(.., None) disables only that module
    # and a later set_global does not override the table; PTP/SKM fill a default global_config.
    model = nn.Sequential(OrderedDict(a=nn.Linear(64, 64), b=nn.Linear(64, 64)))
    dkm = DKMPalettizerConfig().set_module_name("a", None)
    assert dkm.fills_defaults() and not dkm.is_unset()
    assert bits(select_weights(model, dkm, SUPPORTED)) == {"b.weight": 4}
    three = DKMPalettizerConfig().set_global({"n_bits": 3, "weight_threshold": 0})
    assert bits(select_weights(model, three, SUPPORTED)) == {"a.weight": 4, "b.weight": 4}
    mine = DKMPalettizerConfig().set_module_type(nn.Linear, {"n_bits": 3})
    assert bits(select_weights(model, mine, SUPPORTED)) == {"a.weight": 3, "b.weight": 3}
    # created with a config: no defaults at all
    assert (
        select_weights(model, DKMPalettizerConfig(module_name_configs={"a": None}), SUPPORTED) == []
    )
    for top in (PostTrainingPalettizerConfig, SKMPalettizerConfig):
        cfg = top().set_module_name("a", None)
        assert [s.qualified_name for s in select_weights(model, cfg, SUPPORTED)] == ["b.weight"]
        cfg.set_global({"n_bits": 2})
        assert bits(select_weights(model, cfg, SUPPORTED)) == {"b.weight": 2}
        assert select_weights(model, top(module_name_configs={"a": None}), SUPPORTED) == []
        # a dict / YAML round trip of a config created empty is created empty again
        assert top.from_dict(top().as_dict()).fills_defaults()


def test_ptp_fills_none_without_touching_the_rest():
    user = MPTP(
        n_bits=None, cluster_dim=None, enable_per_channel_scale=None, rounding_precision=None
    )
    resolved = resolve_module_config(PTP(global_config=user), "fc", nn.Linear(4, 4))
    assert resolved == MPTP(
        n_bits=4, cluster_dim=1, enable_per_channel_scale=False, rounding_precision=None
    )
    assert user.n_bits is None and user.cluster_dim is None


# ------------------------------------------------------------------------------------------------
# select_weights mechanics


def test_selection_order_names_and_record():
    model = make_model()
    selections = select_weights(model, PTP(), SUPPORTED)
    first = selections[0]
    assert (first.module_name, first.param_name, first.module) == ("emb", "weight", model.emb)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.param_name = "bias"
    root = select_weights(nn.Linear(4, 4), PTP(), SUPPORTED)
    assert [s.qualified_name for s in root] == ["weight"]
    split = nn.MultiheadAttention(64, 4, kdim=32, vdim=16)
    q, k, v = select_weights(
        split, PTP(), {nn.MultiheadAttention: SUPPORTED[nn.MultiheadAttention]}
    )
    assert q.config is k.config is v.config  # one resolved config per module


def test_only_existing_parameters_are_selected():
    packed = nn.MultiheadAttention(64, 4)  # q/k/v_proj_weight registered as None
    split = nn.MultiheadAttention(64, 4, kdim=32, vdim=16)  # in_proj_weight is None
    model = nn.Sequential(OrderedDict(packed=packed, split=split))
    assert [s.qualified_name for s in select_weights(model, PTP(), SUPPORTED)] == [
        "packed.in_proj_weight",
        "packed.out_proj.weight",
        "split.q_proj_weight",
        "split.k_proj_weight",
        "split.v_proj_weight",
        "split.out_proj.weight",
    ]


def test_most_specific_supported_entry_is_used():
    class Twin(nn.Linear):
        def __init__(self) -> None:
            super().__init__(4, 4)
            self.extra_weight = nn.Parameter(self.weight.detach().clone())

    model = nn.Sequential(Twin(), nn.Linear(4, 4), nn.ReLU())
    supported = {nn.Linear: ("weight",), Twin: ("weight", "extra_weight")}
    assert [s.qualified_name for s in select_weights(model, PTP(), supported)] == [
        "0.weight",
        "0.extra_weight",
        "1.weight",
    ]


def test_tied_weights_are_listed_once():
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(OrderedDict(emb=emb, head=head))
    assert [s.qualified_name for s in select_weights(model, PTP(), SUPPORTED)] == ["emb.weight"]


def test_bad_arguments_raise_type_error():
    with pytest.raises(TypeError, match="expected one of DKMPalettizerConfig"):
        select_weights(nn.Linear(2, 2), {"global_config": None}, SUPPORTED)
    with pytest.raises(
        TypeError, match=r"supported\[Linear\] must be a sequence of parameter names"
    ):
        select_weights(nn.Linear(2, 2), PTP(), {nn.Linear: "weight"})
    with pytest.raises(TypeError, match="expected one of"):
        resolve_module_config(MPTP(), "fc", nn.Linear(2, 2))


def test_raw_dicts_put_into_a_built_config_are_validated_at_resolution():
    # the setters validate; a dict assigned into the config's dicts afterwards used to fail
    # with AttributeError deep in the palettizer
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    config = PTP()
    config.module_name_configs["0"] = {"n_bits": 3}
    assert bits(select_weights(model, config, SUPPORTED)) == {"0.weight": 3, "1.weight": 4}
    config.module_name_configs["0"] = {"n_bitz": 3}
    with pytest.raises(ValueError, match=r"module_name_configs\['0'\].*'n_bitz'.*did you mean"):
        select_weights(model, config, SUPPORTED)
    dkm = DKMPalettizerConfig()
    dkm.module_type_configs[nn.Linear] = [{"n_bits": 3, "weight_threshold": 0}]
    assert bits(select_weights(model, dkm, SUPPORTED)) == {"0.weight": 3, "1.weight": 3}
