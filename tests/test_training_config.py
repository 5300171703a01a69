"""Training config: strict YAML + dotted overrides, errors naming the key, the shipped recipe configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from refdecoder.errors import BackboneError, ConfigError
from refdecoder.training.config import TrainConfig, apply_overrides, load_config, parse_overrides, yaml_load

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"

MINIMAL = """
run_dir: runs/x
data:
  train: {kind: csv, path: data.csv}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_exponent_floats_are_numbers():
    # PyYAML alone reads "1e-4" as a string (YAML 1.1); configs write learning rates that way.
    assert yaml_load("a: 1e-4\nb: 2.0e-4\nc: 3\nd: .5\ne: 1_000") == {
        "a": 1e-4,
        "b": 2e-4,
        "c": 3,
        "d": 0.5,
        "e": 1000,
    }


@pytest.mark.parametrize(
    "text, key",
    [
        ("optim: {lrr: 0.1}", "optim.lrr"),
        ("data: {train: {kind: csv, path: a.csv, pth: b}}", "data.train.pth"),
        ("stages: [{name: a, steps: 3, frame: 5}]", "stages.0.frame"),
        ("model: {refdecoder: {transformer: {dept: 3}}}", "model.refdecoder.transformer.dept"),
        ("bogus: 1", "bogus"),
    ],
)
def test_unknown_key_in_file_names_the_key(tmp_path, text, key):
    # A case with its own `data` section stands alone: a second `data:` in one file is an error of its own (below).
    path = _write(tmp_path, text if text.startswith("data:") else MINIMAL + text)
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}'"):
        load_config(path)


