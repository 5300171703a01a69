"""Loading the paper's released Wan2.1 RefDecoder checkpoints: key maps on full-size manifests, numeric fixtures."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from refdecoder import CheckpointError
from refdecoder.convert import (
    _build_wan_vae,
    _strip,
    detect_layout,
    load_official,
    map_wan_state,
    official_wan_config,
    read_checkpoint,
)
from refdecoder.model import wrap
from tests.official_fill import fill_state_dict, load_manifest


def _fixture_checkpoint(official_fixtures, tmp_path, container="state_dict", prefix=""):
    entries = load_manifest(official_fixtures / "wan21_refdecoder_small" / "manifest.json")
    state = {prefix + k: v for k, v in fill_state_dict(entries).items()}
    path = tmp_path / "official.ckpt"
    torch.save({container: state, "epoch": 3}, path)
    return path


def _case(official_fixtures, name):
    return load_file(official_fixtures / "wan21_refdecoder_small" / f"case_{name}.safetensors")


def _decode(model, case):
    with torch.no_grad():
        out = model.decode(case["in.latent"], reference=case["in.reference"])
        base = model.decode(case["in.latent"])
    return out, base


def test_tiny_case_reproduced(official_fixtures, tmp_path):
    model = load_official(_fixture_checkpoint(official_fixtures, tmp_path)).eval()
    case = _case(official_fixtures, "tiny_t2")
    out, base = _decode(model, case)
    assert (out - case["out.refdecoder"]).abs().max().item() <= 1e-4
    assert (base - case["out.baseline_skip"]).abs().max().item() <= 1e-4
    tokens = model.tokenizer(case["in.reference"])
    assert torch.allclose(tokens, case["mid.ref_conv_in_out"].float(), atol=2e-3, rtol=2e-3)


def test_deepspeed_layout_with_wrapper_prefix(official_fixtures, tmp_path):
    path = _fixture_checkpoint(official_fixtures, tmp_path, container="module", prefix="_forward_module.")
    state = read_checkpoint(path)
    assert detect_layout(state.keys()) == "wan2.1"
    assert not any("_forward_module." in k for k in state)


@pytest.mark.parametrize("manifest", ["wan21_refdecoder_eval.json", "wan21_refdecoder_train30.json"])
def test_full_size_manifests_map_strictly(official_fixtures, manifest):
    """Every key of the released layouts lands on our modules with its shape, nothing left over (meta device)."""
    entries = load_manifest(official_fixtures / "manifests" / manifest)
    state = {e["name"]: torch.empty(e["shape"], device="meta") for e in entries if not e["name"].startswith("loss")}
    assert detect_layout(state.keys()) == "wan2.1"
    vae_state, transformer_state = _strip(state, ("ae.",)), _strip(state, ("transformer.",))
    assert len(vae_state) + len(transformer_state) == len(state)
    config = official_wan_config(transformer_state)
    assert config.transformer.depth == (30 if "train30" in manifest else 10)
    assert (config.transformer.num_heads, config.transformer.ffn_dim, config.stages.residual) == (12, 8960, False)
    model = wrap(_build_wan_vae(vae_state, "meta"), config)
    mapped = map_wan_state(vae_state, transformer_state, model)
    assert set(mapped) == set(model.refdecoder_state_dict())
    added = sum(p.numel() for n, p in model.added_parameters())
    tokenizer = sum(v.numel() for k, v in vae_state.items() if k.startswith("decoder.ref_conv_in."))
    assert added == sum(v.numel() for v in transformer_state.values()) + tokenizer


def test_truncated_file(official_fixtures, tmp_path):
    path = _fixture_checkpoint(official_fixtures, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_official(path)


def test_foreign_keys_list_the_expected_layouts(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="ae.decoder.ref_conv_in"):
        load_official(path)


def test_backbone_mismatch(official_fixtures, tmp_path):
    with pytest.raises(CheckpointError, match="wan2.1 RefDecoder checkpoint, not videovae"):
        load_official(_fixture_checkpoint(official_fixtures, tmp_path), backbone="videovae+")


def test_missing_transformer_key(official_fixtures, tmp_path):
    path = _fixture_checkpoint(official_fixtures, tmp_path)
    state = torch.load(path)["state_dict"]
    del state["transformer.proj_outs.1.bias"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match="proj_outs.1.bias"):
        load_official(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full_t1", "full_t2"])
def test_full_size_cases_slow(official_fixtures, tmp_path, name):
    model = load_official(_fixture_checkpoint(official_fixtures, tmp_path)).eval()
    case = _case(official_fixtures, name)
    reference = case.get("in.reference", _case(official_fixtures, "full_t1")["in.reference"])
    with torch.no_grad():
        out = model.decode(case["in.latent"], reference=reference)
    assert (out - case["out.refdecoder"].float()).abs().max().item() <= 1e-3
    if "out.baseline_skip" in case:
        with torch.no_grad():
            base = model.decode(case["in.latent"])
        assert (base - case["out.baseline_skip"].float()).abs().max().item() <= 1e-3
