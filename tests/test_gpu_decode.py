"""``benchmarks/gpu_decode.py --dry-run``: the GPU benchmark's code end to end, on CPU at toy sizes."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_decode


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Graph counts below are per run; torch.compile keeps a bounded number of graphs per function.
    torch._dynamo.reset()


def test_dry_run_measures_every_row_and_writes_json_and_table(tmp_path):
    results = gpu_decode.main(["--dry-run", "--out-dir", str(tmp_path)])
    frames = [str(f) for f in results["settings"]["frames"]]
    decode = results["decode"]
    assert list(decode) == ["vae.decode", "plain loop", "small", "paper", "small compiled", "paper compiled"]
    for row in decode.values():
        for f in frames:
            assert row[f]["median_s"] > 0 and row[f]["tflop"] > 0 and row[f]["above_resident_gib"] > 0
    # The plain loop computes what vae.decode computes; the presets add to it.
    flops = {name: decode[name][frames[1]]["tflop"] for name in decode}
    assert flops["plain loop"] == flops["vae.decode"] < min(flops["small"], flops["paper"])
    for name in ("small compiled", "paper compiled"):
        # The first window and one later window size; the timed runs traced nothing.
        assert decode[name]["graphs"] == 2 and decode[name]["traced_while_timed"] == 0
    for kind in ("plain", "small"):
        for mode in ("bf16", "autocast_bf16"):
            assert results["precision"][kind][mode]["min_db"] >= 40.0
    assert all(step["median_s"] > 0 for step in results["training"]["steps"].values())
    assert [t["value"] is not None for t in results["targets"]] == [True, True, True, True, False]  # no CPU peak
    assert results["attention_kernels"]
    saved = json.loads((tmp_path / "gpu_decode_dry_run.json").read_text())
    assert saved["decode"].keys() == decode.keys()
    table = (tmp_path / "gpu_decode_dry_run.md").read_text()
    assert "| small compiled (2 graphs traced, 0 while timed) |" in table and "| target |" in table
