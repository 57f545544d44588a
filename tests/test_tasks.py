"""The five tasks on the tiny random model (float32, CPU, 64x64 images, a few steps).

- The sampler's cost: decoder passes are counted by wrapping `model.net.forward`, per CFG setting
  (BAGEL_REFERENCE §5.5: no CFG pass outside the window or with a scale <= 1; the image branch of plain
  text-to-image is the conditional history, so its pass is reused).
- Fast path == plain path: `engine.denoise` equals a plain loop written here that runs every branch at every
  step, and reusing the conditional pass equals recomputing it on an equal but distinct history.
- Every task runs and extends the context as the official inferencer would (§5.3), seeds and latents
  behave, bad inputs fail with a message, and an exception raised in the callback stops a task.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from bagel_model import engine, tasks
from bagel_model.context import Context, ContextError, History
from bagel_model.images import flattened_position_ids, to_tensor, unpatchify_latent
from bagel_model.layers.decoder import Routing
from bagel_model.sampling import FlowSettings, cfg_active, combine_cfg, schedule
from bagel_model.tasks import GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT, TextSettings

P = "a red circle at the top left, a blue square at the center"
E = "make the circle green"
Q = "what color is the circle?"
SHORT = TextSettings(max_new_tokens=4)
T2I = FlowSettings(num_steps=3)
EDIT = FlowSettings(num_steps=3, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), renorm_type="text_channel")


def _kinds(history: History) -> list[str]:
    return [s.kind for s in history.segments]


def _noise(model, n=16, seed=0):
    """Start noise (1, n, c) of one image, as `engine.denoise` takes it."""
    return torch.randn(1, n, model.config.patch_latent_dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def t2i_ctx(tiny_model):
    return Context.empty(tiny_model).append_text(P)


@pytest.fixture(scope="module")
def edit_ctx(tiny_model, picture):
    return Context.empty(tiny_model).append_image(picture).append_text(E)


# -- the sampler's passes -----------------------------------------------------------------------------


def six(**kwargs) -> FlowSettings:
    """6 steps at shift 1 evaluate t = 1, 0.8, 0.6, 0.4, 0.2: three inside the window (0.5, 1]. (The
    window's start is kept off the evaluated times; the boundary itself is pinned in test_sampling.)"""
    return FlowSettings(**{"num_steps": 6, "timestep_shift": 1.0, "cfg_interval": (0.5, 1.0), **kwargs})


@pytest.mark.parametrize(
    ("which", "settings", "expected"),
    [
        ("t2i", six(cfg_text_scale=1.0), 5),
        ("t2i", six(cfg_text_scale=4.0, cfg_img_scale=1.0), 5 + 3),
        ("t2i", six(cfg_text_scale=4.0, cfg_img_scale=2.0), 5 + 3),  # image branch reused
        ("edit", six(cfg_text_scale=1.0, cfg_img_scale=1.0), 5),
        ("edit", six(cfg_text_scale=4.0, cfg_img_scale=1.0), 5 + 3),
        ("edit", six(cfg_text_scale=4.0, cfg_img_scale=2.0), 5 + 2 * 3),
        ("edit", six(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0)), 3 * 5),
        ("edit", six(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 0.0)), 5),
        ("edit", six(cfg_text_scale=1.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0)), 5),
        # shift 3, 10 steps: 8 of 9 times in (0.4, 1]
        ("edit", FlowSettings(num_steps=10, cfg_img_scale=2.0), 9 + 2 * 8),
    ],
)
@pytest.mark.parametrize("batch", [True, False], ids=["batched", "one-by-one"])
def test_denoise_pass_count(tiny_model, t2i_ctx, edit_ctx, count_passes, which, settings, expected, batch):
    ctx = t2i_ctx if which == "t2i" else edit_ctx
    settings = replace(settings, batch_cfg=batch)
    engine.denoise(tiny_model, [ctx], 64, 64, settings, _noise(tiny_model))
    # branch passes, the work, batched or not: each is the image query, and nothing else runs
    assert sum(count_passes) == expected * (16 + 2)
    if batch:
        assert len(count_passes) == settings.num_steps - 1  # one forward per evaluated step
    else:
        assert set(count_passes) == {16 + 2}


