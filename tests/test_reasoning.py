"""The visual chain-of-thought loop on the tiny model, its decoding steered by a script.

The tiny random model writes no protocol text of its own, so each test replaces `decode_text` with a
script of segments; everything else is real: the image sampler draws each requested image at the end of
the context the protocol prescribes, the image joins the context, and decoding continues after it. The
script records the history each segment was decoded after, so the tests read what the loop appended.
"""

from __future__ import annotations

import pytest

from bagel_model import reasoning, tasks
from bagel_model.context import Context
from bagel_model.engine import STOP_BUDGET, STOP_END, STOP_WINDOW, Answer, ImageRequest
from bagel_model.sampling import FlowSettings

QUESTION = "where is the red circle after it moves right twice?"
FAST = FlowSettings(num_steps=3, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), renorm_type="text_channel")


@pytest.fixture
def script(monkeypatch):
    """Install `segments` (text, or (text, stop)) as the decoder; returns the list of histories seen."""
    seen = []

    def install(*segments):
        queue = [s if isinstance(s, tuple) else (s, STOP_END) for s in segments]

        def decode(model, history, settings, seed=0, callback=None):
            seen.append([seg.kind for seg in history.segments])
            text, stop = queue.pop(0)
            return Answer(text, stop)

        monkeypatch.setattr(reasoning, "decode_text", decode)
        return seen

    return install


def _run(model, picture, protocol, **kwargs):
    return reasoning.reason(
        model, QUESTION, image=picture, protocol=protocol, flow_settings=FAST, seed=1, **kwargs
    )


def test_thinkmorph_draws_appends_and_continues(tiny_model, picture, script):
    seen = script(
        "<think>move it</think><image_start>", "<image_end><think>done</think><answer>right</answer>"
    )
    out = _run(tiny_model, picture, reasoning.THINKMORPH)
    assert out.stop == reasoning.STOP_NO_IMAGE and out.answer == "right"
    assert len(out.images) == 1 and out.images[0].size == picture.size
    # system prompt, the image (VAE + ViT), the question; then the first thought; then the drawn image
    assert seen[0] == ["text", "vae", "vit", "text"]
    assert seen[1] == ["text", "vae", "vit", "text", "text", "vae", "vit"]
    assert out.transcript.split("\n") == [out.texts[0], "[image 1]", out.texts[1]]
    # guidance stays fixed: [system, image] without the question, [system, question] without images
    assert [s.kind for s in out.context.uncond_text.segments] == ["text", "vae", "vit"]
    assert [s.kind for s in out.context.uncond_img.segments] == ["text", "text"]
    assert out.context.cond.segments[-1].text == out.texts[-1]


def test_the_drawn_image_is_the_one_the_context_would_draw(tiny_model, picture, script, pixels):
    """The requested image is sampled at the end of the context as it stands (the plan included)."""
    script("<image_start>", "<answer>x</answer>")
    out = _run(tiny_model, picture, reasoning.THINKMORPH)
    ctx = Context.empty(tiny_model).append_system_prompt(reasoning.THINKMORPH_SYSTEM_PROMPT)
    ctx = ctx.append_image(picture).append_text(QUESTION).append_thought("<image_start>")
    h, w = ctx.image_size
    request = ImageRequest(h, w, FAST, seed=1)
    expected = tasks.render(tiny_model, [ctx], request, append_result=False).images[0]
    assert (pixels(out.images[0]) == pixels(expected)).all()


def test_zebra_cot_decodes_from_a_vit_only_view_and_draws_from_a_vae_view(tiny_model, picture, script):
    seen = script("<think>first</think>", "<think>second</think>", "<answer>Final Answer: B</answer>")
    out = _run(tiny_model, picture, reasoning.ZEBRA_COT)
    assert out.stop == reasoning.STOP_ANSWER and out.answer == "B" and len(out.images) == 2
    # question first, then the image ViT-only; drawn images join the text view ViT-only too
    assert seen[0] == ["text", "text", "vit"]
    assert seen[2] == ["text", "text", "vit", "text", "vit", "text", "vit"]
    # the image view holds every image VAE + ViT, with the usual CFG histories
    kinds = [s.kind for s in out.context.cond.segments]
    assert kinds == ["text", "text", "vae", "vit", "text", "vae", "vit", "text", "vae", "vit", "text"]
    assert [s.kind for s in out.context.uncond_img.segments] == ["text"] * 5


@pytest.mark.parametrize(
    ("protocol", "segments", "stop", "images"),
    [
        (reasoning.THINKMORPH, ["<image_start>"] * 3 + ["never read"], reasoning.STOP_ROUNDS, 2),
        (reasoning.ZEBRA_COT, ["a", "b", "c"], reasoning.STOP_ROUNDS, 2),
        (reasoning.THINKMORPH, ["no request"], reasoning.STOP_NO_IMAGE, 0),
        (reasoning.ZEBRA_COT, ["Final Answer: 3"], reasoning.STOP_ANSWER, 0),
        (reasoning.ZEBRA_COT, [("cut off", STOP_BUDGET)], STOP_BUDGET, 0),
    ],
)
def test_each_stopping_rule(tiny_model, picture, script, protocol, segments, stop, images):
    script(*segments)
    out = _run(tiny_model, picture, protocol, max_rounds=2)
    assert out.stop == stop and len(out.images) == images
    assert len(out.texts) == images + 1


def test_final_answer_extraction():
    assert reasoning.final_answer("<think>x</think><answer> A </answer>") == "A"
    assert reasoning.final_answer("<answer>Final Answer: 42</answer>") == "42"
    assert reasoning.final_answer("so. Final Answer: red") == "red"
    assert reasoning.final_answer("plain") == "plain"


def test_the_real_decoder_runs_the_loop_end_to_end(tiny_model, picture):
    """Unscripted: the tiny model's own text (no marker) ends a ThinkMorph loop after one segment."""
    out = reasoning.reason(
        tiny_model, QUESTION, image=picture, flow_settings=FAST,
        text_settings=tasks.TextSettings(max_new_tokens=3),
    )  # fmt: skip
    assert out.stop in (reasoning.STOP_NO_IMAGE, STOP_BUDGET) and len(out.texts) == 1


def test_a_picture_that_could_not_join_the_context_is_not_drawn(
    tiny_model, windowed, picture, script, monkeypatch
):
    """With one position left a picture was sampled in full, then lost (appending it takes two): Reason
    now stops with the window's reason before drawing."""
    drawn_at = []
    real = reasoning.render

    def render(model, contexts, *args, **kwargs):
        drawn_at.append(contexts[0].cond.rope)
        return real(model, contexts, *args, **kwargs)

    monkeypatch.setattr(reasoning, "render", render)
    script("<image_start>", "<answer>x</answer>")
    _run(tiny_model, picture, reasoning.THINKMORPH)
    narrow = windowed(tiny_model, drawn_at[0] + 1)  # one position left where the picture would go
    drawn_at.clear()
    script("<image_start>", "never read")
    out = _run(narrow, picture, reasoning.THINKMORPH)
    assert out.stop == STOP_WINDOW and out.images == [] and drawn_at == []
