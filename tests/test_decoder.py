"""The MoT decoder at the model level, on the tiny checkpoints in float32: KV-cache equivalence, expert
routing, the attention and RoPE primitives, and the full understanding / generation forward against an
independent dense reference written here from the formulas of BAGEL_REFERENCE §2.2 and §4.

The reference (`_naive_*`) shares no code with `bagel_model.layers`: it reads the raw state dict, loops
over tokens to pick each token's expert, builds an explicit attention mask for the whole interleaved
sequence (§4.4: text causal, images bidirectional inside, everything sees what came before) and runs one
dense pass in float64, where the model runs segment by segment against its KV cache. Only the SigLIP
features of ViT tokens come from the model (the ViT has its own tests).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bagel_model.layers.attention import attention
from bagel_model.layers.decoder import KV, Routing
from bagel_model.layers.embeddings import apply_rope, rope_cos_sin
from bagel_model.model import BagelModel

PREFIX = "language_model.model."


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-token relative error of a against the reference b (rows = tokens)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return ((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).max().item()


def _cat(a: KV | None, b: KV) -> KV:
    return b if a is None else KV(torch.cat([a.k, b.k], dim=1), torch.cat([a.v, b.v], dim=1))


def _forward(net, emb, pos, routing, past: KV | None, causal: bool, mask=None) -> tuple[torch.Tensor, KV]:
    """One decoder pass after `past` (None: no history): hidden states and the query's K/V."""
    cache = net.new_cache(emb.shape[0], () if past is None else (past,))
    return net(emb, pos, routing, [cache], causal, mask), cache.new_kv()


def _text_ids(model, text: str) -> torch.Tensor:
    return torch.tensor(model.tokenizer.segment(text))


@pytest.fixture(scope="module")
def prefix(tiny_model):
    """A cached text segment (positions 0..n-1) for queries to attend to."""
    ids = _text_ids(tiny_model, "a red circle at the top left")
    with torch.no_grad():
        _, kv = _forward(
            tiny_model.net, tiny_model.net.embed_text(ids), torch.arange(ids.numel()), Routing(), None, True
        )
    return kv, ids.numel()


def _image_query(model, n_latents: int, t: float, seed: int):
    """`<|vision_start|>` latents `<|vision_end|>` at flow time t: embeddings and MoT routing."""
    g = torch.Generator().manual_seed(seed)
    net, m = model.net, model.tokenizer.markers
    x = torch.randn(n_latents, model.config.patch_latent_dim, generator=g)
    latents = net.embed_latents(x, torch.tensor(t), torch.arange(n_latents))
    start, end = net.embed_text(torch.tensor([m.start_of_image, m.end_of_image])).split(1)
    is_gen = torch.zeros(n_latents + 2, dtype=torch.bool)
    is_gen[1:-1] = True
    return torch.cat([start, latents, end]), Routing.from_mask(is_gen), is_gen


# -- KV cache ----------------------------------------------------------------------------------------


@torch.no_grad()
def test_prefill_in_pieces_and_token_by_token_equals_one_causal_pass(tiny_model):
    net = tiny_model.net
    a = _text_ids(tiny_model, "a red circle at the top left")
    b = _text_ids(tiny_model, "what color is the circle?")
    ids = torch.cat([a, b])
    emb, pos, n_a = net.embed_text(ids), torch.arange(ids.numel()), a.numel()

    full, kv_full = _forward(net, emb, pos, Routing(), None, True)
    h_a, kv_a = _forward(net, emb[:n_a], pos[:n_a], Routing(), None, True)
    h_b, kv_b = _forward(net, emb[n_a:], pos[n_a:], Routing(), kv_a, True)
    torch.testing.assert_close(torch.cat([h_a, h_b]), full, rtol=0, atol=1e-5)
    kv_split = _cat(kv_a, kv_b)
    torch.testing.assert_close(kv_split.k, kv_full.k, rtol=0, atol=1e-5)
    torch.testing.assert_close(kv_split.v, kv_full.v, rtol=0, atol=1e-5)

    past, steps = kv_a, []
    for i in range(n_a, ids.numel()):
        h, kv = _forward(net, emb[i : i + 1], pos[i : i + 1], Routing(), past, True)
        past = _cat(past, kv)
        steps.append(h)
    torch.testing.assert_close(torch.cat(steps), full[n_a:], rtol=0, atol=1e-5)
    torch.testing.assert_close(past.k, kv_full.k, rtol=0, atol=1e-5)

    # The cache is really used: B without A's keys is a different computation.
    alone, _ = _forward(net, emb[n_a:], pos[n_a:], Routing(), None, True)
    assert (alone - full[n_a:]).abs().max() > 1e-2


