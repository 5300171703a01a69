"""One owner per training knob: old keys give the same config as their owner's, with a one-line warning naming it;
contradictions are errors; the recipe's compile flag goes through ``RefDecoder.compile``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import refdecoder
from refdecoder.errors import ConfigError
from refdecoder.training.config import config_to_dict, load_config
from refdecoder.training.setup import wrap_run_model
from tests.helpers import tiny_wan

MINIMAL = """
run_dir: runs/x
data:
  train: {kind: csv, path: data.csv}
"""
LMR = "refdecoder.blocks.latent_degradation:LatentMaskedReconstruction"


def _load(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()):
    path = tmp_path / "cfg.yaml"
    path.write_text(MINIMAL + text)
    return load_config(path, list(overrides))


def _same(tmp_path: Path, caplog, old: str, new: str, deprecated: str, owner: str) -> None:
    """The old spelling loads to the new one's config, with one warning line naming the old key and its owner."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="refdecoder"):
        got = _load(tmp_path, old)
    warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert repr(deprecated) in warnings[0] and owner in warnings[0], warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="refdecoder"):
        expected = _load(tmp_path, new)
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert config_to_dict(got) == config_to_dict(expected)
    assert got.refdecoder_config() == expected.refdecoder_config()


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("  frames: 9\nstages: [{steps: 2}, {steps: 3, frames: 17}]\n",
         "stages: [{steps: 2, frames: 9}, {steps: 3, frames: 17}]\n"),
        ("  frames: 9\n", "stages: [{frames: 9}]\n"),  # no stages: the default stage at that length
    ],
)  # fmt: skip
def test_data_frames_fills_the_stages(tmp_path, caplog, old, new) -> None:
    _same(tmp_path, caplog, old, new, "data.frames", "stages[].frames")


def test_data_frames_as_an_override_fills_the_stages(tmp_path) -> None:
    cfg = _load(tmp_path, "stages: [{steps: 2}, {steps: 3, frames: 17}]\n", ("data.frames=5",))
    assert [s.frames for s in cfg.stages] == [5, 17]
    assert _load(tmp_path, "").stages[0].frames == 17  # the old data.frames default, now the stage's


def test_train_decoder_is_owned_by_the_decoder_lr_ratio(tmp_path, caplog) -> None:
    frozen = "optim: {decoder_lr_ratio: 0.0}\n"
    _same(tmp_path, caplog, "model: {refdecoder: {train_decoder: false}}\n", frozen, "model.refdecoder.train_decoder",
          "optim.decoder_lr_ratio")  # fmt: skip
    _same(tmp_path, caplog, "model: {refdecoder: {train_decoder: true}}\n", "", "model.refdecoder.train_decoder",
          "optim.decoder_lr_ratio")  # fmt: skip
    assert _load(tmp_path, frozen).refdecoder_config().train_decoder is False
    assert _load(tmp_path, "").refdecoder_config().train_decoder is True
    model = refdecoder.wrap(tiny_wan(), _load(tmp_path, frozen).refdecoder_config())
    assert [g["name"] for g in model.param_groups(1e-3, 0.0)] == ["refdecoder"]  # nothing of the decoder trains
    with pytest.raises(ConfigError, match=r"train_decoder: false conflicts with optim\.decoder_lr_ratio: 0\.1"):
        _load(tmp_path, "model: {refdecoder: {train_decoder: false}}\noptim: {decoder_lr_ratio: 0.1}\n")
    with pytest.raises(ConfigError, match="must be true or false"):
        _load(tmp_path, "model: {refdecoder: {train_decoder: maybe}}\n")
    with pytest.raises(ConfigError, match=r"optim\.decoder_lr_ratio.*model\.kind: plain"):
        _load(tmp_path, "model: {kind: plain}\noptim: {decoder_lr_ratio: 0.0}\n")
    with pytest.raises(ConfigError, match=r"optim\.decoder_lr_ratio' must be >= 0"):
        _load(tmp_path, "optim: {decoder_lr_ratio: -0.1}\n")


@pytest.mark.parametrize(
    ("args", "degradation"),
    [
        ("{channels: 16}", "{lmr: true}"),
        ("{channels: 16, ratios: [0.0, 0.5], probs: [0.5, 0.5], block: [1, 2, 2], init_std: 1.0}",
         "{lmr: true, lmr_ratios: [0.0, 0.5], lmr_probs: [0.5, 0.5], lmr_block: [1, 2, 2]}"),
    ],
)  # fmt: skip
def test_an_lmr_component_moves_to_the_degradation_config(tmp_path, caplog, args, degradation) -> None:
    blur = "{name: blur, target: 'refdecoder.blocks.latent_degradation:LatentBlur'}"
    old = f"model:\n  latent_components: [{blur}, {{name: lmr, target: '{LMR}', args: {args}}}]\n"
    new = f"model:\n  latent_components: [{blur}]\n  refdecoder: {{degradation: {degradation}}}\n"
    _same(tmp_path, caplog, old, new, "model.latent_components.1 (LatentMaskedReconstruction)",
          "model.refdecoder.degradation.lmr")  # fmt: skip


def test_an_lmr_component_that_cannot_move_is_an_error(tmp_path) -> None:
    def components(text: str) -> str:
        return f"model:\n  latent_components: {text}\n"

    first = f"[{{name: lmr, target: '{LMR}'}}, {{name: blur, target: 'refdecoder.blocks:LatentBlur'}}]"
    with pytest.raises(ConfigError, match=r"model\.latent_components\.0 .* must be the last component"):
        _load(tmp_path, components(first))
    with pytest.raises(ConfigError, match=r"model\.latent_components\.0\.args\.init_std has no key"):
        _load(tmp_path, components(f"[{{name: lmr, target: '{LMR}', args: {{init_std: 0.5}}}}]"))
    both = components(f"[{{name: lmr, target: '{LMR}'}}]") + "  refdecoder: {degradation: {lmr: true}}\n"
    with pytest.raises(ConfigError, match="repeats model.refdecoder.degradation.lmr"):
        _load(tmp_path, both)


def test_train_decoder_set_on_a_built_config_is_refused(tmp_path) -> None:
    """A config built without load_config (e.g. from a dict) cannot bring the second owner back."""
    from refdecoder.config_builder import build_dataclass
    from refdecoder.training.config import TrainConfig, _validate

    data = config_to_dict(_load(tmp_path, ""))
    data["model"]["refdecoder"] = {"train_decoder": False}
    with pytest.raises(ConfigError, match="is set by optim.decoder_lr_ratio"):
        _validate(build_dataclass(TrainConfig, data))


def test_fabric_compile_goes_through_refdecoder_compile(tmp_path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(refdecoder.RefDecoder, "compile", lambda self, **kw: calls.append(kw))
    cfg = _load(tmp_path, "model: {preset: tiny}\n", ("fabric.compile=true",))
    wrap_run_model(cfg, tiny_wan())
    assert calls == [{"decoder": False}]
    calls.clear()
    wrap_run_model(_load(tmp_path, "model: {preset: tiny}\n"), tiny_wan())
    assert calls == []


def test_the_shipped_recipes_use_no_deprecated_key(caplog) -> None:
    configs = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*.yaml"))
    with caplog.at_level(logging.WARNING, logger="refdecoder"):
        for path in configs:
            if path.name != "quality_small.yaml":  # the benchmark's own settings, not a training config
                load_config(path)
    assert len(configs) > 5 and not [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
