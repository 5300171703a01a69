"""Our blocks reproduce the official RefDecoder components (fixture ``components/``, README §5) to atol 1e-4.

Weights are regenerated with the fixture fill rule from the reduced models' manifests and loaded through an
explicit official -> ours key map (to move into ``refdecoder/convert.py`` later).
"""

from __future__ import annotations

import pytest
import torch

from refdecoder.blocks import (
    ReferenceTokenizer,
    RotaryEmbedding3D,
    SharedTransformer,
    StageProjector,
    TransformerBlock,
    space_to_depth,
)
from tests.official_fill import fill_state_dict, load_manifest

ATOL = 1e-4
DEPTH, DIM, HEADS, FFN = 2, 256, 2, 8960  # reduced official transformer (2 blocks, 2 heads x 128)

# Official Wan reference encoder -> ReferenceTokenizer; the Conv2d weight gains a unit time axis.
WAN_TOKENIZER_KEYS = {
    "ae.decoder.ref_conv_in.proj.weight": "proj.weight",
    "ae.decoder.ref_conv_in.proj.bias": "proj.bias",
    "ae.decoder.ref_conv_in.norm.gamma": "norm.gamma",
}
VVP_TOKENIZER_KEYS = {"ref_conv_in.proj.weight": "proj.weight", "ref_conv_in.proj.bias": "proj.bias"}

# One official DiT block -> one TransformerBlock (suffixes after ``transformer.transformer.blocks.N.``).
BLOCK_KEYS = {
    "attn1.to_q.weight": "attn.to_q.weight",
    "attn1.to_q.bias": "attn.to_q.bias",
    "attn1.to_k.weight": "attn.to_k.weight",
    "attn1.to_k.bias": "attn.to_k.bias",
    "attn1.to_v.weight": "attn.to_v.weight",
    "attn1.to_v.bias": "attn.to_v.bias",
    "attn1.to_out.0.weight": "attn.to_out.weight",
    "attn1.to_out.0.bias": "attn.to_out.bias",
    "attn1.norm_q.weight": "attn.norm_q.weight",
    "attn1.norm_k.weight": "attn.norm_k.weight",
    "ffn.net.0.proj.weight": "ffn.fc1.weight",
    "ffn.net.0.proj.bias": "ffn.fc1.bias",
    "ffn.net.2.weight": "ffn.fc2.weight",
    "ffn.net.2.bias": "ffn.fc2.bias",
}
TRANSFORMER_KEYS = {
    f"transformer.transformer.blocks.{n}.{src}": f"blocks.{n}.{dst}"
    for n in range(DEPTH)
    for src, dst in BLOCK_KEYS.items()
}


def projector_keys(stage: int) -> dict[str, str]:
    """Official per-stage patch embedding / output projection -> StageProjector ``embed`` / ``out``."""
    return {
        f"transformer.patch_embeddings.{stage}.weight": "embed.weight",
        f"transformer.patch_embeddings.{stage}.bias": "embed.bias",
        f"transformer.proj_outs.{stage}.weight": "out.weight",
        f"transformer.proj_outs.{stage}.bias": "out.bias",
    }


# (channels, patch) of the Wan stages; the fixture inputs are the joint [reference, video] sequence.
WAN_STAGES = {0: (384, (1, 2, 2)), 1: (192, (1, 4, 4)), 2: (192, (1, 8, 8))}
TRANSFORMER_CASES = {"stage0": 0, "stage1": 1, "stage2": 2, "stage0_pad": 0}


def load_mapped(module: torch.nn.Module, official: dict[str, torch.Tensor], key_map: dict[str, str]) -> None:
    """Strictly load ``official[src]`` into ``module``'s ``dst`` for every mapping (shapes reshaped, numel kept)."""
    ours = module.state_dict()
    assert set(key_map.values()) == set(ours), "key map must cover exactly the module's state_dict"
    state = {}
    for src, dst in key_map.items():
        assert official[src].numel() == ours[dst].numel(), (src, dst)
        state[dst] = official[src].reshape(ours[dst].shape)
    module.load_state_dict(state, strict=True)


@pytest.fixture(scope="module")
def fixture_tensors(official_fixtures):
    from safetensors.torch import load_file

    return load_file(official_fixtures / "components" / "components.safetensors")


@pytest.fixture(scope="module")
def wan_weights(official_fixtures):
    entries = load_manifest(official_fixtures / "wan21_refdecoder_small" / "manifest.json")
    weights = fill_state_dict(entries, "transformer.")
    weights.update(fill_state_dict(entries, "ae.decoder.ref_conv_in."))
    return weights


