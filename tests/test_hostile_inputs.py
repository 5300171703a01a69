"""Every command against a folder of broken, careless and hostile inputs.

For each case: the exit code is the documented one (1 error, 2 usage), stderr holds one line (the command's
error; argparse's usage errors end in theirs), no "Traceback" anywhere, nothing is written outside the case's
output folder (the whole tree of inputs is snapshotted before and compared after), and nothing is lost (a good
input next to broken ones is still done, files named in hostile inputs are never read into outputs).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from refdecoder.cli import build_parser, main
from refdecoder.data import bundled_clips, save_latents, write_image
from tests.helpers import save_random_model

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Case:
    """One command line (``{root}``, ``{out}``, ``{vae}``, ``{weights}`` filled in), what it must end with, and
    an optional check of the output folder."""

    argv: str
    code: int
    says: str  # a piece of the error line (stderr), or of stdout for a listing such as `shards inspect`
    check: Callable[[Path, Path], None] | None = None
    lines: int = 1  # error lines expected (one per broken file when several are in one run)
    stdout: bool = field(default=False)


def _good_row_kept(out: Path, root: Path) -> None:
    assert (out / "good.mp4").is_file()
    assert "good" in (out / "metrics.csv").read_text()


def _only_good_decoded(out: Path, root: Path) -> None:
    assert {p.name.split(".")[0] for p in out.glob("*.mp4")} == {"good"} and (out / "good.mp4").is_file()


def _nothing_decoded(out: Path, root: Path) -> None:
    assert not list(out.glob("*.mp4")) and not (out / "index.html").exists()


_ENCODE = "--vae {vae} --frames 5 --stride 10 --size 32x48 --no-progress"


def _encoded(out: Path, clips: int) -> None:
    """The good video's clips are in the latent shards (25 frames: clips at frames 0, 10 and 20)."""
    assert json.loads((out / "index.json").read_text())["samples"] == clips


CASES = {
    # reconstruct: broken videos next to a good one, broken weights, hostile ids and devices
    "reconstruct-broken-videos": Case(
        "reconstruct {root}/in/good.mp4 {root}/in/garbage.mp4 --out {out}", 1, "garbage.mp4", _good_row_kept
    ),
    "reconstruct-empty-video": Case("reconstruct {root}/in/empty.mp4 --out {out}", 1, "empty.mp4"),
    "reconstruct-missing": Case("reconstruct {root}/in/absent.mp4 --out {out}", 1, "not found"),
    "reconstruct-empty-folder": Case("reconstruct {root}/empty_dir --out {out}", 1, "no video files"),
    "reconstruct-list-of-missing": Case("reconstruct {root}/in/list.txt --out {out}", 1, "not found", lines=2),
    "reconstruct-nan-weights": Case(
        "reconstruct {root}/in/good.mp4 --out {out} --weights {root}/nan_weights", 1, "NaN or inf"
    ),
    "reconstruct-list-config": Case(
        "reconstruct {root}/in/good.mp4 --out {out} --weights {root}/list_config", 1, "JSON object"
    ),
    "reconstruct-typed-config": Case(
        "reconstruct {root}/in/good.mp4 --out {out} --weights {root}/string_depth", 1, "transformer.depth"
    ),
    "reconstruct-hub-escape": Case(
        "reconstruct {root}/in/good.mp4 --out {out} --weights org/name/../../../../outside", 1, "refused"
    ),
    "reconstruct-hub-revision-escape": Case(
        "reconstruct {root}/in/good.mp4 --out {out} --vae org/name@../x", 1, "refused"
    ),
    "reconstruct-device": Case("reconstruct {root}/in/good.mp4 --out {out} --device banana", 1, "--device"),
    "reconstruct-out-is-a-file": Case("reconstruct {root}/in/good.mp4 --out {root}/in/good.mp4", 1, "existing file"),
    "reconstruct-bad-metrics": Case("reconstruct {root}/in/good.mp4 --out {root}/bad_metrics_out", 1, "metrics"),
    "reconstruct-bad-reference": Case(
        "reconstruct {root}/in/good.mp4 --out {out} --reference {root}/in/garbage.mp4", 1, "garbage.mp4"
    ),
    "reconstruct-window-usage": Case("reconstruct {root}/in/good.mp4 --out {out} --window 1.5", 2, "--window"),
    # decode-latents: NaN, huge, unreadable, escaping the folder; each alone, and all next to a good one
    "decode-nan": Case("decode-latents {root}/lat_nan --out {out}", 1, "NaN", _nothing_decoded),
    "decode-huge": Case("decode-latents {root}/lat_huge --out {out}", 1, "scale", _nothing_decoded),
    "decode-garbage": Case("decode-latents {root}/lat_garbage --out {out}", 1, "cannot read", _nothing_decoded),
    "decode-escape": Case("decode-latents {root}/lat_escape --out {out}", 1, "refused", _nothing_decoded),
    "decode-mixed": Case(
        "decode-latents {root}/lat_mixed --out {out} --compare-base", 1, "", _only_good_decoded, lines=4
    ),
    "decode-empty": Case("decode-latents {root}/empty_dir --out {out}", 1, "no .safetensors"),
    # analyze-latents
    "analyze-nan": Case("analyze-latents {root}/lat_nan/x.safetensors --out {out}", 1, "NaN"),
    "analyze-garbage": Case("analyze-latents {root}/lat_garbage/x.safetensors --out {out}", 1, "cannot read"),
    "analyze-missing": Case("analyze-latents {root}/absent.safetensors --out {out}", 1, "absent"),
    # convert
    "convert-garbage": Case("convert {root}/garbage.ckpt --out {out}", 1, "garbage.ckpt"),
    "convert-missing": Case("convert {root}/absent.ckpt --out {out}", 1, "absent.ckpt"),
    # report
    "report-bad-metrics": Case("report {root}/bad_metrics_out --out {out}/r.html", 1, "metrics.csv"),
    "report-escaping-name": Case("report {root}/escaping_metrics --out {out}/r.html", 1, "plain file name"),
    "report-missing-run": Case("report {root}/bad_metrics_out --run {root}/absent_run --out {out}/r.html", 1, "--run"),
    "report-missing-folder": Case("report {root}/absent_dir --out {out}/r.html", 1, "does not exist"),
    "report-out-is-a-folder": Case("report {root}/in --out {root}/in", 1, "is a folder"),
    # encode: broken videos next to a good one, a damaged shard, settings off the VAE's rules
    "encode-broken-videos": Case(
        f"encode {{root}}/in --out {{out}} {_ENCODE}", 1, "", lambda out, root: _encoded(out, 3), lines=2
    ),
    "encode-damaged-shard": Case(f"encode {{root}}/shards/bad.tar --out {{out}} {_ENCODE}", 1, "bad.tar"),
    "encode-missing": Case(f"encode {{root}}/absent_dir --out {{out}} {_ENCODE}", 1, "does not exist"),
    "encode-frame-rule": Case(f"encode {{root}}/in --out {{out}} {_ENCODE} --frames 8", 1, "1 + 4k"),
    "encode-out-is-a-file": Case(f"encode {{root}}/in --out {{root}}/in/good.mp4 {_ENCODE}", 1, "existing file"),
    "encode-device": Case(f"encode {{root}}/in --out {{out}} {_ENCODE} --device banana", 1, "--device"),
    # shards
    "shards-inspect-damaged": Case("shards inspect {root}/shards/bad.tar", 1, "DAMAGED", stdout=True),
    "shards-inspect-missing": Case("shards inspect {root}/absent.tar", 1, "unreadable", stdout=True),
    "shards-build-missing": Case("shards build --input {root}/absent_dir --out {out}", 1, "absent_dir"),
    "shards-build-out-is-a-file": Case("shards build --input {root}/in --out {root}/in/good.mp4", 1, "existing file"),
    "shards-samples-out-is-a-file": Case("shards samples --out {root}/in/good.mp4", 1, "existing file"),
    "shards-make-clips-out-is-a-file": Case("shards make-clips --out {root}/in/good.mp4", 1, "existing file"),
}


