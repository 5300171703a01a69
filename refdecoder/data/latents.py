"""Saved diffusion latents with their reference images, for decoding generations and for latent finetuning.

One item is one ``.safetensors`` file holding the tensor ``latents`` (``C, t, h, w``, or ``1, C, t, h, w``) and
string metadata: ``height``, ``width`` (pixel size the latents decode to), ``seed``, ``prompt``, ``normalized``
(``"true"`` when the latents are in the diffusion pipeline's normalised space, so they need
``model.denormalize`` before ``model.decode``), and optionally ``reference`` (path of the reference image, relative
to the file). Without a ``reference`` entry, the image with the same stem in ``reference_dir`` is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from refdecoder._files import use_default_mode
from refdecoder.data.base import RetryingDataset
from refdecoder.data.latent_shards import LatentMember, index_latent_shards, is_latent_shard_folder, read_latent_sample
from refdecoder.data.transforms import ResizeMode
from refdecoder.data.video import IMAGE_EXTENSIONS, read_image
from refdecoder.errors import DataError, InputError

__all__ = ["save_latents", "load_latents", "metadata_reference", "LatentDataset"]

_TRUE = {"1", "true", "yes"}


def save_latents(
    path: str | os.PathLike,
    latents: torch.Tensor,
    reference_image_path: str | os.PathLike | None = None,
    *,
    height: int,
    width: int,
    seed: int | None = None,
    prompt: str = "",
    normalized: bool = False,
    **extra: Any,
) -> Path:
    """Write latents and their metadata to a ``.safetensors`` file.

    Args:
        path: output file.
        latents: ``C, t, h, w`` or ``1, C, t, h, w``.
        reference_image_path: the reference image; stored relative to the file's folder when possible.
        height, width: pixel size the latents decode to.
        seed, prompt: generation settings, kept for reproducibility.
        normalized: True when the latents are in the diffusion pipeline's normalised space.
        **extra: more metadata, stored as strings.

    Returns:
        The written path.
    """
    path = Path(path)
    latents = _check_latents(latents, str(path))
    meta = {
        "height": str(int(height)),
        "width": str(int(width)),
        "prompt": prompt,
        "normalized": str(bool(normalized)).lower(),
        **{k: str(v) for k, v in extra.items()},
    }
    if seed is not None:
        meta["seed"] = str(int(seed))
    if reference_image_path is not None:
        meta["reference"] = _relative(Path(reference_image_path), path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.detach().cpu().contiguous()}, str(path), metadata=meta)
    use_default_mode(path)
    return path


def load_latents(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """Read ``(latents (C, t, h, w), metadata)`` from a file written by :func:`save_latents`.

    Raises:
        DataError: unreadable file, no ``latents`` tensor, or metadata without ``height``/``width``.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            if "latents" not in handle.keys():
                raise DataError(f"{path} has no 'latents' tensor (tensors: {list(handle.keys())})")
            latents = handle.get_tensor("latents")
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"cannot read latents file {path}: {type(err).__name__}: {err}") from err
    missing = [k for k in ("height", "width") if k not in meta]
    if missing:
        raise DataError(f"{path} metadata lacks {missing}; write it with refdecoder.data.save_latents")
    return _check_latents(latents, str(path), DataError), meta


