"""Typed configuration of a RefDecoder, its named presets, and JSON (de)serialisation.

A :class:`RefDecoderConfig` describes only what the library adds to a backbone; everything about the backbone
itself (stage channels, scales, default patch sizes) comes from its adapter. Configs are saved next to the
weights as ``refdecoder_config.json`` with the library version and the backbone name, and loading tolerates
unknown keys (with a warning) so that files written by newer versions still open.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from refdecoder.blocks.latent_degradation import LatentDegradationConfig
from refdecoder.blocks.upscale_head import UpscaleConfig
from refdecoder.config_builder import build_dataclass
from refdecoder.errors import ConfigError

__all__ = [
    "TokenizerConfig",
    "TransformerConfig",
    "StageConfig",
    "DropoutConfig",
    "WindowConfig",
    "CorrespondenceConfig",
    "RefDecoderConfig",
    "PRESETS",
    "DEFAULT_PRESET",
    "preset",
    "resolve_config",
]


Patch = tuple[int, int, int]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class TokenizerConfig:
    """How the reference frame becomes tokens in the decoder's first stage space."""

    kind: Literal["patch_conv", "space_to_depth"] = "patch_conv"  # space_to_depth = the paper's encoder
    norm: Literal["rms", "group", "none"] = "rms"
    kernel_size: int = 3  # conv kernel of the space_to_depth variant (ignored by patch_conv)
    # Also tokenize the pixel reference at every later conditioned stage (a tokenizer of that stage's scale and
    # width) and add it to the reference features that come through the stages: the reference's pixel detail then
    # reaches each stage directly rather than only through the first stage's channels. Off in every preset.
    per_stage: bool = False

    def __post_init__(self) -> None:
        _check(
            self.kind in ("patch_conv", "space_to_depth"),
            f"tokenizer.kind must be patch_conv|space_to_depth, got {self.kind!r}",
        )
        _check(self.norm in ("rms", "group", "none"), f"tokenizer.norm must be rms|group|none, got {self.norm!r}")
        _check(
            self.kernel_size >= 1 and self.kernel_size % 2 == 1,
            f"tokenizer.kernel_size must be odd, got {self.kernel_size}",
        )


