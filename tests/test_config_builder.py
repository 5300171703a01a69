"""The one config builder (refdecoder.config_builder): model config, training config and benchmark settings alike.

Also: a model saved by the code before the builder existed (commit 9b91a67, ``tests/data/saved_9b91a67``) still
loads and decodes as it did (bit-identically on the machine that saved it, to rounding on others).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

import pytest
import torch
from safetensors.torch import load_file

import refdecoder
from refdecoder.backbones.registry import list_backbones
from refdecoder.config import PRESETS, RefDecoderConfig
from refdecoder.config_builder import build_dataclass, to_plain, yaml_load
from refdecoder.errors import ConfigError
from refdecoder.testing import Conformance, check_identity_at_init, check_reference_matters
from tests.helpers import tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")  # the saved decode was made with one thread

SAVED = Path(__file__).parent / "data" / "saved_9b91a67"


@dataclasses.dataclass
class Inner:
    rate: float
    mode: Literal["a", "b"] = "a"


@dataclasses.dataclass
class Outer:
    inner: Inner
    steps: int = 3
    sizes: tuple[int, ...] = (1,)
    name: str | None = None


def test_builds_nested_dataclasses_with_conversions():
    built = build_dataclass(Outer, yaml_load("inner: {rate: 1e-3, mode: b}\nsizes: [2, 3]\nsteps: 4"))
    assert built == Outer(Inner(1e-3, "b"), 4, (2, 3))
    assert isinstance(built.inner.rate, float) and isinstance(built.sizes, tuple)
    assert build_dataclass(Outer, to_plain(built)) == built


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inner": {"rate": "fast"}}, r"config key 'inner\.rate' must be a number, got 'fast'"),
        ({"inner": {"rate": 1, "mode": "c"}}, r"'inner\.mode' must be one of 'a', 'b'"),
        ({"inner": {"rate": 1}, "steps": 2.5}, r"'steps' must be an integer"),
        ({"inner": {"rate": 1}, "sizes": [1, "x"]}, r"'sizes\.1' must be an integer"),
        ({"inner": 3}, r"'inner' must be a mapping \(Inner\)"),
        ({"inner": {}}, r"missing config key 'inner\.rate'"),
        ({}, r"missing config key 'inner'"),
        ({"inner": {"rat": 1}}, r"unknown config key 'inner\.rat'; did you mean 'inner\.rate'"),
        ({"inner": {"rate": 1}, "stepz": 1}, r"unknown config key 'stepz'; did you mean 'steps'"),
    ],
)
def test_errors_name_the_dotted_key(data, message):
    with pytest.raises(ConfigError, match=message):
        build_dataclass(Outer, data)


def test_unknown_keys_can_warn_instead(caplog):
    with caplog.at_level(logging.WARNING, logger="refdecoder"):
        built = build_dataclass(Outer, {"inner": {"rate": 1, "new": 2}, "later": 1}, unknown="warn")
    assert built == Outer(Inner(1.0))
    assert "inner.new" in caplog.text and "later" in caplog.text
    with pytest.raises(ConfigError, match=r"'inner\.rate' must be a number"):  # wrong types still raise
        build_dataclass(Outer, {"inner": {"rate": "x"}}, unknown="warn")


def test_yaml_exponents_are_numbers():
    assert yaml_load("a: 1e-3\nb: -2E+2\nc: 1.5e-4\nd: '1e-3'\ne: 7") == {
        "a": 1e-3,
        "b": -200.0,
        "c": 1.5e-4,
        "d": "1e-3",
        "e": 7,
    }


def test_saved_model_configs_warn_on_unknown_keys_and_name_wrong_types(caplog):
    data = refdecoder.preset("paper").to_dict()
    data["from_the_future"] = 1
    data["transformer"]["also_new"] = True
    with caplog.at_level(logging.WARNING, logger="refdecoder"):
        assert RefDecoderConfig.from_dict(data) == refdecoder.preset("paper")
    assert "from_the_future" in caplog.text and "transformer.also_new" in caplog.text
    data["transformer"]["depth"] = "two"
    with pytest.raises(ConfigError, match=r"config key 'transformer\.depth' must be an integer, got 'two'"):
        RefDecoderConfig.from_dict(data)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_survives_its_json(name):
    config = refdecoder.preset(name)
    assert RefDecoderConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_the_benchmark_settings_use_the_same_builder(tmp_path):
    from benchmarks.quality import settings

    assert settings.build_dataclass is build_dataclass and settings.yaml_load is yaml_load
    with pytest.raises(ConfigError, match=r"config key 'finetune\.lr' must be a number"):
        settings.load_settings(overrides=("finetune.lr=fast",))
    assert settings.load_settings(overrides=("finetune.lr=2e-4",)).finetune.lr == 2e-4


def test_a_model_saved_before_the_builder_decodes_as_it_did():
    case = load_file(SAVED / "decode.safetensors")
    model = refdecoder.load(tiny_wan(), SAVED / "model").eval()
    with torch.no_grad():
        decoded = model.decode(case["latents"], reference=case["reference"])
    # Bit-identical on the machine that saved the case; another CPU's kernels round differently (2.3e-6 seen on an
    # AMD EPYC against the Xeon's case). A config read differently (another layer, radius, tokenizer) moves it by
    # orders of magnitude more.
    torch.testing.assert_close(decoded, case["decoded"], rtol=0, atol=2e-5)


def test_the_default_preset_is_the_recommended_one_and_differs_from_small_only_there():
    from refdecoder.config import DEFAULT_PRESET, resolve_config

    assert DEFAULT_PRESET == "small-local" and resolve_config(None) == refdecoder.preset("small-local")
    small, local = refdecoder.preset("small").to_dict(), refdecoder.preset("small-local").to_dict()
    changed = {
        (section, key)
        for section, values in small.items()
        if isinstance(values, dict)
        for key in values
        if values[key] != local[section][key]
    }
    assert changed == {
        ("transformer", "attention_radius"),
        ("transformer", "locality_bias"),
        ("tokenizer", "kind"),
        ("tokenizer", "per_stage"),
        ("dropout", "p_max"),
    }
    assert local["dropout"]["p_max"] == 0.0 and local["tokenizer"]["kind"] == "space_to_depth"


@pytest.mark.parametrize("backbone", list_backbones())
def test_the_default_preset_serves_every_backbone(backbone, monkeypatch):
    """small-local's scope, tokenizers and stage layout at a test width: identity at init, the reference matters."""
    local = refdecoder.preset("small-local")
    narrow = dataclasses.replace(local.transformer, depth=1, num_heads=2, head_dim=16)
    monkeypatch.setitem(PRESETS, "small-local-narrow", dataclasses.replace(local, transformer=narrow))
    check = Conformance(backbone, preset="small-local-narrow")
    check_identity_at_init(check)
    check_reference_matters(check)