# -- MoT routing -------------------------------------------------------------------------------------

LAST = "layers.{last}."


@pytest.mark.parametrize(
    ("param", "changes"),
    [
        (LAST + "mlp_moe_gen.down_proj.weight", "gen"),
        (LAST + "mlp.down_proj.weight", "und"),
        (LAST + "post_attention_layernorm_moe_gen.weight", "gen"),
        (LAST + "post_attention_layernorm.weight", "und"),
        (LAST + "self_attn.q_proj_moe_gen.weight", "gen"),
        (LAST + "self_attn.o_proj.weight", "und"),
        # Keys and values of gen tokens enter the one softmax the markers' queries also use.
        (LAST + "self_attn.k_proj_moe_gen.weight", "all"),
        (LAST + "self_attn.v_proj.weight", "all"),
        ("norm_moe_gen.weight", "gen"),
        ("norm.weight", "und"),
    ],
)
@torch.no_grad()
def test_each_token_uses_its_experts_weights(tiny_model, prefix, param, changes):
    kv, n_prefix = prefix
    emb, routing, is_gen = _image_query(tiny_model, 6, 0.5, seed=1)
    pos = torch.full((emb.shape[0],), n_prefix)
    ref, ref_kv = _forward(tiny_model.net, emb, pos, routing, kv, False)

    net = copy.deepcopy(tiny_model.net)
    last = net.config.llm.num_hidden_layers - 1
    weight = net.language_model.model.get_parameter(param.format(last=last))
    weight.add_(0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)))
    out, out_kv = _forward(net, emb, pos, routing, kv, False)

    changed = {"gen": is_gen, "und": ~is_gen, "all": torch.ones_like(is_gen)}[changes]
    row_diff = (out - ref).abs().amax(dim=1)
    assert (row_diff[changed] > 1e-5).all(), row_diff  # unchanged rows are bitwise equal
    assert torch.equal(out[~changed], ref[~changed])
    # Earlier layers' K/V never see a last-layer or final-norm weight.
    assert torch.equal(out_kv.k[:last], ref_kv.k[:last]) and torch.equal(out_kv.v[:last], ref_kv.v[:last])


@torch.no_grad()
def test_text_never_touches_the_generation_expert(tiny_model, prefix):
    ids = _text_ids(tiny_model, "what color is the circle?")
    kv, n_prefix = prefix
    net = tiny_model.net
    emb, pos = net.embed_text(ids), torch.arange(n_prefix, n_prefix + ids.numel())
    ref, ref_kv = _forward(net, emb, pos, Routing(), kv, True)
    noisy = copy.deepcopy(net)
    for name, p in noisy.named_parameters():
        if "moe_gen" in name:
            p.mul_(-3.0)
    out, out_kv = _forward(noisy, emb, pos, Routing(), kv, True)
    assert torch.equal(out, ref) and torch.equal(out_kv.k, ref_kv.k) and torch.equal(out_kv.v, ref_kv.v)


# -- attention and RoPE primitives -------------------------------------------------------------------


