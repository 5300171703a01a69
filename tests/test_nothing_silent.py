"""Nothing silent through the Python API: a non-finite decode names its cause, non-finite weights are refused at
load, empty inputs and fractional windows are typed errors, a config of the wrong shape or type names its key, a
reference in [0, 1] is warned about, and weights are written with the config's file mode."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import refdecoder
from refdecoder.config import RefDecoderConfig
from refdecoder.errors import CheckpointError, ConfigError, InputError, RefDecoderError
from refdecoder.inference.streaming import decode_video
from refdecoder.model import WEIGHTS_NAME
from tests.helpers import latents_for, randomize_, reference_for, tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model() -> refdecoder.RefDecoder:
    model = refdecoder.wrap(tiny_wan(), "tiny").eval()
    randomize_(model.projectors, scale=0.1, seed=3)
    return model


def _latents(model: refdecoder.RefDecoder, frames: int = 3, **kwargs) -> torch.Tensor:
    return latents_for(model.vae, frames, **kwargs)


# --- non-finite output -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["decode", "iter_decode", "streaming", "streaming-tiles"])
def test_latents_at_a_huge_scale_name_the_input_scale(model, how: str) -> None:
    z = _latents(model) * 1e30  # finite, but the added modules overflow
    ref = reference_for(z)
    with pytest.raises(InputError, match="scale") as err, torch.no_grad():
        if how == "decode":
            model.decode(z, reference=ref)
        elif how == "iter_decode":
            list(model.iter_decode(z, reference=ref))
        else:
            from refdecoder.tiling import plan_tiles

            tiles = plan_tiles((4, 6), 8, (32, 32), (16, 16), 16) if how == "streaming-tiles" else None
            decode_video(model, z, reference=ref, tiles=tiles)
    assert "e+30 in magnitude" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("tiled", [False, True])
def test_the_plain_backbone_decode_is_checked_too(model, monkeypatch, tiled: bool) -> None:
    """Without weights the CLI decodes through the adapter: a non-finite window there is refused as well."""
    from refdecoder.tiling import plan_tiles

    original = type(model.adapter).iter_decode_windows

    def poisoned(self, *args, **kwargs):
        for i, part in enumerate(original(self, *args, **kwargs)):
            yield part * float("nan") if i == 1 else part

    monkeypatch.setattr(type(model.adapter), "iter_decode_windows", poisoned)
    tiles = plan_tiles((4, 6), 8, (32, 32), (16, 16), 1) if tiled else None
    with pytest.raises(RefDecoderError, match="overflowed"), torch.no_grad():
        decode_video(model.adapter, _latents(model), window=1, tiles=tiles)


def test_a_non_finite_weight_is_named_when_the_decode_fails(model) -> None:
    with torch.no_grad():
        model.projectors["stage0"].out.weight[0, 0] = float("nan")
    z = _latents(model)
    with pytest.raises(CheckpointError, match=r"projectors\.stage0\.out\.weight"):
        model.decode(z, reference=reference_for(z))


def test_a_model_overflow_with_finite_inputs_is_still_refused(model, monkeypatch) -> None:
    z = _latents(model)
    monkeypatch.setattr(model.adapter, "decode_windows", lambda *a, **k: torch.full((1, 3, 9, 32, 48), float("inf")))
    with pytest.raises(RefDecoderError, match="overflowed"):
        model.decode(z)  # the clamp would have turned inf into a plausible white video


def test_training_mode_leaves_non_finite_steps_to_the_guard(model) -> None:
    """The recipe's non-finite guard skips such steps; a training decode must not stop the run."""
    model.train()
    z = _latents(model) * 1e30
    out = model.decode(z, reference=reference_for(z), clamp=False)
    assert not torch.isfinite(out).all()


def test_a_finite_decode_is_unchanged(model) -> None:
    z = _latents(model)
    ref = reference_for(z)
    with torch.no_grad():
        whole = model.decode(z, reference=ref, window=2)
        streamed = torch.cat(list(model.iter_decode(z, reference=ref, window=2)), dim=2)
    assert torch.equal(whole, streamed) and whole.abs().max() <= 1


