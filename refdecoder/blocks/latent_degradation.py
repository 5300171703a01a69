"""Latent degradations at the ``latents`` hook point: make the decoder robust to what diffusion models produce.

A diffusion model's output latent is a softened, slightly wrong version of the clean latent; a decoder trained on
clean latents never sees that. Training-time components (all identity in eval mode) close the gap:

- :class:`LatentDegrader`: a frozen :class:`DegradationProxy`, a small timestep-conditioned conv net trained by
  ``recipes/train_degrader.py`` to map a clean latent to a diffusion model's prediction at timestep ``t``
  (spacepxl's 2x decoder trains against such a proxy with ``t`` in [0, 0.12]);
- :class:`LatentBlur`, :class:`LatentNoise`: parametric stand-ins that need no proxy;
- :class:`LatentMaskedReconstruction` (SSVAE's LMR): random latent blocks become a learnable mask token.

A frozen proxy is a training tool, not part of the decoder: :func:`freeze_as_constants` turns its parameters into
non-persistent buffers, which follow ``.to()`` but enter no ``state_dict`` (so no ``save_pretrained``) and no
optimizer. The LMR mask token is trained and stays a parameter. Components map latents ``B, C, T, H, W`` (in
whatever space the hook sees, e.g. after Wan's ``post_quant_conv``) as ``component(x, ctx)``, ``ctx`` a
:class:`refdecoder.hooks.DecodeContext` whose ``generator`` makes the draws reproducible.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from refdecoder.blocks.norms import ChannelRMSNorm
from refdecoder.errors import CheckpointError, ConfigError, InputError

__all__ = [
    "LatentDegradationConfig",
    "timestep_embedding",
    "DegradationProxy",
    "freeze_as_constants",
    "LatentDegrader",
    "latent_blur",
    "latent_noise",
    "LatentBlur",
    "LatentNoise",
    "lmr_mask",
    "latent_masked_reconstruction",
    "LatentMaskedReconstruction",
    "build_latent_components",
]

Range = tuple[float, float]
Block = tuple[int, int, int]
Generator = torch.Generator | None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_range(value: Sequence[float], name: str, upper: float = math.inf) -> Range:
    lo, hi = (float(v) for v in value)
    _check(0.0 <= lo <= hi <= upper, f"{name} must be a range (lo, hi) with 0 <= lo <= hi <= {upper}, got {value}")
    return lo, hi


@dataclass
class LatentDegradationConfig:
    """Which latent degradations to attach at the ``latents`` hook point during training (all off by default).

    Attributes:
        proxy: path of a trained :class:`DegradationProxy` file (``recipes/train_degrader.py``), or None.
        t_range: range the proxy's timestep is drawn from (flow-matching ``t`` in [0, 1]; spacepxl: 0-0.12).
        blur_sigma, noise_std: ranges of the blur sigma (latent pixels) and of the noise std (relative to each
            channel's std); ``(0, 0)`` turns them off.
        lmr, lmr_ratios, lmr_probs, lmr_block: attach Latent Masked Reconstruction with that mask-ratio schedule
            and block ``(t, h, w)`` (SSVAE 256p: ratios 0/0.25/0.5/0.75 at 0.7/0.1/0.1/0.1, block 1x1x1; 512p:
            0.6/0.1/0.15/0.15, block 2x2x2).
    """

    proxy: str | None = None
    t_range: Range = (0.0, 0.12)
    blur_sigma: Range = (0.0, 0.0)
    noise_std: Range = (0.0, 0.0)
    lmr: bool = False
    lmr_ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    lmr_probs: tuple[float, ...] = (0.7, 0.1, 0.1, 0.1)
    lmr_block: Block = (1, 1, 1)

    def __post_init__(self) -> None:
        # JSON gives lists; normalise to tuples so configs compare equal after a save/load round trip.
        self.t_range = _check_range(self.t_range, "degradation.t_range", upper=1.0)
        self.blur_sigma = _check_range(self.blur_sigma, "degradation.blur_sigma")
        self.noise_std = _check_range(self.noise_std, "degradation.noise_std")
        self.lmr_ratios, self.lmr_probs = _check_schedule(self.lmr_ratios, self.lmr_probs)
        self.lmr_block = _check_block(self.lmr_block)


def _check_schedule(ratios: Sequence[float], probs: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    ratios, probs = tuple(float(r) for r in ratios), tuple(float(p) for p in probs)
    _check(len(ratios) == len(probs) > 0, f"LMR needs one probability per mask ratio, got {ratios} and {probs}")
    _check(all(0.0 <= r < 1.0 for r in ratios), f"LMR mask ratios must be in [0, 1), got {ratios}")
    _check(min(probs) >= 0 and abs(sum(probs) - 1) < 1e-6, f"LMR probabilities must be >= 0 and sum to 1, got {probs}")
    return ratios, probs


def _check_block(block: Sequence[int]) -> Block:
    _check(len(block) == 3 and min(int(b) for b in block) >= 1, f"LMR block size must be (t, h, w) >= 1, got {block}")
    return tuple(int(b) for b in block)  # type: ignore[return-value]


def _check_latents(x: torch.Tensor, what: str, channels: int | None = None) -> None:
    if x.ndim != 5 or (channels is not None and x.shape[1] != channels):
        expected = f"(B, {channels}, T, H, W)" if channels is not None else "(B, C, T, H, W)"
        raise InputError(f"{what} expects latents of shape {expected}, got {tuple(x.shape)}")


def _per_sample(value: float | torch.Tensor, batch: int, like: torch.Tensor, what: str) -> torch.Tensor:
    """A float or ``(B,)`` tensor as a ``(B,)`` tensor on ``like``'s device, in float32."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        return value.expand(batch)
    if value.shape != (batch,):
        raise InputError(f"{what} must be a float or a tensor of shape ({batch},), got shape {tuple(value.shape)}")
    return value


def _uniform(batch: int, bounds: Range, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` draws from U(lo, hi) with ``generator`` (on its own device), moved to ``like``'s device."""
    device = generator.device if generator is not None else like.device
    lo, hi = bounds
    return (lo + (hi - lo) * torch.rand(batch, generator=generator, device=device)).to(like.device)


# --- the proxy network ---------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps ``t`` ``(B,)`` in [0, 1] -> ``(B, dim)`` (``dim`` even).

    ``t`` is multiplied by ``scale`` first so that the small timesteps used for degradation (0-0.12) still span
    many periods of the fastest frequencies.
    """
    if dim % 2:
        raise ConfigError(f"timestep embedding dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def _frame_conv(cin: int, cout: int) -> nn.Conv3d:
    # (1, 3, 3): frame-wise, so the proxy never mixes time and cannot smear motion across frames.
    return nn.Conv3d(cin, cout, (1, 3, 3), padding=(0, 1, 1))


class _ProxyBlock(nn.Module):
    """Residual block: RMS norm, timestep FiLM, SiLU, two frame-wise convs."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = ChannelRMSNorm(width)
        self.conv1 = _frame_conv(width, width)
        self.conv2 = _frame_conv(width, width)

    def forward(self, h: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        scale, shift = film[:, :, None, None, None].chunk(2, dim=1)
        y = F.silu(self.norm(h) * (1 + scale) + shift)
        return h + self.conv2(F.silu(self.conv1(y)))


class DegradationProxy(nn.Module):
    """Small timestep-conditioned conv net mapping a clean latent to its diffusion-degraded version.

    ``proxy(x, t) = x + f(x, t)`` with ``f`` built from frame-wise (1, 3, 3) convs modulated by a timestep
    embedding; ``f``'s output conv is zero-initialised, so an untrained proxy is the identity.

    Args:
        channels: latent channels C.
        width: hidden channels.
        depth: residual blocks (each two 3x3 convs; the receptive field grows by 4 latent pixels per block).
        embed_dim: timestep embedding size (even).

    Shapes:
        ``x``: ``B, C, T, H, W`` latents; ``t``: float or ``(B,)`` in [0, 1] -> ``B, C, T, H, W``.
    """

    def __init__(self, channels: int, width: int = 64, depth: int = 4, embed_dim: int = 64) -> None:
        super().__init__()
        _check(channels >= 1 and width >= 1 and depth >= 1, f"bad proxy size {channels=} {width=} {depth=}")
        self.config = {"channels": channels, "width": width, "depth": depth, "embed_dim": embed_dim}
        self.embed_dim = embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(embed_dim, width), nn.SiLU(), nn.Linear(width, 2 * width * depth))
        self.conv_in = _frame_conv(channels, width)
        self.blocks = nn.ModuleList(_ProxyBlock(width) for _ in range(depth))
        self.norm_out = ChannelRMSNorm(width)
        self.conv_out = _frame_conv(width, channels)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        _check_latents(x, "DegradationProxy", self.config["channels"])
        t = _per_sample(t, x.shape[0], x, "DegradationProxy timestep t")
        films = self.time_mlp(timestep_embedding(t, self.embed_dim).to(x.dtype)).chunk(len(self.blocks), dim=1)
        h = self.conv_in(x)
        for block, film in zip(self.blocks, films):
            h = block(h, film)
        return x + self.conv_out(F.silu(self.norm_out(h)))

    def save(self, path: str | os.PathLike) -> Path:
        """Write weights and architecture into one ``.safetensors`` file (works before and after freezing)."""
        from safetensors.torch import save_file

        from refdecoder._files import use_default_mode

        tensors = {n: t.detach().contiguous().cpu() for n, t in (*self.named_parameters(), *self.named_buffers())}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"refdecoder_proxy": json.dumps(self.config)})
        use_default_mode(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DegradationProxy:
        """Read a file written by :meth:`save`; a missing file or a foreign layout is a :class:`CheckpointError`."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                config = json.loads((handle.metadata() or {})["refdecoder_proxy"])
                state = {k: handle.get_tensor(k) for k in handle.keys()}
        except (OSError, KeyError, ValueError) as err:
            raise CheckpointError(f"cannot read a degradation proxy from {path}: {type(err).__name__}: {err}") from err
        proxy = cls(**config)
        try:
            proxy.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"{path} does not match its own proxy config {config}: {err}") from err
        return proxy


def freeze_as_constants(module: nn.Module) -> nn.Module:
    """Turn every parameter (and buffer) of ``module`` into a non-persistent buffer, in place; returns it (in eval).

    The values still move with ``.to()`` and pass gradients to the module's input, but no optimizer sees them and
    no ``state_dict`` holds them, so a frozen training tool never lands in a checkpoint nor is expected by a load.
    """
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                del sub._parameters[name]
                sub.register_buffer(name, param.detach(), persistent=False)
        for name, buffer in list(sub._buffers.items()):
            sub.register_buffer(name, buffer, persistent=False)
    return module.eval()


class LatentDegrader(nn.Module):
    """Training-only application of a frozen :class:`DegradationProxy`; identity in eval mode.

    The timestep is ``ctx.degradation_timestep`` (float or ``(B,)``) when given, else drawn per sample from
    U(``t_range``) with ``ctx.generator``.

    Args:
        proxy: a trained proxy; it is frozen in place with :func:`freeze_as_constants`, so it adds nothing to
            ``state_dict``.
        t_range: ``(lo, hi)`` in [0, 1].
    """

    def __init__(self, proxy: DegradationProxy, t_range: Range = (0.0, 0.12)) -> None:
        super().__init__()
        self.t_range = _check_range(t_range, "t_range", upper=1.0)
        self.proxy = freeze_as_constants(proxy)

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if not self.training:
            return x
        fixed = getattr(ctx, "degradation_timestep", None)
        if fixed is not None:
            t = _per_sample(fixed, x.shape[0], x, "ctx.degradation_timestep")
        else:
            t = _uniform(x.shape[0], self.t_range, getattr(ctx, "generator", None), x)
        return self.proxy(x, t)

    def train(self, mode: bool = True) -> LatentDegrader:
        super().train(mode)
        self.proxy.eval()  # frozen: whatever mode the model is in, the proxy behaves as it was trained
        return self

    def extra_repr(self) -> str:
        return f"t_range={self.t_range}"


# --- parametric degradations ---------------------------------------------------------------------------------
def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """``(B,)`` sigmas -> ``(B, 2*radius+1)`` normalised 1-D Gaussian kernels; sigma 0 gives a unit impulse."""
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float64)
    safe = sigma.double().clamp_min(1e-6)[:, None]
    kernels = torch.exp(-0.5 * (offsets[None] / safe) ** 2)
    return kernels / kernels.sum(dim=1, keepdim=True)


def latent_blur(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Spatial Gaussian blur of every latent frame (always applied; :class:`LatentBlur` is train-only).

    Args:
        x: ``B, C, T, H, W`` latents.
        sigma: blur std in latent pixels, a float or one per sample ``(B,)``; 0 leaves a sample unchanged.

    Returns:
        Blurred latents, same shape and dtype. The kernel is truncated at ``ceil(3 * max sigma)`` and borders are
        replicate-padded, like ``scipy.ndimage.gaussian_filter(mode="nearest", truncate=3)`` for integer sigmas.
    """
    _check_latents(x, "latent_blur")
    b, c, t, h, w = x.shape
    sigma = _per_sample(sigma, b, x, "blur sigma")
    if (sigma < 0).any():
        raise InputError(f"blur sigma must be >= 0, got {sigma.tolist()}")
    radius = math.ceil(3 * float(sigma.max()))
    if radius == 0:
        return x
    k = _gaussian_kernels(sigma, radius).to(x.dtype)
    # Samples become the channels of a grouped conv, so each one is blurred with its own kernel in one call.
    y = x.permute(1, 2, 0, 3, 4).reshape(c * t, b, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(b, 1, 1, -1), groups=b)
    y = F.conv2d(y, k.view(b, 1, -1, 1), groups=b)
    return y.reshape(c, t, b, h, w).permute(2, 0, 1, 3, 4).contiguous()


def latent_noise(
    x: torch.Tensor, std: float | torch.Tensor, generator: torch.Generator | None = None, relative: bool = True
) -> torch.Tensor:
    """Add Gaussian noise to latents (always applied; :class:`LatentNoise` is train-only).

    Args:
        x: ``B, C, T, H, W`` latents.
        std: noise std, a float or one per sample ``(B,)``.
        generator: RNG for the noise (on any device).
        relative: scale the noise by each sample's per-channel std (detached), so one setting means the same
            signal-to-noise ratio whatever the latent space's scale; False adds noise of absolute std ``std``.

    Returns:
        ``x + std * scale * eps``, same shape and dtype.
    """
    _check_latents(x, "latent_noise")
    std = _per_sample(std, x.shape[0], x, "noise std").view(-1, 1, 1, 1, 1)
    device = generator.device if generator is not None else x.device
    eps = torch.randn(x.shape, generator=generator, device=device).to(x.device, x.dtype)
    scale = x.detach().float().std(dim=(2, 3, 4), keepdim=True) if relative else 1.0
    return x + (std * scale).to(x.dtype) * eps


class LatentBlur(nn.Module):
    """Training-only :func:`latent_blur` with sigma ~ U(``sigma_range``) per sample; identity in eval mode."""

    def __init__(self, sigma_range: Range = (0.0, 1.0)) -> None:
        super().__init__()
        self.sigma_range = _check_range(sigma_range, "sigma_range")

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if not self.training or self.sigma_range[1] == 0:
            return x
        return latent_blur(x, _uniform(x.shape[0], self.sigma_range, getattr(ctx, "generator", None), x))

    def extra_repr(self) -> str:
        return f"sigma_range={self.sigma_range}"


class LatentNoise(nn.Module):
    """Training-only :func:`latent_noise` with std ~ U(``std_range``) per sample; identity in eval mode."""

    def __init__(self, std_range: Range = (0.0, 0.1), relative: bool = True) -> None:
        super().__init__()
        self.std_range = _check_range(std_range, "std_range")
        self.relative = relative

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if not self.training or self.std_range[1] == 0:
            return x
        generator = getattr(ctx, "generator", None)
        return latent_noise(x, _uniform(x.shape[0], self.std_range, generator, x), generator, self.relative)

    def extra_repr(self) -> str:
        return f"std_range={self.std_range}, relative={self.relative}"


# --- latent masked reconstruction (SSVAE) --------------------------------------------------------------------
def lmr_mask(
    size: Block, ratio: float, block: Block = (1, 1, 1), generator: Generator = None, device: Any = None
) -> torch.Tensor:
    """Boolean mask ``1, 1, T, H, W`` of whole blocks chosen uniformly without replacement.

    The number of masked blocks is ``max(1, floor(T*H*W*ratio / block volume))`` (SSVAE's count), capped at the
    number of blocks; ratio 0 masks nothing. Blocks tile the grid from the origin; edge blocks are cropped.
    """
    if not 0.0 <= ratio < 1.0:
        raise InputError(f"LMR mask ratio must be in [0, 1), got {ratio}")
    grid = tuple(math.ceil(s / b) for s, b in zip(size, block))
    num_blocks = math.prod(grid)
    count = 0 if ratio == 0 else min(num_blocks, max(1, int(math.prod(size) * ratio / math.prod(block))))
    gen_device = generator.device if generator is not None else device
    chosen = torch.randperm(num_blocks, generator=generator, device=gen_device)[:count]
    mask = torch.zeros(num_blocks, dtype=torch.bool, device=gen_device)
    mask[chosen] = True
    mask = mask.view(grid)
    for axis, b in enumerate(block):
        mask = mask.repeat_interleave(b, dim=axis)
    return mask[: size[0], : size[1], : size[2]][None, None].to(device)


def latent_masked_reconstruction(
    x: torch.Tensor, mask_token: torch.Tensor, ratio: float, block: Block = (1, 1, 1), generator: Generator = None
) -> torch.Tensor:
    """Replace a random set of latent blocks by ``mask_token`` (always applied; see the module for train-only).

    Args:
        x: ``B, C, T, H, W`` latents.
        mask_token: ``1, C, 1, 1, 1`` (or anything broadcastable to ``x``).
        ratio: fraction of positions to mask, in [0, 1).
        block: masked block ``(t, h, w)``.
        generator: RNG for the block choice.

    Returns:
        Latents with the masked positions replaced, same shape; the same positions are masked in every sample
        and every channel (as SSVAE does). Gradients reach ``mask_token``.
    """
    _check_latents(x, "latent_masked_reconstruction")
    mask = lmr_mask(tuple(x.shape[2:]), ratio, block, generator, x.device)
    return torch.where(mask, mask_token.to(x.dtype), x)


class LatentMaskedReconstruction(nn.Module):
    """Training-only LMR with a learnable mask token (saved with the model); identity in eval mode.

    Each call draws one mask ratio from ``ratios`` with probabilities ``probs`` (one per batch, as SSVAE).

    Args:
        channels: latent channels C (the mask token is ``1, C, 1, 1, 1``).
        ratios, probs: the mask-ratio schedule.
        block: masked block ``(t, h, w)``.
        init_std: std of the token's normal initialisation (SSVAE draws it from a standard normal).
    """

    def __init__(
        self,
        channels: int,
        ratios: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
        probs: Sequence[float] = (0.7, 0.1, 0.1, 0.1),
        block: Block = (1, 1, 1),
        init_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.ratios, self.probs = _check_schedule(ratios, probs)
        self.block = _check_block(block)
        self.mask_token = nn.Parameter(torch.randn(1, channels, 1, 1, 1) * init_std)

    def draw_ratio(self, generator: torch.Generator | None = None) -> float:
        """One mask ratio from the schedule."""
        device = generator.device if generator is not None else "cpu"
        probs = torch.tensor(self.probs, device=device)
        return self.ratios[int(torch.multinomial(probs, 1, generator=generator))]

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if not self.training:
            return x
        _check_latents(x, "LatentMaskedReconstruction", self.mask_token.shape[1])
        generator = getattr(ctx, "generator", None)
        # Even at ratio 0 the token stays in the graph (zero gradient), so DDP never sees an unused parameter.
        return latent_masked_reconstruction(x, self.mask_token, self.draw_ratio(generator), self.block, generator)

    def extra_repr(self) -> str:
        return f"channels={self.mask_token.shape[1]}, ratios={self.ratios}, probs={self.probs}, block={self.block}"


def build_latent_components(config: LatentDegradationConfig, channels: int, include_proxy: bool = True) -> dict:
    """The modules ``config`` asks for, in application order: proxy, blur, noise, then LMR masking.

    Args:
        config: what to attach.
        channels: latent channels at the hook point (the adapter's ``latent_channels``).
        include_proxy: load the proxy file. Pass False when rebuilding a model for inference: the proxy is frozen
            and identity in eval, it stores nothing in checkpoints, and its file need not exist there.

    Returns:
        ``{name: nn.Module}`` for ``RefDecoder.latent_components``: ``degrade_proxy``, ``latent_blur``,
        ``latent_noise``, ``lmr``.
    """
    components: dict[str, nn.Module] = {}
    if config.proxy and include_proxy:
        proxy = DegradationProxy.load(config.proxy)
        if proxy.config["channels"] != channels:
            raise ConfigError(f"proxy {config.proxy} is for {proxy.config['channels']} channels, not {channels}")
        components["degrade_proxy"] = LatentDegrader(proxy, config.t_range)
    if config.blur_sigma[1] > 0:
        components["latent_blur"] = LatentBlur(config.blur_sigma)
    if config.noise_std[1] > 0:
        components["latent_noise"] = LatentNoise(config.noise_std)
    if config.lmr:
        components["lmr"] = LatentMaskedReconstruction(channels, config.lmr_ratios, config.lmr_probs, config.lmr_block)
    return components