def test_generate_image_passes(tiny_model, count_passes):
    """generate_images: one prefill for the prompt, the sampler's passes, then the image's VAE and ViT."""
    settings = six(cfg_text_scale=4.0, cfg_img_scale=2.0)
    tasks.generate_images(tiny_model, P, height=64, width=64, settings=settings)
    assert len(count_passes) == 1 + 5 + 2  # a step's CFG branches run as one forward


@pytest.mark.parametrize(("k", "evaluated_steps"), [(2, [0, 1, 2, 4]), (3, [0, 1, 3])])
def test_step_cache_runs_the_network_on_every_kth_step(tiny_model, t2i_ctx, count_passes, k, evaluated_steps):
    """Steps 0 and 1 seed the extrapolation; afterwards only multiples of k run the network (5 steps)."""
    settings = six(cfg_text_scale=1.0, step_cache=k)
    engine.denoise(tiny_model, [t2i_ctx], 64, 64, settings, _noise(tiny_model))
    assert len(count_passes) == len(evaluated_steps)


def test_step_cache_stays_close_to_the_full_sampler(tiny_model, edit_ctx, count_passes):
    noise = _noise(tiny_model, seed=2)
    settings = FlowSettings(num_steps=12, cfg_img_scale=2.0)
    full = engine.denoise(tiny_model, [edit_ctx], 64, 64, settings, noise)
    full_passes = sum(count_passes)
    cached = engine.denoise(tiny_model, [edit_ctx], 64, 64, replace(settings, step_cache=2), noise)
    cached_passes = sum(count_passes) - full_passes
    assert cached_passes <= 0.66 * full_passes  # 7 of 11 steps evaluated
    error = float((cached - full).norm() / full.norm())
    assert 0 < error < 0.1, error


def _plain_denoise(model, ctx, height, width, settings, noise):
    """Every branch at every step, each on its own history, then the official combination (one image:
    noise (1, n, c))."""
    h, w = height // 16, width // 16
    m = model.tokenizer.markers
    start, end = model.net.embed_text(torch.tensor([m.start_of_image, m.end_of_image])).split(1)
    is_gen = torch.tensor([False] + [True] * (h * w) + [False])
    x = noise[0].clone()
    times, steps = schedule(settings.num_steps, settings.timestep_shift)
    for t, dt in zip(times, steps, strict=True):
        pos = flattened_position_ids(h, w, model.config.max_latent_size)
        inner = model.net.embed_latents(x, torch.tensor(t), pos)
        embeds = torch.cat([start, inner, end])

        def velocity(hist, embeds=embeds):
            cache = model.net.new_cache(h * w + 2, hist.kvs())
            positions = torch.full((h * w + 2,), hist.rope)
            hidden = model.net(embeds, positions, Routing.from_mask(is_gen), [cache], False)
            return model.net.velocity(hidden[1:-1])

        v, v_text, v_img = (velocity(hist) for hist in (ctx.cond, ctx.uncond_text, ctx.uncond_img))
        if cfg_active(t, settings.cfg_interval):
            v = combine_cfg(
                v,
                v_text,
                v_img,
                settings.cfg_text_scale,
                settings.cfg_img_scale,
                settings.renorm_type,
                settings.renorm_min,
            )
        x = x - v * dt
    return x


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "one-by-one"])
@pytest.mark.parametrize("renorm", ["global", "text_channel"])
@torch.no_grad()
def test_denoise_equals_plain_loop(tiny_model, edit_ctx, renorm, batch):
    settings = six(cfg_text_scale=4.0, cfg_img_scale=2.0, renorm_type=renorm, batch_cfg=batch)
    noise = _noise(tiny_model, seed=1)
    fast = engine.denoise(tiny_model, [edit_ctx], 64, 64, settings, noise)
    plain = _plain_denoise(tiny_model, edit_ctx, 64, 64, settings, noise)
    torch.testing.assert_close(fast[0], plain, atol=1e-5, rtol=1e-5)
    # the guidance acts: without it the result differs
    unguided = engine.denoise(tiny_model, [edit_ctx], 64, 64, six(cfg_text_scale=1.0), noise)
    assert (fast - unguided).abs().max() > 1e-3