def _hand_attention(q, k, v, allowed):
    """Explicit softmax attention; query head hh reads kv head hh // (h / h_kv)."""
    n_q, h, d = q.shape
    group = h // k.shape[1]
    out = torch.zeros(n_q, h, d, dtype=torch.float64)
    for i in range(n_q):
        for hh in range(h):
            kk, vv = k[:, hh // group].double(), v[:, hh // group].double()
            scores = kk @ q[i, hh].double() / math.sqrt(d)
            scores = scores.masked_fill(~allowed[i], -math.inf)
            p = torch.exp(scores - scores.max())
            out[i, hh] = (p / p.sum()) @ vv
    return out


@pytest.mark.parametrize(("n_q", "n_k"), [(3, 7), (1, 5), (4, 4)])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_hand_softmax(n_q, n_k, causal):
    g = torch.Generator().manual_seed(n_q * 10 + n_k)
    q, k, v = (torch.randn(n, h, 8, generator=g) for n, h in ((n_q, 4), (n_k, 2), (n_k, 2)))
    allowed = torch.ones(n_q, n_k, dtype=torch.bool)
    if causal:  # bottom-right: query i is position n_k - n_q + i of the keys
        allowed = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
    out = attention(q, k, v, causal=causal, backend="sdpa")
    assert out.shape == (n_q, 4, 8) and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), _hand_attention(q, k, v, allowed), rtol=0, atol=1e-5)


def test_attention_explicit_mask_matches_hand_softmax():
    g = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(5, 4, 8, generator=g),
        torch.randn(9, 2, 8, generator=g),
        torch.randn(9, 2, 8, generator=g),
    )
    allowed = torch.rand(5, 9, generator=g) < 0.5
    allowed[:, 0] = True  # every query sees at least one key
    for causal in (True, False):  # the mask replaces the causal rule
        out = attention(q, k, v, causal=causal, backend="sdpa", mask=allowed)
        torch.testing.assert_close(out.double(), _hand_attention(q, k, v, allowed), rtol=0, atol=1e-5)


def test_gqa_is_repeat_interleave_of_kv_heads():
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(5, 6, 8, generator=g),
        torch.randn(9, 2, 8, generator=g),
        torch.randn(9, 2, 8, generator=g),
    )
    out = attention(q, k, v, causal=True, backend="sdpa")
    grouped = attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), causal=True, backend="sdpa"
    )
    torch.testing.assert_close(out, grouped, rtol=0, atol=1e-6)
    tiled = attention(q, k.repeat(1, 3, 1), v.repeat(1, 3, 1), causal=True, backend="sdpa")
    assert (out - tiled).abs().max() > 1e-2  # the other head layout is distinguishable


