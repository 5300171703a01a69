"""Correspondence: the cost-volume estimate finds known shifts, caller displacements are pooled and checked, the
field reaches each stage in its tokens, and a model decodes with it (config, decode API, errors)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import refdecoder
from refdecoder.blocks import correspondence
from refdecoder.blocks.correspondence import CorrespondenceField, cost_volume_displacement, pixel_flow_to_latent_grid
from refdecoder.blocks.sub_token_shift import shift_features
from refdecoder.config import CorrespondenceConfig, RefDecoderConfig
from refdecoder.errors import ConfigError, InputError
from refdecoder.frames import FrameRule
from refdecoder.inference import decode_video
from refdecoder.tiling import plan_tiles
from tests.helpers import latents_for, reference_for, tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")


def textured(batch: int, channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth random features (a blurred noise field): structure to match, unlike white noise at every scale."""
    noise = torch.randn(batch, channels, h, w, generator=torch.Generator().manual_seed(seed))
    return F.avg_pool2d(noise, 3, 1, 1, count_include_pad=False)


@pytest.mark.parametrize("shift", [(0, 0), (1, 0), (0, -2), (2, 1), (-1, -3)])
def test_the_estimate_finds_a_shifted_copy(shift):
    big = textured(2, 16, 20, 24)
    dy, dx = shift
    reference = big[:, :, 4:16, 4:20]
    video = big[:, :, 4 + dy : 16 + dy, 4 + dx : 20 + dx]  # video cell (y, x) = reference cell (y + dy, x + dx)
    field = cost_volume_displacement(video[:, :, None], reference[:, :, None], 3, 0.02, 1)
    assert field.shape == (2, 1, 2, 1, 12, 16)
    inner = field[..., 4:-4, 4:-4]  # S + m cells from the edges, where a match may leave the reference
    torch.testing.assert_close(inner[:, :, 0], torch.full_like(inner[:, :, 0], float(dy)), atol=0.1, rtol=0)
    torch.testing.assert_close(inner[:, :, 1], torch.full_like(inner[:, :, 1], float(dx)), atol=0.1, rtol=0)


def test_the_estimate_stays_inside_the_search_window_and_grid():
    video, reference = textured(1, 8, 6, 7, seed=1)[:, :, None], textured(1, 8, 6, 7, seed=2)[:, :, None]
    field = cost_volume_displacement(video, reference, 2, 0.05, 0)
    assert field.abs().max() <= 2
    rows = torch.arange(6).reshape(6, 1).float()
    cols = torch.arange(7).float()
    assert ((rows + field[0, 0, 0, 0]) >= 0).all() and ((rows + field[0, 0, 0, 0]) <= 5).all()
    assert ((cols + field[0, 0, 1, 0]) >= 0).all() and ((cols + field[0, 0, 1, 0]) <= 6).all()
    # Several reference frames: one field per frame.
    two = torch.cat([reference, video], 2)
    both = cost_volume_displacement(video, two, 2, 0.005, 0)
    assert both.shape == (1, 2, 2, 1, 6, 7) and both[0, 1].abs().max() < 0.05  # the video matches itself in place


@pytest.mark.parametrize("shift", [(0, 2), (1, -1), (-2, 0)])
def test_flat_cells_take_their_confident_neighbours_displacement(shift):
    """A textured scene with a flat patch, shifted against its reference: the patch's own correlations tie, so its
    soft-argmax falls back towards zero; with ``smooth_radius`` it takes the shift of the texture around it, and
    the textured cells keep theirs."""
    big = textured(1, 16, 24, 28, seed=3)
    big[:, :, 10:15, 12:17] = 0.3  # flat: every candidate inside it correlates alike
    dy, dx = shift
    reference, video = big[:, :, 4:20, 4:24], big[:, :, 4 + dy : 20 + dy, 4 + dx : 24 + dx]
    flat = (slice(7 - dy, 10 - dy), slice(9 - dx, 12 - dx))  # video cells deep inside the flat patch
    truth = torch.tensor([dy, dx], dtype=torch.float32)[:, None, None]
    plain = cost_volume_displacement(video[:, :, None], reference[:, :, None], 3, 0.02, 1)[0, 0, :, 0]
    smoothed = cost_volume_displacement(video[:, :, None], reference[:, :, None], 3, 0.02, 1, smooth_radius=2)[
        0, 0, :, 0
    ]
    assert (plain[:, flat[0], flat[1]] - truth).abs().mean() > 0.5  # without smoothing the flat cells miss
    assert (smoothed[:, flat[0], flat[1]] - truth).abs().max() < 0.5
    inner = (slice(5, -5), slice(5, -5))
    textured_cells = (smoothed - truth).abs()[:, inner[0], inner[1]]
    assert textured_cells.mean() < 0.1