def test_reused_image_branch_equals_recomputed(tiny_model, t2i_ctx, count_passes):
    """T2I image CFG: uncond_img is cond, so its pass is reused; on an equal but distinct history (a fresh
    prefill of the same prompt) it is recomputed, with the same result."""
    assert t2i_ctx.uncond_img is t2i_ctx.cond
    twin = Context.empty(tiny_model).append_text(P).cond
    assert twin.segments[0] is not t2i_ctx.cond.segments[0]
    forced = Context(tiny_model, t2i_ctx.cond, t2i_ctx.uncond_text, twin)
    settings = six(cfg_text_scale=4.0, cfg_img_scale=2.0)
    noise = _noise(tiny_model, seed=2)
    reused = engine.denoise(tiny_model, [t2i_ctx], 64, 64, settings, noise)
    n_reused = sum(count_passes) // (16 + 2)
    recomputed = engine.denoise(tiny_model, [forced], 64, 64, settings, noise)
    assert (n_reused, sum(count_passes) // (16 + 2) - n_reused) == (5 + 3, 5 + 2 * 3)
    torch.testing.assert_close(reused, recomputed, atol=1e-6, rtol=1e-6)


def test_denoise_callback_reports_each_step(tiny_model, t2i_ctx):
    seen = []
    x = engine.denoise(
        tiny_model,
        [t2i_ctx],
        64,
        64,
        T2I,
        _noise(tiny_model),
        callback=lambda i, n, p: seen.append((i, n, p)),
    )
    assert [(i, n) for i, n, _ in seen] == [(1, 2), (2, 2)]
    # the payload is each step's clean estimate x - t v as a latent: at the last step (t = dt) the result
    result = engine.latent_grids(tiny_model, x, 4, 4)
    assert torch.equal(seen[-1][2], result) and result.shape == (1, tiny_model.config.latent_channels, 8, 8)
    assert (seen[0][2] - result).abs().max() > 1e-3  # the first estimate is a guess, not the result


# -- understanding and thinking -----------------------------------------------------------------------


def test_understand_text_only(tiny_model):
    steps = []
    answer, ctx = tasks.understand(
        tiny_model, Q, settings=SHORT, callback=lambda i, n, text: steps.append((i, n, text))
    )
    assert answer.strip()
    assert [(s.kind, s.text) for s in ctx.cond.segments] == [("text", Q), ("text", answer)]
    # one callback per decoded token, within the budget, the payload being the text so far
    assert 1 <= len(steps) <= SHORT.max_new_tokens
    assert [i for i, _, _ in steps] == list(range(1, len(steps) + 1))
    assert steps[-1][1:] == (SHORT.max_new_tokens, answer)
    # greedy: the same answer again
    assert tasks.understand(tiny_model, Q, settings=SHORT)[0] == answer


def test_understand_with_image_and_think(tiny_model, picture):
    answer, ctx = tasks.understand(tiny_model, Q, image=picture, settings=SHORT)
    assert answer.strip()
    assert _kinds(ctx.cond) == ["vit", "text", "text"]  # understanding images are ViT only
    assert ctx.cond.segments[-1].text == answer
    no_image, _ = tasks.understand(tiny_model, Q, settings=SHORT)
    assert no_image != answer  # the image is seen

    thought_answer, ctx = tasks.understand(tiny_model, Q, image=picture, think=True, settings=SHORT)
    assert [(s.kind, s.text) for s in ctx.cond.segments[:3]] == [
        ("text", VLM_THINK_SYSTEM_PROMPT),
        ("vit", None),
        ("text", Q),
    ]
    assert thought_answer != answer

    # a follow-up question sees the whole conversation
    _, follow = tasks.understand(tiny_model, "how many shapes are there?", context=ctx, settings=SHORT)
    assert all(
        a is b for a, b in zip(follow.cond.segments[: len(ctx.cond.segments)], ctx.cond.segments, strict=True)
    )
    assert follow.cond.segments[len(ctx.cond.segments)].text == "how many shapes are there?"


@pytest.mark.parametrize(("mode", "image_kinds"), [("generate", ["vae", "vit"]), ("answer", ["vit"])])
def test_think_modes(tiny_model, picture, mode, image_kinds):
    system = GEN_THINK_SYSTEM_PROMPT if mode == "generate" else VLM_THINK_SYSTEM_PROMPT
    thought, ctx = tasks.think(tiny_model, E, image=picture, mode=mode, settings=SHORT)
    assert thought.strip()
    assert _kinds(ctx.cond) == ["text", *image_kinds, "text", "text"]
    assert ctx.cond.segments[0].text == system
    assert ctx.cond.segments[-2].text == E and ctx.cond.segments[-1].text == thought
    # the thought joins the conditional history only
    assert [(s.kind, s.text) for s in ctx.uncond_img.segments] == [("text", system), ("text", E)]
    assert _kinds(ctx.uncond_text) == ["text", *image_kinds]
    assert ctx.uncond_text.segments[0] is ctx.cond.segments[0]


def test_think_then_generate(tiny_model, pixels):
    thought, ctx = tasks.think(tiny_model, P, settings=SHORT)
    assert [s.text for s in ctx.cond.segments] == [GEN_THINK_SYSTEM_PROMPT, P, thought]
    drawn = tasks.generate_images(tiny_model, None, context=ctx, settings=T2I)
    image, out = drawn.images[0], drawn.contexts[0]
    assert image.size == (64, 64)
    assert _kinds(out.cond) == ["text", "text", "text", "vae", "vit"]
    # the plan changes the image
    plain = tasks.generate_images(
        tiny_model, None, context=Context.empty(tiny_model).append_text(P), settings=T2I
    ).images[0]
    assert np.abs(pixels(image) - pixels(plain)).max() > 0


def test_generate_text_sampling_is_seeded(tiny_model):
    history = Context.empty(tiny_model).append_text(Q).cond
    before = history.segments[0].kv.k.clone()
    sampled = TextSettings(max_new_tokens=6, do_sample=True, temperature=1.5)
    runs = [engine.decode_text(tiny_model, history, sampled, seed=s) for s in (0, 0, 1, 2, 3)]
    assert runs[0] == runs[1]
    assert len(set(runs)) > 2
    assert torch.equal(history.segments[0].kv.k, before)  # decoding never writes into the history


def test_generate_text_one_pass_per_token(tiny_model, count_passes):
    history = Context.empty(tiny_model).append_text(Q).cond
    count_passes.clear()
    tokens = []
    engine.decode_text(tiny_model, history, SHORT, callback=lambda i, n, t: tokens.append(i))
    stopped_early = len(tokens) < SHORT.max_new_tokens
    assert len(count_passes) == len(tokens) + stopped_early
    assert set(count_passes) == {1}


def test_text_settings_validation():
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        TextSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be positive when sampling"):
        TextSettings(do_sample=True, temperature=0.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            TextSettings(do_sample=True, temperature=bad)
    TextSettings(do_sample=False, temperature=0.0)  # unused when greedy


# -- image generation ---------------------------------------------------------------------------------


def test_generate_image_seed_and_context(tiny_model, pixels):
    out = tasks.generate_images(tiny_model, P, settings=T2I, seed=3)
    a, ctx = out.images[0], out.contexts[0]
    b = tasks.generate_images(tiny_model, P, settings=T2I, seed=3).images[0]
    c = tasks.generate_images(tiny_model, P, settings=T2I, seed=4).images[0]
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))
    # the result joins the context as a clean image, exactly as appending it by hand would
    assert _kinds(ctx.cond) == ["text", "vae", "vit"]
    assert ctx.image_size == (64, 64)
    by_hand = Context.empty(tiny_model).append_text(P).append_image(a)
    for got, want in zip(ctx.cond.segments, by_hand.cond.segments, strict=True):
        torch.testing.assert_close(got.kv.k, want.kv.k)