# --- weights -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_loading_non_finite_weights_is_a_checkpoint_error_naming_the_tensor(model, tmp_path, value) -> None:
    folder = model.save_pretrained(tmp_path / "w")
    state = load_file(folder / WEIGHTS_NAME)
    name = sorted(state)[-1]
    state[name].view(-1)[0] = value
    save_file(state, str(folder / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match="NaN or inf") as err:
        refdecoder.load(tiny_wan(), folder)
    assert name in str(err.value)


def test_weights_file_mode_matches_the_config_file_mode(model, tmp_path) -> None:
    folder = model.save_pretrained(tmp_path / "w")
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


# --- empty and malformed inputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "axis"), [((0, 4, 3, 4, 6), "B"), ((1, 4, 0, 4, 6), "T"), ((1, 4, 3, 0, 6), "h"), ((1, 4, 3, 4, 0), "w")]
)
def test_empty_latents_are_input_errors(model, shape, axis) -> None:
    with pytest.raises(InputError, match=f"empty along {axis}"):
        model.decode(torch.zeros(shape))
    with pytest.raises(InputError, match="empty"):
        decode_video(model.adapter, torch.zeros(shape))


@pytest.mark.parametrize("shape", [(1, 3, 0, 32, 48), (0, 3, 1, 32, 48), (1, 3, 1, 0, 48)])
def test_an_empty_reference_is_an_input_error(model, shape) -> None:
    with pytest.raises(InputError, match="empty"):
        model.decode(_latents(model), reference=torch.zeros(shape))


def test_an_empty_video_is_an_input_error(model) -> None:
    with pytest.raises(InputError, match="empty"):
        model.encode(torch.zeros(0, 3, 5, 32, 48))


@pytest.mark.parametrize("window", [1.5, 0, -1, True, "4", 2.0])
def test_a_window_that_is_no_positive_integer_is_a_config_error(model, window) -> None:
    z = _latents(model)
    with pytest.raises(ConfigError, match="integer"):
        model.decode(z, window=window)
    with pytest.raises(ConfigError, match="integer"):
        decode_video(model.adapter, z, window=window)
    with pytest.raises(ConfigError, match="latent_frames"):
        RefDecoderConfig.from_dict({"window": {"latent_frames": window}})


def test_a_reference_with_no_negative_values_is_warned_about_once(model, caplog, monkeypatch) -> None:
    from refdecoder import validation

    monkeypatch.setattr(validation, "_warned", set())
    z = _latents(model)
    with caplog.at_level("WARNING", logger="refdecoder"):
        model.decode(z, reference=reference_for(z))  # [-1, 1]: no warning
        assert not caplog.records
        for _ in range(3):
            model.decode(z, reference=torch.rand(1, 3, 32, 48))
    assert [r.getMessage() for r in caplog.records if "[0, 1] instead of [-1, 1]" in r.getMessage()] != []
    assert len(caplog.records) == 1  # once per process, not once per decode


# --- configs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"transformer": {"depth": "two"}}, "transformer.depth"),
        ({"transformer": {"rope_theta": "big"}}, "transformer.rope_theta"),
        ({"tokenizer": {"per_stage": 1}}, "tokenizer.per_stage"),
        ({"stages": {"patch_sizes": [[1, 2]]}}, "stages.patch_sizes"),
        ({"dropout": {"mode": "everything"}}, "dropout.mode"),
        ({"transformer": 3}, "transformer"),
    ],
)
def test_a_config_value_of_the_wrong_type_names_its_key(data, key) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RefDecoderConfig.from_dict(data)


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"a string"', "42", "null"])
def test_a_config_file_that_is_no_json_object_is_refused(model, tmp_path, content) -> None:
    folder = model.save_pretrained(tmp_path / "w")
    (folder / "refdecoder_config.json").write_text(content)
    with pytest.raises(ConfigError, match="JSON object"):
        refdecoder.load(tiny_wan(), folder)


def test_config_json_roundtrip_keeps_types(tmp_path) -> None:
    for name, config in refdecoder.PRESETS.items():
        path = tmp_path / f"{name}.json"
        config.save(path)
        assert RefDecoderConfig.load(path) == config, name
        assert json.loads(path.read_text())["transformer"]["depth"] == config.transformer.depth


def test_a_saved_vae_folder_has_one_file_mode(tmp_path) -> None:
    from refdecoder.inference.loading import save_vae

    folder = save_vae(tiny_wan(), tmp_path / "vae")
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert len(set(modes.values())) == 1, modes
