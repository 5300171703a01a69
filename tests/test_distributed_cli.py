"""``encode``, ``reconstruct`` and ``decode-latents`` under ``torchrun --nproc-per-node 2`` (CPU, gloo) write what one
process writes, bit for bit, and a run whose rank 1 dies half-way ends identical after a rerun.

Both sides use one intra-op thread (the same kernels, so the same floats) and encode the mp4s with the same x264
settings, so videos compare as bytes. ``metrics.csv`` compares on every cell but ``output`` (the folder differs) and
``seconds`` (timing).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refdecoder.cli import main
from refdecoder.data import bundled_clips, save_latents, write_image
from refdecoder.data.latent_shards import index_latent_shards, read_latent_sample
from tests.conftest import PROJECT_ROOT
from tests.helpers import save_random_model

pytestmark = pytest.mark.usefixtures("one_thread")

WORKER = PROJECT_ROOT / "tests" / "distributed_worker.py"
COMMANDS = ("encode", "reconstruct", "decode-latents")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny VAE + RefDecoder weights, 6 videos (the bundled clips twice) and 6 latents files with references."""
    root = tmp_path_factory.mktemp("distributed")
    found = save_random_model(root / "models")
    for copy in ("a", "b"):
        for clip in bundled_clips():
            (root / "videos" / copy).mkdir(parents=True, exist_ok=True)
            shutil.copy(clip, root / "videos" / copy / clip.name)
    generator = torch.Generator().manual_seed(0)
    (root / "refs").mkdir()
    for i in range(6):
        latents = torch.randn(4, 2 + i % 2, 4, 6, generator=generator)
        write_image(root / "refs" / f"gen{i}.png", torch.rand(3, 32, 48, generator=generator) * 2 - 1)
        save_latents(root / "latents" / f"gen{i}.safetensors", latents, height=32, width=48, normalized=False)
    return {**found, "videos": root / "videos", "latents": root / "latents", "refs": root / "refs"}


def command(data: dict[str, Path], name: str, out: Path, *extra: str) -> list[str]:
    model = ["--out", str(out), "--vae", str(data["vae"]), "--no-progress", *extra]
    if name == "encode":
        return ["encode", str(data["videos"]), *model, "--frames", "9", "--stride", "8", "--size", "32x48",
                "--maxcount", "2"]  # fmt: skip
    model += ["--weights", str(data["weights"])]
    if name == "reconstruct":
        return ["reconstruct", str(data["videos"]), *model, "--frames", "9", "--size", "32x48", "--lpips", "off"]
    return ["decode-latents", str(data["latents"]), "--reference-dir", str(data["refs"]), *model]


def torchrun(commands: list[list[str]], exit_after: str | None = None) -> subprocess.CompletedProcess:
    """One ``torchrun --nproc-per-node 2`` launch of ``commands`` (tests/distributed_worker.py)."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("REFDECODER_TEST_EXIT_AFTER", None)
    if exit_after:
        env["REFDECODER_TEST_EXIT_AFTER"] = exit_after
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    return subprocess.run(
        [*launcher, str(WORKER), json.dumps(commands)], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def single(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each command run by one process (in this process), the reference for the distributed runs."""
    root = tmp_path_factory.mktemp("single")
    for name in COMMANDS:
        assert main(command(data, name, root / name)) == 0
    return {name: root / name for name in COMMANDS}


def latent_samples(folder: Path) -> dict[str, tuple[torch.Tensor, dict[str, str], bytes]]:
    return {m.key: read_latent_sample(m) for m in index_latent_shards(folder)}


