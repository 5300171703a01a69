"""Backbone registry: registration forms, lazy built-ins, entry points, auto-detection and refusals, import graph."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import refdecoder
from refdecoder import BackboneError
from refdecoder.backbones import registry
from refdecoder.backbones.base import BackboneAdapter, Fit
from refdecoder.backbones.refused import REFUSED

ROOT = Path(__file__).resolve().parents[1]


class _Dummy(BackboneAdapter):
    @classmethod
    def fit(cls, vae):
        return Fit(0, ("never fits",))


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_builtin_backbones_listed():
    assert {"wan2.1", "wan2.2", "qwen-image", "videovae+"} <= set(refdecoder.list_backbones())


def test_import_and_listing_load_no_adapter_and_no_diffusers():
    code = (
        "import sys, refdecoder; names = refdecoder.list_backbones(); "
        "print(sorted(m for m in sys.modules if m.startswith(('diffusers', 'refdecoder.backbones.')))); print(names)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    # refused is a table of class names and reasons: it imports neither an adapter nor diffusers
    assert out[0] == "['refdecoder.backbones.base', 'refdecoder.backbones.refused', 'refdecoder.backbones.registry']"
    names = [
        "cogvideox",
        "hunyuan-video",
        "hunyuan-video-1.5",
        "ltx-2-video",
        "ltx-video",
        "minimax-h3",
        "qwen-image",
        "qwen-image-2.1",
        "stable-video-diffusion",
        "videovae+",
        "wan2.1",
        "wan2.2",
    ]
    assert out[1] == str(names)


def test_register_forms_and_override(clean_registry):
    refdecoder.register_backbone("dummy", _Dummy)
    assert refdecoder.get_backbone("dummy") is _Dummy

    with pytest.raises(BackboneError, match="override=True"):

        @refdecoder.register_backbone("dummy")
        class Other(_Dummy):
            pass

    @refdecoder.register_backbone("dummy", override=True)
    class Replacement(_Dummy):
        pass

    assert refdecoder.get_backbone("dummy") is Replacement
    with pytest.raises(BackboneError, match="'wan2.1' is already registered"):
        refdecoder.register_backbone("wan2.1", _Dummy)  # a built-in counts before its module is imported


def test_lookup_miss_lists_names():
    with pytest.raises(BackboneError, match="wan2.1"):
        refdecoder.get_backbone("no-such-vae")


def test_register_rejects_non_adapters(clean_registry):
    with pytest.raises(BackboneError):
        refdecoder.register_backbone("bad", object)


def test_entry_point_adapters_are_found(tmp_path, monkeypatch, clean_registry):
    """A package that declares ``[project.entry-points."refdecoder.backbones"]`` is found without an import."""
    (tmp_path / "toy_plugin.py").write_text(
        "from refdecoder.backbones.base import Fit\n"
        "from tests.test_registry import _Dummy\n"
        "class PluginAdapter(_Dummy):\n    pass\n"
    )
    dist = tmp_path / "toy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[refdecoder.backbones]\ntoy = toy_plugin:PluginAdapter\nwan2.1 = toy_plugin:PluginAdapter\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_read", False)
    assert "toy" in refdecoder.list_backbones()
    assert "toy_plugin" not in sys.modules  # listed, not imported
    adapter = refdecoder.get_backbone("toy")
    assert adapter.__name__ == "PluginAdapter" and adapter.name == "toy"
    assert refdecoder.get_backbone("wan2.1").__name__ == "WanAdapter"  # an entry point cannot take a built-in name


def _tiny_diffusers_vaes() -> dict[str, nn.Module]:
    """Tiny VAEs built straight from diffusers classes (not build_tiny), one per diffusers built-in."""
    from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan

    family = dict(base_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True])
    stats = dict(latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return {
        "wan2.1": AutoencoderKLWan(z_dim=4, **family, **stats),
        "wan2.2": AutoencoderKLWan(
            z_dim=4,
            is_residual=True,
            patch_size=2,
            in_channels=12,
            out_channels=12,
            scale_factor_spatial=16,
            **family,
            **stats,
        ),  # fmt: skip
        "qwen-image": AutoencoderKLQwenImage(z_dim=4, **family, **stats),
    }


def test_autodetect_from_plain_diffusers_and_videovaeplus_classes():
    from refdecoder.backbones.videovaeplus import VideoVAEPlus, VideoVAEPlusConfig

    vaes = _tiny_diffusers_vaes()
    vaes["videovae+"] = VideoVAEPlus(VideoVAEPlusConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1))
    for name, vae in vaes.items():
        assert registry.find_backbone(vae).name == name
        model = refdecoder.wrap(vae, "tiny")
        assert model.adapter.name == name
        model.unwrap()


def test_forcing_the_wrong_wan_adapter_names_the_fields_and_the_right_one():
    vae = _tiny_diffusers_vaes()["wan2.2"]
    with pytest.raises(BackboneError) as err:
        refdecoder.wrap(vae, "tiny", backbone="wan2.1")
    message = str(err.value)
    assert "is_residual=True (wan2.1 needs False)" in message and "patch_size=2 (wan2.1 needs None)" in message
    assert "backbone='wan2.2' fits it" in message and "\n" not in message


def test_inconsistent_wan22_config_says_what_to_set():
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, num_res_blocks=1, is_residual=True, patch_size=2, in_channels=12, out_channels=12
    )  # scale_factor_spatial left at Wan2.1's 8
    with pytest.raises(BackboneError, match=r"nearest is 'wan2.2': .*up-samples space 16x.*scale_factor_spatial=16"):
        refdecoder.wrap(vae, "tiny")


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_vaes_get_one_line_naming_the_nearest_adapter_and_why(name):
    import diffusers

    with torch.device("meta"):  # only the class is inspected: nothing is allocated
        vae = getattr(diffusers, name)()
    with pytest.raises(BackboneError) as err:
        refdecoder.wrap(vae, "tiny")
    message, refusal = str(err.value), REFUSED[name]
    assert "\n" not in message
    assert message.startswith(
        f"no registered backbone drives a {name}: {refusal.reason}; nearest is {refusal.nearest!r}"
    )
    assert refusal.nearest in refdecoder.list_backbones()
    assert f"{name}: {refusal.reason} (nearest adapter: {refusal.nearest!r})" in refdecoder.list_backbones(
        refused=True
    )


def test_every_diffusers_video_vae_has_an_adapter_or_a_refusal():
    import diffusers

    video = {n for n in dir(diffusers) if n.startswith("Autoencoder") and ("Video" in n or n in REFUSED)}
    video -= {n for n in video if "Audio" in n}
    driven = {"AutoencoderKLWan", "AutoencoderKLHunyuanVideo", "AutoencoderKLHunyuanVideo15", "AutoencoderKLLTXVideo",
              "AutoencoderKLLTX2Video", "AutoencoderKLCogVideoX", "AutoencoderKLTemporalDecoder"}  # fmt: skip
    assert video - driven <= set(REFUSED) and not driven & set(REFUSED)


def test_the_docs_table_of_refused_vaes_is_the_registrys():
    text = (ROOT / "docs" / "backbones.md").read_text()
    rows = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("| `Autoencoder")}
    assert set(rows) == set(REFUSED)
    for name, refusal in REFUSED.items():
        assert rows[name] == f"| `{name}` | `{refusal.nearest}` | {refusal.reason} |"


def test_a_registered_adapter_for_a_refused_class_wins(registered):
    from diffusers import AutoencoderKLMochi

    class MochiFit(registry.get_backbone("cogvideox")):
        @classmethod
        def fit(cls, vae):
            return Fit(1) if isinstance(vae, AutoencoderKLMochi) else Fit(0, ("not Mochi",))

    registered("mochi-test", MochiFit)
    with torch.device("meta"):
        assert registry.find_backbone(AutoencoderKLMochi()) is MochiFit


@pytest.mark.parametrize(
    "name, backbone",
    [
        ("AutoencoderKLHunyuanVideo", "hunyuan-video"),
        ("AutoencoderKLHunyuanVideo15", "hunyuan-video-1.5"),
        ("AutoencoderKLLTXVideo", "ltx-video"),
        ("AutoencoderKLCogVideoX", "cogvideox"),
        ("AutoencoderKLQwenImage21", "qwen-image-2.1"),
        ("AutoencoderKLMiniMaxH3", "minimax-h3"),
    ],
)
def test_released_default_configs_are_detected(name, backbone):
    import diffusers

    with torch.device("meta"):  # the class defaults are the released layouts (docs/backbones.md)
        vae = getattr(diffusers, name)()
    assert registry.find_backbone(vae).name == backbone


def test_a_non_vae_is_refused_with_the_nearest_adapter():
    with pytest.raises(BackboneError, match="no registered backbone drives a Linear; nearest is 'wan2.1'"):
        refdecoder.wrap(nn.Linear(2, 2))


def _imports(path: Path, modules: set[str]) -> set[str]:
    """``refdecoder.backbones`` modules a file imports anywhere (function-level imports count: they close cycles)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from package import module`
    return found & modules


def test_no_import_cycle_in_backbones():
    paths = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (ROOT / "refdecoder" / "backbones").rglob("*.py")
    }
    graph = {module: _imports(path, set(paths)) - {module} for module, path in paths.items()}
    graph["refdecoder.backbones.registry"] |= {path.partition(":")[0] for path in registry.BUILTINS.values()}
    assert graph["refdecoder.backbones.registry"] >= {"refdecoder.backbones.base", "refdecoder.backbones.wan.wan21"}

    def cycle(node: str, trail: tuple[str, ...]) -> tuple[str, ...] | None:
        if node in trail:
            return trail[trail.index(node) :] + (node,)
        return next((c for nxt in sorted(graph[node]) if (c := cycle(nxt, trail + (node,)))), None)

    assert [c for c in map(lambda m: cycle(m, ()), sorted(graph)) if c] == []