def test_a_section_given_twice_is_an_error_not_the_last_one(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'data' is given twice \(again on line 5\)"):
        load_config(_write(tmp_path, MINIMAL + "data: {train: {kind: csv, path: b.csv}}"))


@pytest.mark.parametrize(
    "text, key",
    [
        ("optim: {lr: fast}", "optim.lr"),
        ("optim: {grad_accum: 1.5}", "optim.grad_accum"),
        ("optim: {betas: [0.9]}", "optim.betas"),
        ("fabric: {strategy: horovod}", "fabric.strategy"),
        ("logging: {progress_bar: 'yes'}", "logging.progress_bar"),
        ("stages: [{steps: ten}]", "stages.0.steps"),
        ("model: {refdecoder: {transformer: {depth: two}}}", "model.refdecoder.transformer.depth"),
        ("model: {refdecoder: {dropout: {p_max: 1.5}}}", "dropout.p_max"),
    ],
)
def test_wrong_type_in_file_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(_write(tmp_path, MINIMAL + text))


def test_overrides_are_checked_like_the_file(tmp_path):
    path = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'.*did you mean 'optim\.lr'"):
        load_config(path, ["optim.lrr=1e-4"])
    with pytest.raises(ConfigError, match=r"'data\.batch_size' must be an integer"):
        load_config(path, ["data.batch_size=many"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["optim.lr"])
    with pytest.raises(ConfigError, match="holds no list"):
        load_config(path, ["stages.0.steps=3"])
    with pytest.raises(ConfigError, match="not an index of a list of 1"):
        load_config(_write(tmp_path, MINIMAL + "stages: [{steps: 2}]"), ["stages.4.steps=3"])


def test_overrides_set_values_lists_and_nested_sections(tmp_path):
    cfg = load_config(
        _write(tmp_path, MINIMAL + "stages: [{name: a, steps: 3}, {name: b, steps: 4}]"),
        [
            "optim.lr=1e-4",
            "stages.0.frames=9",
            "data.size=[32, 48]",
            "stages.1.frames=17",
            "model.refdecoder.transformer.depth=3",
            "validation.frames=null",
            "model.vae.tiny={base_dim: 16}",
        ],
    )
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.size == (32, 48)
    assert [s.frames for s in cfg.stages] == [9, 17] and cfg.total_steps == 7
    assert cfg.refdecoder_config().transformer.depth == 3
    assert cfg.model.vae.tiny == {"base_dim": 16}


def test_apply_overrides_does_not_touch_the_input():
    data = {"optim": {"lr": 1.0}}
    out = apply_overrides(data, parse_overrides(["optim.lr=2", "a.b.c=x"]))
    assert data == {"optim": {"lr": 1.0}} and out == {"optim": {"lr": 2}, "a": {"b": {"c": "x"}}}


def test_refdecoder_config_is_the_preset_plus_overrides(tmp_path):
    cfg = load_config(
        _write(tmp_path, MINIMAL),
        [
            "model.preset=tiny",
            "model.refdecoder.train_decoder=true",
            "model.refdecoder.transformer.gradient_checkpointing=true",
        ],
    )
    rd = cfg.refdecoder_config()
    assert (rd.transformer.depth, rd.transformer.num_heads, rd.transformer.head_dim) == (2, 2, 32)  # tiny preset
    assert rd.train_decoder and rd.transformer.gradient_checkpointing
    with pytest.raises(ConfigError, match="model.preset"):
        load_config(_write(tmp_path, MINIMAL), ["model.preset=huge"])


def test_defaults_without_a_file_still_need_training_data():
    with pytest.raises(ConfigError, match="data.train.path"):
        load_config(None)
    assert isinstance(load_config(None, ["data.train.path=x.csv"]), TrainConfig)


def test_shipped_paper_configs_hold_the_paper_values():
    wan = load_config(CONFIGS / "wan2.1.yaml")
    vvp = load_config(CONFIGS / "videovae+.yaml")
    for cfg in (wan, vvp):
        assert cfg.model.preset == "paper" and cfg.refdecoder_config().transformer.depth == 10
        assert cfg.optim.lr == pytest.approx(2e-4) and cfg.optim.decoder_lr_ratio == pytest.approx(0.1)
        assert (cfg.schedule.warmup_steps, cfg.total_steps) == (1000, 100_000)
        assert cfg.schedule.warmup_start == pytest.approx(0.01) and cfg.schedule.min_ratio == pytest.approx(0.01)
        assert cfg.refdecoder_config().dropout.p_max == pytest.approx(0.7) and cfg.refdecoder_config().train_decoder
        assert (cfg.loss.l1_weight, cfg.loss.lpips_weight, cfg.loss.lpips_net) == (1.0, 1.0, "vgg")
        assert cfg.fabric.precision == "bf16-mixed"
    assert wan.data.size == (480, 832) and [s.frames for s in wan.stages] == [5, 17] and wan.data.batch_size == 2
    assert vvp.data.size == (216, 216) and [s.frames for s in vvp.stages] == [4, 16] and vvp.data.batch_size == 4
    assert wan.optim.betas == (0.9, 0.999) and vvp.optim.betas == (0.5, 0.9)
    assert (wan.model.backbone, vvp.model.backbone) == ("wan2.1", "videovae+")


def test_tiny_config_is_the_cpu_demo():
    cfg = load_config(CONFIGS / "tiny.yaml")
    assert cfg.fabric.accelerator == "cpu" and cfg.loss.lpips_weight == 0
    assert cfg.model.vae.source == "demo" and cfg.data.val.samples == ["carphone"]
    assert "carphone" not in cfg.data.train.samples  # the held-out clip
    assert cfg.compare.enabled and cfg.compare.baseline
    rd = cfg.refdecoder_config()  # the settings that showed a reference gain in the quality benchmark
    assert (rd.transformer.attention_radius, rd.transformer.num_heads, rd.transformer.head_dim) == (0, 4, 64)
    assert rd.stages.patch_sizes == ((1, 1, 1), (1, 2, 2), (1, 4, 4)) and rd.dropout.p_max == 0


@pytest.mark.parametrize(
    ("removed", "owner"),
    [
        ("fabric.activation_checkpointing=true", "model.refdecoder.transformer.gradient_checkpointing"),
        ("schedule.total_steps=10", "stages"),
    ],
)
def test_removed_duplicate_keys_name_their_one_owner(tmp_path, removed, owner):
    with pytest.raises(ConfigError, match=f"{removed.split('=')[0]}' was removed; set {owner}"):
        load_config(_write(tmp_path, MINIMAL), [removed])


def test_unregistered_backbone_fails_with_a_clear_error(monkeypatch):
    from refdecoder.backbones import registry
    from refdecoder.training.vae import backbone_adapter

    monkeypatch.setattr(registry, "_REGISTRY", {"wan2.1": registry.BUILTINS["wan2.1"]})
    with pytest.raises(BackboneError, match=r"backbone 'videovae\+'.*registered backbones: \['wan2\.1'\]"):
        backbone_adapter("videovae+")


def test_training_fine_tunes_the_decoder_unless_told_not_to(tmp_path):
    assert load_config(_write(tmp_path, MINIMAL)).refdecoder_config().train_decoder
    frozen = load_config(_write(tmp_path, MINIMAL), ["model.refdecoder.train_decoder=false"])
    assert not frozen.refdecoder_config().train_decoder
    for path in CONFIGS.glob("*.yaml"):  # the recipes rely on the default instead of restating it
        assert "train_decoder" not in path.read_text(), path.name


def test_the_backbone_has_one_owner(tmp_path):
    path = _write(tmp_path, MINIMAL)
    assert load_config(path, ["model.refdecoder.backbone=wan2.1"]).model.backbone == "wan2.1"  # agrees: accepted
    with pytest.raises(
        ConfigError, match=r"'model\.refdecoder\.backbone' is 'wan2\.2' but model\.backbone is 'wan2\.1'"
    ):
        load_config(path, ["model.refdecoder.backbone=wan2.2"])