def _hand_rope(x: torch.Tensor, pos: float, theta: float) -> torch.Tensor:
    """Rotate dims (i, i + d/2) of x (d,) by pos * theta^(-2i/d), in float64."""
    d = x.shape[-1]
    angle = pos * theta ** (-2 * torch.arange(d // 2, dtype=torch.float64) / d)
    a, b = x[..., : d // 2].double(), x[..., d // 2 :].double()
    return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], dim=-1)


def test_rope_is_the_rotate_half_rotation():
    theta, d = 1_000_000.0, 16
    positions = torch.tensor([0, 1, 5, 37, 1000])
    x = torch.randn(5, 3, d, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_cos_sin(positions, d, theta, torch.float32)
    out = apply_rope(x, cos, sin)
    assert torch.equal(out[0], x[0])  # position 0 is the identity
    for i, p in enumerate(positions.tolist()):
        torch.testing.assert_close(out[i].double(), _hand_rope(x[i], p, theta), rtol=0, atol=1e-5)
    # Scores depend on the relative position only.
    q, k = x[:, 0], x[:, 1]

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq]), d, theta, torch.float32)
        ck, sk = rope_cos_sin(torch.tensor([pk]), d, theta, torch.float32)
        return (apply_rope(q[:1, None], cq, sq) * apply_rope(k[:1, None], ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(107, 103), rtol=0, atol=1e-5)
    assert abs(score(7, 3) - score(3, 7)) > 1e-3


@torch.no_grad()
def test_image_tokens_share_one_position_so_order_inside_an_image_does_not_matter(tiny_model, prefix):
    kv, n_prefix = prefix
    emb, routing, _ = _image_query(tiny_model, 6, 0.3, seed=3)
    n = emb.shape[0]
    perm = torch.cat(
        [
            torch.tensor([0]),
            1 + torch.randperm(n - 2, generator=torch.Generator().manual_seed(4)),
            torch.tensor([n - 1]),
        ]
    )
    assert not torch.equal(perm, torch.arange(n))
    net = tiny_model.net

    shared = torch.full((n,), n_prefix)
    out, out_kv = _forward(net, emb, shared, routing, kv, False)
    permuted, permuted_kv = _forward(net, emb[perm], shared, routing, kv, False)
    torch.testing.assert_close(permuted, out[perm], rtol=0, atol=1e-5)
    torch.testing.assert_close(permuted_kv.k, out_kv.k[:, perm], rtol=0, atol=1e-5)

    # Control: with one position per token the same permutation changes the outputs.
    distinct = n_prefix + torch.arange(n)
    out, _ = _forward(net, emb, distinct, routing, kv, False)
    permuted, _ = _forward(net, emb[perm], distinct, routing, kv, False)
    assert (permuted - out[perm]).abs().max() > 1e-3


# -- the whole forward against a dense reference -----------------------------------------------------


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x / torch.sqrt((x * x).mean() + eps)


def _naive_layer(W, cfg, layer: int, x, positions, is_gen, allowed):
    """One MoT decoder layer over the whole sequence (§4.1), token by token; returns (x, k, v)."""
    n, heads, kv_heads, d, eps = (
        x.shape[0],
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.rms_norm_eps,
    )

    def w(name: str, gen: bool) -> torch.Tensor:
        return W[f"{PREFIX}layers.{layer}.{name.format(e='_moe_gen' if gen else '')}"]

    q = torch.zeros(n, heads, d, dtype=torch.float64)
    k = torch.zeros(n, kv_heads, d, dtype=torch.float64)
    v = torch.zeros(n, kv_heads, d, dtype=torch.float64)
    for i in range(n):
        g, p = bool(is_gen[i]), float(positions[i])
        h = _rms(x[i], w("input_layernorm{e}.weight", g), eps)
        qi = (w("self_attn.q_proj{e}.weight", g) @ h + w("self_attn.q_proj{e}.bias", g)).view(heads, d)
        ki = (w("self_attn.k_proj{e}.weight", g) @ h + w("self_attn.k_proj{e}.bias", g)).view(kv_heads, d)
        vi = (w("self_attn.v_proj{e}.weight", g) @ h + w("self_attn.v_proj{e}.bias", g)).view(kv_heads, d)
        for hh in range(heads):  # QK-norm per head, before RoPE
            q[i, hh] = _hand_rope(_rms(qi[hh], w("self_attn.q_norm{e}.weight", g), eps), p, cfg.rope_theta)
        for hh in range(kv_heads):
            k[i, hh] = _hand_rope(_rms(ki[hh], w("self_attn.k_norm{e}.weight", g), eps), p, cfg.rope_theta)
        v[i] = vi
    attn = _hand_attention(q, k, v, allowed)  # one softmax over all tokens, whatever their expert
    out = torch.zeros_like(x)
    for i in range(n):
        g = bool(is_gen[i])
        h = x[i] + w("self_attn.o_proj{e}.weight", g) @ attn[i].reshape(-1)
        m = _rms(h, w("post_attention_layernorm{e}.weight", g), eps)
        gate, up = w("mlp{e}.gate_proj.weight", g) @ m, w("mlp{e}.up_proj.weight", g) @ m
        out[i] = h + w("mlp{e}.down_proj.weight", g) @ (F.silu(gate) * up)
    return out, k, v


def _naive_decoder(W, cfg, x, positions, is_gen, allowed):
    ks, vs = [], []
    for layer in range(cfg.num_hidden_layers):
        x, k, v = _naive_layer(W, cfg, layer, x, positions, is_gen, allowed)
        ks.append(k)
        vs.append(v)
    final = torch.stack(
        [
            _rms(x[i], W[PREFIX + ("norm_moe_gen.weight" if g else "norm.weight")], cfg.rms_norm_eps)
            for i, g in enumerate(is_gen.tolist())
        ]
    )
    return final, torch.stack(ks), torch.stack(vs)


def _mask(blocks: list[tuple[int, bool]]) -> torch.Tensor:
    """§4.4 for a sequence of (length, causal) blocks: k <= q, or q and k in one bidirectional block."""
    block = torch.cat([torch.full((n,), i) for i, (n, _) in enumerate(blocks)])
    full = torch.tensor([not causal for _, causal in blocks])[block]
    idx = torch.arange(block.numel())
    same = block[:, None] == block[None, :]
    return (idx[None, :] <= idx[:, None]) | (same & full[:, None])


def _naive_time(W, t: float) -> torch.Tensor:
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    feat = torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)])
    h = F.silu(W["time_embedder.mlp.0.weight"] @ feat + W["time_embedder.mlp.0.bias"])
    return W["time_embedder.mlp.2.weight"] @ h + W["time_embedder.mlp.2.bias"]