def test_generate_image_latents_override_seed(tiny_model, pixels):
    settings = T2I
    seeded = tasks.generate_images(tiny_model, P, height=64, width=96, settings=settings, seed=0).images[0]
    assert seeded.size == (96, 64)
    # the seed's noise, handed over in the official latent layout [z, H/8, W/8], gives the same image
    noise = engine.initial_noise(tiny_model, 64, 96, 0, None)
    latents = unpatchify_latent(noise, 4, 6, 2, tiny_model.config.latent_channels)
    assert latents.shape == (16, 8, 12)
    same = tasks.generate_images(
        tiny_model, P, height=64, width=96, settings=settings, seed=7, latents=latents[None]
    ).images[0]
    assert np.array_equal(pixels(same), pixels(seeded))
    other = tasks.generate_images(
        tiny_model, P, height=64, width=96, settings=settings, seed=0, latents=torch.randn(1, 16, 8, 12)
    ).images[0]
    assert not np.array_equal(pixels(other), pixels(seeded))
    with pytest.raises(
        ValueError, match=r"latents have shape \[16, 12, 8\], expected \[16, 8, 12\] for 64x96"
    ):
        tasks.generate_images(tiny_model, P, height=64, width=96, settings=settings, latents=latents.mT[None])


def test_edit_image_size_and_chain(tiny_model, pixels, picture):
    # 100x70 -> the tiny model's VAE rule (max 256, min 64, stride 16) -> 96x64
    source = picture.resize((100, 70))
    out = tasks.edit_images(tiny_model, [source], E, settings=EDIT)
    edited, ctx = out.images[0], out.contexts[0]
    assert edited.size == (96, 64)
    assert _kinds(ctx.cond) == ["vae", "vit", "text", "vae", "vit"]
    assert ctx.image_size == (64, 96)
    # the edit uses the image
    blank = tasks.edit_images(tiny_model, [Image.new("RGB", (100, 70), "white")], E, settings=EDIT).images[0]
    assert not np.array_equal(pixels(edited), pixels(blank))

    # image=None edits the context's latest image, without re-encoding earlier turns
    out = tasks.edit_images(
        tiny_model, None, "move the red circle to the bottom right", context=ctx, settings=EDIT
    )
    again, ctx2 = out.images[0], out.contexts[0]
    assert again.size == (96, 64)
    n = len(ctx.cond.segments)
    assert all(a is b for a, b in zip(ctx2.cond.segments[:n], ctx.cond.segments, strict=True))
    assert _kinds(ctx2.cond)[n:] == ["text", "vae", "vit"]
    # after the result is appended, the text-unconditional history is the whole context (officially
    # cfg_text = gen after an image) and the image-unconditional one holds the two instructions only
    assert ctx2.uncond_text is ctx2.cond
    assert _kinds(ctx2.uncond_img) == ["text", "text"]


