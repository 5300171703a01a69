"""``RefDecoder.compile``: compiled equals eager, and windows of one size reuse one graph.

Compiling on CPU costs seconds per graph, so the default run compiles with inductor only the transformer (one
graph), and checks the compiled window pass with a backend that counts dynamo's graphs and runs them as traced.
Inductor on the whole window pass is the slow test.
"""

from __future__ import annotations

import pytest
import torch

import refdecoder
from tests.helpers import latents_for, randomize_, reference_for, tiny_wan


class CountingBackend:
    """A ``torch.compile`` backend that keeps every graph dynamo hands it and runs it unchanged."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(graph)
        return graph.forward


def trained_looking(seed: int = 0) -> refdecoder.RefDecoder:
    model = refdecoder.wrap(tiny_wan(seed), "tiny")
    for module in (model.tokenizer, model.transformer, *model.projectors.values()):
        randomize_(module, 0.05)
    return model


def test_compiled_transformer_equals_eager():
    model = trained_looking()
    grid = (3, 2, 3)
    tokens = torch.randn(2, 18, model.transformer.dim)
    with torch.no_grad():
        eager = model.transformer(tokens, grid, num_reference=1)
        model.compile(decoder=False, dynamic=False)
        compiled = model.transformer(tokens, grid, num_reference=1)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_compiled_decode_equals_eager_and_windows_of_one_size_reuse_their_graph():
    model = trained_looking()
    short, long = latents_for(model.vae, 7), latents_for(model.vae, 11, seed=3)
    ref = reference_for(short)
    keys = list(model.state_dict())
    with torch.no_grad():
        eager = [model.decode(z, reference=ref, window=3) for z in (short, long)]
    backend = CountingBackend()
    model.compile(backend=backend, dynamic=False)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        # Windows (0, 3), (3, 5), (5, 7): the first window's graph, then one graph for both later windows.
        first = model.decode(short, reference=ref, window=3)
        assert len(backend.graphs) == 2
        # A longer video: more windows of the same sizes, nothing traced again.
        second = model.decode(long, reference=ref, window=3)
        assert len(backend.graphs) == 2
    for got, want in zip((first, second), eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_inductor_compiled_decode_equals_eager_with_and_without_a_reference():
    model = trained_looking()
    z = latents_for(model.vae, 7)
    ref = reference_for(z)
    with torch.no_grad():
        eager = [model.decode(z, reference=ref, window=3), model.decode(z, window=3)]
        model.compile(dynamic=False)
        compiled = [model.decode(z, reference=ref, window=3), model.decode(z, window=3)]
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_compiled_decode_with_a_local_scope_equals_eager():
    # On CUDA the local scope runs on flex_attention, here inside the compiled window pass.
    torch.manual_seed(0)
    config = refdecoder.preset("tiny")
    config.transformer.attention_radius, config.transformer.locality_bias = 1, True
    model = refdecoder.wrap(tiny_wan(), config)
    for module in (model.transformer, *model.projectors.values()):
        randomize_(module, 0.05)
    model.cuda()
    z = latents_for(model.vae, 7).cuda()
    ref = reference_for(z).cuda()
    with torch.no_grad():
        eager = model.decode(z, reference=ref, window=3)
        model.compile(dynamic=False)
        torch.testing.assert_close(model.decode(z, reference=ref, window=3), eager, atol=1e-4, rtol=1e-4)