@dataclass
class TransformerConfig:
    """The transformer shared by every decoder stage."""

    depth: int = 4
    num_heads: int = 8
    head_dim: int = 128
    ffn_dim: int | None = None  # None: 4 x width
    rope_theta: float = 10000.0
    # None: every token attends to every token of its stage (the paper). r >= 0: only to tokens within r token rows
    # and columns, in every frame, so the reference token at the same position is always in view (a locality prior
    # that the reference path learns much faster with; see docs/architecture.md "Attention scope").
    attention_radius: int | None = None
    # With a local attention_radius: the radius in the video frames (None: the same as in the reference; 0: only
    # the query's own position in the video frames, a neighbourhood in the reference).
    video_attention_radius: int | None = None
    # A learnable per-head bias by spatial offset from query to key (blocks.LocalityBias), initialised to
    # -slope * distance so attention starts on the query's own position. With global attention it reaches
    # locality_bias_extent tokens (farther offsets share the edge value); a local scope uses its radius.
    locality_bias: bool = False
    locality_bias_slope: float = 3.0
    locality_bias_extent: int = 4
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check(self.depth >= 1, f"transformer.depth must be >= 1, got {self.depth}")
        _check(self.num_heads >= 1, f"transformer.num_heads must be >= 1, got {self.num_heads}")
        # RoPE splits each head into t/h/w parts of rotation pairs, so the head size must be even and >= 6.
        _check(
            self.head_dim >= 6 and self.head_dim % 2 == 0,
            f"transformer.head_dim must be even and >= 6, got {self.head_dim}",
        )
        _check(self.ffn_dim is None or self.ffn_dim >= 1, f"transformer.ffn_dim must be positive, got {self.ffn_dim}")
        _check(
            self.attention_radius is None or (isinstance(self.attention_radius, int) and self.attention_radius >= 0),
            f"transformer.attention_radius must be None (global) or an int >= 0, got {self.attention_radius!r}",
        )
        _check(
            self.video_attention_radius is None
            or (
                self.attention_radius is not None
                and isinstance(self.video_attention_radius, int)
                and self.video_attention_radius >= 0
            ),
            "transformer.video_attention_radius must be None, or an int >= 0 with a local attention_radius; got "
            f"{self.video_attention_radius!r} with attention_radius {self.attention_radius!r}",
        )
        _check(
            isinstance(self.locality_bias, bool),
            f"transformer.locality_bias must be a bool, got {self.locality_bias!r}",
        )
        extent = self.locality_bias_extent
        _check(
            self.locality_bias_slope >= 0 and isinstance(extent, int) and extent >= 0,
            "transformer.locality_bias_slope and locality_bias_extent must be >= 0 (extent an int), got "
            f"{self.locality_bias_slope!r}, {self.locality_bias_extent!r}",
        )

    @property
    def width(self) -> int:
        """Token width ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    @property
    def ffn_width(self) -> int:
        """Hidden width of the feed-forward layers."""
        return self.ffn_dim if self.ffn_dim is not None else 4 * self.width


@dataclass
class StageConfig:
    """Which decoder stages attend jointly over reference and video tokens, and how."""

    indices: tuple[int, ...] | None = None  # adapter stage indices to condition; None = all of them
    patch_sizes: tuple[Patch, ...] | None = None  # per conditioned stage; None = the adapter's defaults
    # Per conditioned stage, multiplies the adapter's default spatial patch (coarser token grid, fewer tokens).
    patch_multipliers: tuple[int, ...] | None = None
    residual: bool = True  # add a zero-initialised update (identity at init); False replaces (official Wan)
    residual_reference: bool = True  # with residual, add it to the reference frames too (False: official VideoVAE+)
    input_norm: Literal["none", "group"] = "none"  # GroupNorm before the stage (official VideoVAE+)

    def __post_init__(self) -> None:
        if self.indices is not None:
            self.indices = tuple(int(i) for i in self.indices)
            _check(
                len(self.indices) > 0 and len(set(self.indices)) == len(self.indices),
                f"stages.indices must be unique and non-empty, got {self.indices}",
            )
        if self.patch_sizes is not None:
            self.patch_sizes = tuple(tuple(int(v) for v in p) for p in self.patch_sizes)
            _check(
                all(len(p) == 3 and min(p) >= 1 for p in self.patch_sizes),
                f"stages.patch_sizes must be (t, h, w) triples >= 1, got {self.patch_sizes}",
            )
        if self.patch_multipliers is not None:
            self.patch_multipliers = tuple(int(m) for m in self.patch_multipliers)
            _check(
                min(self.patch_multipliers, default=1) >= 1,
                f"stages.patch_multipliers must be >= 1, got {self.patch_multipliers}",
            )
            _check(self.patch_sizes is None, "give stages.patch_sizes or stages.patch_multipliers, not both")
        _check(self.input_norm in ("none", "group"), f"stages.input_norm must be none|group, got {self.input_norm!r}")


@dataclass
class DropoutConfig:
    """Latent token dropout during training (forces the decoder to use the reference)."""

    p_max: float = 0.7  # per-sample drop probability p ~ U(0, p_max)
    mode: Literal["spatial", "spatiotemporal"] = "spatial"  # spatial = one mask shared by all frames (official)

    def __post_init__(self) -> None:
        _check(0.0 <= self.p_max < 1.0, f"dropout.p_max must be in [0, 1), got {self.p_max}")
        _check(
            self.mode in ("spatial", "spatiotemporal"),
            f"dropout.mode must be spatial|spatiotemporal, got {self.mode!r}",
        )


@dataclass
class WindowConfig:
    """How many latent frames one decoder pass (and so one joint attention) covers."""

    latent_frames: int | None = None  # None: the backbone's default (Wan: 5 = the paper's 17-frame chunk)
    max_tokens_per_stage: int | None = None  # shrink the window when a stage would exceed this many tokens

    def __post_init__(self) -> None:
        _check(
            self.latent_frames is None or (_is_int(self.latent_frames) and self.latent_frames >= 1),
            f"window.latent_frames must be >= 1, got {self.latent_frames}",
        )
        _check(
            self.max_tokens_per_stage is None
            or (_is_int(self.max_tokens_per_stage) and self.max_tokens_per_stage > 0),
            f"window.max_tokens_per_stage must be positive, got {self.max_tokens_per_stage}",
        )


@dataclass
class CorrespondenceConfig:
    """Correspondence-guided reference attention (docs/architecture.md "Correspondence"). Off in every preset.

    On, each video token's reference neighbourhood (and locality prior) is centred where a cost volume between the
    frozen encoder's latents of the video and of the reference finds its content, instead of at the token's own
    position. Needs a local ``transformer.attention_radius`` and temporal token patches of 1. Adds no weights.
    """

    enabled: bool = False
    search_radius: int = 5  # S: candidate offsets up to S latent cells in each direction ((2S+1)^2 of them)
    # Soft-argmax temperature over patch-averaged cosine similarities (lower: closer to the arg-max). 0.02: on the
    # quality benchmark's latents the median estimate of a 1- or 2-cell shift is within 0.001 cell of the truth.
    temperature: float = 0.02
    match_radius: int = 1  # correlations averaged over a (2m+1)^2 patch of latent cells before the soft-argmax
    # Round each stage's displacements to whole tokens: the reference is then read at token centres (a plain
    # gather, no bilinear blur of the detail it carries, about half the attention cost); where the cost volume is
    # flat the soft-argmax averages to near zero and rounds to exactly zero, i.e. today's in-place neighbourhood.
    snap: bool = True
    # How the reference reaches each latent frame's feature space (a temporally compressing encoder codes frame 0
    # and later frames differently). "still_clip": the reference encoded as a still clip of still_frames latent
    # frames (pixel_frames(4) = 13 Wan frames through the encoder: 1.41x the FLOPs of the same 17-frame decode
    # without correspondence). "fitted": the reference encoded as one image and mapped per sample by the channel
    # map that takes the video's own latent frame 0 to each later frame (1.04x; less exact). Errors by setting:
    # benchmarks/README.md, "The correspondence estimate".
    frame_spaces: Literal["still_clip", "fitted"] = "still_clip"
    still_frames: int = 4  # latent frames of the still clip ("still_clip"); later frames use its last
    # Confidence-weighted box average of the field over (2q+1)^2 latent cells: flat cells, whose correlations nearly
    # tie, take their textured neighbours' displacement instead of falling back to zero (0: off).
    smooth_radius: int = 2
    # Each latent frame's global translation (a robust confidence-weighted mean of the field: a pan, or a displaced
    # reference) joins that average with the weight of this many boxes of the frame's mean confidence, gated off
    # where a cell's own correlations contradict it (a moving object keeps its own): cells with no confident
    # neighbour follow the frame's motion instead of falling back to zero (0: off; needs smooth_radius >= 1).
    # 3.0 follows a displaced reference further; off by default, as trained with it the default run's held-out
    # gains were 0.01-0.03 dB lower (docs/architecture.md, "Correspondence").
    global_prior: float = 0.0
    # The field holds one displacement per latent frame, and a latent frame decodes to several frames (4 on Wan).
    # On: a stage after temporal upsampling gives each of its frames its own, linear in time between the latent
    # frames' values (each at the middle of its frames), so the reference follows content that moves within a latent
    # frame's frames (a pan); off: all of them take their latent frame's. Stages at the latent rate are the same.
    per_frame: bool = False
    # With snap: each video frame's stage features are moved by the part of its displacement that rounding drops (in
    # whole cells of the stage) before the joint attention, and the attention's update moved back
    # (refdecoder/blocks/sub_token_shift.py), so content displaced by a fraction of a token sits inside each video
    # token where the gathered reference token shows it. Needs snap; the first reference frame's remainder moves the
    # video. Measured on the quality benchmark: with the built-in estimate it gained no more than without; with
    # exact caller displacements it gained more on camera moves (docs/architecture.md, "Correspondence").
    sub_token_shift: bool = False
    # The estimate below a latent cell: the best candidate refined by a parabola through its neighbours' correlations
    # instead of the soft-argmax, which at a low temperature rounds a fraction of a cell towards a whole one; the
    # smoothing then weighs each cell by its margin over candidates beyond the best's neighbours.
    subcell: bool = False
    # The estimate's candidates half a cell apart: the reference is also encoded with its content moved half a cell
    # down, right and both (4 images per reference frame through the encoder instead of 1, 4x the cost volume), so
    # content displaced by a fraction of a cell is matched by features the encoder made for content there, instead
    # of being placed between whole-cell candidates. Adds no weights: a decode-time switch for a trained model too.
    half_cell: bool = False

    @property
    def search(self) -> tuple[int, float, int, int, float, bool]:
        """``(search_radius, temperature, match_radius, smooth_radius, global_prior, subcell)``, the estimate's
        settings in the order :func:`~refdecoder.blocks.correspondence.cost_volume_displacement` takes them."""
        return (
            self.search_radius, self.temperature, self.match_radius, self.smooth_radius, self.global_prior,
            self.subcell,
        )  # fmt: skip

    def __post_init__(self) -> None:
        _check(isinstance(self.enabled, bool), f"correspondence.enabled must be a bool, got {self.enabled!r}")
        _check(
            isinstance(self.search_radius, int) and self.search_radius >= 0,
            f"correspondence.search_radius must be an int >= 0, got {self.search_radius!r}",
        )
        _check(self.temperature > 0, f"correspondence.temperature must be > 0, got {self.temperature!r}")
        _check(isinstance(self.snap, bool), f"correspondence.snap must be a bool, got {self.snap!r}")
        _check(isinstance(self.per_frame, bool), f"correspondence.per_frame must be a bool, got {self.per_frame!r}")
        _check(
            isinstance(self.sub_token_shift, bool),
            f"correspondence.sub_token_shift must be a bool, got {self.sub_token_shift!r}",
        )
        _check(isinstance(self.subcell, bool), f"correspondence.subcell must be a bool, got {self.subcell!r}")
        _check(isinstance(self.half_cell, bool), f"correspondence.half_cell must be a bool, got {self.half_cell!r}")
        _check(
            self.snap or not self.sub_token_shift,
            "correspondence.sub_token_shift needs correspondence.snap: it moves the video by what snapping drops",
        )
        _check(
            isinstance(self.still_frames, int) and not isinstance(self.still_frames, bool) and self.still_frames >= 1,
            f"correspondence.still_frames must be an int >= 1, got {self.still_frames!r}",
        )
        _check(
            isinstance(self.match_radius, int) and self.match_radius >= 0,
            f"correspondence.match_radius must be an int >= 0, got {self.match_radius!r}",
        )
        _check(
            isinstance(self.smooth_radius, int)
            and not isinstance(self.smooth_radius, bool)
            and self.smooth_radius >= 0,
            f"correspondence.smooth_radius must be an int >= 0, got {self.smooth_radius!r}",
        )
        _check(
            isinstance(self.global_prior, (int, float))
            and not isinstance(self.global_prior, bool)
            and math.isfinite(self.global_prior)
            and self.global_prior >= 0,
            f"correspondence.global_prior must be a finite number >= 0, got {self.global_prior!r}",
        )
        _check(  # the translation joins the smoothing's box average: without it the prior would do nothing
            not (self.global_prior and self.smooth_radius == 0),
            f"correspondence.global_prior ({self.global_prior}) needs smooth_radius >= 1; set one or global_prior: 0",
        )
        _check(
            self.frame_spaces in ("fitted", "still_clip"),
            f"correspondence.frame_spaces must be 'fitted' or 'still_clip', got {self.frame_spaces!r}",
        )


@dataclass
class RefDecoderConfig:
    """Everything RefDecoder adds to a backbone. See the presets in :data:`PRESETS`."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    stages: StageConfig = field(default_factory=StageConfig)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    degradation: LatentDegradationConfig = field(default_factory=LatentDegradationConfig)
    upscale: UpscaleConfig = field(default_factory=UpscaleConfig)
    correspondence: CorrespondenceConfig = field(default_factory=CorrespondenceConfig)
    train_decoder: bool = False  # unfreeze the backbone decoder (trained at a reduced learning rate)
    backbone: str | None = None  # filled in by wrap(); checked again at load time

    def __post_init__(self) -> None:
        for name, kind in (
            ("tokenizer", TokenizerConfig),
            ("transformer", TransformerConfig),
            ("stages", StageConfig),
            ("dropout", DropoutConfig),
            ("window", WindowConfig),
            ("degradation", LatentDegradationConfig),
            ("upscale", UpscaleConfig),
            ("correspondence", CorrespondenceConfig),
        ):
            _check(
                isinstance(getattr(self, name), kind),
                f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}",
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict including ``refdecoder_version``."""
        from refdecoder._version import __version__

        return {"refdecoder_version": __version__, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RefDecoderConfig:
        """Build from a dict; unknown keys are logged and ignored, wrong types raise :class:`ConfigError`.

        The message of a wrong type names the dotted key (``transformer.depth``).
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a RefDecoder config is a JSON object of keys to values, got {type(data).__name__}")
        data = dict(data)
        data.pop("refdecoder_version", None)
        return build_dataclass(cls, data, unknown="warn")

    def save(self, path: str | Path) -> None:
        """Write the config as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RefDecoderConfig:
        """Read a config written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read RefDecoder config {path}: {err}") from err
        return cls.from_dict(data)

    def copy(self) -> RefDecoderConfig:
        """Deep copy, so presets are never mutated through a model."""
        return copy.deepcopy(self)


