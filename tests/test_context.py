"""`Context` on the tiny random model (float32, CPU): incremental == one prefill, forked == fresh, shared
segments are never copied or modified, the CFG companions follow the official rules (BAGEL_REFERENCE §5.3),
and bad inputs fail with a message.

The one-prefill reference is built here from the network's primitives: the whole interleaved sequence in one
decoder pass with an explicit mask (text causal, an image bidirectional inside, every token sees all earlier
segments; §4.4), positions by the official rules (a text token per position, one position per image part;
§4.3) and per-token expert routing (VAE latents to the generation expert; §4.1).
"""

from __future__ import annotations

import pytest
import torch

import bagel_model
from bagel_model.context import Context, ContextError
from bagel_model.engine import denoise
from bagel_model.images import flattened_position_ids, patchify, prepare_context_image, to_tensor
from bagel_model.layers.decoder import Routing
from bagel_model.sampling import FlowSettings

A = "a red circle at the top left"
B = "move the red circle to the bottom right"


@pytest.fixture(scope="module")
def chain(tiny_model, picture):
    """text A, image (VAE + ViT), text B, appended one by one."""
    return Context.empty(tiny_model).append_text(A).append_image(picture).append_text(B)


# -- the one-prefill reference ------------------------------------------------------------------------


def _text_part(model, text, pos):
    ids = torch.tensor(model.tokenizer.segment(text))
    return model.net.embed_text(ids), torch.arange(pos, pos + ids.numel()), "text"


def _image_part(model, inner, pos, kind):
    """[<|vision_start|>, inner, <|vision_end|>] at one position."""
    m = model.tokenizer.markers
    start, end = model.net.embed_text(torch.tensor([m.start_of_image, m.end_of_image])).split(1)
    return torch.cat([start, inner, end]), torch.full((inner.shape[0] + 2,), pos), kind


def _one_prefill(model, parts):
    """parts: (embeds, positions, kind) with kind "text", "vit" or "vae". One decoder pass over all of them
    with an explicit mask; returns the hidden states, the K/V and each part's token slice."""
    embeds = torch.cat([e for e, _, _ in parts])
    positions = torch.cat([p for _, p, _ in parts])
    n = embeds.shape[0]
    mask = torch.zeros(n, n, dtype=torch.bool)
    is_gen = torch.zeros(n, dtype=torch.bool)  # only VAE latents (not their markers) use the gen expert
    slices, start = [], 0
    for e, _, kind in parts:
        end = start + e.shape[0]
        mask[start:end, :start] = True
        block = torch.ones(end - start, end - start, dtype=torch.bool)
        mask[start:end, start:end] = block.tril() if kind == "text" else block
        if kind == "vae":
            is_gen[start + 1 : end - 1] = True
        slices.append(slice(start, end))
        start = end
    with torch.no_grad():
        cache = model.net.new_cache(n)
        hidden = model.net(embeds, positions, Routing.from_mask(is_gen), [cache], False, mask)
    return hidden, cache.new_kv(), slices


@pytest.fixture(scope="module")
def reference_parts(tiny_model, picture):
    """The parts of [A, VAE(picture), ViT(picture), B], built from the network's primitives."""
    model, cfg = tiny_model, tiny_model.config
    vae_image, vit_image = prepare_context_image(picture, cfg.inference.vae_limits, cfg.inference.vit_limits)
    h, w = vae_image.height // cfg.latent_downsample, vae_image.width // cfg.latent_downsample
    with torch.no_grad():
        latent = model.encode_latent(to_tensor(vae_image))
        vae_inner = model.net.embed_latents(
            latent, torch.tensor(0.0), flattened_position_ids(h, w, cfg.max_latent_size)
        )
        pixels = to_tensor(vit_image)
        p = cfg.vit.patch_size
        hp, wp = pixels.shape[1] // p, pixels.shape[2] // p
        vit_inner = model.net.embed_vit(
            patchify(pixels, p), flattened_position_ids(hp, wp, cfg.vit_max_num_patch_per_side), [hp * wp]
        )
        ta = _text_part(model, A, 0)
        la = ta[1].numel()
        parts = [
            ta,
            _image_part(model, vae_inner, la, "vae"),
            _image_part(model, vit_inner, la + 1, "vit"),
            _text_part(model, B, la + 2),
        ]
    return parts


def test_chain_layout(chain, reference_parts, picture):
    segs = chain.cond.segments
    assert [s.kind for s in segs] == ["text", "vae", "vit", "text"]
    assert [s.tokens for s in segs] == [p[0].shape[0] for p in reference_parts]
    assert segs[0].text == A and segs[3].text == B
    # text advances the position per token, each image part by one
    la, lb = reference_parts[0][0].shape[0], reference_parts[3][0].shape[0]
    assert chain.cond.rope == la + 2 + lb
    assert chain.tokens == sum(s.tokens for s in segs)
    assert chain.image_size == (64, 64) == segs[1].image_size
    assert chain.summary().startswith(f"4 segments (2 text, 1 vae, 1 vit), {chain.tokens} tokens")


