"""Checkpoint manager: atomic write, keep-last-k, survival of a SIGKILL mid-write, stop requests on signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from refdecoder.errors import CheckpointError
from refdecoder.training.checkpoint import CheckpointManager, StopSignal

ROOT = Path(__file__).resolve().parents[1]


def _writer(value: float):
    return lambda path: torch.save({"value": torch.tensor(value)}, path)


def test_keep_last_k(tmp_path):
    ckpts = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    for step in (10, 20, 30, 40):
        path = ckpts.save(step, _writer(step))
        assert path == tmp_path / "ckpt" / f"step-{step:09d}.ckpt"
    assert [s for s, _ in ckpts.checkpoints()] == [30, 40]
    assert torch.load(ckpts.latest())["value"] == 40
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000000030.ckpt", "step-000000040.ckpt"]


def test_failed_write_leaves_the_previous_checkpoint(tmp_path):
    ckpts = CheckpointManager(tmp_path, keep_last=3)
    ckpts.save(1, _writer(1.0))

    def broken(path):
        path.write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpts.save(2, broken)
    assert ckpts.latest() == ckpts.path_for(1) and torch.load(ckpts.latest())["value"] == 1.0
    assert (tmp_path / "step-000000002.tmp").exists()  # the partial write never got the final name
    ckpts.save(3, _writer(3.0))
    assert not (tmp_path / "step-000000002.tmp").exists()  # and the next save cleans it up
    assert [s for s, _ in ckpts.checkpoints()] == [1, 3]


def test_folder_checkpoints_are_renamed_whole(tmp_path):
    ckpts = CheckpointManager(tmp_path, keep_last=1)

    def sharded(path):  # like FSDP/DeepSpeed: a folder of shards
        path.mkdir()
        for rank in range(2):
            torch.save({"rank": rank}, path / f"shard{rank}.pt")

    ckpts.save(5, sharded)
    ckpts.save(6, sharded)
    assert ckpts.latest().is_dir() and sorted(p.name for p in ckpts.latest().iterdir()) == ["shard0.pt", "shard1.pt"]
    assert [s for s, _ in ckpts.checkpoints()] == [6]


def test_resolve(tmp_path):
    ckpts = CheckpointManager(tmp_path)
    assert ckpts.resolve("auto") is None and ckpts.resolve("none") is None
    ckpts.save(7, _writer(7.0))
    assert ckpts.resolve("auto") == ckpts.path_for(7)
    assert ckpts.resolve(str(ckpts.path_for(7))) == ckpts.path_for(7)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ckpts.resolve(str(tmp_path / "missing.ckpt"))


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    ckpts = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2):
        ckpts.save(step, _writer(float(step)))
    newest = ckpts.path_for(2)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut after its rename
    with caplog.at_level("WARNING", logger="refdecoder.training"):
        assert ckpts.resolve("auto") == ckpts.path_for(1)
    assert any("damaged" in r.getMessage() and str(newest) in r.getMessage() for r in caplog.records)
    assert torch.load(ckpts.resolve("auto"))["value"] == 1.0
    ckpts.save(2, _writer(2.5))  # the resumed run reaches step 2 again: the damaged copy is replaced
    assert ckpts.resolve("auto") == newest and torch.load(newest)["value"] == 2.5
    ckpts.path_for(1).write_bytes(b"")
    newest.write_bytes(b"not a zip")
    assert ckpts.resolve("auto") is None  # nothing loadable: a fresh start, with the warnings saying why


_KILLED_WRITER = """
import sys, time, torch
sys.path.insert(0, {root!r})
from refdecoder.training.checkpoint import CheckpointManager

ckpts = CheckpointManager({folder!r}, keep_last=2)
ckpts.save(1, lambda p: torch.save({{"value": torch.arange(1000.0)}}, p))

def slow(path):
    with open(path, "wb") as f:
        f.write(b"x" * 100000)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)

ckpts.save(2, slow)
"""


def test_sigkill_during_a_write_keeps_the_previous_checkpoint_loadable(tmp_path):
    folder = tmp_path / "ckpt"
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER.format(root=str(ROOT), folder=str(folder)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"  # checkpoint 2 is half written now
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    ckpts = CheckpointManager(folder, keep_last=2)
    assert [s for s, _ in ckpts.checkpoints()] == [1]
    assert torch.equal(torch.load(ckpts.latest(), weights_only=True)["value"], torch.arange(1000.0))


def test_stop_signal_turns_sigterm_into_a_request():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not stop.requested and time.time() < deadline:
            time.sleep(0.01)
        assert stop.requested and stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_second_sigint_interrupts_at_once():
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