@pytest.mark.parametrize("global_prior", [0.0, 1.0])
def test_a_flat_scene_smoothed_stays_in_place(global_prior):
    """Nothing confident anywhere: the smoothed field (and the frame's translation) stays near zero."""
    video = torch.full((1, 8, 1, 6, 7), 0.5) + 1e-3 * textured(1, 8, 6, 7)[:, :, None]
    field = cost_volume_displacement(video, video, 2, 0.5, 1, smooth_radius=2, global_prior=global_prior)
    assert field.abs().max() < 0.5


@pytest.mark.parametrize("shift", [(0, 2), (-1, 0), (1, -2)])
def test_a_wide_flat_region_follows_the_frames_translation(shift):
    """A flat region wider than the smoothing box: no confident neighbour reaches its centre, so without the global
    prior it stays near zero; with it, it takes the shift the textured rest of the frame shows."""
    big = textured(1, 16, 28, 32, seed=5)
    big[:, :, 8:20, 10:22] = 0.3
    dy, dx = shift
    reference, video = big[:, :, 4:24, 4:28], big[:, :, 4 + dy : 24 + dy, 4 + dx : 28 + dx]
    centre = (slice(8 - dy, 12 - dy), slice(10 - dx, 14 - dx))  # video cells deep inside the flat region
    truth = torch.tensor([dy, dx], dtype=torch.float32)[:, None, None]

    def estimate(prior: float) -> torch.Tensor:
        field = cost_volume_displacement(video[:, :, None], reference[:, :, None], 3, 0.02, 1, 1, prior)
        return field[0, 0, :, 0]

    assert (estimate(0.0)[:, centre[0], centre[1]] - truth).abs().amax(0).mean() > 0.5
    followed = estimate(1.0)
    assert (followed[:, centre[0], centre[1]] - truth).abs().max() < 0.25
    assert (followed - truth).abs()[:, 5:-5, 5:-5].mean() < 0.1  # the textured cells keep theirs


def test_a_moving_object_keeps_its_own_displacement_under_the_global_prior():
    """The background pans by 2 cells, a textured object inside it moves the other way: the frame's translation is
    the background's (the robust mean is not dragged towards the object), and the object's cells keep their own."""
    big = textured(1, 16, 28, 32, seed=7)
    reference = big[:, :, 4:24, 4:28]
    video = big[:, :, 4:24, 6:30].clone()  # background: dx = +2
    video[:, :, 7:13, 8:14] = big[:, :, 11:17, 11:17]  # object: video cell (y, x) shows reference (y, x - 1)
    field = cost_volume_displacement(video[:, :, None], reference[:, :, None], 3, 0.02, 1, 1, 1.0)[0, 0, :, 0]
    object_cells, background = field[:, 8:12, 9:13], field[:, 14:-4, 4:-4]
    torch.testing.assert_close(object_cells[1], torch.full_like(object_cells[1], -1.0), atol=0.25, rtol=0)
    torch.testing.assert_close(background[1], torch.full_like(background[1], 2.0), atol=0.25, rtol=0)
    assert object_cells[0].abs().max() < 0.25 and background[0].abs().max() < 0.25


@pytest.mark.parametrize("dx", [2, -2, 3])
def test_cells_whose_match_lies_on_the_reference_border_find_it(dx):
    """Video cells matching the reference's first or last column: their patch reaches off the reference grid. The
    patch mean is over the candidates on the grid, so the true match is not handicapped against in-grid wrong ones
    (a zero for each off-grid candidate made these cells miss)."""
    big = textured(4, 16, 16, 30, seed=11)
    reference = big[:, :, :, 5:25]
    video = big[:, :, :, 5 + dx : 25 + dx]  # video cell (y, x) shows reference cell (y, x + dx)
    field = cost_volume_displacement(video[:, :, None], reference[:, :, None], 3, 0.02, 1)[:, 0, 1, 0]
    border = -dx if dx < 0 else 19 - dx  # the video column showing the reference's first / last column
    assert (field[:, 1:-1, border] - dx).abs().max() < 0.5


