"""Load the paper's released RefDecoder checkpoints into refdecoder models.

The released files are Lightning/DeepSpeed checkpoints of the official code: a dict with ``state_dict`` (or
``module`` for DeepSpeed, or a plain dict), keys possibly carrying ``_forward_module.`` / ``_orig_mod.``
fragments. Training-only entries (``loss.``, ``loss_fn.``) are dropped. Two layouts exist:

- Wan2.1: a VAE part (``ae.``; the demo's loaders also accept ``vae.``, ``model.ae.``, ``model.vae.``) holding the
  reference encoder at ``ae.decoder.ref_conv_in``, and a transformer part (``transformer.``).
- VideoVAE+: the autoencoder's own keys (``encoder.``, ``decoder.``, ``encoder_temporal.``, ``decoder_temporal.``)
  plus ``decoder.pre_transformer_norms{,_ref}.{0,1,2}``, ``ref_conv_in.`` and ``transformer.``.

Every other key is mapped explicitly onto our modules, with shape checks, and nothing is left over.

    model = refdecoder.convert.load_official("wan2.1_ref.pt")          # a ready RefDecoder (official-wan2.1)
    model.save_pretrained("refdecoder-wan2.1")                         # our format (no frozen base weights)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from refdecoder.config import RefDecoderConfig, preset
from refdecoder.errors import CheckpointError
from refdecoder.model import RefDecoder, wrap

if TYPE_CHECKING:
    from refdecoder.backbones.videovaeplus import VideoVAEPlusConfig

__all__ = [
    "read_checkpoint",
    "sniff_format",
    "detect_layout",
    "official_wan_config",
    "official_videovaeplus_config",
    "map_wan_state",
    "map_videovaeplus_state",
    "load_official",
]

logger = logging.getLogger("refdecoder")

# Fragments the official loaders strip anywhere in a key (Lightning < 2.1 wrapper, torch.compile).
_WRAPPER_FRAGMENTS = ("_forward_module.", "_orig_mod.")
_TRAINING_ONLY = ("loss.", "loss_fn.")
_WAN_VAE_PREFIXES = ("model.ae.", "model.vae.", "ae.", "vae.")
_WAN_TRANSFORMER_PREFIXES = ("model.transformer.", "transformer.")
_WAN_TOKENIZER = "decoder.ref_conv_in."
_VVP_TOKENIZER = "ref_conv_in."
_VVP_NORMS = {"decoder.pre_transformer_norms.": "norm_video", "decoder.pre_transformer_norms_ref.": "norm_reference"}
_VVP_ADDED = (_VVP_TOKENIZER, "transformer.", *_VVP_NORMS)
# Where our saved decoder weights sit in a RefDecoder state dict (see RefDecoder.refdecoder_state_dict).
_BASE = "vae."
# The official RoPE and attention assume 128-channel heads; the head count follows from the block width.
_OFFICIAL_HEAD_DIM = 128
_NUM_STAGES = 3


# --- reading ------------------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or DeepSpeed folder, with wrapper fragments removed from the keys.

    Args:
        path: ``.ckpt``/``.pt``/``.pth`` (torch), ``.safetensors``, a DeepSpeed checkpoint folder, a folder holding
            one checkpoint file, or a Hugging Face repo id (``org/name``, ``org/name@rev/file.ckpt``; see
            :mod:`refdecoder.hub`).
        allow_pickle: allow arbitrary pickled objects (only for files you trust); by default only tensors and
            plain containers are unpickled.
    """
    from refdecoder.hub import resolve_path

    path = resolve_path(path, what="checkpoint")
    if path.is_dir():
        path = _checkpoint_in(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    state = _unwrap_container(_load_file(path, allow_pickle), path)
    cleaned = {}
    for key, value in state.items():
        for fragment in _WRAPPER_FRAGMENTS:
            key = key.replace(fragment, "")
        if isinstance(value, torch.Tensor):
            cleaned[key] = value
    return cleaned


def _checkpoint_in(folder: Path) -> Path:
    """The checkpoint file of a folder: DeepSpeed's model states, else its only checkpoint file."""
    shards = sorted(folder.glob("**/mp_rank_00_model_states.pt"))
    if shards:
        return shards[0]
    files = sorted(p for p in folder.iterdir() if p.suffix in (".ckpt", ".pt", ".pth", ".bin", ".safetensors"))
    if len(files) != 1:
        found = f"{len(files)} checkpoint files ({[p.name for p in files][:5]})" if files else "no checkpoint file"
        raise CheckpointError(
            f"{folder} holds {found} and no DeepSpeed mp_rank_00_model_states.pt; name the file (org/name/FILE)"
        )
    return files[0]


def _load_file(path: Path, allow_pickle: bool) -> Mapping:
    kind = sniff_format(path)
    if kind == "text":
        first = path.read_bytes()[:60].decode("utf-8", "replace").splitlines()[0] if path.stat().st_size else ""
        raise CheckpointError(f"{path} is a text file (it starts with {first!r}), not a checkpoint")
    if kind == "unknown" and not allow_pickle:
        raise CheckpointError(
            f"{path} is neither a torch checkpoint (zip or pickle) nor a safetensors file; if it is a checkpoint in "
            "another pickle layout and you trust it, pass --allow-pickle (allow_pickle=True in Python)"
        )
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:  # torch raises several unrelated types for truncated or foreign files
        reason = " ".join(str(err).split())
        if not allow_pickle and "weights_only" in reason.lower().replace(" ", "_"):
            reason = "it holds Python objects other than tensors"
            hint = "; if the file is trusted, pass --allow-pickle (allow_pickle=True in Python)"
        else:
            reason, hint = f"{type(err).__name__}: {reason[:300]}", ""
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}{hint}") from err


