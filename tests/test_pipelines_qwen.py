"""reference_decoding on the Qwen-Image edit and image-to-image pipelines: the reference is the input image."""

from __future__ import annotations

import pytest
import torch

from refdecoder.errors import InputError
from refdecoder.pipelines import reference_decoding
from tests import tiny_pipelines

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["edit", "img2img"])
def pipe(request) -> object:
    return tiny_pipelines.qwen(request.param)


def _options(pipe: object) -> dict[str, bool]:
    # The edit pipeline preprocesses its source at ~1024x1024 pixels of the same aspect ratio, whatever the output
    # size asked for; these tests decode 32x48 images, so that source is resized to be the reference.
    return {"resize_reference": "Edit" in type(pipe).__name__}


def test_images_at_init_equal_the_stock_pipeline(pipe) -> None:
    image = tiny_pipelines.image()
    stock = tiny_pipelines.call(pipe, "pt", image)
    with tiny_pipelines.wrapped(pipe) as model, reference_decoding(pipe, model, **_options(pipe)):
        assert model.adapter.name == "qwen-image"
        inside = tiny_pipelines.call(pipe, "pt", image)
    assert inside.shape == stock.shape == (1, 3, 32, 48)
    assert (inside - stock).abs().max() <= 1e-5


def test_trained_weights_decode_with_the_input_image(pipe) -> None:
    image, other = tiny_pipelines.image(0), tiny_pipelines.image(7)
    with tiny_pipelines.wrapped(pipe, perturb=True) as model:
        with reference_decoding(pipe, model, **_options(pipe)):
            own = tiny_pipelines.call(pipe, "pt", image)
        with reference_decoding(pipe, model, image=other, resize_reference=True):
            swapped = tiny_pipelines.call(pipe, "pt", image)  # same generation, another reference
    assert (own - swapped).abs().max() > 0.05


def test_a_reference_of_another_size_needs_resize_reference() -> None:
    pipe = tiny_pipelines.qwen("img2img")
    with tiny_pipelines.wrapped(pipe) as model:
        with reference_decoding(pipe, model, image=torch.zeros(1, 3, 64, 64)):  # a tensor is used as it is
            with pytest.raises(InputError, match="resize_reference=True"):
                tiny_pipelines.call(pipe, "pt", tiny_pipelines.image())
