"""Hugging Face repo ids where a path is expected, offline, against a hand-built cache in the Hub's layout
(``models--org--name/refs/<revision>`` holding a commit hash, ``snapshots/<hash>/...`` holding the files)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import refdecoder
from refdecoder.cli import main
from refdecoder.data import bundled_clips
from refdecoder.errors import CheckpointError
from refdecoder.hub import HubSpec, parse_hub_spec
from tests.helpers import randomize_, tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")

MAIN, TAGGED = "a" * 40, "b" * 40


def _snapshot(cache: Path, repo: str, commit: str, refs: list[str]) -> Path:
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hub cache with ``org/tiny`` (main: VAE in vae/, weights at the top; tag v1: other weights)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    main_snapshot = _snapshot(cache, "org/tiny", MAIN, ["main"])
    vae = tiny_wan()
    vae.save_pretrained(main_snapshot / "vae")
    model = refdecoder.wrap(vae, "tiny")
    randomize_(model.projectors, scale=0.1, seed=1)
    model.save_pretrained(main_snapshot)
    randomize_(model.projectors, scale=0.1, seed=2)
    model.save_pretrained(_snapshot(cache, "org/tiny", TAGGED, ["v1"]) / "weights")
    model.unwrap()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # for subprocesses
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("org/name", HubSpec("org/name")),
        ("org/name@v1.0", HubSpec("org/name", "v1.0")),
        ("org/name/vae", HubSpec("org/name", None, "vae")),
        (
            "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers@main/vae",
            HubSpec("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "main", "vae"),
        ),
        ("./org/name", None),
        ("/abs/path", None),
        ("justaname", None),
    ],
)
def test_parse_hub_spec(text, spec) -> None:
    assert parse_hub_spec(text) == spec


def test_load_reads_weights_from_the_cache_with_revision_and_subfolder(hub: Path) -> None:
    from refdecoder.inference import load_vae

    vae = load_vae("org/tiny/vae")
    assert torch.equal(vae.decoder.conv_in.weight, tiny_wan().decoder.conv_in.weight)
    main_weights = refdecoder.load(vae, "org/tiny").refdecoder_state_dict()
    vae = load_vae("org/tiny", subfolder="vae")
    tagged = refdecoder.load(vae, "org/tiny", revision="v1", subfolder="weights").refdecoder_state_dict()
    key = "projectors.stage0.out.weight"
    assert not torch.equal(main_weights[key], tagged[key])  # two revisions, two sets of weights
    vae = load_vae("org/tiny@main/vae")
    same = refdecoder.load(vae, "org/tiny@v1/weights").refdecoder_state_dict()
    assert torch.equal(same[key], tagged[key])


def test_load_official_reads_a_checkpoint_file_from_the_cache(hub: Path) -> None:
    from refdecoder.convert import read_checkpoint

    snapshot = _snapshot(hub, "org/official", MAIN, ["main"])
    torch.save({"state_dict": {"ae.decoder.ref_conv_in.proj.weight": torch.ones(2)}}, snapshot / "wan2.1_ref.pt")
    for spec in ("org/official", "org/official/wan2.1_ref.pt"):
        assert torch.equal(read_checkpoint(spec)["ae.decoder.ref_conv_in.proj.weight"], torch.ones(2))


def test_cli_takes_hub_ids_for_vae_and_weights(hub: Path, tmp_path: Path) -> None:
    clip = str(bundled_clips()[0])
    out = tmp_path / "out"
    args = ["--vae", "org/tiny/vae", "--weights", "org/tiny@v1/weights", "--frames", "5", "--no-progress"]
    assert main(["reconstruct", clip, "--out", str(out), *args]) == 0
    assert (out / f"{Path(clip).stem}.mp4").is_file()


def test_offline_with_nothing_cached_names_the_id_and_the_cache(hub: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(CheckpointError) as err:
        refdecoder.load(tiny_wan(), "org/absent")
    message = str(err.value)
    assert "org/absent" in message and str(hub) in message and "HF_HUB_OFFLINE=1" in message
    code = main(["reconstruct", str(bundled_clips()[0]), "--out", str(tmp_path / "x"), "--vae", "org/absent@v2/vae"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "org/absent at revision v2" in err and str(hub) in err


@pytest.mark.parametrize(
    "spec",
    [
        "org/tiny/../../../../outside",
        "org/tiny@main/../../../outside",
        "org/tiny@main/vae/../../../../outside",
        "org/tiny@../vae",
        "org/tiny@main/./vae",
    ],
)
def test_hub_ids_that_could_leave_the_snapshot_are_refused(hub: Path, tmp_path: Path, spec: str, capsys) -> None:
    """A weights folder outside the cache, reachable with '..' from the snapshot, is never loaded."""
    outside = hub.parent / "outside"  # what '../../../..' from a snapshot subfolder would reach
    refdecoder.wrap(tiny_wan(), "tiny").save_pretrained(outside)
    with pytest.raises(CheckpointError, match="refused") as err:
        refdecoder.load(tiny_wan(), spec)
    assert "\n" not in str(err.value)
    code = main(
        [
            "reconstruct",
            str(bundled_clips()[0]),
            "--out",
            str(tmp_path / "o"),
            "--vae",
            "org/tiny/vae",
            "--weights",
            spec,
            "--no-progress",
        ]
    )
    err_text = capsys.readouterr().err.strip()
    assert code == 1 and len(err_text.splitlines()) == 1 and "refused" in err_text
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_subfolder_argument_is_checked_for_local_folders_and_hub_ids(hub: Path, tmp_path: Path) -> None:
    from refdecoder.hub import resolve_path

    (tmp_path / "local").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "local" / "link").symlink_to(tmp_path / "elsewhere")
    for path, subfolder in [(tmp_path / "local", "../elsewhere"), (tmp_path / "local", "/etc"), ("org/tiny", "..")]:
        with pytest.raises(CheckpointError, match="refused"):
            resolve_path(path, subfolder=subfolder)
    with pytest.raises(CheckpointError, match="outside"):  # a symlinked folder leading out
        resolve_path(tmp_path / "local", subfolder="link")
    with pytest.raises(CheckpointError, match="refused"):
        resolve_path("org/tiny", revision="../main")
    assert resolve_path("org/tiny", subfolder="vae").name == "vae"  # the plain forms still work