def sniff_format(path: Path) -> str:
    """The container of a checkpoint file from its first bytes: ``"zip"`` (torch >= 1.6), ``"pickle"`` (legacy
    torch), ``"safetensors"``, ``"text"``, or ``"unknown"``."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown"
    return "text" if all(c.isprintable() or c.isspace() for c in text) else "unknown"


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
        and any(k.startswith(_VVP_TOKENIZER) for k in keys)
        and any(k.startswith("decoder_temporal.") for k in keys)
    ):
        return "videovae+"
    base_only = any(k.startswith(("decoder_temporal.", "encoder.down_blocks.", "ae.encoder.")) for k in keys)
    hint = (
        " It looks like a base autoencoder without RefDecoder weights: load it as the base VAE." if base_only else ""
    )
    raise CheckpointError(
        "checkpoint matches no known RefDecoder layout: expected Wan2.1 keys ('ae.decoder.ref_conv_in.*' + "
        "'transformer.*') or VideoVAE+ keys ('ref_conv_in.*', 'decoder_temporal.*', 'transformer.*'); "
        f"got {len(keys)} keys such as {sorted(keys)[:8]}.{hint}"
    )


def _strip(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                out[key[len(prefix) :]] = value
                break
    return out


# --- shared pieces ------------------------------------------------------------------------------------------
def _official_config(name: str, transformer_state: Mapping[str, torch.Tensor]) -> RefDecoderConfig:
    """Preset ``name`` with the layer count, width and FFN size read from the (prefix-stripped) transformer keys."""
    blocks = {int(m.group(1)) for k in transformer_state if (m := re.match(r"transformer\.blocks\.(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise CheckpointError(f"transformer blocks must be numbered 0..N-1, found {sorted(blocks)}")
    try:
        width = transformer_state["transformer.blocks.0.attn1.to_q.weight"].shape[0]
        ffn = transformer_state["transformer.blocks.0.ffn.net.0.proj.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(
            f"official checkpoint lacks transformer weight {err} (needed to size the model)"
        ) from None
    if width % _OFFICIAL_HEAD_DIM:
        raise CheckpointError(f"transformer width {width} is not a multiple of the official head size 128")
    config = preset(name)
    config.transformer.depth = len(blocks)
    config.transformer.num_heads = width // _OFFICIAL_HEAD_DIM
    config.transformer.ffn_dim = ffn
    return config


def _transformer_key_map(depth: int) -> dict[str, str]:
    """Official transformer key (after the ``transformer.`` prefix) -> our RefDecoder key."""
    mapping = {}
    for s in range(_NUM_STAGES):
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


def _map_added(
    sources: Mapping[str, torch.Tensor], mapping: Mapping[str, str], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename the official added-module tensors by ``mapping``, asserting every key and every shape."""
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
    return ours