def test_edit_errors(tiny_model, picture):
    with pytest.raises(ValueError, match="edit needs an image, or a context that holds one"):
        tasks.edit_images(tiny_model, None, E, settings=EDIT)
    with pytest.raises(ValueError, match="edit needs an image"):
        tasks.edit_images(
            tiny_model, None, E, context=Context.empty(tiny_model).append_text(P), settings=EDIT
        )
    with pytest.raises(ValueError, match="the edit instruction is empty"):
        tasks.edit_images(tiny_model, [picture], "  ", settings=EDIT)


def test_generate_sequence(tiny_model, pixels):
    prompts = ["the red circle moves right", "the red circle moves down"]
    (frames,), (ctx,) = tasks.generate_sequences(tiny_model, prompts, settings=EDIT, seed=5)
    assert [f.size for f in frames] == [(64, 64), (64, 64)]
    assert _kinds(ctx.cond) == ["text", "vae", "vit"] * 2
    assert [s.text for s in ctx.cond.segments if s.kind == "text"] == prompts
    # frame k is generate_images on the context so far, with seed + k
    first = tasks.generate_images(tiny_model, prompts[0], settings=EDIT, seed=5)
    second = tasks.generate_images(tiny_model, prompts[1], context=first.contexts[0], settings=EDIT, seed=6)
    assert np.array_equal(pixels(frames[0]), pixels(first.images[0]))
    assert np.array_equal(pixels(frames[1]), pixels(second.images[0]))


def test_generate_sequence_from_image(tiny_model, picture):
    (frames,), (ctx,) = tasks.generate_sequences(
        tiny_model, ["the red circle moves right"], image=picture.resize((100, 70)), settings=EDIT
    )
    assert frames[0].size == (96, 64)
    assert _kinds(ctx.cond) == ["vae", "vit", "text", "vae", "vit"]
    with pytest.raises(ValueError, match="at least one prompt"):
        tasks.generate_sequences(tiny_model, [], settings=EDIT)
    with pytest.raises(ValueError, match="the prompt is empty"):
        tasks.generate_sequences(tiny_model, [" ", "x"], settings=EDIT)


