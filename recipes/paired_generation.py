"""Paired generation (the paper's protocol): generate latents once with a Wan I2V pipeline, decode them twice.

    python recipes/paired_generation.py --pipeline Wan2.1-I2V-14B-480P-Diffusers --prompts prompts.csv \
        --out gen/ --seeds 0 1 2 --num-frames 81
    refdecoder decode-latents gen/latents --reference-dir gen/images --out gen/videos \
        --vae Wan2.1-I2V-14B-480P-Diffusers/vae --weights my-refdecoder --compare-base

``prompts.csv`` has the columns ``image`` (path, relative to the CSV), ``prompt`` and optionally ``name``. For every
row and seed the pipeline runs once with ``output_type="latent"``; the normalised latents are saved with
``refdecoder.data.save_latents`` (seed, prompt and sampler settings in the metadata), next to the conditioning image
exactly as the pipeline preprocessed it (``images/<name>_s<seed>.png`` at the generation size), and every run is
appended to ``manifest.jsonl``. Decoding the same latents with the base decoder and with RefDecoder
(``decode-latents --compare-base``) isolates the decoder: both videos come from identical latents. See
``recipes/paired_generation.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refdecoder.data import save_latents, write_image

# The negative prompt of the Wan I2V examples (diffusers docs, translated from the original Chinese one).
NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, three "
    "legs, many people in the background, walking backwards"
)


@dataclass(frozen=True)
class Job:
    """One generation: the conditioning image, its prompt, the seed, and the output name."""

    name: str
    image: Path
    prompt: str
    seed: int


def read_jobs(csv_path: str | Path, seeds: list[int]) -> list[Job]:
    """One :class:`Job` per CSV row and seed; names default to the image stem."""
    csv_path = Path(csv_path)
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    jobs = []
    for row in rows:
        image = csv_path.parent / row["image"]
        for seed in seeds:
            jobs.append(Job(f"{row.get('name') or image.stem}_s{seed}", image, row["prompt"], seed))
    return jobs


def generation_size(width: int, height: int, area: int = 480 * 832, multiple: int = 16) -> tuple[int, int]:
    """(height, width) with the image's aspect ratio and about ``area`` pixels, multiples of ``multiple``."""
    scale = math.sqrt(area / (width * height))
    return (round(height * scale / multiple) * multiple, round(width * scale / multiple) * multiple)


def generate_latents(
    pipe: Any,
    jobs: list[Job],
    out_dir: str | Path,
    *,
    num_frames: int = 81,
    steps: int = 50,
    guidance: float = 5.0,
    negative_prompt: str = NEGATIVE_PROMPT,
    size: tuple[int, int] | None = None,
    **pipe_kwargs: Any,
) -> list[Path]:
    """Run ``pipe`` once per job and save normalised latents + the conditioning image as the pipeline saw it.

    Args:
        pipe: a diffusers ``WanImageToVideoPipeline`` (or any pipeline with the same call signature).
        jobs: what to generate.
        out_dir: gets ``latents/``, ``images/`` and ``manifest.jsonl``.
        num_frames, steps, guidance, negative_prompt: sampler settings (logged with every file).
        size: (height, width) for every job; None: about 480x832 pixels with each image's aspect ratio.
        **pipe_kwargs: passed to every pipeline call (e.g. ``max_sequence_length``).

    Returns:
        The latents files written.
    """
    from PIL import Image

    out = Path(out_dir)
    (out / "latents").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    written = []
    for job in jobs:
        image = Image.open(job.image).convert("RGB")
        height, width = size or generation_size(*image.size)
        generator = torch.Generator(device="cpu").manual_seed(job.seed)
        settings = dict(num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance)
        latents = pipe(
            image=image,
            prompt=job.prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            generator=generator,
            output_type="latent",
            **settings,
            **pipe_kwargs,
        ).frames
        reference = pipe.video_processor.preprocess(image, height=height, width=width)[0]
        image_path = write_image(out / "images" / f"{job.name}.png", reference.float().clamp(-1, 1))
        meta = dict(steps=steps, guidance=guidance, num_frames=num_frames, fps=16, negative_prompt=negative_prompt)
        path = save_latents(
            out / "latents" / f"{job.name}.safetensors",
            latents[0].float(),
            image_path,
            height=height,
            width=width,
            seed=job.seed,
            prompt=job.prompt,
            normalized=True,
            **meta,
        )
        record = {"name": job.name, "image": str(job.image), "prompt": job.prompt, "seed": job.seed, **meta}
        with (out / "manifest.jsonl").open("a") as handle:
            handle.write(json.dumps({**record, "height": height, "width": width}) + "\n")
        written.append(path)
    return written


def load_pipeline(path: str, device: str) -> Any:
    """A Wan I2V pipeline from a local diffusers folder: VAE and image encoder in fp32, the rest in bf16 (as the
    diffusers documentation loads it)."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
    from transformers import CLIPVisionModel

    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
    encoder = CLIPVisionModel.from_pretrained(path, subfolder="image_encoder", torch_dtype=torch.float32)
    pipe = WanImageToVideoPipeline.from_pretrained(path, vae=vae, image_encoder=encoder, torch_dtype=torch.bfloat16)
    return pipe.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="local Wan2.1 I2V diffusers folder")
    parser.add_argument("--prompts", required=True, help="CSV with image, prompt[, name] columns")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one generation per seed and row")
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    pipe = load_pipeline(args.pipeline, args.device)
    jobs = read_jobs(args.prompts, args.seeds)
    paths = generate_latents(
        pipe, jobs, args.out, num_frames=args.num_frames, steps=args.steps, guidance=args.guidance
    )
    print(f"wrote {len(paths)} latents files to {Path(args.out) / 'latents'}")


if __name__ == "__main__":
    main()