class LatentDataset(RetryingDataset):
    """Map-style dataset of saved latents (``*.safetensors`` in ``root``, sorted) with their reference images, or
    of the latent shards ``refdecoder encode`` wrote into ``root`` (see :mod:`refdecoder.data.latent_shards`; the
    reference is then the clip frame stored with each sample, and ``reference_dir`` is not used).

    Items: ``{"latents": (C, t, h, w), "reference": (3, 1, H, W) in [-1, 1] at (height, width), "height": int,
    "width": int, "seed": int (-1 when unknown), "prompt": str, "normalized": bool, "key": str (file stem),
    "skipped": int}``. Files without a readable reference image are skipped like broken samples.

    Args:
        root: folder of ``.safetensors`` files.
        reference_dir: folder of reference images named like the latents files (default: ``root``).
        seed: base seed (random draws only happen for ``resize_mode="crop_random"``).
        max_failures: broken files in a row tolerated before :class:`DataError`.
        resize_mode: how a reference of another size is brought to (height, width).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        reference_dir: str | os.PathLike | None = None,
        seed: int = 0,
        max_failures: int = 20,
        resize_mode: ResizeMode = "crop_center",
    ) -> None:
        super().__init__(seed, max_failures, name=str(root))
        self.root = Path(root)
        self.reference_dir = Path(reference_dir) if reference_dir is not None else self.root
        self.files: list[Any] = sorted(self.root.glob("*.safetensors"))
        if not self.files and is_latent_shard_folder(self.root):
            self.files = index_latent_shards(self.root)
        self.resize_mode = resize_mode
        if not self.files:
            raise DataError(f"no .safetensors latents files (or latent shards with an index.json) in {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        item = self.files[index]
        return f"{item.shard}:{item.key}" if isinstance(item, LatentMember) else str(item)

    def load(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        path = self.files[index]
        if isinstance(path, LatentMember):
            latents, meta, image = read_latent_sample(path)
        else:
            latents, meta = load_latents(path)
            image = self._reference_path(path, meta)
        height, width = int(meta["height"]), int(meta["width"])
        reference = read_image(image, (height, width), self.resize_mode, generator)
        return {
            "latents": latents,
            "reference": reference,
            "height": height,
            "width": width,
            "seed": int(meta.get("seed", -1)),
            "prompt": meta.get("prompt", ""),
            "normalized": meta.get("normalized", "false").lower() in _TRUE,
            "key": path.key if isinstance(path, LatentMember) else path.stem,
        }

    def _reference_path(self, path: Path, meta: dict[str, str]) -> Path:
        if "reference" in meta:
            return metadata_reference(path, meta["reference"], [self.reference_dir])
        for ext in IMAGE_EXTENSIONS:
            candidate = self.reference_dir / f"{path.stem}.{ext}"
            if candidate.is_file():
                return candidate
        raise DataError(
            f"no reference image for {path.name}: no 'reference' metadata entry and no "
            f"{path.stem}.<{'|'.join(IMAGE_EXTENSIONS)}> in {self.reference_dir}"
        )


def metadata_reference(path: Path, name: str, folders: list[Path]) -> Path:
    """The image a latents file's ``reference`` metadata names: ``name`` relative to the file's folder.

    The name was written by whoever made the file, so it must resolve (links followed) inside the file's folder or
    one of ``folders`` (``--reference-dir``): an absolute path, ``..`` or a link leading elsewhere is refused, and a
    latents file cannot make refdecoder read an arbitrary file of the machine.

    Raises:
        DataError: ``name`` resolves outside every allowed folder.
    """
    target = (path.parent / name).resolve()
    allowed = list(dict.fromkeys([path.parent, *folders]))
    if any(target.is_relative_to(folder.resolve()) for folder in allowed):
        return target
    raise DataError(
        f"{path.name}: its 'reference' metadata {name!r} points outside {' and '.join(map(str, allowed))}; refused "
        "(a latents file may only name an image in its own folder or the reference folder); move the image there"
    )


def _check_latents(latents: torch.Tensor, where: str, error: type[Exception] = InputError) -> torch.Tensor:
    if latents.ndim == 5 and latents.shape[0] == 1:
        latents = latents[0]
    if latents.ndim != 4:
        raise error(f"{where}: latents must be (C, t, h, w) or (1, C, t, h, w), got shape {tuple(latents.shape)}")
    return latents


def _relative(target: Path, base: Path) -> str:
    try:
        return os.path.relpath(target.resolve(), base.resolve())
    except ValueError:  # different drives on Windows: keep the absolute path
        return str(target.resolve())