@pytest.mark.parametrize("dx", [2, -2, 3, -3])
def test_cells_the_reference_does_not_show_do_not_drag_their_neighbours(dx):
    """A shifted copy whose unshown columns hold the reference's own cells there under noise: those cells match
    displacement 0 with a clear margin but clearly worse than a true match. Confidence counts how well the best
    candidate matches, so the smoothing does not spread their displacement into the shown cells beside them."""
    big = textured(4, 16, 16, 30, seed=13)
    reference = big[:, :, :, 5:25]
    video = big[:, :, :, 5 + dx : 25 + dx].clone()
    band = slice(20 - dx, 20) if dx > 0 else slice(0, -dx)  # video columns the reference does not show
    video[:, :, :, band] = reference[:, :, :, band] + 0.3 * textured(4, 16, 16, abs(dx), seed=14)
    field = cost_volume_displacement(video[:, :, None], reference[:, :, None], 3, 0.02, 1, smooth_radius=2)
    shown = field[:, 0, 1, 0, :, slice(0, 20 - dx) if dx > 0 else slice(-dx, 20)]
    assert (shown.round() == dx).all()


@pytest.mark.parametrize("temperature", [0.02, 0.005, 0.001])
@pytest.mark.parametrize("global_prior", [0.0, 1.0])
@pytest.mark.parametrize("subcell", [False, True])
def test_content_that_matches_nothing_gives_a_finite_field(temperature, global_prior, subcell):
    """Unrelated or blank content: every cell's best cosine is far below a true match's, so its match factor
    ``exp(-(1 - best) / temperature)`` would underflow to 0 at small temperatures and the smoothing would divide
    0 by 0. The field stays finite and inside the search window."""
    reference = textured(2, 8, 6, 7, seed=21)[:, :, None]
    for video in (textured(2, 8, 6, 7, seed=22)[:, :, None], torch.zeros(2, 8, 1, 6, 7)):
        field = cost_volume_displacement(video, reference, 2, temperature, 1, 2, global_prior, subcell)
        assert torch.isfinite(field).all() and field.abs().max() <= 2


@pytest.mark.parametrize("subcell", [False, True])
@pytest.mark.parametrize("size", [1, 2])
def test_smoothing_a_lone_candidate_is_finite(subcell, size):
    """A grid with no rival candidate (1x1), or with subcell none beyond the best's neighbours (2x2): an infinite
    margin, clamped."""
    video = textured(1, 8, size, size)[:, :, None]
    field = cost_volume_displacement(video, video, 2, 0.02, 1, smooth_radius=1, subcell=subcell)
    assert torch.isfinite(field).all() and field.abs().max() <= (0.5 if subcell else 1e-6)


class _Adapter:
    """What the field reads from an adapter: Wan's causal frame rule and stages doubling time."""

    def __init__(self) -> None:
        vae = tiny_wan()
        self.wrapped = refdecoder.wrap(vae, "tiny")
        self.adapter = self.wrapped.adapter


def test_caller_flow_is_pooled_per_latent_frame_and_cell():
    adapter = _Adapter().adapter
    flow = torch.zeros(1, 2, 9, 32, 48)  # 9 frames of 32x48 px = 3 latent frames of 4x6 cells (8 px)
    flow[:, 0, 0] = 8.0  # frame 0 -> latent frame 0
    flow[:, 1, 1:5] = torch.arange(4.0).reshape(4, 1, 1)  # frames 1-4 -> latent frame 1: mean 1.5
    pooled = pixel_flow_to_latent_grid(flow, 1, (3, 4, 6), adapter)
    assert pooled.shape == (1, 1, 2, 3, 4, 6)
    assert torch.all(pooled[:, :, 0, 0] == 8.0) and torch.all(pooled[:, :, 1, 1] == 1.5)
    assert torch.all(pooled[:, :, :, 2] == 0)
    for bad in (torch.zeros(1, 2, 8, 32, 48), torch.zeros(1, 3, 9, 32, 48), torch.zeros(1, 2, 9, 30, 48)):
        with pytest.raises(InputError, match="displacements"):
            pixel_flow_to_latent_grid(bad, 1, (3, 4, 6), adapter)


