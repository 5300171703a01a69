"""Loading a backbone VAE from a path, a Hub id or a training run folder, and RefDecoder weights on top of it.

A ``--vae`` is one of:

- a diffusers model folder (``config.json`` naming the class, e.g. ``AutoencoderKLWan``);
- a VideoVAE+ folder (``videovaeplus.safetensors`` + ``videovaeplus_config.json``, as ``convert --base-out``
  writes) or a VideoVAE+ checkpoint file; a single file is identified by its keys, and one of another family is
  refused with a message that names what was found;
- a training run folder (``recipes/train.py``'s ``run_dir``): its ``vae/`` folder, or the VAE its config names;
- a Hugging Face repo id (:mod:`refdecoder.hub`).

``--weights`` is a ``save_pretrained`` folder, a run folder (its ``refdecoder/``) or a repo id.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refdecoder._files import use_default_mode
from refdecoder.backbones.registry import BackboneAdapter, find_backbone, get_backbone
from refdecoder.errors import CheckpointError, InputError
from refdecoder.hub import resolve_path

__all__ = [
    "Decoder",
    "DTYPES",
    "VIDEOVAEPLUS_WEIGHTS",
    "VIDEOVAEPLUS_CONFIG",
    "load_vae",
    "load_decoder",
    "save_vae",
    "is_run_folder",
    "run_vae_path",
    "run_weights_path",
    "detect_family",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VIDEOVAEPLUS_WEIGHTS = "videovaeplus.safetensors"
VIDEOVAEPLUS_CONFIG = "videovaeplus_config.json"
_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
_RUN_CONFIG = "config.json"  # the resolved training config a run writes (a diffusers config has _class_name)
_RUN_VAE, _RUN_WEIGHTS = "vae", "refdecoder"


@dataclass
class Decoder:
    """A loaded VAE ready for streamed work: its backbone adapter and, when weights were given, the RefDecoder.

    Attributes:
        adapter: drives the backbone (encode, plain decode); with trained decoder weights, its decoder is the
            fine-tuned one.
        model: the RefDecoder wrapping ``adapter.vae``, or None to decode with the base decoder only.
        base: the original VAE's adapter for base-decoder comparisons, when the weights replaced decoder weights
            (else None: ``adapter`` is the base).
    """

    adapter: BackboneAdapter
    model: nn.Module | None = None
    base: BackboneAdapter | None = None

    @property
    def vae(self) -> nn.Module:
        """The backbone VAE."""
        return self.adapter.vae

    @property
    def conditioned(self) -> bool:
        """True when decoding goes through RefDecoder (a reference is used)."""
        return self.model is not None

    @property
    def main(self) -> nn.Module | BackboneAdapter:
        """What :func:`iter_decode` should decode with: the RefDecoder, or the plain adapter."""
        return self.model if self.model is not None else self.adapter

    @property
    def base_adapter(self) -> BackboneAdapter:
        """The adapter of the VAE as it was before the weights were loaded (what "base" means in comparisons)."""
        return self.base if self.base is not None else self.adapter


def _run_config(folder: Path) -> dict[str, Any] | None:
    """The training config of a run folder, or None when ``folder`` is not one."""
    path = folder / _RUN_CONFIG
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "_class_name" not in data and "model" in data else None


def is_run_folder(folder: str | os.PathLike) -> bool:
    """True for a training run folder (``recipes/train.py``'s ``run_dir``: it holds the run's ``config.json``)."""
    return _run_config(Path(folder)) is not None


def run_vae_path(folder: str | os.PathLike) -> tuple[Path, str | None] | None:
    """``(path, subfolder)`` of the VAE a training run folder used, or None when ``folder`` is not a run folder.

    Raises:
        CheckpointError: a run folder that saved no VAE and whose config names none.
    """
    folder = Path(folder)
    config = _run_config(folder)
    if config is None:
        return None
    if (folder / _RUN_VAE).is_dir():
        return folder / _RUN_VAE, None
    vae = config.get("model", {}).get("vae", {})
    if vae.get("source") == "pretrained" and vae.get("path"):
        return Path(vae["path"]), vae.get("subfolder")
    raise CheckpointError(
        f"{folder} is a training run folder without a {_RUN_VAE}/ folder (the run has not finished its first "
        "start?) and its config names no VAE path"
    )


def run_weights_path(folder: str | os.PathLike) -> Path | None:
    """The ``refdecoder/`` export of a training run folder, or None when ``folder`` is not a run folder.

    Raises:
        CheckpointError: a run folder without RefDecoder weights (a plain-decoder baseline, or an unfinished run).
    """
    folder = Path(folder)
    config = _run_config(folder)
    if config is None:
        return None
    if (folder / _RUN_WEIGHTS).is_dir():
        return folder / _RUN_WEIGHTS
    if config.get("model", {}).get("kind") == "plain":
        raise CheckpointError(
            f"{folder} is a plain-decoder run (model.kind: plain): it has no RefDecoder weights; pass it as --vae "
            "to decode with its fine-tuned decoder"
        )
    raise CheckpointError(f"{folder} is a training run folder without {_RUN_WEIGHTS}/ weights (has it finished?)")


def load_vae(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    subfolder: str | None = None,
    revision: str | None = None,
) -> nn.Module:
    """Load a backbone VAE (see the module docstring for what ``path`` may be).

    Args:
        path: folder, checkpoint file, run folder or Hub id.
        device: where to put it.
        dtype: its parameter dtype.
        subfolder: folder inside ``path`` (diffusers' ``subfolder``).
        revision: Hub revision.

    Returns:
        The VAE in eval mode.

    Raises:
        CheckpointError: missing path, unknown layout, a file of another model family, weights that do not load.
    """
    path = resolve_path(path, revision, subfolder, what="VAE")
    run = run_vae_path(path) if path.is_dir() else None
    if run is not None:
        return load_vae(run[0], device, dtype, subfolder=run[1])
    if path.is_dir() and (path / VIDEOVAEPLUS_WEIGHTS).is_file():
        vae = _load_videovaeplus_folder(path).to(dtype)
    elif path.is_dir():
        vae = _load_diffusers(path, dtype)  # cast by diffusers itself: its .to(dtype) warns at length
    elif path.suffix.lower() in _CHECKPOINT_SUFFIXES:
        vae = _load_videovaeplus_file(path).to(dtype)
    else:
        raise CheckpointError(f"VAE {path} is neither a folder nor a {'/'.join(_CHECKPOINT_SUFFIXES)} file")
    return vae.to(device).eval()


def _load_diffusers(folder: Path, dtype: torch.dtype) -> nn.Module:
    import diffusers

    config = folder / "config.json"
    try:
        name = json.loads(config.read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{folder} is not a diffusers model folder (config.json with _class_name): {err}"
        ) from err
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise CheckpointError(f"{config} names class {name!r}, which diffusers {diffusers.__version__} does not have")
    # low_cpu_mem_usage=False: the default wants `accelerate` and warns at length without it. Classes that pin
    # modules in fp32 (MiniMax-H3's _keep_in_fp32_modules) refuse False, so they take the default when
    # accelerate is installed.
    pinned = bool(getattr(cls, "_keep_in_fp32_modules", None))
    if pinned and importlib.util.find_spec("accelerate") is None:
        raise CheckpointError(
            f"diffusers loads {name} (modules kept in fp32) only with accelerate: pip install accelerate"
        )
    try:
        return cls.from_pretrained(folder, torch_dtype=dtype, low_cpu_mem_usage=pinned)
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot load {name} from {folder}: {err}") from err


def _load_videovaeplus_folder(folder: Path) -> nn.Module:
    from refdecoder.backbones.videovaeplus import VideoVAEPlus, VideoVAEPlusConfig

    try:
        raw = json.loads((folder / VIDEOVAEPLUS_CONFIG).read_text())
        config = VideoVAEPlusConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{folder / VIDEOVAEPLUS_CONFIG} is not a readable VideoVAE+ config: {err}") from err
    return VideoVAEPlus.from_checkpoint(folder / VIDEOVAEPLUS_WEIGHTS, config)


def _load_videovaeplus_file(path: Path) -> nn.Module:
    from refdecoder.backbones.videovaeplus import VideoVAEPlus

    try:
        return VideoVAEPlus.from_checkpoint(path)
    except CheckpointError as err:
        family = detect_family(path)
        if family in (None, "videovae+"):
            raise
        raise CheckpointError(
            f"VAE file {path} holds {_FAMILY_NAMES[family]}, but a single-file VAE is read as a VideoVAE+ "
            f"checkpoint (keys encoder_temporal.* / decoder_temporal.*). {_FAMILY_HINTS[family]}"
        ) from err


_FAMILY_NAMES = {
    "wan2.1": "a diffusers AutoencoderKLWan (Wan2.1) state dict",
    "refdecoder": "RefDecoder weights (tokenizer / transformer / projectors), not a VAE",
    "official": "an official RefDecoder checkpoint, not a plain VAE",
}
_FAMILY_HINTS = {
    "wan2.1": "A Wan VAE is loaded from a diffusers folder: save it with vae.save_pretrained(DIR) and pass DIR "
    "(or pass the training run folder).",
    "refdecoder": "Pass them as --weights (their folder), with the base VAE as --vae.",
    "official": "Convert it first: refdecoder convert FILE --out OUT --base-out BASE, then use --vae BASE "
    "--weights OUT.",
}


def detect_family(path: str | os.PathLike) -> str | None:
    """What a checkpoint file holds, from its keys: ``"wan2.1"`` (a diffusers ``AutoencoderKLWan`` state dict),
    ``"videovae+"``, ``"refdecoder"`` (``save_pretrained`` weights), ``"official"`` (a released RefDecoder
    checkpoint), or None when it cannot be read or fits none."""
    from refdecoder.convert import detect_layout, read_checkpoint

    try:
        keys = set(read_checkpoint(path))
    except CheckpointError:
        return None
    try:
        detect_layout(keys)
        return "official"
    except CheckpointError:
        pass
    if any(k.startswith(("encoder_temporal.", "decoder_temporal.")) for k in keys):
        return "videovae+"
    if any(k.startswith("post_quant_conv.") for k in keys) and any(".up_blocks." in k for k in keys):
        return "wan2.1"
    if any(k.startswith("tokenizer.") for k in keys) and any(k.startswith("projectors.") for k in keys):
        return "refdecoder"
    return None


def save_vae(vae: nn.Module, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``vae`` as a folder :func:`load_vae` reads, replacing ``directory`` atomically.

    Diffusers models: ``save_pretrained`` (config.json + safetensors). VideoVAE+:
    ``videovaeplus.safetensors`` + ``videovaeplus_config.json``. ``dtype`` casts the saved tensors (e.g.
    ``torch.float16`` to halve the size); the model itself is not changed.
    """
    import dataclasses
    import shutil

    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    source = _cast_copy(vae, dtype) if dtype is not None else vae
    if hasattr(source, "save_pretrained"):
        source.save_pretrained(tmp)
    elif dataclasses.is_dataclass(getattr(source, "config", None)):
        from safetensors.torch import save_file

        tmp.mkdir(parents=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in source.state_dict().items()}
        save_file(tensors, tmp / VIDEOVAEPLUS_WEIGHTS, metadata={"format": "pt"})
        config = dataclasses.asdict(source.config)
        (tmp / VIDEOVAEPLUS_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    else:
        raise CheckpointError(f"cannot save a {type(vae).__name__}: neither a diffusers model nor a VideoVAE+")
    for path in tmp.rglob("*"):  # safetensors (also through diffusers) writes 0600, the configs get the umask's mode
        if path.is_file():
            use_default_mode(path)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def _cast_copy(vae: nn.Module, dtype: torch.dtype) -> nn.Module:
    # Tensor by tensor: diffusers' own .to() warns about modules it would keep in float32 (the Wan VAE has none).
    out = copy.deepcopy(vae)
    with torch.no_grad():
        for tensor in [*out.parameters(), *out.buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(dtype)
    return out


def load_decoder(
    vae: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    backbone: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    keep_base: bool = False,
) -> Decoder:
    """Load a VAE and, with ``weights``, the RefDecoder saved by ``save_pretrained`` on top of it.

    Args:
        vae: see :func:`load_vae`.
        weights: a ``save_pretrained`` folder, a training run folder, a Hub id, or None for the base decoder.
        backbone: force an adapter.
        device, dtype: where and how the VAE is loaded.
        keep_base: when the weights replace decoder weights (``train_decoder``), keep a copy of the original VAE
            as :attr:`Decoder.base`, so that comparisons are against the VAE as it was.

    Raises:
        CheckpointError: unreadable VAE or weights; ConfigError: weights made for another backbone;
        BackboneError: no adapter fits the VAE.
    """
    import refdecoder

    module = load_vae(vae, device, dtype)
    if weights is None:
        adapter_cls = get_backbone(backbone) if backbone else find_backbone(module)
        return Decoder(adapter_cls(module))
    folder = resolve_weights(weights)
    original = copy.deepcopy(module) if keep_base and _replaces_decoder(folder) else None
    model = refdecoder.load(module, folder, backbone=backbone).eval()
    base = type(model.adapter)(original) if original is not None else None
    return Decoder(model.adapter, model, base)


def resolve_weights(weights: str | os.PathLike) -> Path:
    """The ``save_pretrained`` folder ``weights`` names (a folder, a run folder, or a Hub id)."""
    folder = resolve_path(weights, what="RefDecoder weights")
    run = run_weights_path(folder) if folder.is_dir() else None
    return run if run is not None else folder


def _replaces_decoder(folder: Path) -> bool:
    from safetensors import safe_open

    from refdecoder.model import WEIGHTS_NAME

    try:
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as handle:
            return any(key.startswith("vae.") for key in handle.keys())
    except (OSError, ValueError, RuntimeError):
        return False  # refdecoder.load reports the unreadable file


def resolve_device(name: str | None) -> torch.device:
    """The torch device ``name`` names (None: cuda when available, else cpu), checked before any work is done.

    Raises:
        InputError: not a device name (``banana``), or a device this machine does not have (``cuda`` without a
            GPU, ``cuda:3`` with one GPU, ``mps`` off Apple silicon).
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {name!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU is available on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:  # mps off Apple silicon, a backend torch was built without
        raise InputError(f"--device {name} cannot be used here ({' '.join(str(err).split())[:120]})") from None
    return device