PRESETS: dict[str, RefDecoderConfig] = {
    # The paper's architecture: 10 shared layers, 12 heads x 128, FFN 8960, the adapter's paper patch layout,
    # but with our residual zero-init so that step 0 reproduces the pretrained decoder.
    "paper": RefDecoderConfig(
        transformer=TransformerConfig(depth=10, num_heads=12, head_dim=128, ffn_dim=8960),
        tokenizer=TokenizerConfig(kind="space_to_depth", norm="rms"),
    ),
    # The efficient default candidate. Its highest-resolution stage uses a 2x coarser token grid: at 17 frames
    # that stage holds over half of all tokens and most of the quadratic attention cost (see benchmarks).
    "small": RefDecoderConfig(
        transformer=TransformerConfig(depth=4, num_heads=8, head_dim=128),
        stages=StageConfig(patch_multipliers=(1, 1, 2)),
    ),
    # What the quality benchmark recommends for a small model that is to be fine-tuned (benchmarks/README.md):
    # `small` with local attention (radius 2) and the locality prior, per-stage space-to-depth tokenizers (the
    # paper's kind), and no latent token dropout. Global attention without the prior learned to ignore the reference
    # at small budgets, and token dropout cost most of the gain there.
    "small-local": RefDecoderConfig(
        transformer=TransformerConfig(depth=4, num_heads=8, head_dim=128, attention_radius=2, locality_bias=True),
        tokenizer=TokenizerConfig(kind="space_to_depth", per_stage=True),
        stages=StageConfig(patch_multipliers=(1, 1, 2)),
        dropout=DropoutConfig(p_max=0.0),
    ),
    # Tests and CPU demos.
    "tiny": RefDecoderConfig(transformer=TransformerConfig(depth=2, num_heads=2, head_dim=32)),
    # Exactly the released Wan2.1 checkpoints: replace (no residual), decoder fine-tuned alongside.
    "official-wan2.1": RefDecoderConfig(
        transformer=TransformerConfig(depth=10, num_heads=12, head_dim=128, ffn_dim=8960),
        tokenizer=TokenizerConfig(kind="space_to_depth", norm="rms"),
        stages=StageConfig(residual=False),
        train_decoder=True,
        backbone="wan2.1",
    ),
    # Exactly the released VideoVAE+ checkpoint: GroupNorm before each stage, residual, no tokenizer norm.
    "official-videovae+": RefDecoderConfig(
        transformer=TransformerConfig(depth=10, num_heads=12, head_dim=128, ffn_dim=8960),
        tokenizer=TokenizerConfig(kind="space_to_depth", norm="none"),
        stages=StageConfig(residual=True, residual_reference=False, input_norm="group"),
        train_decoder=True,
        backbone="videovae+",
    ),
}


# What wrap(vae) and the training recipe use when no preset is named: the configuration the measurements recommend.
DEFAULT_PRESET = "small-local"


def preset(name: str) -> RefDecoderConfig:
    """A fresh copy of the named preset (``paper``, ``small``, ``small-local``, ``tiny``, ``official-wan2.1``, ...)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
    return PRESETS[name].copy()


def resolve_config(config: str | RefDecoderConfig | None) -> RefDecoderConfig:
    """Turn a preset name, a config or ``None`` (the :data:`DEFAULT_PRESET`) into a private config copy."""
    if config is None:
        return preset(DEFAULT_PRESET)
    if isinstance(config, str):
        return preset(config)
    if isinstance(config, RefDecoderConfig):
        return config.copy()
    raise ConfigError(f"config must be a preset name or a RefDecoderConfig, got {type(config).__name__}")
