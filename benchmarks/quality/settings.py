"""Settings of ``benchmarks/quality_small.py``, read strictly from ``recipes/configs/quality_small.yaml``.

Every key is required and unknown keys are rejected. What is trained on and what is held out is checked here,
before anything runs: a video's train and held-out frame ranges never overlap, a photo is never both a training
and a held-out photo, no file serves two sources, and nothing comes from scikit-image's bundled photographs
(reserved for independent evaluation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.quality.variants import BaseSettings, Reference, Variant, VariantDiff, resolve
from refdecoder.config_builder import build_dataclass, yaml_load
from refdecoder.data import CameraMotion
from refdecoder.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "recipes" / "configs" / "quality_small.yaml"
EVAL_GROUPS = ("static", "motion")


@dataclass
class DataSettings:
    """Sources, their train / held-out material, the clip geometry and the camera moves."""

    short_side: int  # videos are resized (aspect kept) to this short side
    photo_short_side: int  # photos likewise
    crop: int  # square crops for training and evaluation (a multiple of 16)
    pretrain_frames: int
    train_frames: int
    eval_frames: int
    frame_stride: int  # source frames per clip frame, unless a source sets its own `stride`
    cut_threshold: float
    photo_share: float  # share of training clips made by moving the camera over a still photo
    motion: dict[str, float]  # CameraMotion of training clips (variants with `motion: true`; photos always)
    eval_motion: dict[str, float]  # CameraMotion of the held-out camera moves
    sources: list[dict[str, Any]]
    photos: dict[str, list[str]]  # {"train": [...], "heldout": [...]}

    def __post_init__(self) -> None:
        frames = (self.pretrain_frames, self.train_frames, self.eval_frames)
        if self.crop % 16 or self.crop > self.short_side or any((f - 1) % 4 for f in frames):
            raise ConfigError(
                "data needs crop % 16 == 0, crop <= short_side and pretrain/train/eval frames = 1 + 4k; got "
                f"crop={self.crop}, short_side={self.short_side}, frames={'/'.join(map(str, frames))}"
            )
        if not 0 <= self.photo_share <= 1:
            raise ConfigError(f"data.photo_share must be in [0, 1], got {self.photo_share}")
        self.camera, self.eval_camera = (self._camera(self.motion, "motion"), self._camera(self.eval_motion, "eval"))
        for src in self.sources:
            _check_source(src)
        if set(self.photos) != {"train", "heldout"}:
            raise ConfigError(f"data.photos needs exactly train and heldout lists, got {sorted(self.photos)}")
        _check_disjoint(self.sources, self.photos)

    @staticmethod
    def _camera(raw: dict[str, float], key: str) -> CameraMotion:
        try:
            return CameraMotion(**raw)
        except TypeError as err:
            raise ConfigError(f"data.{key}: {err}") from err

    def stride(self, source: dict[str, Any]) -> int:
        return int(source.get("stride", self.frame_stride))

    def span(self, frames: int, stride: int) -> int:
        """Source frames a clip of ``frames`` frames covers."""
        return (frames - 1) * stride + 1

    def window(self, camera: CameraMotion) -> int:
        """Side of the square source window a camera move of ``camera`` crops from."""
        return camera.window((self.crop, self.crop))[0]


def _check_source(src: dict[str, Any]) -> None:
    keys = {"name", "file", "train", "heldout", "eval"}
    if not keys <= set(src) <= keys | {"stride"}:
        raise ConfigError(f"a data source needs name, file, train, heldout, eval (and optional stride); got {src}")
    if src["eval"] not in EVAL_GROUPS:
        raise ConfigError(f"{src['name']}: eval must be one of {EVAL_GROUPS}, got {src['eval']!r}")
    ranges = [(a, b) for a, b in src["train"]] + [(a, b) for a, b in src["heldout"]]
    if any(not 0 <= a < b for a, b in ranges):
        raise ConfigError(f"{src['name']}: frame ranges must be [start, stop) with 0 <= start < stop")
    if any(a < d and c < b for a, b in src["train"] for c, d in src["heldout"]):
        raise ConfigError(f"{src['name']}: train {src['train']} overlaps held-out {src['heldout']}")


def _check_disjoint(sources: list[dict[str, Any]], photos: dict[str, list[str]]) -> None:
    files = [s["file"] for s in sources] + photos["train"] + photos["heldout"]
    repeated = sorted({f for f in files if files.count(f) > 1})
    if repeated:
        raise ConfigError(f"these files serve more than one source or split: {repeated}")
    reserved = [f for f in files if "skimage" in f or "scikit-image" in f]
    if reserved:
        raise ConfigError(f"scikit-image's photographs are reserved for independent evaluation: {reserved}")


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
    """Equal-budget fine-tuning shared by every variant, the variants, and which of them the README recommends.

    ``variants`` maps a short name to what that variant changes (:class:`~benchmarks.quality.variants.VariantDiff`)
    over ``base`` (RefDecoder variants) and the defaults here; :attr:`resolved` holds them resolved, checked when
    the recipe loads. Variants with the same ``motion`` see the same clips.
    """

    steps: int
    batch: int
    lr: float
    decoder_lr_ratio: float
    warmup: int
    weight_decay: float
    reference: Reference  # first: the clip's frame 0; random: a random clip frame (the paper); far: see below
    motion: bool
    reference_distance: int  # a `far` reference lies this many clip frames outside the clip
    headline: str  # the recommended configuration: its saved folder is what an independent evaluation loads
    default_variants: list[str]  # what a run without --variants trains
    base: BaseSettings
    variants: dict[str, VariantDiff]

    def __post_init__(self) -> None:
        if min(self.steps, self.batch, self.reference_distance) < 1:
            raise ConfigError(f"finetune needs steps, batch, reference_distance >= 1, got {self}")
        self.resolved = {name: resolve(name, diff, self) for name, diff in self.variants.items()}
        unknown = sorted(set(self.default_variants + [self.headline]) - set(self.variants))
        if unknown:
            raise ConfigError(f"finetune.headline / default_variants name unknown variants {unknown}")
        if self.headline not in self.default_variants:
            raise ConfigError(f"the headline variant {self.headline!r} must be in finetune.default_variants")


@dataclass
class ShiftProbeSettings:
    """The shift probe of the eval phase (:mod:`benchmarks.quality.shift_probe`) on the headline and its comparison."""

    shifts: list[float]  # tokens, each in both directions (and 0); a fraction of one must be whole pixels
    crop: list[int]  # probe crop (height, width) in px; wider than the benchmark's so a shifted reference overlaps
    clips_per_source: int
    token_pixels: int  # output pixels per token of the shift (a latent cell of the benchmark's VAE)

    def __post_init__(self) -> None:
        if not self.shifts or min(self.shifts) <= 0 or len(self.crop) != 2 or min(self.crop) < 1:
            raise ConfigError(
                f"eval.shift_probe needs shifts > 0 and crop [height, width], got {self.shifts} and {self.crop}"
            )
        fractional = [s for s in self.shifts if float(s * self.token_pixels) != round(s * self.token_pixels)]
        if fractional:
            raise ConfigError(
                f"eval.shift_probe.shifts {fractional} are not whole pixels at {self.token_pixels} px per token"
            )


@dataclass
class EvalSettings:
    """Held-out evaluation."""

    batch: int
    max_clips_per_source: int  # natural held-out clips per source and set (0 = all), spread over the range
    camera_clips_per_source: int  # camera moves rendered over held-out frames of each video
    camera_clips_per_photo: int  # camera moves over each held-out photo
    grid_clips: int
    # The headline variant's targets: motion_psnr, motion_psnr_0, motion_psnr_4+, camera_psnr_4+ (gains over its
    # baseline, dB), static_versus / static_margin (its static PSNR must be >= that variant's minus the margin), and
    # the shift probe's follow ratios shift_follow_near / _far (whole frames) and *_shown (the shown columns).
    targets: dict[str, Any]
    shift_probe: ShiftProbeSettings

    def __post_init__(self) -> None:
        keys = {"motion_psnr", "motion_psnr_0", "motion_psnr_4+", "camera_psnr_4+", "static_versus", "static_margin"}
        keys |= {"shift_follow_near", "shift_follow_far", "shift_follow_near_shown", "shift_follow_far_shown"}
        if set(self.targets) != keys:
            raise ConfigError(f"eval.targets needs exactly {sorted(keys)}, got {sorted(self.targets)}")


@dataclass
class Settings:
    """The whole recipe (``recipes/configs/quality_small.yaml``)."""

    seed: int
    threads: int
    workers: int  # processes of ``threads`` threads each: variants fine-tuned, evaluation jobs run side by side
    budget_minutes: float
    data: DataSettings
    vae: VaeSettings
    pretrain: PretrainSettings
    finetune: FinetuneSettings
    eval: EvalSettings

    def __post_init__(self) -> None:
        if min(self.threads, self.workers) < 1:
            raise ConfigError(f"threads and workers must be >= 1, got {self.threads} and {self.workers}")
        if self.eval.targets["static_versus"] not in self.finetune.variants:
            raise ConfigError(f"eval.targets.static_versus names no variant: {self.eval.targets['static_versus']!r}")


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
    raw = yaml_load(Path(path).read_text())
    quick_overrides = raw.pop("quick", {}) or {}
    for key, value in quick_overrides.items() if quick else ():
        set_dotted(raw, key, value)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        set_dotted(raw, key, yaml_load(value))
    return build_dataclass(Settings, raw)


def fingerprint(settings: Settings, phase: str, variant: Variant | None = None) -> dict[str, Any]:
    """The settings a cached output of ``phase`` depends on (threads and eval settings do not change weights)."""
    d = dataclasses.asdict(settings)
    # What only the evaluation reads (held-out camera moves and photos, the eval groups) leaves the weights alone.
    data = {k: v for k, v in d["data"].items() if k not in ("eval_motion", "photos", "sources")}
    data["train_photos"] = d["data"]["photos"]["train"]
    data["sources"] = [{k: v for k, v in src.items() if k != "eval"} for src in d["data"]["sources"]]
    out = {"seed": d["seed"], "data": data, "vae": d["vae"], "pretrain": d["pretrain"]}
    if phase == "finetune" and variant is not None:
        skipped = ("variants", "headline", "default_variants", "base", "motion", "reference")
        shared = {k: v for k, v in d["finetune"].items() if k not in skipped}
        out["finetune"] = shared | {
            "variant": variant.fingerprint(),
            "motion": variant.motion,
            "reference": variant.reference,
        }
    return out
