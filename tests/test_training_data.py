"""Data plumbing of the recipe: per-step sample layout across ranks, resumable streams, sample shards."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

from refdecoder.errors import ConfigError, DataError
from refdecoder.training.config import DatasetConfig
from refdecoder.training.data import BatchStream, StepSampler, StreamPosition, ensure_sample_shards, take_samples


def _layout(world: int, accum: int, batch: int, length: int = 24, epoch: int = 0) -> dict[tuple[int, int], list[int]]:
    """(step, slot in the global batch) -> sample indices, from every rank's sampler."""
    out = {}
    for rank in range(world):
        indices = list(StepSampler(length, batch, accum, rank, world, seed=3, epoch=epoch))
        for micro in range(len(indices) // batch):
            step, m = divmod(micro, accum)
            out[(step, rank * accum + m)] = indices[micro * batch : (micro + 1) * batch]
    return out


def test_global_batch_is_the_same_for_ranks_and_accumulation():
    ddp = _layout(world=2, accum=1, batch=1)
    accumulated = _layout(world=1, accum=2, batch=1)
    assert ddp == accumulated
    # and every step's global batch is a consecutive slice of one permutation of the epoch
    single = list(StepSampler(24, 2, 1, 0, 1, seed=3))
    assert [ddp[(s, 0)] + ddp[(s, 1)] for s in range(12)] == [single[2 * s : 2 * s + 2] for s in range(12)]
    assert sorted(single) == list(range(24))


def test_sampler_epochs_start_offset_and_drop_last():
    first = list(StepSampler(10, 3, seed=1, epoch=0))
    assert len(first) == 9 and len(set(first)) == 9  # the partial last global batch is dropped
    assert first != list(StepSampler(10, 3, seed=1, epoch=1))  # a new permutation every epoch
    assert list(StepSampler(10, 3, seed=1, epoch=0, start=2)) == first[6:]
    assert len(StepSampler(10, 3, seed=1, start=2)) == 3
    assert list(StepSampler(5, 2, shuffle=False)) == [0, 1, 2, 3]
    with pytest.raises(DataError, match="fewer than one global batch"):
        StepSampler(3, 2, accum=1, world=2)


class _Numbers(Dataset):
    """Sample i of epoch e is ``{"video": tensor([e, i]), "skipped": 0}``."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"video": torch.tensor([self.epoch, i]), "skipped": 0}


class _Stream(IterableDataset):
    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.epoch)
        for i in torch.randperm(self.n, generator=g).tolist():
            yield {"video": torch.tensor([self.epoch, i]), "skipped": 0}


@pytest.mark.parametrize("dataset", [_Numbers(7), _Stream(7)], ids=["map-style", "iterable"])
def test_stream_resumes_exactly_across_epochs(dataset):
    straight = BatchStream(dataset, batch_size=2, seed=5)
    reference = [next(straight)["video"].tolist() for _ in range(10)]  # 3 batches per epoch: crosses epochs

    first = BatchStream(dataset, batch_size=2, seed=5)
    head = [next(first)["video"].tolist() for _ in range(4)]
    saved = first.state()
    assert saved == {"epoch": 1, "consumed": 1}
    resumed = BatchStream(dataset, batch_size=2, seed=5, position=StreamPosition(**saved))
    tail = [next(resumed)["video"].tolist() for _ in range(6)]
    assert head + tail == reference
    assert {tuple(v[0] for v in batch) for batch in reference} == {(0, 0), (1, 1), (2, 2), (3, 3)}


def test_stream_with_too_little_data_fails_clearly():
    with pytest.raises(DataError, match="no batch"):
        next(BatchStream(_Stream(1), batch_size=2))


def test_take_samples_collates_the_first_samples():
    batch = take_samples(_Numbers(5), 3)
    assert batch["video"].tolist() == [[0, 0], [0, 1], [0, 2]]


def test_sample_shards_are_built_once(tmp_path):
    out = tmp_path / "shards"
    cfg = DatasetConfig(kind="shards", path=str(out), samples=["carphone", "bikes"])
    assert ensure_sample_shards(cfg) == out
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert len(tars) == 2  # one clip per shard, so ranks and workers can split them
    assert ensure_sample_shards(cfg) is None  # present: left alone
    with pytest.raises(ConfigError, match="unknown sample clips"):
        ensure_sample_shards(DatasetConfig(kind="shards", path=str(tmp_path / "x"), samples=["nope"]))


def test_recipe_datasets_move_the_camera_and_take_a_far_reference(tmp_path):
    from refdecoder.data import CameraMotion
    from refdecoder.frames import CAUSAL_1_PLUS_4K
    from refdecoder.training.config import load_config
    from refdecoder.training.data import build_clip_dataset

    out = tmp_path / "shards"
    ensure_sample_shards(DatasetConfig(kind="shards", path=str(out), samples=["bikes"]))
    config = tmp_path / "c.yaml"
    config.write_text(
        f"data:\n  train: {{kind: shards, path: {out}, reference: far, reference_distance: 3,\n"
        "    motion: {pan: 0.3, zoom: 0.1, rotation: 2.0}}\n"
    )
    cfg = load_config(config).data.train
    assert cfg.motion == CameraMotion(pan=0.3, zoom=0.1, rotation=2.0)
    sample = next(iter(build_clip_dataset(cfg, 5, (32, 32), CAUSAL_1_PLUS_4K, seed=0)))
    assert sample["video"].shape == (3, 5, 32, 32) and sample["reference"].shape == (3, 1, 32, 32)
    assert sample["reference_index"] == -1
    # The loss decodes with that outside frame, not a clip frame.
    from refdecoder.training.steps import video_loss

    class Recorder(torch.nn.Module):
        def forward(self, video, reference_index=None, generator=None, reference=None):
            self.reference, self.reference_index = reference, reference_index
            return type("Out", (), {"sample": video})()

    model = Recorder()
    batch = {"video": sample["video"][None], "reference": sample["reference"][None], "reference_index": [-1]}
    video_loss(model, batch, lambda a, b: {"loss": (a - b).abs().mean()}, torch.Generator())
    assert torch.equal(model.reference, batch["reference"]) and model.reference_index is None
    with pytest.raises(ConfigError, match="data.val.reference"):
        config.write_text(f"data:\n  train: {{path: {out}}}\n  val: {{path: {out}, reference: far}}\n")
        load_config(config)