@pytest.mark.parametrize(
    ("height", "width", "from_text", "from_image"),
    [(None, 32, (32, 64), (32, 64)), (32, None, (64, 32), (96, 32))],
)
def test_a_sequence_takes_a_lone_height_or_width(tiny_model, picture, height, width, from_text, from_image):
    # as generate_images and edit_images do: the other side is the model's default, or the context's image's
    prompts = ["the red circle moves right", "the red circle moves down"]
    (frames,), _ = tasks.generate_sequences(tiny_model, prompts, height=height, width=width, settings=EDIT)
    assert [f.size for f in frames] == [from_text] * 2
    image = picture.resize((100, 70))  # 96x64 after the official resize
    (frames,), _ = tasks.generate_sequences(
        tiny_model, prompts, image=image, height=height, width=width, settings=EDIT
    )
    assert [f.size for f in frames] == [from_image] * 2


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "message"),
    [
        (70, 64, "height 70 must be a multiple of 16 between 16 and 1024"),
        (64, 1040, "width 1040 must be a multiple of 16 between 16 and 1024"),
        (8, 64, "height 8 must be"),
        (-16, 64, "height -16 must be"),
    ],
)
def test_image_size_errors(tiny_model, height, width, message):
    with pytest.raises(ValueError, match=message):
        tasks.generate_images(tiny_model, P, height=height, width=width, settings=T2I)


def test_empty_inputs(tiny_model):
    with pytest.raises(ValueError, match="the prompt is empty and there is no context to generate from"):
        tasks.generate_images(tiny_model, "  ", settings=T2I)
    with pytest.raises(ValueError, match="no context"):
        tasks.generate_images(tiny_model, None, settings=T2I)
    with pytest.raises(ValueError, match="the question is empty"):
        tasks.understand(tiny_model, "", settings=SHORT)
    with pytest.raises(ValueError, match="the instruction is empty"):
        tasks.think(tiny_model, " ", settings=SHORT)
    with pytest.raises(ValueError, match="think mode 'plan' is unknown"):
        tasks.think(tiny_model, P, mode="plan", settings=SHORT)


@pytest.mark.parametrize(
    ("run", "what"),
    [
        (lambda m: tasks.understand(m, "a\ud800b", settings=SHORT), "the question"),
        (lambda m: tasks.think(m, "a\ud800b", settings=SHORT), "the instruction"),
        (lambda m: tasks.generate_images(m, "a\ud800b", settings=T2I), "the prompt"),
        (lambda m: tasks.generate_sequences(m, ["x", "a\ud800b"], settings=EDIT), "the prompt"),
        (lambda m: Context.empty(m).append_text("a\ud800b"), "the text"),
    ],
)
def test_a_lone_surrogate_is_refused_with_its_position(tiny_model, run, what):
    # ComfyUI's API takes JSON, which can carry "\ud800" alone; the tokenizer would fail with a TypeError
    with pytest.raises(ValueError, match=rf"{what} has a lone UTF-16 surrogate U\+D800 at character 2"):
        run(tiny_model)


def test_an_edit_instruction_with_a_lone_surrogate_is_refused(tiny_model, picture):
    with pytest.raises(
        ValueError, match=r"the edit instruction has a lone UTF-16 surrogate U\+DC00 at character 1"
    ):
        tasks.edit_images(tiny_model, [picture], "\udc00", settings=EDIT)


# -- interruption -------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def _stop_at(step):
    seen = []

    def callback(i, n, payload):
        seen.append(i)
        if i == step:
            raise Interrupted

    return callback, seen


def test_callback_exception_stops_generation(tiny_model, t2i_ctx, count_passes, pixels):
    segments, histories = t2i_ctx.cond.segments, (t2i_ctx.cond, t2i_ctx.uncond_text, t2i_ctx.uncond_img)
    k_before = t2i_ctx.cond.segments[0].kv.k.clone()
    settings = six(cfg_text_scale=1.0)
    callback, seen = _stop_at(2)
    with pytest.raises(Interrupted):
        tasks.generate_images(tiny_model, None, context=t2i_ctx, settings=settings, callback=callback)
    assert seen == [1, 2]
    assert len(count_passes) == 2  # stopped right away: no further step, no decode or append
    # the input context is untouched and still works
    assert t2i_ctx.cond.segments is segments
    assert (t2i_ctx.cond, t2i_ctx.uncond_text, t2i_ctx.uncond_img) == histories
    assert torch.equal(t2i_ctx.cond.segments[0].kv.k, k_before)
    after = tasks.generate_images(tiny_model, None, context=t2i_ctx, settings=settings).images[0]
    fresh = tasks.generate_images(tiny_model, P, settings=settings).images[0]
    assert np.array_equal(pixels(after), pixels(fresh))


