"""Run reporting: the appending CSV logger, the per-stage summary, JSON output."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from refdecoder.training.loggers import CSVMetricsLogger, summarize, write_json


def _rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_logger_appends_across_restarts_and_widens_the_header(tmp_path):
    first = CSVMetricsLogger(tmp_path / "csv")
    first.log_metrics({"train/loss": torch.tensor(0.5)}, step=10)
    first.log_metrics({"train/loss": 0.25}, step=20)
    resumed = CSVMetricsLogger(tmp_path / "csv")  # a resumed run opens the same file
    resumed.log_metrics({"train/loss": 0.125, "val/psnr": 20.0}, step=30)
    rows = _rows(tmp_path / "csv" / "metrics.csv")
    assert [r["step"] for r in rows] == ["10", "20", "30"]
    assert [float(r["train/loss"]) for r in rows] == [0.5, 0.25, 0.125]
    assert [r["val/psnr"] for r in rows] == ["", "", "20.0"]
    assert list(rows[0]) == ["step", "train/loss", "val/psnr"]


def test_summary_measures_the_loss_drop_within_each_stage():
    # Stage 2 starts higher (longer clips): a drop over the whole run would mix the two stages.
    train = [[s, 1.0 - 0.01 * s] for s in range(10, 101, 10)] + [
        [s, 2.0 - 0.01 * (s - 100)] for s in range(110, 201, 10)
    ]
    val = [{"step": 0, "tag": "start", "l1": 0.5, "psnr": 10.0}, {"step": 200, "tag": "end", "l1": 0.4, "psnr": 11.0}]
    summary = summarize({"train": train, "val": val}, [100, 200], {"l1": 0.4, "psnr": 11.0}, 0, 1.0)
    first, second = summary["stages"]
    assert first["steps"] == [0, 100] and second["steps"] == [100, 200]
    # k = 10 // 5 = 2 values at each end
    assert first["loss_first"] == pytest.approx((0.9 + 0.8) / 2) and first["loss_last"] == pytest.approx(
        (0.1 + 0.0) / 2
    )
    assert second["loss_first"] == pytest.approx((1.9 + 1.8) / 2)
    assert second["loss_drop"] == pytest.approx(1 - 1.05 / 1.85)
    assert summary["val_l1_drop"] == pytest.approx(0.2) and summary["val_start"] == {"l1": 0.5, "psnr": 10.0}


def test_summary_ignores_non_finite_losses():
    summary = summarize({"train": [[1, float("nan")], [2, 1.0], [3, 0.5]], "val": []}, [3], {}, 1, 1.0)
    assert summary["stages"][0]["loss_first"] == pytest.approx(1.0) and summary["nonfinite_steps"] == 1


def test_write_json_turns_nan_into_null(tmp_path):
    path = write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": 2}}