def _decoder_weights(
    expected: Mapping[str, torch.Tensor], base_state: Mapping[str, torch.Tensor], shown_prefix: str
) -> dict[str, torch.Tensor]:
    """The official decoder is fine-tuned alongside: its weights replace the base VAE's in our checkpoint."""
    ours = {}
    for key in expected:
        if key.startswith(_BASE):
            name = key[len(_BASE) :]
            if name not in base_state:
                raise CheckpointError(f"official checkpoint lacks decoder weight '{shown_prefix}{name}'")
            ours[key] = base_state[name]
    return ours


def _wrap_and_load(
    vae: nn.Module, config: RefDecoderConfig, mapper: Callable[[RefDecoder], dict[str, torch.Tensor]]
) -> RefDecoder:
    model = wrap(vae, config)
    try:
        model.load_refdecoder_state_dict(mapper(model))
    except CheckpointError:
        model.unwrap()
        raise
    return model


# --- Wan2.1 -------------------------------------------------------------------------------------------------
def official_wan_config(transformer_state: Mapping[str, torch.Tensor]) -> RefDecoderConfig:
    """The ``official-wan2.1`` preset with the layer count, width and FFN size read from the transformer keys."""
    return _official_config("official-wan2.1", transformer_state)


def map_wan_state(
    vae_state: Mapping[str, torch.Tensor], transformer_state: Mapping[str, torch.Tensor], model: RefDecoder
) -> dict[str, torch.Tensor]:
    """Official Wan tensors -> ``model.refdecoder_state_dict()`` keys, asserting every shape and every key."""
    expected = model.refdecoder_state_dict()
    mapping = _transformer_key_map(model.config.transformer.depth)
    mapping.update({_WAN_TOKENIZER + k: "tokenizer." + k for k in ("proj.weight", "proj.bias", "norm.gamma")})
    sources = {**{k: v for k, v in vae_state.items() if k.startswith(_WAN_TOKENIZER)}, **transformer_state}
    return {**_map_added(sources, mapping, expected), **_decoder_weights(expected, vae_state, "ae.")}


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


def _load_wan(state: Mapping[str, torch.Tensor], vae: nn.Module | None, device: torch.device | str) -> RefDecoder:
    vae_state = _strip(state, _WAN_VAE_PREFIXES)
    transformer_state = _strip(state, _WAN_TRANSFORMER_PREFIXES)
    config = official_wan_config(transformer_state)
    vae = vae if vae is not None else _build_wan_vae(vae_state, device)
    return _wrap_and_load(vae, config, lambda model: map_wan_state(vae_state, transformer_state, model))


# --- VideoVAE+ ----------------------------------------------------------------------------------------------
def official_videovaeplus_config(transformer_state: Mapping[str, torch.Tensor]) -> RefDecoderConfig:
    """The ``official-videovae+`` preset with depth, heads and FFN size read from the transformer keys."""
    return _official_config("official-videovae+", transformer_state)


def map_videovaeplus_state(state: Mapping[str, torch.Tensor], model: RefDecoder) -> dict[str, torch.Tensor]:
    """Official VideoVAE+ RefDecoder tensors -> ``model.refdecoder_state_dict()`` keys, every key and shape asserted.

    ``ref_conv_in.proj`` -> ``tokenizer.proj``; ``decoder.pre_transformer_norms.s`` ->
    ``projectors.stage{s}.norm_video`` and ``decoder.pre_transformer_norms_ref.s`` -> ``.norm_reference``; the
    transformer as for Wan; the fine-tuned ``decoder.*`` -> ``vae.decoder.*``.
    """
    expected = model.refdecoder_state_dict()
    mapping = _transformer_key_map(model.config.transformer.depth)
    mapping.update({_VVP_TOKENIZER + k: "tokenizer." + k for k in ("proj.weight", "proj.bias")})
    for prefix, ours in _VVP_NORMS.items():
        for s in range(_NUM_STAGES):
            for kind in ("weight", "bias"):
                mapping[f"{prefix}{s}.{kind}"] = f"projectors.stage{s}.{ours}.{kind}"
    added = {k: v for k, v in state.items() if k.startswith((_VVP_TOKENIZER, *_VVP_NORMS))}
    sources = {**added, **_strip(state, ("transformer.",))}
    return {**_map_added(sources, mapping, expected), **_decoder_weights(expected, state, "")}