def test_appending_equals_one_prefill(tiny_model, chain, reference_parts):
    """Each segment's K/V, and the logits of the next token, as if the history were prefilled at once."""
    model = tiny_model
    bos = model.tokenizer.markers.bos
    with torch.no_grad():
        next_tok = (model.net.embed_text(torch.tensor([bos])), torch.tensor([chain.cond.rope]), "text")
    hidden, kv, slices = _one_prefill(model, [*reference_parts, next_tok])
    for seg, s in zip(chain.cond.segments, slices[:-1], strict=True):
        torch.testing.assert_close(seg.kv.k, kv.k[:, s], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(seg.kv.v, kv.v[:, s], atol=1e-5, rtol=1e-5)
    # the first decoding step of engine.decode_text, against the cached context
    with torch.no_grad():
        cache = model.net.new_cache(1, chain.cond.kvs())
        h1 = model.net(next_tok[0], next_tok[1], Routing(), [cache], True)
        cached, full = model.net.logits(h1[-1]), model.net.logits(hidden[-1])
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    assert cached.std() > 0.01


def test_velocity_equals_one_prefill(tiny_model, chain, reference_parts, count_passes):
    """A denoising evaluation (engine.denoise, one step, no CFG) against the cached context equals the noisy
    image at the end of one prefill."""
    model, cfg = tiny_model, tiny_model.config
    h = w = 2  # a 32x32 image: 4 latent tokens
    noise = torch.randn(h * w, cfg.patch_latent_dim, generator=torch.Generator().manual_seed(0))
    # num_steps=2 evaluates t = 1 once with dt = 1, so x_out = noise - v
    settings = FlowSettings(num_steps=2, cfg_text_scale=1.0)
    x = denoise(model, [chain], 32, 32, settings, noise[None])[0]
    assert len(count_passes) == 1
    v_cached = noise - x
    with torch.no_grad():
        inner = model.net.embed_latents(
            noise, torch.tensor(1.0), flattened_position_ids(h, w, cfg.max_latent_size)
        )
        query = _image_part(model, inner, chain.cond.rope, "vae")
    hidden, _, slices = _one_prefill(model, [*reference_parts, query])
    v_full = model.net.velocity(hidden[slices[-1]][1:-1])
    torch.testing.assert_close(v_cached, v_full, atol=1e-5, rtol=1e-5)
    assert v_full.std() > 0.01


# -- branches -----------------------------------------------------------------------------------------


def _snapshot(ctx):
    return [(s, s.kv.k.clone(), s.kv.v.clone()) for s in ctx.cond.segments]


def _same_values(a, b):
    assert [s.kind for s in a.cond.segments] == [s.kind for s in b.cond.segments]
    assert a.cond.rope == b.cond.rope
    for x, y in zip(a.cond.segments, b.cond.segments, strict=True):
        assert x.text == y.text
        torch.testing.assert_close(x.kv.k, y.kv.k, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(x.kv.v, y.kv.v, atol=1e-6, rtol=1e-6)


def test_branches_are_independent_and_share_the_parent(tiny_model, picture):
    parent = Context.empty(tiny_model).append_image(picture).append_text(A)
    before = _snapshot(parent)
    parent_segments, parent_histories = (
        parent.cond.segments,
        (parent.cond, parent.uncond_text, parent.uncond_img),
    )

    child1 = parent.append_text("x")
    child2 = parent.append_text("y")

    # the parent is untouched: same objects, same values
    assert parent.cond.segments is parent_segments
    assert (parent.cond, parent.uncond_text, parent.uncond_img) == parent_histories
    for (seg, k, v), now in zip(before, parent.cond.segments, strict=True):
        assert now is seg
        assert torch.equal(now.kv.k, k) and torch.equal(now.kv.v, v)

    # each child equals a fresh recomputation of its whole history
    for child, text in ((child1, "x"), (child2, "y")):
        fresh = Context.empty(tiny_model).append_image(picture).append_text(A).append_text(text)
        _same_values(child, fresh)
        assert child.cond.segments[-1].text == text
        # children share the parent's segments (no copy) and add one of their own
        assert len(child.cond.segments) == len(parent_segments) + 1
        assert all(c is p for c, p in zip(child.cond.segments[:-1], parent_segments, strict=True))
        assert child.uncond_text is parent.cond
    assert child1.cond.segments[-1] is not child2.cond.segments[-1]
    assert not torch.equal(child1.cond.segments[-1].kv.k, child2.cond.segments[-1].kv.k)


def test_nbytes_counts_shared_segments_once(tiny_model, picture):
    parent = Context.empty(tiny_model).append_image(picture).append_text(A)
    child = parent.append_text(B)
    distinct = {id(s): s for h in (child.cond, child.uncond_text, child.uncond_img) for s in h.segments}
    assert child.nbytes == sum(s.nbytes for s in distinct.values())
    per_history = sum(s.nbytes for h in (child.cond, child.uncond_text, child.uncond_img) for s in h.segments)
    assert child.nbytes < per_history  # the image and A are held by cond and uncond_text alike
    # the child adds exactly its own two new segments (B after the image, B without the image)
    assert (
        child.nbytes == parent.nbytes + child.cond.segments[-1].nbytes + child.uncond_img.segments[-1].nbytes
    )
    seg = child.cond.segments[-1]
    cfg = tiny_model.config.llm
    assert seg.nbytes == 2 * cfg.num_hidden_layers * seg.tokens * cfg.num_key_value_heads * cfg.head_dim * 4


# -- CFG companions (BAGEL_REFERENCE §5.3 table) ------------------------------------------------------


def _kinds_texts(history):
    return [(s.kind, s.text) for s in history.segments]


def test_cfg_companions_text_to_image(tiny_model):
    ctx = Context.empty(tiny_model).append_text(A)
    assert ctx.uncond_text.segments == () and ctx.uncond_text.rope == 0
    assert ctx.uncond_img is ctx.cond  # the same history: a sampler can reuse the conditional pass


def test_cfg_companions_edit(tiny_model, picture):
    with_image = Context.empty(tiny_model).append_image(picture)
    ctx = with_image.append_text(B)
    assert _kinds_texts(ctx.cond) == [("vae", None), ("vit", None), ("text", B)]
    assert _kinds_texts(ctx.uncond_text) == [("vae", None), ("vit", None)]
    assert all(a is b for a, b in zip(ctx.uncond_text.segments, ctx.cond.segments[:2], strict=True))
    assert _kinds_texts(ctx.uncond_img) == [("text", B)]
    # the image-free prompt is its own prefill, at positions from 0
    assert ctx.uncond_img.segments[0] is not ctx.cond.segments[-1]
    assert ctx.uncond_img.rope == ctx.cond.segments[-1].tokens
    fresh = Context.empty(tiny_model).append_text(B)
    torch.testing.assert_close(ctx.uncond_img.segments[0].kv.k, fresh.cond.segments[0].kv.k)
    assert not torch.allclose(ctx.uncond_img.segments[0].kv.k, ctx.cond.segments[-1].kv.k)


def test_cfg_companions_system_prompt_and_thought(tiny_model, picture):
    sys_ctx = Context.empty(tiny_model).append_system_prompt("S")
    assert _kinds_texts(sys_ctx.cond) == [("text", "S")]
    assert sys_ctx.uncond_img is sys_ctx.cond
    assert sys_ctx.uncond_text.segments == ()

    ctx = sys_ctx.append_image(picture).append_text(B).append_thought("T")
    assert _kinds_texts(ctx.cond) == [("text", "S"), ("vae", None), ("vit", None), ("text", B), ("text", "T")]
    assert _kinds_texts(ctx.uncond_text) == [("text", "S"), ("vae", None), ("vit", None)]
    assert _kinds_texts(ctx.uncond_img) == [("text", "S"), ("text", B)]
    assert ctx.uncond_img.segments[0] is ctx.cond.segments[0]  # one prefill of the system prompt

    # a thought joins the conditional history only
    before = sys_ctx.append_text(A)
    after = before.append_thought("T")
    assert after.uncond_text is before.uncond_text and after.uncond_img is before.uncond_img
    assert _kinds_texts(after.cond) == [("text", "S"), ("text", A), ("text", "T")]
    assert _kinds_texts(after.uncond_img) == [("text", "S"), ("text", A)]


def test_understanding_image_is_vit_only(tiny_model, picture):
    ctx = Context.empty(tiny_model).append_image(picture, vae=False)
    assert [s.kind for s in ctx.cond.segments] == ["vit"]
    assert ctx.cond.rope == 1
    assert ctx.image_size == (64, 64)
    with pytest.raises(ContextError, match="vae=True, vit=True or both"):
        Context.empty(tiny_model).append_image(picture, vae=False, vit=False)


# -- errors -------------------------------------------------------------------------------------------


def test_context_of_another_model(tiny_model, tiny_dir):
    other = bagel_model.load(tiny_dir)
    ctx = Context.empty(tiny_model).append_text(A)
    ctx.check_model(tiny_model)
    with pytest.raises(ContextError, match="built by another model"):
        ctx.check_model(other)
    with pytest.raises(ContextError, match="another model"):
        bagel_model.understand(other, "what color is the circle?", context=ctx)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text(tiny_model, text):
    ctx = Context.empty(tiny_model)
    for append in (ctx.append_text, ctx.append_system_prompt, ctx.append_thought):
        with pytest.raises(ContextError, match="empty"):
            append(text)


def test_window_limit_exact(tiny_model, windowed):
    """A model whose window holds exactly A then B: both fit, one more token does not."""
    tok = tiny_model.tokenizer
    la, lb = len(tok.segment(A)), len(tok.segment(B))
    small = windowed(tiny_model, la + lb)
    ctx = Context.empty(small).append_text(A).append_text(B)
    assert ctx.cond.rope == la + lb
    with pytest.raises(ContextError, match=rf"reach position {la + lb + 3}, past the model's window of"):
        ctx.append_text("a")  # <|im_start|> a <|im_end|>


def test_prompt_too_long(tiny_model):
    ctx = Context.empty(tiny_model).append_text(A)
    long = "a red circle at the top left, a blue square at the center. " * 800
    with pytest.raises(ContextError, match="window of 4096; start a new context or shorten the prompt"):
        ctx.append_text(long)


def test_the_loaders_attention_choice_reaches_the_vit(tiny_dir, picture, monkeypatch):
    """`load(attention=...)` sets the backend of every attention call, the ViT's included."""
    from bagel_model.layers import vit

    model = bagel_model.load(tiny_dir, attention="sdpa")
    seen = []

    def recording(*args, backend, **kwargs):
        seen.append(backend)
        return original(*args, backend=backend, **kwargs)

    original = vit.attention
    monkeypatch.setattr(vit, "attention", recording)
    Context.empty(model).append_image(picture, vae=False, vit=True)
    assert seen and set(seen) == {"sdpa"}


def test_an_image_appended_with_its_latent_equals_one_encoded(tiny_model, picture):
    """A known latent (a generated image's, a LATENT from another node) replaces the VAE encode."""
    latent = tiny_model.vae.encode(to_tensor(picture).unsqueeze(0))[0]
    encoded = Context.empty(tiny_model).append_image(picture)
    given = Context.empty(tiny_model).append_image(picture, latent=latent)
    for a, b in zip(encoded.cond.segments, given.cond.segments, strict=True):
        torch.testing.assert_close(a.kv.k, b.kv.k, atol=1e-5, rtol=1e-5)
    with pytest.raises(ContextError, match="outside this model's image sizes"):
        Context.empty(tiny_model).append_image(picture, latent=latent[:, :4])


def test_cond_only_image_leaves_the_guidance_histories(tiny_model, picture):
    ctx = Context.empty(tiny_model).append_text(A)
    out = ctx.append_image(picture, cond_only=True)
    assert out.uncond_text is ctx.uncond_text and out.uncond_img is ctx.uncond_img
    assert [s.kind for s in out.cond.segments] == ["text", "vae", "vit"] and out.image_size == (64, 64)


def test_segments_keep_their_kv_where_the_model_says_and_a_task_still_runs_after(tiny_dir, picture):
    """A memory manager's offload device holds every segment between tasks (`kv_storage`); a task joins
    them into its cache on the compute device, and the answer is the same as with no storage set."""
    model = bagel_model.load(tiny_dir)
    plain = Context.empty(model).append_text("describe the image.")
    model.place(torch.device("cpu"), kv_storage=torch.device("meta"))  # a device no task computes on
    stored = Context.empty(model).append_text("describe the image.")
    assert {t.device.type for t in stored.tensors()} == {"meta"}
    assert {t.device.type for t in plain.tensors()} == {"cpu"}
    model.place(torch.device("cpu"))
    reference, _ = bagel_model.understand(
        model, "describe the image.", context=Context.empty(model).append_image(picture)
    )
    model.place(torch.device("cpu"), kv_storage=torch.device("cpu"))
    answer, _ = bagel_model.understand(
        model, "describe the image.", context=Context.empty(model).append_image(picture)
    )
    assert answer == reference


def test_comfyuis_output_cache_sizes_a_context_by_its_kv(tiny_model, picture):
    """ComfyUI's RAM-pressure cache counts CPU tensors and `_comfy_cache_tensors()`: a context reports
    each K/V it holds once, so the bytes it counts are the context's own."""
    ctx = Context.empty(tiny_model).append_image(picture).append_text("make the circle green")
    tensors = ctx._comfy_cache_tensors()
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(storages) == len(tensors)  # each segment's K/V is a compact copy, not a view of a cache
    assert sum(t.untyped_storage().nbytes() for t in tensors) == ctx.nbytes > 0
    assert all(t.device.type == "cpu" for t in tensors)