class _Sequence:
    """An interleaved sequence built twice: model segments (run against the cache) and naive inputs."""

    def __init__(self, model):
        self.model, self.net, self.m = model, model.net, model.tokenizer.markers
        self.W = {k: v.double() for k, v in model.net.state_dict().items()}
        self.segments, self.naive, self.rope = [], [], 0

    def _add(self, emb, naive, positions, is_gen, causal):
        self.segments.append((emb, positions, is_gen, causal))
        self.naive.append((naive, positions, is_gen, causal))

    def _markers(self):
        ids = torch.tensor([self.m.start_of_image, self.m.end_of_image])
        return self.net.embed_text(ids), self.W[PREFIX + "embed_tokens.weight"][ids]

    def text(self, ids: torch.Tensor):
        pos = self.rope + torch.arange(ids.numel())
        self._add(
            self.net.embed_text(ids),
            self.W[PREFIX + "embed_tokens.weight"][ids],
            pos,
            torch.zeros(ids.numel(), dtype=torch.bool),
            True,
        )
        self.rope += ids.numel()

    def vit_image(self, h: int, w: int, seed: int):
        side = self.model.config.vit_max_num_patch_per_side
        patches = (
            torch.rand(h * w, self.model.config.vit.patch_dim, generator=torch.Generator().manual_seed(seed))
            * 2
            - 1
        )
        pos_ids = torch.tensor([r * side + c for r in range(h) for c in range(w)])
        inner = self.net.embed_vit(patches, pos_ids, [h * w])
        feat = self.net.vit_model(patches, pos_ids, [h * w]).double()
        W = self.W
        naive_inner = (
            F.linear(
                F.gelu(
                    F.linear(feat, W["connector.fc1.weight"], W["connector.fc1.bias"]), approximate="tanh"
                ),
                W["connector.fc2.weight"],
                W["connector.fc2.bias"],
            )
            + W["vit_pos_embed.pos_embed"][pos_ids]
        )
        self._image(inner, naive_inner, gen=False)

    def vae_image(self, h: int, w: int, t: float, seed: int, advance: bool):
        side = self.model.config.max_latent_size
        x = torch.randn(
            h * w, self.model.config.patch_latent_dim, generator=torch.Generator().manual_seed(seed)
        )
        pos_ids = torch.tensor([r * side + c for r in range(h) for c in range(w)])
        inner = self.net.embed_latents(x, torch.tensor(t), pos_ids)
        W = self.W
        naive_inner = (
            F.linear(x.double(), W["vae2llm.weight"], W["vae2llm.bias"])
            + _naive_time(W, t)
            + W["latent_pos_embed.pos_embed"][pos_ids]
        )
        self._image(inner, naive_inner, gen=True, advance=advance)

    def _image(self, inner, naive_inner, gen: bool, advance: bool = True):
        (start, end), (nstart, nend) = (m.split(1) for m in self._markers())
        n = inner.shape[0] + 2
        is_gen = torch.zeros(n, dtype=torch.bool)
        is_gen[1:-1] = gen
        self._add(
            torch.cat([start, inner, end]),
            torch.cat([nstart, naive_inner, nend]),
            torch.full((n,), self.rope),
            is_gen,
            False,
        )
        self.rope += int(advance)

    @torch.no_grad()
    def run_model(self):
        """Each segment against the K/V of the ones before: hidden states and the K/V, concatenated."""
        past, hidden = None, []
        for emb, pos, is_gen, causal in self.segments:
            h, kv = _forward(self.net, emb, pos, Routing.from_mask(is_gen), past, causal)
            hidden.append(h)
            past = _cat(past, kv)
        return torch.cat(hidden), past

    @torch.no_grad()
    def run_packed(self):
        """The whole sequence in one model pass with the explicit mask (training's packing)."""
        x = torch.cat([s[0] for s in self.segments])
        positions = torch.cat([s[1] for s in self.segments])
        routing = Routing.from_mask(torch.cat([s[2] for s in self.segments]))
        allowed = _mask([(s[0].shape[0], s[3]) for s in self.segments])
        return _forward(self.net, x, positions, routing, None, False, mask=allowed)

    def run_naive(self):
        """The whole sequence in one dense float64 pass with the explicit mask."""
        x = torch.cat([s[0] for s in self.naive])
        positions = torch.cat([s[1] for s in self.naive])
        is_gen = torch.cat([s[2] for s in self.naive])
        allowed = _mask([(s[0].shape[0], s[3]) for s in self.naive])
        return _naive_decoder(self.W, self.model.config.llm, x, positions, is_gen, allowed)


