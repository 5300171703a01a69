"""Load the paper's released RefDecoder checkpoints into refdecoder models.

The released files are Lightning/DeepSpeed checkpoints of the official code: a dict with ``state_dict`` (or
``module`` for DeepSpeed, or a plain dict), keys possibly carrying ``_forward_module.`` / ``_orig_mod.``
fragments, a VAE part (``ae.``; the demo's loaders also accept ``vae.``, ``model.ae.``, ``model.vae.``) and a
transformer part (``transformer.``). Training-only entries (``loss.``, ``loss_fn.``) are dropped. Every other key
is mapped explicitly onto our modules, with shape checks, and nothing is left over.

    model = refdecoder.convert.load_official("wan2.1_ref.pt")          # a ready RefDecoder (official-wan2.1)
    model.save_pretrained("refdecoder-wan2.1")                         # our format (no frozen base weights)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from refdecoder.config import RefDecoderConfig, preset
from refdecoder.errors import CheckpointError
from refdecoder.model import RefDecoder, wrap

__all__ = ["read_checkpoint", "detect_layout", "official_wan_config", "map_wan_state", "load_official"]

logger = logging.getLogger("refdecoder")

# Fragments the official loaders strip anywhere in a key (Lightning < 2.1 wrapper, torch.compile).
_WRAPPER_FRAGMENTS = ("_forward_module.", "_orig_mod.")
_TRAINING_ONLY = ("loss.", "loss_fn.")
_WAN_VAE_PREFIXES = ("model.ae.", "model.vae.", "ae.", "vae.")
_WAN_TRANSFORMER_PREFIXES = ("model.transformer.", "transformer.")
_WAN_TOKENIZER = "decoder.ref_conv_in."
# The official RoPE and attention assume 128-channel heads; the head count follows from the block width.
_OFFICIAL_HEAD_DIM = 128


def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or DeepSpeed folder, with wrapper fragments removed from the keys.

    Args:
        path: ``.ckpt``/``.pt``/``.pth`` (torch), ``.safetensors``, or a DeepSpeed checkpoint folder.
        allow_pickle: allow arbitrary pickled objects (only for files you trust); by default only tensors and
            plain containers are unpickled.
    """
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.glob("**/mp_rank_00_model_states.pt"))
        if not shards:
            raise CheckpointError(f"{path} is a folder but holds no DeepSpeed mp_rank_00_model_states.pt")
        path = shards[0]
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    raw = _load_file(path, allow_pickle)
    state = _unwrap_container(raw, path)
    cleaned = {}
    for key, value in state.items():
        for fragment in _WRAPPER_FRAGMENTS:
            key = key.replace(fragment, "")
        if isinstance(value, torch.Tensor):
            cleaned[key] = value
    return cleaned


def _load_file(path: Path, allow_pickle: bool) -> Mapping:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:  # torch raises several unrelated types for truncated or foreign files
        hint = "" if allow_pickle else " (if the file is trusted and holds non-tensor objects, pass allow_pickle=True)"
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}{hint}") from err


def _unwrap_container(raw: Mapping, path: Path) -> Mapping:
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, expected a dict of tensors")
    for key in ("state_dict", "module"):
        if isinstance(raw.get(key), Mapping):
            return raw[key]
    return raw


def detect_layout(keys: list[str] | set[str]) -> str:
    """``"wan2.1"`` or ``"videovae+"`` from the checkpoint keys; :class:`CheckpointError` when neither fits."""
    keys = set(keys)
    has_transformer = any(k.startswith(_WAN_TRANSFORMER_PREFIXES) for k in keys)
    if has_transformer and any(k.startswith(p + _WAN_TOKENIZER) for p in _WAN_VAE_PREFIXES for k in keys):
        return "wan2.1"
    if (
        has_transformer
        and any(k.startswith("ref_conv_in.") for k in keys)
        and any(k.startswith("decoder_temporal.") for k in keys)
    ):
        return "videovae+"
    sample = sorted(keys)[:8]
    raise CheckpointError(
        "checkpoint matches no known RefDecoder layout: expected Wan2.1 keys ('ae.decoder.ref_conv_in.*' + "
        "'transformer.*') or VideoVAE+ keys ('ref_conv_in.*', 'decoder_temporal.*', 'transformer.*'); "
        f"got {len(keys)} keys such as {sample}"
    )


