"""Ranks, shares, progress, latent shards and ``encode`` in one process (the multi-process runs are in
tests/test_distributed_cli.py)."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import pytest
import torch

from refdecoder.cli import main
from refdecoder.data import LatentDataset, ShardItem, bundled_clips, write_shards
from refdecoder.data.latent_shards import LatentShardWriter, finished_shards, is_latent_shard_folder, write_index
from refdecoder.errors import ConfigError
from refdecoder.inference import load_decoder
from refdecoder.inference.distributed import (
    RankContext,
    exit_if_told,
    init_distributed,
    map_shared,
    rank_context,
    share,
)
from refdecoder.inference.encode import EncodeOptions, clip_starts, encode_dataset
from refdecoder.inference.rank_progress import RankProgress
from tests.helpers import save_random_model

pytestmark = pytest.mark.usefixtures("one_thread")


# --- ranks and shares ---------------------------------------------------------------------------------------------
def test_rank_context_reads_the_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert rank_context() == RankContext(0, 1, 0) and not rank_context().distributed
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = rank_context()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.label) == (5, 8, 1, False, "rank 5/8")
    assert rank_context(rank=0, world_size=2) == RankContext(0, 2, 1)  # arguments win over the environment
    with pytest.raises(ConfigError, match="0 <= rank < world_size"):
        rank_context(rank=8)
    monkeypatch.setenv("WORLD_SIZE", "eight")
    with pytest.raises(ConfigError, match="WORLD_SIZE='eight'"):
        rank_context()


def test_several_processes_need_a_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT"):
        init_distributed(RankContext(0, 2, 0), "cpu")
    assert init_distributed(RankContext(), "cpu") == torch.device("cpu")  # one process: no group
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_shares_split_everything_once_and_balance_by_weight(world: int) -> None:
    rng = random.Random(world)
    weights = [rng.choice([1, 9, 17, 33, 81, 200]) for _ in range(37)]
    shares = [share(weights, world, rank) for rank in range(world)]
    assert sorted(i for part in shares for i in part) == list(range(len(weights)))  # each item exactly once
    assert all(part == sorted(part) for part in shares)  # walked in input order
    loads = [sum(weights[i] for i in part) for part in shares]
    assert max(loads) - min(loads) <= max(weights)  # greedy longest-first: within one item of the best
    assert shares == [share(list(weights), world, rank) for rank in range(world)]  # deterministic


def test_share_balances_frames_not_counts() -> None:
    # one long video against four short ones: a count split (3 + 2) would give one rank 100 + 10 + 10 frames
    weights = [100, 10, 10, 10, 10]
    assert share(weights, 2, 0) == [0] and share(weights, 2, 1) == [1, 2, 3, 4]
    with pytest.raises(ConfigError):
        share(weights, 2, 2)


def test_map_shared_and_the_exit_hook_in_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    assert map_shared(RankContext(), [3, 1, 2], lambda x: x * 10) == [30, 10, 20]
    monkeypatch.setenv("REFDECODER_TEST_EXIT_AFTER", "1:1")
    exit_if_told(RankContext(0, 1, 0), 5)  # another rank: nothing happens (the test would end otherwise)


# --- progress -----------------------------------------------------------------------------------------------------
def test_progress_counts_this_rank_and_the_run(tmp_path: Path) -> None:
    stream = io.StringIO()
    other = RankProgress(RankContext(1, 2, 1), 4, tmp_path, run_id=1.0)
    stale = RankProgress(RankContext(1, 2, 1), 100, tmp_path / "old", run_id=0.5)  # another run's folder
    other.update(3)
    assert other.quiet and stale.quiet  # rank 1 is quiet by default
    main_rank = RankProgress(RankContext(0, 2, 0), 6, tmp_path, run_id=1.0, stream=stream)
    main_rank.started -= 10  # pretend 10 s went by: rates and time left appear
    main_rank.update(2)
    line = stream.getvalue().strip().splitlines()[-1]
    assert line.startswith("rank 0/2: 2/6 clips (33%), 0.20 clips/s, ~20 s left | all ranks: 5/10 clips (50%)")
    (tmp_path / ".progress" / "rank-1.json").write_text(
        json.dumps({"run": 0.1, "done": 99, "total": 99, "started": 0})
    )
    main_rank.print_line()  # a file of an earlier run is not counted
    assert "all ranks: 2/6 clips" in stream.getvalue().strip().splitlines()[-1]
    single = io.StringIO()
    RankProgress(RankContext(), 3, tmp_path / "single", run_id=2.0, stream=single).update(3)
    assert single.getvalue().startswith("done: 3/3 clips (100%)") and not (tmp_path / "single").exists()


# --- latent shards ------------------------------------------------------------------------------------------------
def test_a_shard_counts_only_when_finished(tmp_path: Path) -> None:
    writer = LatentShardWriter(tmp_path, rank=3, maxcount=2)
    meta = {"height": "8", "width": "8", "normalized": "false"}
    for i in range(3):
        writer.write(f"k{i}", torch.full((4, 1, 1, 1), float(i)), b"png", meta)
    assert [p.name for p in finished_shards(tmp_path)] == ["latents-r003-000000.tar"]  # the second is in progress
    assert list(tmp_path.glob(".latents-r003-000001.tar.partial"))
    index = json.loads(write_index(tmp_path, {"a": 1}).read_text())
    assert index["samples"] == 2 and not list(tmp_path.glob(".*.partial"))  # the interrupted write is cleaned up
    assert is_latent_shard_folder(tmp_path) and not is_latent_shard_folder(tmp_path / "nothing")
    again = LatentShardWriter(tmp_path, rank=3, maxcount=2)  # a rerun continues the numbering
    again.write("k2", torch.zeros(4, 1, 1, 1), b"png", meta)
    again.close()
    assert [p.name for p in again.written] == ["latents-r003-000001.tar"]


# --- encode -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory):
    folders = save_random_model(tmp_path_factory.mktemp("models"))
    return load_decoder(folders["vae"], device="cpu")


def test_clip_starts() -> None:
    assert clip_starts(25, 9, 8) == [0, 8, 16] and clip_starts(25, 9, 9) == [0, 9] and clip_starts(8, 9, 8) == []


def test_encode_resumes_and_refuses_other_settings(decoder, tmp_path: Path) -> None:
    options = EncodeOptions(frames=5, stride=10, size=(32, 48), maxcount=2)
    clips = tmp_path / "clips"
    clips.mkdir()
    for clip in bundled_clips()[:2]:
        (clips / clip.name).write_bytes(clip.read_bytes())
    first = encode_dataset(decoder, clips, tmp_path / "out", options, RankContext())
    assert first.encoded == 6 and first.clips_total == 6 and not first.failed  # 2 videos x starts 0, 10, 20
    again = encode_dataset(decoder, clips, tmp_path / "out", options, RankContext())
    assert again.encoded == 0 and again.skipped == 6 and again.clips_total == 6
    with pytest.raises(ConfigError, match="stride differ"):
        encode_dataset(decoder, clips, tmp_path / "out", EncodeOptions(frames=5, stride=5, size=(32, 48)))
    data = LatentDataset(tmp_path / "out")
    sample = data[0]
    assert sample["latents"].shape == (4, 2, 4, 6) and sample["reference"].shape == (3, 1, 32, 48)
    assert sample["key"] == "bigbuckbunny-f000000" and sample["seed"] == -1 and not sample["normalized"]
    # the stored reference is the clip's first frame as encoded, exactly
    from refdecoder.data import read_clip

    frame = read_clip(clips / "bigbuckbunny.mp4", [0], size=(32, 48))
    assert torch.equal(sample["reference"], frame)
    assert torch.equal(
        sample["latents"],
        decoder.adapter.encode(read_clip(clips / "bigbuckbunny.mp4", range(5), size=(32, 48))[None])[0],
    )


def test_encode_inputs_folder_csv_and_shards_agree(decoder, tmp_path: Path) -> None:
    clips = bundled_clips()[:2]
    table = tmp_path / "train.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "caption"])
        writer.writerows([[str(c), f"a clip of {c.stem}"] for c in clips])
    write_shards([ShardItem(c, c.stem, f"a clip of {c.stem}") for c in clips], tmp_path / "shards", maxcount=1)
    options = EncodeOptions(frames=9, stride=16, size=(32, 48))
    results = {}
    for name, source in (("csv", table), ("shards", tmp_path / "shards")):
        encode_dataset(decoder, source, tmp_path / name, options, RankContext())
        results[name] = LatentDataset(tmp_path / name)
    assert len(results["csv"]) == len(results["shards"]) == 4
    for a, b in zip(results["csv"], results["shards"]):
        # a CSV names its videos by their path as written there, shards by their key
        assert a["key"].endswith(b["key"]) and torch.equal(a["latents"], b["latents"])
        assert a["prompt"] == b["prompt"] == f"a clip of {b['key'].rsplit('-', 1)[0]}"


def test_posterior_samples_are_seeded_by_clip(decoder, tmp_path: Path) -> None:
    clip = bundled_clips()[0]
    runs = {}
    for name, posterior, seed in (("mode", "mode", 0), ("a", "sample", 0), ("b", "sample", 0), ("c", "sample", 1)):
        options = EncodeOptions(frames=5, stride=20, size=(32, 48), posterior=posterior, seed=seed)
        encode_dataset(decoder, clip.parent, tmp_path / name, options, RankContext())
        runs[name] = [s["latents"] for s in LatentDataset(tmp_path / name) if s["key"].startswith(clip.stem)]
    assert all(torch.equal(x, y) for x, y in zip(runs["a"], runs["b"]))  # same seed: same draw
    assert not torch.equal(runs["a"][0], runs["c"][0]) and not torch.equal(runs["a"][0], runs["mode"][0])
    assert not torch.equal(runs["a"][0], runs["a"][1])  # each clip draws its own noise


def test_encode_command_checks_its_settings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folders = save_random_model(tmp_path / "models")
    args = ["encode", str(bundled_clips()[0].parent), "--out", str(tmp_path / "o"), "--vae", str(folders["vae"])]
    assert main([*args, "--frames", "8", "--no-progress"]) == 1
    assert "1 + 4k" in capsys.readouterr().err  # the frame rule, one line
    assert main([*args, "--frames", "5", "--size", "30x48", "--no-progress"]) == 1
    assert "spatial factor 8" in capsys.readouterr().err
    assert not (tmp_path / "o" / "index.json").exists()


def test_python_api_reconstructs_a_dataset_and_resumes(tmp_path: Path) -> None:
    from refdecoder.inference import ReconstructOptions
    from refdecoder.inference.dataset_runs import reconstruct_dataset

    folders = save_random_model(tmp_path / "models")
    decoder = load_decoder(folders["vae"], folders["weights"], device="cpu")
    clips = bundled_clips()[:2]
    options = ReconstructOptions(size=(16, 16), max_frames=5)
    rows = reconstruct_dataset(decoder, clips, tmp_path / "out", options, ctx=RankContext(), quiet=True)
    assert [row["name"] for row in rows] == [c.stem for c in clips] and not any("error" in row for row in rows)
    with (tmp_path / "out" / "metrics.csv").open() as handle:
        assert [row["name"] for row in csv.DictReader(handle)] == [c.stem for c in clips]
    again = reconstruct_dataset(decoder, clips, tmp_path / "out", options, resume=True, quiet=True)
    assert again == []  # everything finished: nothing redone
    refused = reconstruct_dataset(decoder, clips[:1], tmp_path / "out", options, quiet=True)
    assert "error" in refused[0] and "another run" in refused[0]["error"]  # not resumed, not overwritten: refused


def test_latent_finetuning_reads_encoded_shards(decoder, tmp_path: Path) -> None:
    """The training recipe's latent steps run on a folder ``encode`` wrote (latents, reference frame, metadata)."""
    from refdecoder.training.config import DatasetConfig
    from refdecoder.training.data import ensure_sample_shards
    from tests.test_training_recipe import TINY, load_recipe, tiny_overrides

    videos = tmp_path / "train"
    ensure_sample_shards(DatasetConfig(kind="shards", path=str(videos), samples=["bigbuckbunny", "bikes"]))
    latents = tmp_path / "latents"  # the recipe's tiny VAE: 4 channels, 8x spatial, 16x16 clips
    encode_dataset(decoder, videos, latents, EncodeOptions(frames=5, stride=20, size=(16, 16)), RankContext())
    run_dir = tmp_path / "run"
    overrides = ["latent_finetune.enabled=true", f"latent_finetune.path={latents}", "stages=[{steps: 2, frames: 5}]"]
    assert load_recipe().main([TINY, *tiny_overrides(run_dir, videos, *overrides)]) == 0
    with (run_dir / "logs" / "csv" / "metrics.csv").open() as handle:
        losses = [float(r["latent/loss"]) for r in csv.DictReader(handle) if r.get("latent/loss")]
    assert len(losses) == 1 and losses[0] > 0  # step 2 was a latent step on the encoded clips