def test_the_field_reaches_each_stage_in_its_tokens():
    adapter = _Adapter().adapter
    pixels = torch.zeros(1, 1, 2, 3, 4, 6)
    pixels[:, :, 1, 1] = 8.0  # latent frame 1: 8 px to the right
    field = CorrespondenceField(pixels, (32, 48), [(0, 3)], adapter)
    for index, scale in enumerate((8, 4, 2)):
        frames = adapter.stage_frames(index, 3, True)
        features = torch.zeros(1, 4, frames, 32 // scale, 48 // scale)
        tokens = field.stage(index, features, (1, 2, 2), 0, True)
        h, w = -(-32 // scale // 2), -(-48 // scale // 2)
        assert tokens.shape == (1, 1, 2, frames, h, w)
        token_px = 2 * scale
        moved = [f for f in range(frames) if tokens[0, 0, 1, f].abs().max() > 0]
        # Causal stages: latent frame 1 decodes to stage frames 1..k of the first window.
        assert moved == list(range(1, 1 + adapter.stage_frames(index, 2, True) - 1))
        torch.testing.assert_close(tokens[0, 0, 1, moved[0]], torch.full((h, w), 8.0 / token_px))


@pytest.mark.parametrize("first_window", [True, False])
def test_per_frame_fields_follow_motion_within_a_latent_frame(first_window):
    """A pan at constant speed, seen once per latent frame (at the middle of the frames it decodes to): with
    ``per_frame`` every frame of a stage after temporal upsampling takes its own displacement, the pan's."""
    adapter, speed = _Adapter().adapter, 2.0  # px per frame, to the right
    n = 3
    counts = [0] + [adapter.stage_frames(len(adapter.stages()), j, first_window) for j in range(1, n + 1)]
    middles = [(counts[j] + counts[j + 1] - 1) / 2 for j in range(n)]
    pixels = torch.zeros(1, 1, 2, n, 4, 6)
    pixels[:, :, 1] = speed * torch.tensor(middles).reshape(n, 1, 1)
    fields = {on: CorrespondenceField(pixels, (32, 48), [(0, n)], adapter, per_frame=on) for on in (False, True)}
    latent_rate = 0
    for index, scale in enumerate((8, 4, 2)):
        frames = adapter.stage_frames(index, n, first_window)
        features = torch.zeros(1, 4, frames, 32 // scale, 48 // scale)
        off, on = (fields[flag].stage(index, features, (1, 1, 1), 0, first_window) for flag in (False, True))
        if frames == n:  # the latent rate: nothing to share out
            latent_rate += 1
            assert torch.equal(on, off)
            continue
        stage_counts = [0] + [adapter.stage_frames(index, j, first_window) for j in range(1, n + 1)]
        per_pixel_frame = (counts[-1] - 1) / max(frames - 1, 1) if frames > 1 else 1.0
        expected = speed * torch.arange(frames, dtype=torch.float32) * per_pixel_frame / scale  # tokens of 1 cell
        if stage_counts[-1] == counts[-1]:  # the output rate: the pan itself, frame by frame
            torch.testing.assert_close(on[0, 0, 1, :, 0, 0], expected, atol=1e-5, rtol=0)
        assert on[0, 0, 1, :, 0, 0].unique().numel() == frames  # every frame its own
        assert off[0, 0, 1, :, 0, 0].unique().numel() == n  # one value per latent frame
        assert torch.all(on[0, 0, 0] == 0)
    assert latent_rate == 1


def test_correspondence_needs_a_local_radius():
    config = refdecoder.preset("tiny")
    config.correspondence.enabled = True
    with pytest.raises(ConfigError, match="correspondence.enabled needs a local"):
        refdecoder.wrap(tiny_wan(), config)
    with pytest.raises(ConfigError, match="search_radius"):
        CorrespondenceConfig(search_radius=-1)
    with pytest.raises(ConfigError, match="temperature"):
        CorrespondenceConfig(temperature=0)


def test_config_round_trip_and_old_configs_stay_off(tmp_path):
    config = refdecoder.preset("tiny")
    config.correspondence = CorrespondenceConfig(enabled=True, search_radius=5)
    config.save(tmp_path / "c.json")
    assert RefDecoderConfig.load(tmp_path / "c.json").correspondence == config.correspondence
    old = config.to_dict()
    old.pop("correspondence")  # a config saved before correspondence existed
    assert RefDecoderConfig.from_dict(old).correspondence.enabled is False
    assert all(not refdecoder.preset(name).correspondence.enabled for name in refdecoder.config.PRESETS)


def _model(enabled: bool) -> refdecoder.RefDecoder:
    config = refdecoder.preset("tiny")
    config.transformer = replace(config.transformer, attention_radius=1, locality_bias=True)
    config.correspondence.enabled = enabled
    model = refdecoder.wrap(tiny_wan(), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for _, param in model.added_parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def _caller_displacement_case() -> tuple[refdecoder.RefDecoder, torch.Tensor, torch.Tensor, int]:
    """A model without its own estimate, 3 latent frames of 4x6 cells, their reference, and the pixel frame count."""
    model = _model(enabled=False)
    z = latents_for(model.vae, 3, h=4, w=6)
    return model, z, reference_for(z), model.adapter.frame_rule.pixel_frames(3)


@torch.no_grad()
def test_decode_with_caller_displacements():
    model, z, ref, frames = _caller_displacement_case()
    plain = model.decode(z, ref)
    zero = model.decode(z, ref, displacements=torch.zeros(1, 2, frames, 32, 48))
    assert (zero - plain).abs().max() <= 1e-5  # zero displacement = today's attention
    moved = torch.zeros(1, 2, frames, 32, 48)
    moved[:, 1] = 16.0  # whole tokens on every stage grid (snapped fields round half a token to 0)
    assert (model.decode(z, ref, displacements=moved) - plain).abs().max() > 1e-3
    per_frame = model.decode(z, ref, displacements=moved[:, None])  # B, R, 2, T, H, W
    assert torch.equal(per_frame, model.decode(z, ref, displacements=moved))
    with pytest.raises(InputError, match="displacements must be"):
        model.decode(z, ref, displacements=torch.zeros(1, 2, frames - 1, 32, 48))
    with pytest.raises(InputError, match="need a reference"):
        model.decode(z, displacements=moved)


@torch.no_grad()
def test_per_frame_displacements_change_the_decode_only_where_they_change_in_time():
    model, z, ref, frames = _caller_displacement_case()
    steady = torch.zeros(1, 2, frames, 32, 48)
    steady[:, 1] = 16.0
    pan = steady.clone()
    pan[:, 1] = 4.0 * torch.arange(frames, dtype=torch.float32).reshape(frames, 1, 1)  # 4 px per frame
    decoded = {}
    for per_frame in (False, True):
        model.config.correspondence.per_frame = per_frame
        decoded[per_frame] = [model.decode(z, ref, displacements=d, clamp=False) for d in (steady, pan)]
    torch.testing.assert_close(decoded[True][0], decoded[False][0], atol=1e-6, rtol=0)  # the same every frame
    assert (decoded[True][1] - decoded[False][1]).abs().max() > 1e-3  # a pan: later frames follow it


@torch.no_grad()
def test_the_estimate_is_used_when_enabled_and_follows_a_shifted_reference():
    on, off = _model(enabled=True), _model(enabled=False)
    z = latents_for(on.vae, 3, h=4, w=6)
    ref = reference_for(z)
    assert (on.decode(z, ref) - off.decode(z, ref)).abs().max() > 1e-4
    # The estimate of an in-place reference (its own encoding) is near zero where the video is that reference.
    video = ref.expand(-1, -1, on.adapter.frame_rule.pixel_frames(2), -1, -1)
    latents = on.encode(video)
    field = refdecoder.blocks.correspondence.correspondence_field(
        on.adapter, latents, ref, [(0, 2)], (32, 48), (2, 0.02, 1)
    )
    assert field.pixels[:, :, :, 0].abs().mean() < 1.0  # output pixels


class _KindedEncoder:
    """A stand-in adapter whose encoder codes latent frame ``i`` in its own feature space (a different random
    projection per frame index up to 3, as a temporally compressing encoder's first and later frames differ and
    its causal caches settle after a few frames)."""

    spatial_factor = 4
    frame_rule = FrameRule(first=1, step=4)

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(11)
        self.projections = [torch.randn(8, 3, generator=g) for _ in range(4)]

    def check_latent_frames(self, latent_frames: int) -> None:
        self.frame_rule.pixel_frames(latent_frames)

    def encode(self, clip: torch.Tensor) -> torch.Tensor:
        t = self.frame_rule.latent_frames(clip.shape[2])
        pooled = F.avg_pool3d(clip, (1, 4, 4))
        frames = [pooled[:, :, 0]] + [pooled[:, :, 1 + 4 * (i - 1) : 1 + 4 * i].mean(2) for i in range(1, t)]
        coded = [torch.einsum("kc,bchw->bkhw", self.projections[min(i, 3)], f).tanh() for i, f in enumerate(frames)]
        return torch.stack(coded, 2)


@torch.no_grad()
@pytest.mark.parametrize("frame_spaces", ["fitted", "still_clip"])
@pytest.mark.parametrize("shift_px", [0, 8, -12])
def test_later_latent_frames_are_matched_in_their_own_feature_space(shift_px, frame_spaces):
    """A still scene shifted against its reference: every latent frame finds the shift, also the later ones coded
    in other feature spaces (the reference mapped into each by the channel map fitted on the video's own frames,
    or encoded as a still clip and matched frame by frame)."""
    adapter = _KindedEncoder()
    g = torch.Generator().manual_seed(7)
    scene = torch.rand(1, 3, 64, 96, generator=g) * 2 - 1
    ref = scene[..., 16:48, 32:80][:, :, None]  # B, 3, 1, 32, 48
    moved = scene[..., 16:48, 32 + shift_px : 80 + shift_px]  # frame pixel x shows reference pixel x + shift_px
    latents = adapter.encode(moved[:, :, None].expand(-1, -1, adapter.frame_rule.pixel_frames(6), -1, -1))
    field = refdecoder.blocks.correspondence.correspondence_field(
        adapter, latents, ref, [(0, 6)], (32, 48), (4, 0.02, 1), frame_spaces=frame_spaces
    )
    cells = slice(4, -4)  # columns whose content the reference shows (and whose match fits), whatever the sign
    dx, dy = field.pixels[0, 0, 1, :, 1:-1, cells], field.pixels[0, 0, 0, :, 1:-1, cells]
    assert (dx - shift_px).abs().mean(dim=(1, 2)).max() < 1.0, dx.mean(dim=(1, 2))  # every latent frame, in px
    assert dy.abs().mean() < 1.0
    # A still clip of one frame, unmapped (what either way does without its bringing into the frames' spaces),
    # matches later frames across feature spaces: they miss.
    cheap = refdecoder.blocks.correspondence.correspondence_field(
        adapter, latents, ref, [(0, 6)], (32, 48), (4, 0.02, 1), frame_spaces="still_clip", still_frames=1
    )
    missed = (cheap.pixels[0, 0, 1, 1:, 1:-1, cells] - shift_px).abs().mean(dim=(1, 2))
    assert missed.mean() > 2.0, missed


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_still_frames_is_checked(bad):
    with pytest.raises(ConfigError, match="still_frames"):
        CorrespondenceConfig(still_frames=bad)


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("smooth_radius", -1), ("smooth_radius", 1.5), ("smooth_radius", True), ("frame_spaces", "x"),
        ("global_prior", -0.5), ("global_prior", float("nan")), ("global_prior", True), ("global_prior", "1"),
        ("per_frame", 1), ("per_frame", "yes"),
    ],
)  # fmt: skip
def test_smoothing_and_frame_spaces_are_checked(key, bad):
    with pytest.raises(ConfigError, match=key):
        CorrespondenceConfig(**{key: bad})


def test_a_global_prior_without_smoothing_is_refused():
    """The translation joins the smoothing's average: with ``smooth_radius: 0`` it would silently do nothing."""
    with pytest.raises(ConfigError, match="global_prior .* needs smooth_radius >= 1"):
        CorrespondenceConfig(global_prior=3.0, smooth_radius=0)
    CorrespondenceConfig(global_prior=0.0, smooth_radius=0)  # off: no smoothing needed


@torch.no_grad()
def test_snapped_fields_are_whole_tokens_and_tiled_streams_take_displacements():
    from refdecoder.inference import decode_video
    from refdecoder.tiling import plan_tiles

    model, z, ref, frames = _caller_displacement_case()
    moved = torch.full((1, 2, frames, 32, 48), 5.0)  # 5 px: fractional on every stage grid
    snapped = model.decode(z, ref, displacements=moved)
    model.config.correspondence.snap = False
    assert (model.decode(z, ref, displacements=moved) - snapped).abs().max() > 1e-4  # bilinear reads between tokens
    model.config.correspondence.snap = True
    # Streams and tiles take displacements too: one tile covering the frame is the whole decode.
    streamed = decode_video(model, z, reference=ref, displacements=moved, clamp=False)
    torch.testing.assert_close(streamed, model.decode(z, ref, displacements=moved, clamp=False), atol=1e-6, rtol=0)
    whole = plan_tiles((4, 6), 8, tile=(32, 48), overlap=(0, 0))
    tiled = decode_video(model, z, reference=ref, displacements=moved, tiles=whole, clamp=False)
    torch.testing.assert_close(tiled, streamed, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="pass a reference"):
        decode_video(model, z, displacements=moved)


@pytest.mark.parametrize(("shift", "soft_rounds"), [((0.25, -0.4), True), ((1.3, 0.75), True), ((-0.5, 0.0), False)])
def test_subcell_refinement_finds_a_fraction_of_a_cell(shift, soft_rounds):
    """A smooth scene sampled a fraction of a cell away: the parabola through the best candidate's neighbours
    finds the fraction where the low-temperature soft-argmax rounds it towards a whole cell (not at half a cell,
    where the two candidates tie and it averages them); whole shifts stay whole."""
    big = textured(2, 16, 40, 44, seed=5)
    big = F.avg_pool2d(big, 3, 1, 1, count_include_pad=False)  # smoother: bilinear sampling keeps its content
    reference = big[:, :, 8:32, 8:36]
    dy, dx = shift
    moved = shift_features(big[:, :, None], torch.tensor([dy, dx]).reshape(1, 2, 1, 1, 1).expand(2, 2, 1, 40, 44))
    video = moved[:, :, :, 8:32, 8:36]  # video cell (y, x) = reference at (y + dy, x + dx)
    truth = torch.tensor([dy, dx]).reshape(1, 1, 2, 1, 1, 1)

    def error(subcell: bool) -> float:
        field = cost_volume_displacement(video, reference[:, :, None], 3, 0.02, 1, subcell=subcell)
        return (field - truth)[..., 5:-5, 5:-5].abs().median().item()

    assert error(subcell=True) < 0.1
    if soft_rounds:
        assert error(subcell=False) > 2 * error(subcell=True)
    whole = cost_volume_displacement(video.roll(1, -1), video, 3, 0.02, 1, subcell=True)[..., 5:-5, 5:-5]
    assert (whole[:, :, 1] + 1).abs().median() < 0.05 and whole[:, :, 0].abs().median() < 0.05


def test_smoothing_keeps_the_weight_of_cells_half_a_cell_away(monkeypatch):
    """Content displaced by half a cell matches the two cells it straddles about equally; with ``subcell`` the
    smoothing's confidence is the margin over rivals beyond the best's neighbours, so those cells keep their weight
    and the smoothed field stays at half a cell (with the margin over the runner-up, the old rule, it does not)."""
    big = textured(2, 16, 40, 44, seed=5)
    reference = big[:, :, 8:32, 8:36]
    moved = shift_features(big[:, :, None], torch.tensor([0.0, -0.5]).reshape(1, 2, 1, 1, 1).expand(2, 2, 1, 40, 44))
    video = moved[:, :, :, 8:32, 8:36]

    def error() -> float:
        field = cost_volume_displacement(video, reference[:, :, None], 3, 0.02, 1, smooth_radius=2, subcell=True)
        return (field[:, 0, 1, ..., 5:-5, 5:-5] + 0.5).abs().mean().item()

    assert error() < 0.015
    second_best = correspondence._best_and_rival
    monkeypatch.setattr(correspondence, "_best_and_rival", lambda c, s, beyond_peak: second_best(c, s, False))
    assert error() > 0.02


def test_subcell_is_checked_and_reaches_the_estimate():
    with pytest.raises(ConfigError, match="subcell must be a bool"):
        CorrespondenceConfig(subcell="yes")
    assert CorrespondenceConfig(subcell=True).search[-1] is True


def test_half_cell_phases_move_the_content_by_half_a_cell():
    frames = torch.randn(2, 3, 8, 12)
    phases = correspondence.half_cell_phases(frames, 4).unflatten(0, (2, 4))  # N, phase, 3, H, W
    as_is, down, right, both = phases.unbind(1)
    assert torch.equal(as_is, frames)
    assert torch.equal(down[..., 2:, :], frames[..., :-2, :]) and torch.equal(
        down[..., :2, :], frames[..., :1, :].expand(-1, -1, 2, -1)
    )
    assert torch.equal(right[..., 2:], frames[..., :-2]) and torch.equal(
        right[..., :2], frames[..., :1].expand(-1, -1, -1, 2)
    )
    assert torch.equal(both[..., 2:, 2:], frames[..., :-2, :-2])
    with pytest.raises(InputError, match="even latent cell"):
        correspondence.half_cell_phases(frames, 3)
    with pytest.raises(InputError, match="4 feature maps per reference frame"):
        cost_volume_displacement(torch.randn(1, 4, 1, 5, 5), torch.randn(1, 4, 3, 5, 5), 1, 0.02, half_cell=True)


def _encoded_scene_shift(
    shift_px: tuple[int, int], half_cell: bool, frame_spaces: str = "still_clip"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A still scene whose every frame shows the reference ``shift_px`` away (``(dy, dx)`` px, cells of 4 px), through
    :class:`_KindedEncoder`: the estimated field in px, ``2, t, h, w`` over the inner cells (every latent frame), and
    the truth, ``2, 1, 1, 1``."""
    adapter = _KindedEncoder()
    g = torch.Generator().manual_seed(13)
    scene = F.avg_pool2d(torch.rand(1, 3, 72, 104, generator=g) * 2 - 1, 3, 1, 1, count_include_pad=False)
    dy, dx = shift_px
    ref = scene[..., 20:52, 28:76][:, :, None]  # B, 3, 1, 32, 48
    moved = scene[..., 20 + dy : 52 + dy, 28 + dx : 76 + dx]  # frame pixel (y, x) shows reference (y + dy, x + dx)
    latents = adapter.encode(moved[:, :, None].expand(-1, -1, adapter.frame_rule.pixel_frames(3), -1, -1))
    field = correspondence.correspondence_field(
        adapter, latents, ref, [(0, 3)], (32, 48), (3, 0.02, 1, 1, 0.0, True), frame_spaces=frame_spaces,
        half_cell=half_cell,
    )  # fmt: skip
    return field.pixels[0, 0, :, :, 2:-2, 3:-3], torch.tensor([dy, dx], dtype=torch.float32).reshape(2, 1, 1, 1)


@torch.no_grad()
@pytest.mark.parametrize("shift_px", [(0, 2), (2, 0), (-2, 2), (1, -3), (0, 3), (0, 0), (0, 4), (2, -6)])
def test_half_cell_candidates_find_fractions_of_a_cell(shift_px):
    """Content a fraction of a latent cell away (4-px cells): with ``half_cell`` the reference is also encoded moved
    half a cell down, right and both, and the estimate (refined by ``subcell``'s parabola, as without) misses the
    fraction by less than 0.75x what it misses with whole-cell candidates (half a cell: under a third), on every latent
    frame and along both axes (a phase put in the wrong slot of the half-cell grid misses by half a cell). Whole
    cells stay within 0.3 px: the closer candidates make the parabola a little less exact there (0.06 px without)."""
    field, truth = _encoded_scene_shift(shift_px, half_cell=True)
    whole_cells, _ = _encoded_scene_shift(shift_px, half_cell=False)
    per_latent_frame = (field - truth).abs().mean(dim=(0, 2, 3))
    assert per_latent_frame.max() < 0.35, field.mean(dim=(2, 3))  # px, of a 4-px cell
    error = per_latent_frame.mean().item()
    if shift_px[0] % 4 or shift_px[1] % 4:
        halves = shift_px[0] % 2 == 0 and shift_px[1] % 2 == 0
        assert error < (0.33 if halves else 0.75) * (whole_cells - truth).abs().mean().item()
    else:
        assert error < 0.3
    fitted, _ = _encoded_scene_shift(shift_px, half_cell=True, frame_spaces="fitted")  # phases through the maps too
    assert (fitted - truth).abs().mean() < 0.5


def test_half_cell_is_checked_and_reaches_the_estimate(monkeypatch):
    with pytest.raises(ConfigError, match="half_cell must be a bool"):
        CorrespondenceConfig(half_cell=1)
    model = _model(enabled=True)
    z = latents_for(model.vae, 2, h=4, w=6)
    seen = []
    estimate = correspondence.correspondence_field

    def spy(*args, **kwargs):
        seen.append(kwargs["half_cell"])
        return estimate(*args, **kwargs)

    monkeypatch.setattr(refdecoder.model, "correspondence_field", spy)
    with torch.no_grad():
        plain = model.decode(z, reference_for(z))
        model.config.correspondence.half_cell = True
        halved = model.decode(z, reference_for(z))
    assert seen == [False, True] and halved.shape == plain.shape and torch.isfinite(halved).all()


@pytest.mark.parametrize("half_cell", [False, True])
def test_a_kept_estimate_decodes_the_same_bit_for_bit_without_the_encoder(monkeypatch, half_cell):
    model = _model(enabled=True)
    model.config.correspondence.half_cell = half_cell
    z = latents_for(model.vae, 3, h=4, w=6)
    ref = reference_for(z)
    with torch.no_grad():
        fresh = model.decode(z, ref)
        estimate = model.estimate_correspondence(z, ref)
        encodes = []
        encode = model.adapter.encode
        monkeypatch.setattr(model.adapter, "encode", lambda *a, **k: encodes.append(1) or encode(*a, **k))
        reused = model.decode(z, ref, displacements=estimate)
    assert estimate.pixels.shape == (z.shape[0], 1, 2, 3, 4, 6) and estimate.pixels.abs().sum() > 0
    assert encodes == [] and torch.equal(reused, fresh)


def test_a_kept_estimate_is_what_the_decode_follows_and_must_fit_the_decode():
    model = _model(enabled=True)
    z = latents_for(model.vae, 3, h=4, w=6)
    ref = reference_for(z)
    frames = model.adapter.frame_rule.pixel_frames(3)
    with torch.no_grad():
        still = model.decode(z, ref, displacements=torch.zeros(z.shape[0], 2, frames, 32, 48))
        zero = refdecoder.blocks.CorrespondenceEstimate(torch.zeros(z.shape[0], 1, 2, 3, 4, 6))
        assert torch.equal(model.decode(z, ref, displacements=zero), still)
        assert not torch.equal(model.decode(z, ref), still)  # the content estimate is not zero here
        other = model.estimate_correspondence(z[:, :, :2], ref)  # made for 2 latent frames
        with pytest.raises(InputError, match="made for another decode"):
            model.decode(z, ref, displacements=other)
        with pytest.raises(InputError, match="needs a reference"):
            model.estimate_correspondence(z, None)
        kept = model.estimate_correspondence(z, ref)
        with pytest.raises(InputError, match="estimate is for one whole decode"):
            decode_video(model, z, reference=ref, tiles=plan_tiles((4, 6), 8, (32, 32), (16, 16)), displacements=kept)