def _videovaeplus_base_config(base: Mapping[str, torch.Tensor]) -> VideoVAEPlusConfig:
    """The autoencoder's construction arguments, read from the shapes of its own weights."""
    from refdecoder.backbones.videovaeplus import VideoVAEPlusConfig

    def count(pattern: str) -> int:
        return len({m.group(1) for k in base if (m := re.match(pattern, k))})

    try:
        ch, in_channels = base["encoder.conv_in.weight"].shape[:2]
        z = base["decoder.conv_in.weight"].shape[1]
        levels = range(count(r"encoder\.down\.(\d+)\."))
        table = base["decoder.mid.attn_1_tmp.relative_position_k.embeddings_table"]  # 2 * max_distance + 1 rows
        return VideoVAEPlusConfig(
            in_channels=in_channels,
            out_channels=base["decoder.conv_out.weight"].shape[0],
            ch=ch,
            ch_mult=tuple(base[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels),
            num_res_blocks=count(r"encoder\.down\.0\.block\.(\d+)\."),
            z_channels=z,
            double_z=base["encoder.conv_out.weight"].shape[0] == 2 * z,
            temporal_hidden=base["encoder_temporal.conv_in.conv.weight"].shape[0],
            temporal_scale_factor=2 ** count(r"encoder_temporal\.mid_blocks\.(\d+)\."),
            max_relative_distance=(table.shape[0] - 1) // 2,
        )
    except KeyError as err:
        raise CheckpointError(f"the checkpoint's VideoVAE+ autoencoder part lacks {err}") from None


def _check_videovaeplus_base(vae: nn.Module, base: Mapping[str, torch.Tensor]) -> None:
    from refdecoder.backbones.videovaeplus.checkpoint import check_state_dict

    expected = {k: v.shape for k, v in vae.state_dict().items()}
    check_state_dict(expected, base, f"the VideoVAE+ base model {vae.config}")


def _build_videovaeplus_vae(base: Mapping[str, torch.Tensor], device: torch.device | str) -> nn.Module:
    from refdecoder.backbones.videovaeplus import VideoVAEPlus

    with torch.device("meta"):
        vae = VideoVAEPlus(_videovaeplus_base_config(base))
    _check_videovaeplus_base(vae, base)
    # Assigning the checkpoint's tensors avoids a second copy of the weights (the model was built on meta).
    vae.load_state_dict({k: v.float() for k, v in base.items()}, strict=True, assign=True)
    return vae.to(device).eval()


def _load_videovaeplus(
    state: Mapping[str, torch.Tensor], vae: nn.Module | None, device: torch.device | str
) -> RefDecoder:
    base = {k: v for k, v in state.items() if not k.startswith(_VVP_ADDED)}
    config = official_videovaeplus_config(_strip(state, ("transformer.",)))
    if vae is None:
        vae = _build_videovaeplus_vae(base, device)
    else:
        _check_videovaeplus_base(vae, base)
    return _wrap_and_load(vae, config, lambda model: map_videovaeplus_state(state, model))


_LOADERS = {"wan2.1": _load_wan, "videovae+": _load_videovaeplus}


def load_official(
    path: str | Path,
    backbone: str | None = None,
    vae: nn.Module | None = None,
    allow_pickle: bool = False,
    device: torch.device | str = "cpu",
) -> RefDecoder:
    """Read a released RefDecoder checkpoint and return a ready :class:`RefDecoder`.

    Args:
        path: the official checkpoint (file, DeepSpeed folder, or Hub id: see :func:`read_checkpoint`).
        backbone: ``"wan2.1"`` or ``"videovae+"``; detected from the keys when None (a mismatch raises).
        vae: an existing base VAE to wrap (its decoder weights are replaced by the checkpoint's fine-tuned ones);
            by default one is built from the checkpoint's own VAE weights.
        allow_pickle: see :func:`read_checkpoint`.
        device: where to build the model.

    Raises:
        CheckpointError: unreadable or truncated file, keys of neither layout, a layout other than ``backbone``,
            or keys/shapes that do not match the model (listed in the message).
    """
    state = read_checkpoint(path, allow_pickle=allow_pickle)
    state = {k: v for k, v in state.items() if not k.startswith(_TRAINING_ONLY)}
    layout = detect_layout(state.keys())
    if backbone is not None and backbone != layout:
        raise CheckpointError(f"{path} is a {layout} RefDecoder checkpoint, not {backbone}")
    model = _LOADERS[layout](state, vae, device)
    logger.info("loaded official %s RefDecoder (%d blocks) from %s", layout, model.config.transformer.depth, path)
    return model
