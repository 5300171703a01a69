"""One output folder, several writers and a hostile environment: concurrent runs keep every row, a clip claimed by
another run is refused, a full disk leaves nothing behind and blocks no rerun, a read-only --out and a missing device
are found before any work, Ctrl-C ends on one line with exit 130, and --debug shows what is otherwise one line."""

from __future__ import annotations

import csv
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from refdecoder.cli import main
from refdecoder.data import bundled_clips, save_latents
from refdecoder.inference.outfolder import OutputFolder
from refdecoder.media import VideoWriter
from tests.helpers import tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vae") / "vae"
    tiny_wan().save_pretrained(folder)
    return folder


def _args(vae_dir: Path, out: Path, *inputs: Path | str, extra: tuple[str, ...] = ()) -> list[str]:
    base = ["reconstruct", *map(str, inputs), "--out", str(out), "--vae", str(vae_dir), "--no-progress"]
    return base + ["--frames", "5", "--size", "16x16", "--lpips", "off", *extra]


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "metrics.csv").open() as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def _leftovers(out: Path) -> list[str]:
    """Partial files and stages: anything a failed or interrupted clip might have left."""
    return sorted(p.name for p in out.rglob("*") if "partial" in p.name or p.name.startswith(".tmp"))


def _stderr_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _clips(folder: Path, prefix: str, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        shutil.copy(bundled_clips()[i % 3], folder / f"{prefix}{i}.mp4")
    return folder


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_two_concurrent_runs_into_one_folder_keep_every_row(vae_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    runs = [_clips(tmp_path / name, name, 3) for name in ("a", "b")]
    command = [sys.executable, "-m", "refdecoder"]
    procs = [
        subprocess.Popen([*command, *_args(vae_dir, out, run)], env=_env(), stderr=subprocess.PIPE, text=True)
        for run in runs
    ]
    codes = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [c for c, _ in codes] == [0, 0], codes
    rows = _rows(out)
    assert set(rows) == {f"{x}{i}" for x in "ab" for i in range(3)}
    assert all(float(row["psnr"]) > 0 for row in rows.values())
    assert all((out / f"{name}.mp4").is_file() and (out / ".clips" / f"{name}.json").is_file() for name in rows)
    assert _leftovers(out) == []


def test_a_clip_claimed_by_another_run_is_refused_or_waited_for(
    vae_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    clip, out = bundled_clips()[0], tmp_path / "out"
    with OutputFolder(out).claim(clip.stem):  # another run is writing it right now
        assert main(_args(vae_dir, out, clip)) == 1
    err = _stderr_line(capsys)
    assert "being written" in err and "--overwrite" in err
    assert not (out / f"{clip.stem}.mp4").exists() and not (out / ".clips" / f"{clip.stem}.json").exists()
    # With --overwrite the run waits for the other writer and then replaces its output.
    release = threading.Event()

    def other_run() -> None:
        with OutputFolder(out).claim(clip.stem):
            release.wait(timeout=30)

    holder = threading.Thread(target=other_run)
    holder.start()
    time.sleep(0.2)
    threading.Timer(1.0, release.set).start()
    started = time.monotonic()
    assert main(_args(vae_dir, out, clip, extra=("--overwrite",))) == 0
    holder.join()
    assert time.monotonic() - started >= 0.9 and float(_rows(out)[clip.stem]["psnr"]) > 0


def test_a_clip_finished_by_another_run_meanwhile_is_refused(vae_dir, tmp_path, monkeypatch, capsys) -> None:
    """The start-of-run check passed, but another run finished the clip before this run reached it."""
    import json

    clip, out = bundled_clips()[0], tmp_path / "out"
    original = OutputFolder.claim

    def finished_meanwhile(self, name, overwrite=False):
        self.clips.mkdir(parents=True, exist_ok=True)
        (self.clips / f"{name}.json").write_text(json.dumps({"name": name, "psnr": 30.0}))
        return original(self, name, overwrite)

    monkeypatch.setattr(OutputFolder, "claim", finished_meanwhile)
    assert main(_args(vae_dir, out, clip)) == 1
    assert "meanwhile" in _stderr_line(capsys) and _rows(out)[clip.stem]["psnr"] == "30"


@pytest.mark.parametrize("where", ["write", "close", "result"])
def test_a_full_disk_leaves_nothing_behind_and_does_not_block_the_rerun(
    vae_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    clips, out = bundled_clips()[:2], tmp_path / "out"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    calls = {"n": 0}

    def fail_on_the_second_clip(original):
        def patched(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > calls.setdefault("first", 0) and calls.get("armed"):
                raise full
            return original(*args, **kwargs)

        return patched

    if where == "result":
        from refdecoder.inference import outfolder

        monkeypatch.setattr(outfolder, "atomic_write_text", fail_on_the_second_clip(outfolder.atomic_write_text))
    else:
        monkeypatch.setattr(VideoWriter, where, fail_on_the_second_clip(getattr(VideoWriter, where)))
    calls["armed"] = True  # every call fails: the disk is full from the start
    extra = ("--compare-base",) if where == "close" else ()
    assert main(_args(vae_dir, out, *clips, extra=extra)) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert not list(out.glob("*.mp4")) and not list(out.glob("*.png")) and _leftovers(out) == []
    monkeypatch.undo()  # space freed: the rerun needs no --overwrite
    assert main(_args(vae_dir, out, *clips)) == 0
    rows = _rows(out)
    assert set(rows) == {c.stem for c in clips} and all(not row["error"] for row in rows.values())


def test_a_failed_overwrite_keeps_the_earlier_result(vae_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    clip, out = bundled_clips()[0], tmp_path / "out"
    assert main(_args(vae_dir, out, clip)) == 0
    before = (out / f"{clip.stem}.mp4").read_bytes(), _rows(out)[clip.stem]["psnr"]

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(VideoWriter, "close", no_space)
    assert main(_args(vae_dir, out, clip, extra=("--overwrite", "--size", "32x32"))) == 1
    assert (out / f"{clip.stem}.mp4").read_bytes() == before[0] and _rows(out)[clip.stem]["psnr"] == before[1]
    assert _leftovers(out) == []


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A read-only file system (chmod does not stop root): a tmpfs mounted ro; skipped where mount is refused."""
    folder = tmp_path / "ro"
    folder.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if done.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_an_unwritable_out_is_found_before_any_work(vae_dir, read_only_dir, tmp_path, monkeypatch, capsys) -> None:
    import refdecoder.inference

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(refdecoder.inference, "load_decoder", no_work)
    for out in (read_only_dir, read_only_dir / "new" / "deeper"):
        assert main(_args(vae_dir, out, bundled_clips()[0])) == 1
        assert "not writable" in _stderr_line(capsys)
    # Every command that writes: report --out, shards build --out, decode-latents --out.
    report_dir = tmp_path / "rep"
    report_dir.mkdir()
    shutil.copy(bundled_clips()[0], report_dir / "clip.mp4")
    save_latents(report_dir / "z.safetensors", torch.zeros(4, 2, 4, 6), height=32, width=48)
    commands = [
        ["report", str(report_dir), "--out", str(read_only_dir / "index.html")],
        ["shards", "build", "--input", str(report_dir), "--out", str(read_only_dir / "shards")],
        ["decode-latents", str(report_dir), "--out", str(read_only_dir), "--vae", str(vae_dir)],
    ]
    for command in commands:
        code = main(command)
        line = _stderr_line(capsys)
        assert code == 1 and ("not writable" in line or "Read-only file system" in line), (command, line)


@pytest.mark.parametrize("device", ["banana", "cuda:97", "cuda", "mps"])
def test_devices_are_checked_at_start(vae_dir, tmp_path, device, monkeypatch, capsys) -> None:
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    import refdecoder.inference

    monkeypatch.setattr(refdecoder.inference, "load_decoder", lambda *a, **k: pytest.fail("loaded before the check"))
    out = tmp_path / "out"
    assert main(_args(vae_dir, out, bundled_clips()[0], extra=("--device", device))) == 1
    assert "--device" in _stderr_line(capsys) and not out.exists()
    latents = tmp_path / "latents"
    latents.mkdir()
    (latents / "x.safetensors").write_bytes(b"")
    assert main(["decode-latents", str(latents), "--out", str(out), "--vae", str(vae_dir), "--device", device]) == 1
    assert "--device" in _stderr_line(capsys)


def test_debug_shows_the_traceback(vae_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    args = _args(vae_dir, tmp_path / "out", bundled_clips()[0], extra=("--device", "banana"))
    monkeypatch.delenv("REFDECODER_DEBUG", raising=False)
    assert main(args) == 1 and "Traceback" not in capsys.readouterr().err
    assert main(["--debug", *args]) == 1 and "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("REFDECODER_DEBUG", "1")
    assert main(args) == 1 and "Traceback" in capsys.readouterr().err


def test_ctrl_c_ends_on_one_line_with_exit_130(vae_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Interrupted in the middle of the second clip: the first stays, the second leaves nothing behind."""
    from refdecoder.inference import reconstruct

    clips, out = bundled_clips()[:3], tmp_path / "out"
    original, seen = reconstruct._written_psnr, []

    def interrupt_the_second(*args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(reconstruct, "_written_psnr", interrupt_the_second)
    assert main(_args(vae_dir, out, *clips)) == 130
    line = _stderr_line(capsys)
    assert line.startswith("interrupted:") and "1 of 3 videos finished" in line and "2 not done" in line
    assert set(_rows(out)) == {clips[0].stem} and not (out / f"{clips[1].stem}.mp4").exists()
    assert _leftovers(out) == []
    monkeypatch.undo()
    assert main(_args(vae_dir, out, *clips)) == 1  # the first is refused without --overwrite: it is done
    assert main(_args(vae_dir, out, *clips[1:])) == 0 and len(_rows(out)) == 3


def test_a_real_sigint_ends_on_one_line_with_exit_130(vae_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    inputs = _clips(tmp_path / "in", "c", 6)
    proc = subprocess.Popen(
        [sys.executable, "-m", "refdecoder", *_args(vae_dir, out, inputs)],
        env=_env(),
        # As in a terminal: a test run started in the background (`cmd &`, as CI scripts do) ignores SIGINT, the run
        # would inherit that, finish, and the check would not run.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.csv").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1].strip()
    assert proc.returncode != 0, "the run finished despite the signal: was SIGINT ignored, or did it end first?"
    lines = [line for line in err.splitlines() if not line.startswith(("INFO ", "WARNING "))]  # the log
    assert proc.returncode == 130 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("interrupted:") and "videos finished" in lines[0], err
    assert _leftovers(out) == [] and len(_rows(out)) >= 1
