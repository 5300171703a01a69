"""Quality benchmark variants as typed diffs over one base: same effective configs as before, strict files, old
names read with a deprecation warning, no private benchmark module shared between scripts."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from benchmarks import quality_small as qs
from benchmarks import quality_small_table as qtable
from benchmarks.quality import settings as qset
from benchmarks.quality.names import REMOVED, RENAMED, current_name, with_current_names
from refdecoder.config_builder import yaml_load
from refdecoder.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BEFORE = json.loads((ROOT / "tests" / "data" / "quality_variants_before.json").read_text())


def _drop_version(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "refdecoder_version"}


def _subset_differences(recorded: dict, now: dict, path: str = "") -> list[str]:
    """Keys recorded before whose value differs now (keys added since, e.g. a new correspondence option, pass)."""
    out = []
    for key, value in recorded.items():
        if key not in now:
            out.append(f"{path}{key} missing")
        elif isinstance(value, dict) and isinstance(now[key], dict):
            out += _subset_differences(value, now[key], f"{path}{key}.")
        elif json.loads(json.dumps(now[key])) != value:
            out.append(f"{path}{key}: {value!r} before, {now[key]!r} now")
    return out


def test_every_kept_variant_resolves_to_the_config_it_had_before() -> None:
    """The recorded configs were written by the pre-diff code (tests/data/quality_variants_before.json)."""
    settings = qset.load_settings()
    resolved = settings.finetune.resolved
    assert len(BEFORE["variants"]) == 16
    # Variants added after the record, which it cannot hold.
    added_since = {"corr_frames", "corr_sub", "corr_fine", "corr_half", "corr_random"}
    assert set(resolved) - {RENAMED.get(n, n) for n in BEFORE["variants"]} == added_since
    for old, before in BEFORE["variants"].items():
        variant = resolved[RENAMED.get(old, old)]
        now = {"kind": variant.kind, "motion": variant.motion, "reference": variant.reference}
        if variant.kind == "refdecoder":
            now |= {"added_lr": variant.added_lr, "config": _drop_version(variant.config.to_dict())}
        assert _subset_differences(before, now) == [], old
    renamed = [RENAMED.get(n, n) for n in BEFORE["default_variants"]]
    assert settings.finetune.default_variants == renamed == ["baseline", "s2d", "corr"]
    assert settings.finetune.headline == RENAMED[BEFORE["headline"]]
    assert settings.eval.targets["static_versus"] == RENAMED[BEFORE["static_versus"]]


def test_the_equivalence_check_sees_a_changed_variant(tmp_path: Path) -> None:
    raw = yaml_load(qset.CONFIG.read_text())
    raw["finetune"]["variants"]["corr"]["set"]["transformer.locality_bias_slope"] = 2.0
    changed = _load(tmp_path, raw).finetune.resolved["corr"].config.to_dict()
    before = BEFORE["variants"]["refdecoder_r2_prior_ps_s2d_corr"]["config"]
    assert _subset_differences(before, changed) == ["transformer.locality_bias_slope: 3.0 before, 2.0 now"]


def _load(tmp_path: Path, raw: dict) -> qset.Settings:
    (tmp_path / "c.yaml").write_text(json.dumps(raw))  # JSON is YAML
    return qset.load_settings(tmp_path / "c.yaml")


def _with_variant(tmp_path: Path, name: str, entry: object) -> qset.Settings:
    raw = yaml_load(qset.CONFIG.read_text())
    raw["finetune"]["variants"][name] = entry
    return _load(tmp_path, raw)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"sett": {}}, "unknown config key 'finetune.variants.x.sett'; did you mean 'finetune.variants.x.set'"),
        ({"kind": "fancy"}, "'finetune.variants.x.kind' must be one of 'plain', 'refdecoder'"),
        ({"set": {"transformer.attention_radiu": 1}}, r"finetune\.variants\.x\.set\.transformer\.attention_radiu"),
        ({"set": {"transformers.depth": 1}}, r"finetune\.variants\.x\.set\.transformers\.depth"),
        ({"set": {"transformer.depth": "two"}}, r"finetune\.variants\.x\.set: .*'transformer\.depth' must be an int"),
        (
            {"set": {"transformer.attention_radius": 2}},
            r"x\.set\.transformer\.attention_radius repeats the base's value 2",
        ),
        ({"set": {"stages.patch_sizes": [[1, 1, 1], [1, 2, 2], [1, 4, 4]]}}, r"x\.set\.stages\.patch_sizes repeats"),
        ({"set": {"dropout": {"p_max": 0.3, "mode": "spatial"}}}, r"finetune\.variants\.x\.set\.dropout is a section"),
        ({"kind": "plain", "set": {"dropout.p_max": 0.3}}, "finetune.variants.x: a plain variant"),
        ({"set": {"train_decoder": False}}, r"x\.set\.train_decoder is set by finetune\.decoder_lr_ratio"),
        ({"kind": "plain", "added_lr": 1e-3}, "finetune.variants.x: a plain variant"),
        ({"added_lr": -1e-3}, r"finetune\.variants\.x\.added_lr must be a positive number"),
        ({"reference": "last"}, "'finetune.variants.x.reference' must be one of"),
        ("r0", "'finetune.variants.x' must be a mapping"),
    ],
)
def test_a_broken_variant_is_an_error_naming_its_key_path(tmp_path: Path, entry: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _with_variant(tmp_path, "x", entry)


def test_a_working_diff_is_accepted(tmp_path: Path) -> None:
    """The class of valid diffs: any leaf key of the RefDecoder config the base does not already give that value."""
    settings = _with_variant(
        tmp_path,
        "x",
        {"reference": "far", "added_lr": 1e-3, "set": {"transformer.depth": 3, "dropout.mode": "spatiotemporal"}},
    )
    x, r2 = settings.finetune.resolved["x"], settings.finetune.resolved["r2"]
    assert (x.reference, x.added_lr, x.motion) == ("far", 1e-3, True)
    assert x.config.transformer.depth == 3 and x.config.dropout.mode == "spatiotemporal"
    assert x.config.transformer.attention_radius == r2.config.transformer.attention_radius == 2
    assert x.config.train_decoder and x.config.dropout.p_max == 0.0  # the base's, with nothing applied after `set`


def test_the_decoder_lr_ratio_decides_whether_the_decoder_trains(tmp_path: Path) -> None:
    raw = yaml_load(qset.CONFIG.read_text())
    assert all(v.config.train_decoder for v in _load(tmp_path, raw).finetune.resolved.values() if v.config)
    raw["finetune"]["decoder_lr_ratio"] = 0.0
    with pytest.raises(ConfigError, match=r"finetune\.variants\.baseline: a plain variant needs finetune\.decoder_lr"):
        _load(tmp_path, raw)
    variants = {k: v for k, v in raw["finetune"]["variants"].items() if v.get("kind") != "plain"}
    raw["finetune"]["variants"] = variants
    raw["finetune"]["default_variants"] = [v for v in raw["finetune"]["default_variants"] if v in variants]
    assert not any(v.config.train_decoder for v in _load(tmp_path, raw).finetune.resolved.values() if v.config)
    raw["finetune"]["base"]["set"]["train_decoder"] = True
    with pytest.raises(ConfigError, match=r"finetune\.base\.set\.train_decoder is set by"):
        _load(tmp_path, raw)


def test_a_broken_base_is_an_error_naming_its_key_path(tmp_path: Path) -> None:
    raw = yaml_load(qset.CONFIG.read_text())
    raw["finetune"]["base"]["set"]["transformer.locality_bais"] = True
    with pytest.raises(ConfigError, match=r"finetune\.base\.set\.transformer\.locality_bais"):
        _load(tmp_path, raw)
    raw = yaml_load(qset.CONFIG.read_text())
    raw["eval"]["targets"]["static_versus"] = "refdecoder_r2_prior_ps_s2d"  # an old name is no variant of the file
    with pytest.raises(ConfigError, match="static_versus"):
        _load(tmp_path, raw)


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("  variants:\n", "  variants:\n    r0: {}\n", "'finetune.variants.r0' is given twice"),
        ("transformer.attention_radius: 0, transformer.locality_bias: false}}  # radius 0",
         "transformer.attention_radius: 0, transformer.attention_radius: 1}}  # radius 0",
         "'finetune.variants.r0.set.transformer.attention_radius' is given twice"),
    ],
)  # fmt: skip
def test_a_key_given_twice_in_the_file_is_an_error(tmp_path: Path, old: str, new: str, where: str) -> None:
    text = qset.CONFIG.read_text()
    assert text.count(old) == 1
    (tmp_path / "c.yaml").write_text(text.replace(old, new))
    with pytest.raises(ConfigError, match=re.escape(where)):
        qset.load_settings(tmp_path / "c.yaml")


def test_yaml_load_rejects_repeated_keys_at_any_depth_and_keeps_lists() -> None:
    with pytest.raises(ConfigError, match=r"'a\.b' is given twice \(again on line 3\)"):
        yaml_load("a:\n  b: 1\n  b: 2\n")
    with pytest.raises(ConfigError, match=r"'l\.1\.k' is given twice"):
        yaml_load("l: [{k: 1}, {k: 1, k: 2}]\n")
    assert yaml_load("a: {b: 1, c: [1, 1]}\nd: 1e-3\n") == {"a": {"b": 1, "c": [1, 1]}, "d": 1e-3}


def test_old_names_on_the_command_line_map_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    settings = qset.load_settings()
    with caplog.at_level(logging.WARNING):
        picked = qs.select_variants(settings, "baseline,refdecoder_r2_prior_ps_s2d_corr")
    assert [v.name for v in picked] == ["baseline", "corr"]
    assert ["variant name 'refdecoder_r2_prior_ps_s2d_corr' is deprecated; use 'corr'"] == [
        r.getMessage() for r in caplog.records
    ]
    with pytest.raises(ConfigError, match="was removed"):
        qs.select_variants(settings, "refdecoder_r4_prior")
    with pytest.raises(ConfigError, match="unknown variants"):
        qs.select_variants(settings, "r3")
    assert all(current_name(new) == new for new in RENAMED.values())
    assert set(RENAMED.values()) <= set(settings.finetune.variants)
    assert not set(REMOVED) & set(RENAMED) and not {RENAMED.get(n, n) for n in REMOVED} & set(
        settings.finetune.variants
    )


def test_committed_results_read_under_the_current_names() -> None:
    path = ROOT / "benchmarks" / "results" / "quality_small_ablations.json"
    recorded = json.loads(path.read_text())
    doc = with_current_names(recorded)
    assert list(doc["eval"]["models"])[1:4] == ["baseline", "baseline_still", "r0"]
    assert "r2_still - baseline_still" in doc["gains"] and "refdecoder_r0" not in json.dumps(doc)
    assert doc["eval"]["models"]["r0"] == recorded["eval"]["models"]["refdecoder_r0"]  # figures untouched
    assert with_current_names(
        {"refdecoder_r0_still": 1, "static_psnr_vs_refdecoder_r0": 2, "x_refdecoder_r0y": 3}
    ) == {
        "r0_still": 1,
        "static_psnr_vs_r0": 2,
        "x_refdecoder_r0y": 3,
    }
    rows = qtable.rows(doc, "motion", ["r0"])
    assert rows[0].startswith("| r0 | ")


def test_no_private_benchmark_module_is_shared_between_scripts() -> None:
    """Code two scripts share lives in a public module (benchmarks/quality/, benchmarks/common.py); a private
    ``benchmarks/_x.py`` serves one script (its tests may import it too)."""
    importers: dict[str, set[str]] = {}
    for path in [*ROOT.glob("benchmarks/**/*.py"), *ROOT.glob("recipes/*.py"), *ROOT.glob("refdecoder/**/*.py")]:
        for found in re.findall(r"benchmarks\.(_\w+)|from benchmarks import (_\w+)", path.read_text()):
            importers.setdefault(found[0] or found[1], set()).add(str(path.relative_to(ROOT)))
    shared = {module: files for module, files in importers.items() if len(files) > 1}
    assert shared == {}


def test_benchmark_json_records_the_cpu_model(tmp_path: Path) -> None:
    from benchmarks import common

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Example CPU @ 2.0GHz\nflags\t: fpu\n")
    assert common.cpu_model(info) == "Example CPU @ 2.0GHz"
    info.write_text("processor\t: 0\nflags\t: fpu\n")  # a kernel that names no model (some ARM machines)
    assert common.cpu_model(info) is None
    assert common.cpu_model(tmp_path / "missing") is None
    written = json.loads(common.write_json("probe", {"x": 1}, tmp_path / "probe.json").read_text())
    assert written["x"] == 1 and set(written["machine"]) >= {"cpu", "cpu_model", "cpu_count", "threads"}