def _strip(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                out[key[len(prefix) :]] = value
                break
    return out


def official_wan_config(transformer_state: Mapping[str, torch.Tensor]) -> RefDecoderConfig:
    """The ``official-wan2.1`` preset with the layer count, width and FFN size read from the transformer keys."""
    blocks = {int(m.group(1)) for k in transformer_state if (m := re.match(r"transformer\.blocks\.(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise CheckpointError(f"transformer blocks must be numbered 0..N-1, found {sorted(blocks)}")
    width = transformer_state["transformer.blocks.0.attn1.to_q.weight"].shape[0]
    ffn = transformer_state["transformer.blocks.0.ffn.net.0.proj.weight"].shape[0]
    if width % _OFFICIAL_HEAD_DIM:
        raise CheckpointError(f"transformer width {width} is not a multiple of the official head size 128")
    config = preset("official-wan2.1")
    config.transformer.depth = len(blocks)
    config.transformer.num_heads = width // _OFFICIAL_HEAD_DIM
    config.transformer.ffn_dim = ffn
    return config


def _wan_key_map(depth: int) -> dict[str, str]:
    """Official key (after the ``transformer.``/VAE prefixes) -> our RefDecoder key."""
    mapping = {
        _WAN_TOKENIZER + "proj.weight": "tokenizer.proj.weight",
        _WAN_TOKENIZER + "proj.bias": "tokenizer.proj.bias",
        _WAN_TOKENIZER + "norm.gamma": "tokenizer.norm.gamma",
    }
    for s in range(3):
        for kind in ("weight", "bias"):
            mapping[f"patch_embeddings.{s}.{kind}"] = f"projectors.stage{s}.embed.{kind}"
            mapping[f"proj_outs.{s}.{kind}"] = f"projectors.stage{s}.out.{kind}"
    parts = {
        "attn1.to_q": "attn.to_q",
        "attn1.to_k": "attn.to_k",
        "attn1.to_v": "attn.to_v",
        "attn1.to_out.0": "attn.to_out",
        "ffn.net.0.proj": "ffn.fc1",
        "ffn.net.2": "ffn.fc2",
    }
    for n in range(depth):
        for theirs, ours in parts.items():
            for kind in ("weight", "bias"):
                mapping[f"transformer.blocks.{n}.{theirs}.{kind}"] = f"transformer.blocks.{n}.{ours}.{kind}"
        for norm in ("norm_q", "norm_k"):
            mapping[f"transformer.blocks.{n}.attn1.{norm}.weight"] = f"transformer.blocks.{n}.attn.{norm}.weight"
    return mapping


def map_wan_state(
    vae_state: Mapping[str, torch.Tensor], transformer_state: Mapping[str, torch.Tensor], model: RefDecoder
) -> dict[str, torch.Tensor]:
    """Official Wan tensors -> ``model.refdecoder_state_dict()`` keys, asserting every shape and every key."""
    expected = model.refdecoder_state_dict()
    mapping = _wan_key_map(model.config.transformer.depth)
    sources = {**{k: v for k, v in vae_state.items() if k.startswith(_WAN_TOKENIZER)}, **transformer_state}
    unmapped = sorted(set(sources) - set(mapping))
    if unmapped:
        raise CheckpointError(f"{len(unmapped)} official keys have no counterpart: {unmapped[:10]}")
    ours = {}
    for theirs, key in mapping.items():
        if theirs not in sources:
            raise CheckpointError(f"official checkpoint lacks {theirs!r} (needed for {key!r})")
        value = sources[theirs]
        if key == "tokenizer.proj.weight" and value.ndim == 4:
            value = value.unsqueeze(2)  # official Conv2d [out, in, k, k] -> our Conv3d [out, in, 1, k, k]
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{theirs}: shape {tuple(value.shape)} != expected {tuple(expected[key].shape)}")
        ours[key] = value
    # The official decoder is fine-tuned alongside: its weights replace the base VAE's in our checkpoint.
    for key in expected:
        if key.startswith("vae."):
            name = key[len("vae.") :]
            if name not in vae_state:
                raise CheckpointError(f"official checkpoint lacks decoder weight 'ae.{name}'")
            ours[key] = vae_state[name]
    return ours


def _build_wan_vae(vae_state: Mapping[str, torch.Tensor], device: torch.device | str) -> nn.Module:
    from diffusers import AutoencoderKLWan

    with torch.device(device):
        vae = AutoencoderKLWan()  # the Wan2.1 VAE config the official code builds from the hub
    base = {k: v for k, v in vae_state.items() if not k.startswith(_WAN_TOKENIZER)}
    missing, unexpected = set(vae.state_dict()) - set(base), set(base) - set(vae.state_dict())
    if missing or unexpected:
        raise CheckpointError(
            f"the checkpoint's VAE part does not match the Wan2.1 VAE: {len(missing)} missing "
            f"{sorted(missing)[:10]}, {len(unexpected)} unexpected {sorted(unexpected)[:10]}"
        )
    vae.load_state_dict(base, strict=True, assign=str(device) == "meta")
    return vae.eval()


def load_official(
    path: str | Path,
    backbone: str | None = None,
    vae: nn.Module | None = None,
    allow_pickle: bool = False,
    device: torch.device | str = "cpu",
) -> RefDecoder:
    """Read a released RefDecoder checkpoint and return a ready :class:`RefDecoder`.

    Args:
        path: the official checkpoint (file or DeepSpeed folder).
        backbone: ``"wan2.1"`` or ``"videovae+"``; detected from the keys when None (a mismatch raises).
        vae: an existing base VAE to wrap (its decoder weights are replaced by the checkpoint's fine-tuned ones);
            by default one is built from the checkpoint's own VAE weights.
        allow_pickle: see :func:`read_checkpoint`.
        device: where to build the model.
    """
    state = read_checkpoint(path, allow_pickle=allow_pickle)
    state = {k: v for k, v in state.items() if not k.startswith(_TRAINING_ONLY)}
    layout = detect_layout(state.keys())
    if backbone is not None and backbone != layout:
        raise CheckpointError(f"{path} is a {layout} RefDecoder checkpoint, not {backbone}")
    if layout != "wan2.1":
        raise CheckpointError(f"{path}: converting {layout} checkpoints needs the {layout} backbone adapter")
    vae_state = _strip(state, _WAN_VAE_PREFIXES)
    transformer_state = _strip(state, _WAN_TRANSFORMER_PREFIXES)
    config = official_wan_config(transformer_state)
    vae = vae if vae is not None else _build_wan_vae(vae_state, device)
    model = wrap(vae, config)
    try:
        model.load_refdecoder_state_dict(map_wan_state(vae_state, transformer_state, model))
    except CheckpointError:
        model.unwrap()
        raise
    logger.info("loaded official %s RefDecoder (%d blocks) from %s", layout, config.transformer.depth, path)
    return model