def test_callback_exception_stops_decoding(tiny_model, count_passes):
    callback, seen = _stop_at(1)
    with pytest.raises(Interrupted):
        tasks.understand(tiny_model, Q, settings=TextSettings(max_new_tokens=50), callback=callback)
    assert seen == [1]
    assert len(count_passes) == 1 + 1  # the question's prefill and one decoding step


def test_batched_cfg_branches_give_the_same_images(tiny_model, pixels):
    """One forward for a step's CFG branches changes only matmul shapes: float rounding, never a pixel
    beyond 1/255 (on this model: none at all)."""
    source = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(source).ellipse((4, 4, 28, 28), fill="red")
    for batch in (True, False):
        t2i = FlowSettings(num_steps=8, cfg_img_scale=2.0, batch_cfg=batch)
        edit = FlowSettings(num_steps=8, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), batch_cfg=batch)
        images = (
            tasks.generate_images(tiny_model, P, settings=t2i, seed=5).images[0],
            tasks.edit_images(tiny_model, [source], "make the circle green", settings=edit, seed=5).images[0],
        )
        if batch:
            batched = images
    for a, b in zip(batched, images, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_append_result_false_returns_the_context_the_image_came_from(tiny_model, count_passes, pixels):
    settings = six(cfg_text_scale=1.0)
    out = tasks.generate_images(tiny_model, P, settings=settings, seed=1)
    kept, ctx = out.images[0], out.contexts[0]
    count_passes.clear()
    out = tasks.generate_images(tiny_model, P, settings=settings, seed=1, append_result=False)
    image, same = out.images[0], out.contexts[0]
    assert np.array_equal(pixels(image), pixels(kept))
    assert _kinds(same.cond) == ["text"] and _kinds(ctx.cond) == ["text", "vae", "vit"]
    assert len(count_passes) == 1 + 5  # the prompt and the steps; no encoding of the result


# -- the position window ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def narrow_model(tiny_model, windowed):
    """The tiny model's weights behind a 40-position RoPE window."""
    return windowed(tiny_model, 40)


def test_decoding_stops_where_the_window_ends(narrow_model):
    """An answer longer than the window leaves is cut where it still joins the context, and says so."""
    question = "what color is the circle?"
    ctx = Context.empty(narrow_model).append_text(question)
    room = engine.answer_room(narrow_model, ctx.cond)
    assert 0 < room < 200
    answer, out = tasks.understand(narrow_model, question, settings=TextSettings(max_new_tokens=200))
    assert answer.stop == engine.STOP_WINDOW
    assert len(narrow_model.tokenizer.encode(answer)) <= room
    assert out.cond.rope <= 40 and out.cond.segments[-1].text == answer
    # A budget inside the window is reported as such.
    short, _ = tasks.understand(narrow_model, question, settings=TextSettings(max_new_tokens=3))
    assert short.stop == engine.STOP_BUDGET and answer.startswith(short)


def test_a_full_window_leaves_no_room_to_answer(narrow_model):
    words = ["circle"]
    while len(narrow_model.tokenizer.segment(" ".join(words + ["circle"]))) <= 40:
        words.append("circle")
    ctx = Context.empty(narrow_model).append_text(" ".join(words))
    assert engine.answer_room(narrow_model, ctx.cond) < 1
    with pytest.raises(ContextError, match="fills the model's window of 40 positions"):
        engine.decode_text(narrow_model, ctx.cond, SHORT)


def test_an_answer_copies_and_pickles_with_its_stop_reason():
    """ComfyUI deep-copies outputs into /history: an Answer must survive copy and pickle."""
    answer = engine.Answer("a red circle", engine.STOP_WINDOW)
    for twin in (copy.deepcopy(answer), pickle.loads(pickle.dumps(answer))):
        assert twin == "a red circle" and twin.stop == engine.STOP_WINDOW and type(twin) is engine.Answer


# -- batches ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "one-by-one"])
def test_a_batch_equals_one_by_one(tiny_model, pixels, batch):
    """Item b of a batch is what a batch of one gives with seed + b, whether the items' passes run as one
    forward or one by one; each item's context continues from its own image."""
    settings = replace(EDIT, batch_cfg=batch)
    out = tasks.generate_images(tiny_model, P, height=64, width=64, settings=settings, seed=7, batch_size=3)
    assert len(out.images) == len(out.contexts) == 3 and out.latents.shape[0] == 3
    for b in range(3):
        one = tasks.generate_images(tiny_model, P, height=64, width=64, settings=settings, seed=7 + b)
        alone, ctx = one.images[0], one.contexts[0]
        assert np.abs(pixels(out.images[b]) - pixels(alone)).max() <= 1
        assert out.contexts[b].tokens == ctx.tokens
    assert not np.array_equal(pixels(out.images[0]), pixels(out.images[1]))


def test_a_batch_of_images_is_edited_each_in_its_own_context(tiny_model, picture, pixels):
    other = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = tasks.edit_images(tiny_model, [picture, other], E, settings=EDIT, seed=3)
    for b, source in enumerate((picture, other)):
        alone = tasks.edit_images(tiny_model, [source], E, settings=EDIT, seed=3 + b).images[0]
        assert np.abs(pixels(out.images[b]) - pixels(alone)).max() <= 1
    with pytest.raises(
        ValueError, match="2 images to edit and batch_size 3: a batch is edited once per image"
    ):
        tasks.edit_images(tiny_model, [picture, other], E, settings=EDIT, batch_size=3)
    with pytest.raises(ValueError, match="different sizes after the resize"):
        tasks.edit_images(tiny_model, [picture, picture.resize((96, 64))], E, settings=EDIT)
    # one image batch_size times, encoded once; known latents replace the encode
    twice = tasks.edit_images(tiny_model, [picture], E, settings=EDIT, seed=3, batch_size=2)
    assert twice.contexts[0].cond.segments[0] is twice.contexts[1].cond.segments[0]
    latent = tiny_model.vae.encode(to_tensor(picture).unsqueeze(0))
    given = tasks.edit_images(
        tiny_model, [picture], E, settings=EDIT, seed=3, batch_size=2, image_latents=latent
    )
    for a, b in zip(twice.images, given.images, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_a_batch_of_sequences_equals_one_by_one(tiny_model, picture, pixels):
    prompts = ["the red circle moves right", "the red circle moves down"]
    frames, contexts = tasks.generate_sequences(
        tiny_model, prompts, image=picture, settings=EDIT, seed=5, batch_size=2
    )
    for b in range(2):
        (alone,), (ctx,) = tasks.generate_sequences(
            tiny_model, prompts, image=picture, settings=EDIT, seed=5 + b
        )
        for got, want in zip(frames[b], alone, strict=True):
            assert np.abs(pixels(got) - pixels(want)).max() <= 1
        assert contexts[b].tokens == ctx.tokens


def test_an_edit_or_sequence_after_an_image_for_understanding_only_asks_for_the_image(tiny_model, picture):
    """Understand appends its image for the vision encoder only; an Edit (or Multi-Frame, Navigate) with no
    image then sampled without the picture's VAE tokens (7/20 recolors instead of 19/20), with no error."""
    _, ctx = tasks.understand(tiny_model, Q, image=picture, settings=SHORT)
    with pytest.raises(ContextError, match="understanding only.*connect the image to the edit"):
        tasks.edit_images(tiny_model, None, "make the circle green", context=ctx)
    with pytest.raises(ContextError, match="understanding only.*sequence's image input"):
        tasks.generate_sequences(tiny_model, ["move left"], context=ctx)
    tasks.edit_images(tiny_model, [picture], "make the circle green", context=ctx, settings=EDIT)
    drawn = Context.empty(tiny_model).append_image(picture)  # vae + vit: the chain continues from it
    assert drawn.latest_image_drawable and not ctx.latest_image_drawable


def test_an_image_that_could_not_join_its_context_is_not_sampled(tiny_model, windowed):
    """With one free position an image was sampled in full and then lost (appending it takes two)."""
    room = len(tiny_model.tokenizer.segment(P)) + 1
    narrow = windowed(tiny_model, room)
    ctx = Context.empty(narrow).append_text(P)
    steps = []
    with pytest.raises(ContextError, match="past the model's window"):
        tasks.generate_images(narrow, "", context=ctx, settings=EDIT, callback=lambda *a: steps.append(a))
    assert steps == []
    tasks.generate_images(narrow, "", context=ctx, settings=EDIT, append_result=False)  # one-shot: it fits