def test_understanding_forward_matches_dense_reference(tiny_model):
    _assert_understanding_matches_dense_reference(tiny_model)


def test_understanding_forward_on_an_official_checkpoint(official_model):
    _assert_understanding_matches_dense_reference(official_model)


def test_generation_forward_matches_dense_reference(tiny_model):
    _assert_generation_matches_dense_reference(tiny_model)


def test_generation_forward_on_an_official_checkpoint(official_model):
    _assert_generation_matches_dense_reference(official_model)


def _assert_understanding_matches_dense_reference(model: BagelModel) -> None:
    """ViT image, then a question, then `<|im_start|>`: hidden states, K/V and next-token logits."""
    seq = _Sequence(model)
    seq.vit_image(2, 3, seed=5)
    seq.text(_text_ids(model, "what color is the circle?"))
    seq.text(torch.tensor([model.tokenizer.markers.bos]))
    hidden, kv = seq.run_model()
    ref_hidden, ref_k, ref_v = seq.run_naive()

    assert _rel(hidden, ref_hidden) < 1e-4
    assert _rel(kv.k.transpose(0, 1), ref_k.transpose(0, 1)) < 1e-4
    assert _rel(kv.v.transpose(0, 1), ref_v.transpose(0, 1)) < 1e-4
    packed, packed_kv = seq.run_packed()
    assert _rel(packed, ref_hidden) < 1e-4
    assert _rel(packed_kv.v.transpose(0, 1), ref_v.transpose(0, 1)) < 1e-4
    logits = model.net.logits(hidden[-1:])
    ref_logits = ref_hidden[-1:] @ seq.W["language_model.lm_head.weight"].T
    assert logits.shape == (1, model.config.llm.vocab_size)
    assert _rel(logits, ref_logits) < 1e-4


def _assert_generation_matches_dense_reference(model: BagelModel) -> None:
    """Prompt, clean context image (VAE at t=0, then ViT), then noisy latents at t=0.7: the velocity."""
    seq = _Sequence(model)
    seq.text(_text_ids(model, "make the circle green"))
    seq.vae_image(2, 3, t=0.0, seed=6, advance=True)
    seq.vit_image(2, 2, seed=7)
    seq.vae_image(2, 3, t=0.7, seed=8, advance=False)
    hidden, kv = seq.run_model()
    ref_hidden, ref_k, _ = seq.run_naive()

    assert _rel(hidden, ref_hidden) < 1e-4
    assert _rel(kv.k.transpose(0, 1), ref_k.transpose(0, 1)) < 1e-4
    packed, _ = seq.run_packed()
    assert _rel(packed, ref_hidden) < 1e-4
    latents = hidden[-7:-1]
    ref_latents = ref_hidden[-7:-1]
    velocity = model.net.velocity(latents)
    ref_velocity = F.linear(ref_latents, seq.W["llm2vae.weight"], seq.W["llm2vae.bias"])
    assert velocity.shape == (6, model.config.patch_latent_dim)
    assert _rel(velocity, ref_velocity) < 1e-4