@pytest.fixture(scope="module")
def shared_transformer(wan_weights):
    transformer = SharedTransformer(DIM, DEPTH, HEADS, FFN).eval()
    load_mapped(transformer, wan_weights, TRANSFORMER_KEYS)
    return transformer


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max |diff| {diff:.3g} > {atol}"


def test_key_map_covers_the_official_transformer(wan_weights):
    official = {k for k in wan_weights if k.startswith("transformer.transformer.")}
    assert official == set(TRANSFORMER_KEYS)
    mapped = set(TRANSFORMER_KEYS) | set(WAN_TOKENIZER_KEYS)
    mapped |= {k for s in WAN_STAGES for k in projector_keys(s)}
    assert mapped == set(wan_weights), sorted(set(wan_weights) ^ mapped)


@torch.no_grad()
def test_wan_reference_encoder(fixture_tensors, wan_weights):
    tokenizer = ReferenceTokenizer(384, 8, kind="space_to_depth", kernel_size=3, norm="rms").eval()
    load_mapped(tokenizer, wan_weights, WAN_TOKENIZER_KEYS)
    image = fixture_tensors["refconvin.in.image"]
    s2d = space_to_depth(image[:, :, 0], 8)
    assert_close(s2d, fixture_tensors["refconvin.mid.space_to_depth"], atol=0.0)
    assert_close(tokenizer.proj(s2d.unsqueeze(2))[:, :, 0], fixture_tensors["refconvin.mid.conv_out"])
    assert_close(tokenizer(image), fixture_tensors["refconvin.out"])


@torch.no_grad()
def test_videovaeplus_reference_encoder(official_fixtures, fixture_tensors):
    entries = load_manifest(official_fixtures / "videovaeplus_refdecoder_small" / "manifest.json")
    tokenizer = ReferenceTokenizer(512, 2, kind="space_to_depth", kernel_size=3, norm="none").eval()
    load_mapped(tokenizer, fill_state_dict(entries, "ref_conv_in."), VVP_TOKENIZER_KEYS)
    image = fixture_tensors["vvp_refconvin.in.image"]
    s2d = space_to_depth(image[:, :, 0], 2).unsqueeze(2)
    assert_close(s2d, fixture_tensors["vvp_refconvin.mid.space_to_depth"], atol=0.0)
    assert_close(tokenizer(image), fixture_tensors["vvp_refconvin.out"])


def test_rope_tables(fixture_tensors):
    cos, sin = RotaryEmbedding3D(128)((3, 4, 6))
    assert cos.dtype == sin.dtype == torch.float32
    assert_close(cos, fixture_tensors["rope.freqs_cos"].reshape(72, 128), atol=1e-6)
    assert_close(sin, fixture_tensors["rope.freqs_sin"].reshape(72, 128), atol=1e-6)


@torch.no_grad()
def test_transformer_block(fixture_tensors, wan_weights):
    block = TransformerBlock(DIM, HEADS, FFN).eval()
    block_keys = {k: v.removeprefix("blocks.0.") for k, v in TRANSFORMER_KEYS.items() if v.startswith("blocks.0.")}
    load_mapped(block, wan_weights, block_keys)
    x = fixture_tensors["block0.in.tokens"]
    rope = tuple(fixture_tensors[f"rope.freqs_{n}"].reshape(72, 128) for n in ("cos", "sin"))
    attn_out = block.attn(block.norm1(x), rope)
    assert_close(attn_out, fixture_tensors["block0.mid.attn_out"])
    assert_close(block.ffn(block.norm2(x + attn_out)), fixture_tensors["block0.mid.ffn_out"])
    assert_close(block(x, rope), fixture_tensors["block0.out.tokens"])


@torch.no_grad()
@pytest.mark.parametrize("case", sorted(TRANSFORMER_CASES))
def test_transformer_stage(fixture_tensors, wan_weights, shared_transformer, case):
    stage = TRANSFORMER_CASES[case]
    channels, patch = WAN_STAGES[stage]
    projector = StageProjector(channels, DIM, patch, residual=False).eval()
    load_mapped(projector, wan_weights, projector_keys(stage))
    x = fixture_tensors[f"transformer.{case}.in"]
    assert_close(projector(x, shared_transformer, num_reference=1), fixture_tensors[f"transformer.{case}.out"])
