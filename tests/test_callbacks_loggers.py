"""Reports reach every logger: read back what CSV, TensorBoard, MLflow and W&B wrote."""

from __future__ import annotations

import csv
import glob
import json
import logging
import os

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
from test_callbacks_models import DKM_CFG, BoringModule, DigitsData, trained_digits_cnn, trainer

from lightning_palettize.callbacks import (
    PalettizationCallback,
    PostTrainingPalettizationCallback,
)

SCALARS = ["compression_ratio", "bytes_before", "bytes_after", "mean_rel_error"]


def _csv_rows(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_dkm_report_in_csv_tensorboard_and_mlflow(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 wants a database otherwise
    csv_logger = CSVLogger(tmp_path / "csv", name="run")
    tb_logger = TensorBoardLogger(tmp_path / "tb", name="run")
    uri = (tmp_path / "mlruns").as_uri()
    mlf_logger = MLFlowLogger(experiment_name="lp", tracking_uri=uri)
    pl.seed_everything(0, verbose=False)
    callback = PalettizationCallback(DKM_CFG, log_every_n_steps=2, verbose=False)
    trainer(logger=[csv_logger, tb_logger, mlf_logger], callbacks=[callback]).fit(
        BoringModule(n_batches=4)
    )
    report = callback.report
    summary = report.summary()

    # CSV: scalars at steps 2 and 4 (DKM state) and 4 (final) in metrics.csv, table next to it
    rows = _csv_rows(os.path.join(csv_logger.log_dir, "metrics.csv"))
    logged = [r for r in rows if r.get("palettization/dkm/compression_ratio")]
    assert [r["step"] for r in logged] == ["2", "4", "4"]
    final = logged[-1]
    assert float(final["palettization/dkm/bytes_after"]) == summary["bytes_after"]
    assert float(final["palettization/dkm/rel_error/net.0.weight"]) == pytest.approx(
        report["net.0.weight"].rel_error
    )
    table = _csv_rows(os.path.join(csv_logger.log_dir, "palettization_dkm_step4.csv"))
    assert [r["name"] for r in table] == ["net.0.weight", "net.2.weight"]
    assert int(table[0]["bytes_after"]) == report["net.0.weight"].bytes_after

    # TensorBoard: the scalars and a markdown text entry
    events = EventAccumulator(tb_logger.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    ratio = events.Scalars("palettization/dkm/compression_ratio")
    assert [e.step for e in ratio] == [2, 4, 4]
    assert ratio[-1].value == pytest.approx(summary["compression_ratio"])
    (text,) = events.Tensors("palettization/dkm/report/text_summary")
    markdown = text.tensor_proto.string_val[0].decode()
    assert text.step == 4 and "| net.0.weight | 2 |" in markdown and "| TOTAL |" in markdown

    # MLflow (local file store): metric history and the CSV / markdown artifacts
    client = MlflowClient(tracking_uri=uri)
    run_id = mlf_logger.run_id
    for name in SCALARS:
        history = client.get_metric_history(run_id, f"palettization/dkm/{name}")
        assert [m.step for m in history] == [2, 4, 4]
        assert history[-1].value == pytest.approx(summary[name])
    artifacts = client.download_artifacts(run_id, "palettization", str(tmp_path / "dl"))
    assert sorted(os.listdir(artifacts)) == ["dkm_report_step4.csv", "dkm_report_step4.md"]
    with open(os.path.join(artifacts, "dkm_report_step4.csv")) as f:
        assert f.read().splitlines() == report.to_csv().splitlines()


def test_ptp_report_and_metric_drop_logged_during_test(tmp_path):
    logger = CSVLogger(tmp_path, name="test")
    callback = PostTrainingPalettizationCallback(
        {"global_config": {"n_bits": 2}}, when="test_start", compare=True, verbose=False
    )
    trainer(logger=logger, callbacks=[callback]).test(trained_digits_cnn(), datamodule=DigitsData())
    rows = _csv_rows(os.path.join(logger.log_dir, "metrics.csv"))
    (row,) = [r for r in rows if r.get("palettization/ptp/compression_ratio")]
    assert float(row["palettization/ptp/drop/val_acc"]) == pytest.approx(
        callback.comparison["drop/val_acc"]
    )
    assert float(row["palettization/ptp/before/val_acc"]) > 0.5
    assert os.path.exists(os.path.join(logger.log_dir, "palettization_ptp_step0.csv"))
    assert any(r.get("test_acc") for r in rows)  # the test's own metrics are still there


def test_wandb_offline_table(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lp")
    callback = PostTrainingPalettizationCallback({"global_config": {"n_bits": 2}}, verbose=False)
    try:
        trainer(logger=logger, callbacks=[callback]).fit(BoringModule(n_batches=2))
    finally:
        wandb.finish()
    (table_file,) = glob.glob(
        str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "**" / "*.json"),
        recursive=True,
    )
    with open(table_file) as f:
        table = json.load(f)
    assert table["columns"][:2] == ["name", "n_bits"]
    assert [r[0] for r in table["data"]] == ["net.0.weight", "net.2.weight"]
    assert table["data"][0][7] == callback.report["net.0.weight"].bytes_after


def test_without_logger_one_console_table(caplog):
    caplog.set_level(logging.INFO)
    callback = PalettizationCallback(DKM_CFG)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer(callbacks=[callback]).fit(BoringModule(n_batches=2))
    tables = [
        r.getMessage()
        for r in caplog.records
        if "PalettizationCallback: palettized" in r.getMessage()
    ]
    assert len(tables) == 1
    assert "net.0.weight" in tables[0] and "net.2.weight" in tables[0] and "TOTAL" in tables[0]
