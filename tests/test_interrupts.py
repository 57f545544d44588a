"""An interrupt raised from inside any decoder layer leaves every context as it was.

The newest ComfyUI raises its interrupt from inside each `comfy.ops` layer's forward (not only between
steps), so a Cancel can land in the middle of a decoder pass: while a segment is appended, while a token
is decoded, while a denoising step runs. Contexts are immutable and a task only returns new ones, so such
an exception must leave every existing context's K/V untouched and the next run must give the same bytes
as an uninterrupted one. Here a forward hook on one decoder layer raises at a chosen call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import bagel_model
from bagel_model.context import Context
from bagel_model.sampling import FlowSettings


class Interrupted(Exception):
    """Stands for ComfyUI's InterruptProcessingException."""


@contextmanager
def interrupt_at(model, layer: int, call: int) -> Iterator[None]:
    """Raise `Interrupted` from decoder layer `layer` on its `call`-th forward (1-based)."""
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if calls[0] == call:
            raise Interrupted

    handle = model.net.language_model.model.layers[layer].register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def snapshot(ctx: Context) -> list[torch.Tensor]:
    return [t.clone() for t in ctx.tensors()]


def unchanged(ctx: Context, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(ctx.tensors(), before, strict=True))


@pytest.fixture
def base(tiny_model, picture) -> Context:
    return Context.empty(tiny_model).append_image(picture).append_text("a red circle")


@pytest.mark.parametrize("call", [1, 2])
def test_an_interrupted_append_leaves_the_context_and_the_retry_is_the_same(tiny_model, base, call):
    before = snapshot(base)
    reference = base.append_text("make the circle green")
    with interrupt_at(tiny_model, 1, call), pytest.raises(Interrupted):
        base.append_text("make the circle green")
    assert unchanged(base, before)
    again = base.append_text("make the circle green")
    assert all(torch.equal(a, b) for a, b in zip(again.tensors(), reference.tensors(), strict=True))


def test_an_interrupted_token_leaves_the_context_and_the_retry_is_the_same(tiny_model, base):
    before = snapshot(base)
    reference, _ = bagel_model.understand(tiny_model, "what color is it?", context=base)
    # call 1 is the question's prefill; the calls after it decode one token each
    with interrupt_at(tiny_model, 0, 3), pytest.raises(Interrupted):
        bagel_model.understand(tiny_model, "what color is it?", context=base)
    assert unchanged(base, before)
    answer, _ = bagel_model.understand(tiny_model, "what color is it?", context=base)
    assert answer == reference


def test_an_interrupted_denoising_step_leaves_the_context_and_the_retry_is_the_same(tiny_model, base):
    settings = FlowSettings(num_steps=4)
    before = snapshot(base)
    reference = bagel_model.generate_images(tiny_model, "", context=base, settings=settings, seed=5).images[0]
    with interrupt_at(tiny_model, 1, 4), pytest.raises(Interrupted):
        bagel_model.generate_images(tiny_model, "", context=base, settings=settings, seed=5)
    assert unchanged(base, before)
    image = bagel_model.generate_images(tiny_model, "", context=base, settings=settings, seed=5).images[0]
    assert image.tobytes() == reference.tobytes()
