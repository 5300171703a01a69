"""The decode path's values: what the adapter's window loop is handed, and how the reference moves between stages."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import refdecoder
from refdecoder.conditioning import ReferenceFeatures, StageConditioner
from refdecoder.hooks import DecodeContext, IdentityHooks
from tests.helpers import latents_for, reference_for, tiny_wan


def _model(indices: tuple[int, ...] | None = None, per_stage: bool = True) -> refdecoder.RefDecoder:
    config = refdecoder.preset("tiny")
    config.tokenizer.per_stage = per_stage
    config.stages.indices = indices
    return refdecoder.wrap(tiny_wan(), config)


def _capture_loop(model: refdecoder.RefDecoder, monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, object]]:
    """Record the hooks and context each decode hands the adapter's window loop."""
    seen, loop = [], model.adapter.iter_decode_windows

    def recording(latents, hooks, ctx, windows):
        seen.append((hooks, ctx))
        return loop(latents, hooks, ctx, windows)

    monkeypatch.setattr(model.adapter, "iter_decode_windows", recording)
    return seen


def test_the_loop_gets_the_reference_as_typed_features_and_never_the_model(monkeypatch):
    model = _model()
    seen = _capture_loop(model, monkeypatch)
    z = latents_for(model.vae, 3, batch=2)
    reference = reference_for(z, frames=2)
    with torch.no_grad():
        model.decode(z, reference=reference, window=2)
    (hooks, ctx), specs = seen[0], model.adapter.stages()
    assert isinstance(hooks, StageConditioner) and isinstance(ctx, DecodeContext)
    assert not any(value is model for value in vars(hooks).values())  # the hooks hold the modules, not the model
    features = hooks.reference_features
    assert isinstance(features, ReferenceFeatures) and features.num_frames == 2
    assert torch.equal(features.pixels, reference) and ctx.reference_pixels is features.pixels
    h, w = reference.shape[-2:]
    assert features.first_stage.shape == (2, specs[0].channels, 2, h // specs[0].scale, w // specs[0].scale)
    later = [specs[i] for i in model.stage_indices if i > 0]
    assert sorted(features.per_stage) == sorted(spec.name for spec in later) != []
    for spec in later:
        assert features.per_stage[spec.name].shape == (2, spec.channels, 2, h // spec.scale, w // spec.scale)
    with pytest.raises(dataclasses.FrozenInstanceError):
        features.first_stage = features.first_stage * 0


def test_a_decode_without_reference_hands_the_loop_no_reference(monkeypatch):
    model = _model()
    seen = _capture_loop(model, monkeypatch)
    with torch.no_grad():
        model.decode(latents_for(model.vae, 2))
    ((hooks, ctx),) = seen
    assert hooks.reference_features is None and ctx.reference_pixels is None


@pytest.mark.parametrize("indices", [(0,), (0, 1), (1,), (0, 1, 2), (1, 2)])
def test_the_reference_passes_each_stage_up_to_the_last_conditioned_one_in_every_window(monkeypatch, indices):
    model = _model(indices, per_stage=False)
    calls, branch = [], model.adapter.run_stage_on_reference

    def recording(index, features, ctx=None):
        calls.append((ctx.window_index, index, features.shape[2]))
        return branch(index, features, ctx)

    monkeypatch.setattr(model.adapter, "run_stage_on_reference", recording)
    z = latents_for(model.vae, 5)
    windows = model.adapter.plan_windows(5, 3)
    with torch.no_grad():
        model.decode(z, reference=reference_for(z), window=3)
    expected = [(w, i, 1) for w in range(len(windows)) for i in range(max(indices))]
    assert len(windows) > 1 and calls == expected


def test_every_field_of_the_decode_context_is_typed_and_documented():
    doc = inspect.getdoc(DecodeContext)
    for field in dataclasses.fields(DecodeContext):
        assert f"{field.name}:" in doc, f"DecodeContext.{field.name} is not documented"
        assert "dict[str, Any]" not in str(field.type) or field.name == "decode_inputs", field.name


@pytest.mark.parametrize("frames, window", [(5, 2), (3, 3), (1, 1)])
def test_the_loop_tells_each_window_where_it_stands(frames, window):
    model = _model()
    seen = []

    class Recording(IdentityHooks):
        def stage(self, index, x, reference, ctx):
            if index == 0:
                seen.append((ctx.window_index, ctx.first_window, ctx.last_window))
            return x, None

    windows = model.adapter.plan_windows(frames, window)
    with torch.no_grad():
        model.adapter.decode_windows(latents_for(model.vae, frames), Recording(), DecodeContext(), windows)
    last = len(windows) - 1
    assert seen == [(k, k == 0, k == last) for k in range(len(windows))]


def test_the_stage_hook_hands_the_loop_the_reference_up_to_the_last_conditioned_stage(monkeypatch):
    """Stage 0 gets no reference (the hook starts it), each later stage up to the last conditioned one the reference
    at its own grid, also through an unconditioned stage between; from the last conditioned stage on, none."""
    model = _model((0, 2), per_stage=False)
    specs, hook, seen = model.adapter.stages(), StageConditioner.stage, []

    def recording(self, index, x, reference, ctx=None):
        x, out = hook(self, index, x, reference, ctx)
        seen.append((index, None if reference is None else tuple(reference.shape), out is None or out.shape))
        return x, out

    monkeypatch.setattr(StageConditioner, "stage", recording)
    z = latents_for(model.vae, 2)
    with torch.no_grad():
        model.decode(z, reference=reference_for(z, frames=2), window=2)
    h, w = (s * model.adapter.spatial_factor for s in z.shape[-2:])
    grid = [(1, spec.channels, 2, h // spec.scale, w // spec.scale) for spec in specs]
    assert len(specs) == 3 and seen == [(0, None, grid[0]), (1, grid[1], grid[1]), (2, grid[2], True)]