def metrics(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len({row["name"] for row in rows}) == len(rows), "one row per clip"
    return {row["name"]: {k: v for k, v in row.items() if k not in ("output", "seconds")} for row in rows}


def videos(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.mp4"))}


def assert_same(name: str, got: Path, want: Path) -> None:
    """``got`` holds the same outputs as ``want``, bit for bit."""
    if name == "encode":
        mine, theirs = latent_samples(got), latent_samples(want)
        assert sorted(mine) == sorted(theirs) and len(theirs) == 18  # 6 videos x 3 clips of 9 frames, stride 8
        for key, (latents, meta, reference) in theirs.items():
            assert torch.equal(mine[key][0], latents) and mine[key][1] == meta and mine[key][2] == reference, key
        assert json.loads((got / "index.json").read_text())["samples"] == 18
        assert not list(got.glob(".*.partial")), "interrupted shards are cleaned up"
        return
    assert videos(got) == videos(want) and len(videos(want)) == 6
    if name == "reconstruct":
        assert metrics(got) == metrics(want) and len(metrics(want)) == 6
    results = sorted(p.name for p in (got / ".clips").glob("*.json"))
    assert results == sorted(p.name for p in (want / ".clips").glob("*.json")) and len(results) == 6


def test_two_processes_write_what_one_writes(data: dict[str, Path], single: dict[str, Path], tmp_path: Path) -> None:
    proc = torchrun([command(data, name, tmp_path / name) for name in COMMANDS])
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in COMMANDS:
        assert_same(name, tmp_path / name, single[name])
    # each rank wrote its own shards, and both shares were used
    assert {p.name[:12] for p in (tmp_path / "encode").glob("latents-r*.tar")} == {"latents-r000", "latents-r001"}
    # rank 0 speaks for the run; rank 1 is quiet
    assert "wrote" in proc.stdout and "encoded" in proc.stdout and proc.stdout.count("decoded 6 of 6") == 1


def test_accelerate_launch_writes_what_one_process_writes(
    data: dict[str, Path], single: dict[str, Path], tmp_path: Path
) -> None:
    """`accelerate launch --multi_gpu` (torchrun's launcher underneath) starts the ranks; on CPU they use gloo."""
    pytest.importorskip("accelerate")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port), "-m", "refdecoder"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "reconstruct"
    argv = [arg for arg in command(data, "reconstruct", out) if arg != "--no-progress"]  # progress names the rank
    proc = subprocess.run(
        [*launcher, *argv, "--all-ranks"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    # rank 0 saw a world of 2 and did its share (3 of the 6 clips); the outputs below are complete
    assert "rank 0/2: 3/3 clips" in proc.stdout + proc.stderr, "two ranks shared the clips"
    assert_same("reconstruct", out, single["reconstruct"])


def test_the_checker_sees_a_difference(data: dict[str, Path], single: dict[str, Path], tmp_path: Path) -> None:
    """The comparisons above object to outputs that differ (one changed clip, one lost row)."""
    for name in ("reconstruct", "decode-latents"):
        broken = shutil.copytree(single[name], tmp_path / name)
        mp4 = sorted(broken.glob("*.mp4"))[0]
        mp4.write_bytes(mp4.read_bytes()[:-1] + b"\0")
        with pytest.raises(AssertionError):
            assert_same(name, broken, single[name])
    table = tmp_path / "reconstruct" / "metrics.csv"
    table.write_text("".join(table.read_text().splitlines(keepends=True)[:-1]))
    shutil.copy(single["reconstruct"] / sorted(p.name for p in single["reconstruct"].glob("*.mp4"))[0],
                sorted((tmp_path / "reconstruct").glob("*.mp4"))[0])  # fmt: skip
    with pytest.raises(AssertionError):
        assert_same("reconstruct", tmp_path / "reconstruct", single["reconstruct"])
    encoded = shutil.copytree(single["encode"], tmp_path / "encode")
    next(encoded.glob("*.meta.jsonl")).unlink()  # a shard without its marker does not count
    (encoded / "index.json").unlink()
    from refdecoder.data.latent_shards import write_index

    write_index(encoded, {})
    with pytest.raises(AssertionError):
        assert_same("encode", encoded, single["encode"])


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_killed_rank_then_rerun_ends_identical(
    data: dict[str, Path], single: dict[str, Path], tmp_path: Path, name: str
) -> None:
    out = tmp_path / name
    # rank 1 dies (exit 17, no clean-up) after its first clip or file (encode: after 3 clips, one shard of 2 done)
    killed = torchrun([command(data, name, out)], exit_after="1:3" if name == "encode" else "1:1")
    assert killed.returncode != 0
    finished = _finished(name, out)
    assert finished, "rank 1 finished something before it died"
    if name == "encode":
        assert list(out.glob(".latents-r001-*.partial")), "rank 1 died inside a shard"
        assert sum(len(p.read_text().splitlines()) for p in out.glob("*.meta.jsonl")) < 18
    else:
        assert len(finished) < 6, "the kill stopped the run before the end"
    before = {path: path.stat().st_mtime_ns for path in finished}
    rerun = command(data, name, out) + ([] if name == "encode" else ["--resume"])
    proc = torchrun([rerun])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same(name, out, single[name])
    # what was finished before the kill was kept, not redone
    assert {path: path.stat().st_mtime_ns for path in finished} == before


def _finished(name: str, out: Path) -> list[Path]:
    if name == "encode":
        return sorted(out.glob("latents-r*.meta.jsonl")) + sorted(out.glob("latents-r*.tar"))
    done = [p for p in (out / ".clips").glob("*.json") if "error" not in json.loads(p.read_text())]
    return sorted(out / f"{p.stem}.mp4" for p in done)
