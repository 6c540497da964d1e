"""The README's configuration reference is generated from the config classes and kept in step."""

from pathlib import Path

from lightning_palettize._docs import END, START, config_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_reference_matches_the_classes():
    text = README.read_text()
    assert START in text and END in text, "README.md lost its config-reference markers"
    block = text[text.index(START) : text.index(END) + len(END)]
    assert block == config_reference(), (
        "README.md's configuration reference is stale: regenerate it with "
        "`python -m lightning_palettize._docs` and paste it between the markers"
    )


def test_reference_lists_every_coremltools_argument():
    ref = config_reference()
    for name in (
        "kmeans_init",
        "palett_tau",
        "enable_fast_kmeans_mode",
        "outlier_fraction",
        "calibration_nsamples",
        "weight_threshold",
        "cluster_dim",
    ):
        assert f"`{name}`" in ref
