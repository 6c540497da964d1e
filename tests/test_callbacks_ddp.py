"""PalettizationCallback under DDP: 2 CPU processes (gloo, strategy="ddp" in a script)."""

from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from test_callbacks_models import DKM_CFG, BoringModule, LUTRecorder, trainer

from lightning_palettize.callbacks import (
    PalettizationCallback,
    PostTrainingPalettizationCallback,
    SKMPalettizationCallback,
)

# net.0 starts at prepare (same weights on every rank and in a single process), net.2 after
# two optimizer steps (DDP-averaged weights).
CONFIG = {
    "global_config": {"n_bits": 2, "weight_threshold": 0},
    "module_name_configs": {"net\\.2": {"n_bits": 3, "weight_threshold": 0, "milestone": 2}},
}


@pytest.mark.slow
def test_ddp_luts_identical_on_ranks_and_report_logged_once(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "_ddp_fit.py")
    run = subprocess.run(
        [sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    model = BoringModule(n_batches=4)
    model.load_state_dict(torch.load(tmp_path / "initial.pt"))
    single_model = BoringModule(n_batches=4)
    single_model.load_state_dict(model.state_dict())
    main = torch.load(tmp_path / "main.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    # identical LUTs (and enabled flags) on both ranks at every step
    steps = sorted(ranks[0]["luts"])
    assert steps == sorted(ranks[1]["luts"]) and steps[0] == 0 and len(steps) == 5
    for step in steps:
        a, b = ranks[0]["luts"][step], ranks[1]["luts"][step]
        assert a.keys() == b.keys() and len(a) == 4
        for k in a:
            assert torch.equal(a[k], b[k]), (step, k)
    assert int(ranks[0]["luts"][1]["net.2.weight_dkm.enabled"]) == 0
    assert int(ranks[0]["luts"][2]["net.2.weight_dkm.enabled"]) == 1

    # the finalized module is identical on both ranks, palettized, and reached the main process
    final0, final1 = ranks[0]["final"], ranks[1]["final"]
    assert final0.keys() == final1.keys()
    assert not any("_dkm." in k for k in final0)
    for k in final0:
        assert torch.equal(final0[k], final1[k]), k
    assert len(torch.unique(final0["net.0.weight"])) <= 4
    assert len(torch.unique(final0["net.2.weight"])) <= 8
    # the main process (rank 0) keeps the finalized module, its metadata and the report
    assert main["state"].keys() == final0.keys() and main["report"]
    assert any("_COREML_" in k for k in final0)
    for k in final0:
        assert torch.equal(main["state"][k], final0[k]), k

    # at the milestone where the weights are the same (prepare), a single process agrees
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    trainer(
        max_epochs=1,
        max_steps=1,
        callbacks=[PalettizationCallback(CONFIG, verbose=False), LUTRecorder(str(single_dir))],
    ).fit(single_model)
    single = torch.load(single_dir / "rank0.pt")
    k = "net.0.weight_dkm.centroids"
    assert torch.equal(single["luts"][0][k], ranks[0]["luts"][0][k])

    # one report: one table file, one row of report scalars, one console table
    # (the main process's logger never resolved its version: find the workers' directory)
    tables = glob.glob(str(tmp_path / "logs" / "ddp" / "*" / "palettization_dkm_step*.csv"))
    assert [os.path.basename(t) for t in tables] == ["palettization_dkm_step4.csv"]
    with open(os.path.join(os.path.dirname(tables[0]), "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    # steps 1-4 (log_every_n_steps=1) and the final report at step 4, each written once
    steps = [r["step"] for r in rows if r.get("palettization/dkm/bytes_after")]
    assert steps == ["1", "2", "3", "4", "4"]
    assert (run.stderr + run.stdout).count("PalettizationCallback: palettized 2 weight(s)") == 1


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_spawning_strategies_rejected_at_setup(strategy):
    # the main process would get the weights back without _COREML_ buffers and report
    t = trainer(strategy=strategy, devices=2)
    model = BoringModule()
    callbacks = [
        (PalettizationCallback(DKM_CFG), "fit"),
        (PostTrainingPalettizationCallback(when="test_start"), "test"),
        (SKMPalettizationCallback(when="fit_end"), "fit"),
    ]
    for callback, stage in callbacks:
        with pytest.raises(MisconfigurationException, match="strategy='ddp'"):
            callback.setup(t, model, stage)