def test_every_command_is_covered() -> None:
    """A new command joins this module: every sub-command (and shards action) has a case here."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    covered = {" ".join(case.argv.split()[:2]) for case in CASES.values()} | {
        c.argv.split()[0] for c in CASES.values()
    }
    missing = [name for name in commands if name not in covered]
    shards = next(a for a in commands["shards"]._actions if a.dest == "shards_action").choices
    missing += [f"shards {action}" for action in shards if f"shards {action}" not in covered]
    assert not missing, f"no hostile case for {missing}"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    save_random_model(root / "models")
    _broken_weights(root)
    _videos(root)
    _latents(root)
    _reports(root)
    _shards(root)
    (root / "empty_dir").mkdir()
    (root / "garbage.ckpt").write_bytes(os.urandom(4096))
    (root / "outs").mkdir()
    return root


def _broken_weights(root: Path) -> None:
    weights = root / "models" / "weights"
    for name in ("nan_weights", "list_config", "string_depth"):
        shutil.copytree(weights, root / name)
    state = load_file(root / "nan_weights" / "refdecoder.safetensors")
    key = sorted(state)[0]
    state[key].view(-1)[-1] = float("nan")
    save_file(state, str(root / "nan_weights" / "refdecoder.safetensors"))
    (root / "list_config" / "refdecoder_config.json").write_text("[1, 2, 3]")
    config = json.loads((weights / "refdecoder_config.json").read_text())
    config["transformer"]["depth"] = "two"
    (root / "string_depth" / "refdecoder_config.json").write_text(json.dumps(config))


def _videos(root: Path) -> None:
    folder = root / "in"
    folder.mkdir()
    shutil.copy(bundled_clips()[0], folder / "good.mp4")
    (folder / "garbage.mp4").write_bytes(os.urandom(3000))
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "list.txt").write_text("absent1.mp4\n# a comment\n../nowhere/absent2.mp4\n")


def _latents(root: Path) -> None:
    secret = root / "secret"
    secret.mkdir()
    write_image(secret / "secret.png", torch.rand(3, 32, 48) * 2 - 1)
    image = torch.rand(3, 32, 48) * 2 - 1
    good = torch.randn(4, 2, 4, 6)
    files = {
        "nan": good.clone().index_fill_(1, torch.tensor([1]), float("nan")),
        "huge": good * 1e30,
        "escape": good,
    }
    for name in ("nan", "huge", "escape", "garbage", "mixed"):
        (root / f"lat_{name}").mkdir()
    for name, latents in files.items():
        folder = root / f"lat_{name}"
        if name != "escape":
            write_image(folder / "x.png", image)
        reference = (folder / ".." / "secret" / "secret.png") if name == "escape" else None
        save_latents(folder / "x.safetensors", latents, reference, height=32, width=48, normalized=False)
        shutil.copy(folder / "x.safetensors", root / "lat_mixed" / f"{name}.safetensors")
        if name != "escape":
            shutil.copy(folder / "x.png", root / "lat_mixed" / f"{name}.png")
    (root / "lat_garbage" / "x.safetensors").write_bytes(os.urandom(2000))
    shutil.copy(root / "lat_garbage" / "x.safetensors", root / "lat_mixed" / "garbage.safetensors")
    save_latents(root / "lat_mixed" / "good.safetensors", good, height=32, width=48, normalized=False)
    write_image(root / "lat_mixed" / "good.png", image)


def _reports(root: Path) -> None:
    bad = root / "bad_metrics_out"
    bad.mkdir()
    shutil.copy(bundled_clips()[0], bad / "clip.mp4")
    (bad / "metrics.csv").write_text("name,psnr\nclip,31.2,surplus\n")
    escaping = root / "escaping_metrics"
    escaping.mkdir()
    shutil.copy(bundled_clips()[0], root / "secret" / "clip.mp4")
    (escaping / "metrics.csv").write_text("name,psnr\n../secret/clip,31.2\n")


def _shards(root: Path) -> None:
    import tarfile

    assert main(["shards", "samples", "--out", str(root / "shards")]) == 0
    first = root / "shards" / "000000.tar"
    with tarfile.open(first) as tar:
        second_header = tar.getmembers()[1].offset
    data = bytearray(first.read_bytes())
    data[second_header : second_header + 100] = b"\xff" * 100
    (root / "shards" / "bad.tar").write_bytes(bytes(data))


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and skip not in p.parents
    }


def _error_lines(text: str) -> list[str]:
    """stderr without progress bars (tqdm redraws) and log records of the library (INFO/WARNING)."""
    lines = [line.split("\r")[-1] for line in text.splitlines()]
    return [line for line in lines if line.strip() and "%|" not in line and not line.startswith(("INFO", "WARN"))]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input(root: Path, name: str, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    case = CASES[name]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "outs" / "no-hub-cache"))
    monkeypatch.delenv("REFDECODER_DEBUG", raising=False)
    out = root / "outs" / name
    models = {"vae": root / "models" / "vae", "weights": root / "models" / "weights"}
    argv = case.argv.format(root=root, out=out, **models).split()
    if argv[0] in ("reconstruct", "decode-latents"):
        argv += ["--no-progress"] + ([] if "--vae" in argv else ["--vae", str(models["vae"])])
        if "--weights" not in argv and argv[0] == "decode-latents":
            argv += ["--weights", str(models["weights"])]
        argv += ["--lpips", "off"] if argv[0] == "reconstruct" else []
    out.mkdir(parents=True)  # as a user's existing folder: what a command writes there is checked below
    before = _snapshot(root, out)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert code == case.code, (argv, captured.err)
    errors = _error_lines(captured.err)
    if case.stdout:
        assert case.says in captured.out and not errors, (captured.out, errors)
    elif case.code == 2:
        assert errors[-1].startswith("refdecoder") and case.says in errors[-1], errors
    else:
        assert len(errors) == case.lines and all(line.startswith("error:") for line in errors), errors
        assert case.says in errors[0] if case.lines == 1 else True, errors
    after = _snapshot(root, out)
    assert after == before, f"written outside {out}: {sorted(set(after.items()) ^ set(before.items()))[:5]}"
    if case.check is not None:
        case.check(out, root)
    leftovers = [p for p in out.rglob("*") if "partial" in p.name or p.name.startswith(".tmp")] if out.exists() else []
    assert not leftovers, leftovers


def test_nothing_named_by_a_hostile_input_reaches_an_output(root: Path) -> None:
    """The clip outside every input folder, named by an escaping metrics.csv, is never embedded in an output
    (raw or base64, as the HTML report embeds videos), whatever ran before."""
    import base64

    if not (root / "outs" / "report-escaping-name").parent.exists():
        pytest.skip("run with the hostile cases")
    secret = (root / "secret" / "clip.mp4").read_bytes()[:3000]
    encoded = base64.b64encode(secret)
    for path in (p for p in (root / "outs").rglob("*") if p.is_file()):
        data = path.read_bytes()
        assert secret not in data and encoded not in data, path
