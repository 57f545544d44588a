"""Training sequences from the shapes world: sequence plans per task, and packing plans into one sequence.

A *plan* is one training sample as the official `sequence_plan` describes it (BAGEL_REFERENCE §4.2): an
ordered list of items, each text, a ViT image, a clean VAE image, or a noisy VAE target, with its flags.
Every plan lays its items out exactly as `tasks.py` lays out the context of the matching task, so a model
trained on them runs through the unchanged inference code:

| task       | plan (official inference order)                                                      |
|------------|--------------------------------------------------------------------------------------|
| t2i        | caption, target                                                                      |
| understand | ViT(image), question, answer (loss)                                                  |
| edit       | VAE(image), ViT(image), instruction, target                                          |
| chain      | caption, target s0, then per edit: VAE(prev), ViT(prev), instruction, target         |
| think      | GEN_THINK_SYSTEM_PROMPT, instruction, thought (loss), target                         |
| motion     | VAE(f0), ViT(f0), prompt, target f1, VAE(f1), ViT(f1), prompt, target f2, ...        |
| navigate   | VAE(v0), ViT(v0), move, target v1, VAE(v1), ViT(v1), move, target v2, ...            |

`chain` is a text-to-image followed by 2-3 edits in one context, as Text to Image → Edit → Edit → Edit
wires them; motion and navigation plans start with a caption and its target in `caption_p` of the
samples, as Text to Image → Multi-Frame / Navigate does.

A target may be repeated (`copies`): noisy tokens are invisible to every later token and do not advance
RoPE, so k copies of a target after one context are k independent flow samples that share the context's
cost. The official mask already gives this meaning; the official data just never uses it.

Packing (`pack`) turns several plans into one sequence: token ids, the images to embed, RoPE ids (one id
per image, restarting at 0 per sample), the generalized-causal mask (§4.4), expert routing, and the
CE/MSE targets. CFG dropout of conditioning items happens here, as in the official datasets.

Not here: the network, flow times and noise, and the losses (`losses.py`); the autoencoder itself (an
`ImageBank` turns scenes into ViT patches and clean latent tokens and caches them).
"""

from __future__ import annotations

import random
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..config import BagelConfig
from ..images import flattened_position_ids, patchify, prepare_context_image, to_tensor
from ..layers.vae import AutoEncoder
from ..shapes import (
    EDIT_KINDS,
    QUESTION_KINDS,
    Edit,
    Scene,
    describe,
    legal_moves,
    move_window,
    paraphrase,
    questions,
    sample_edit,
    sample_indirect,
    sample_motion,
    sample_scene,
    sample_world,
    view,
)
from ..tasks import GEN_THINK_SYSTEM_PROMPT
from ..tokenizer import BagelTokenizer
from .autoencoder import SIZE, shown

# -- plan items ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """`<|im_start|> text <|im_end|>`. With `loss`, next-token CE on the text and on the closing marker."""

    text: str
    loss: bool = False
    cfg: bool = False  # may be dropped for classifier-free guidance (p = text_drop)
    group: int | None = None  # items of one group are dropped together (one coin per group)


# What an image item shows: a shapes-world `Scene`, or any other hashable picture reference that the bank
# packing them knows how to show (a user's image file: `folder.ImageFile`).
Picture = Hashable


@dataclass(frozen=True)
class Vit:
    """The image as understanding tokens, `<|vision_start|> ViT <|vision_end|>`; advances RoPE by 1."""

    image: Picture
    cfg: bool = False  # p = vit_drop


@dataclass(frozen=True)
class Vae:
    """The image as clean latent tokens (flow time 0); advances RoPE by 1."""

    image: Picture
    cfg: bool = False  # p = vae_drop


@dataclass(frozen=True)
class Target:
    """A noisy latent image with the flow loss: hidden from later tokens, does not advance RoPE."""

    image: Picture
    copies: int = 1


Item = Text | Vit | Vae | Target
Shown = tuple[Scene, bool]  # a scene and whether its picture was resized from 64 px


@dataclass(frozen=True)
class Plan:
    task: str
    items: tuple[Item, ...]


# -- plans per task --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanSettings:
    """Knobs of the samplers (not of the world, which `shapes` fixes)."""

    object_counts: tuple[float, float, float] = (0.2, 0.4, 0.4)  # t2i scenes of 1, 2, 3 objects
    paraphrase_p: float = 0.2  # captions are canonical otherwise (evaluation asks canonical ones)
    t2i_copies: int = 2
    edit_copies: int = 2
    think_copies: int = 1
    questions_per_image: int = 3
    max_sequence_steps: int = 3  # frames / moves after the first image
    linger_p: float = 0.3  # motion: add a frame where the mover stays at the edge
    # recolor, recolor_shared, move, add, remove (`EDIT_KINDS`). Recolor leaked the new color onto another
    # object (5 of 30 held-out recolors of the 48 px model) and was drawn at 0.4 in run 4; run 4 never saw
    # a recolor naming the color of one of two objects of a shape and got 9 of 50 such held-out cases
    # right, so run 5 draws that kind most (50 of 50 after it).
    edit_kinds: tuple[float, float, float, float, float] = (0.25, 0.3, 0.15, 0.15, 0.15)
    chain_edits: tuple[int, int] = (2, 3)  # edits after the text-to-image of a chain plan
    caption_p: float = 0.25  # motion / navigation plans that start from a text-to-image


def _scene(rng: random.Random, s: PlanSettings) -> Scene:
    count = rng.choices((1, 2, 3), weights=s.object_counts)[0]
    return sample_scene(rng, count, count)


def _caption(scene: Scene, rng: random.Random, s: PlanSettings) -> str:
    return paraphrase(scene, rng) if rng.random() < s.paraphrase_p else describe(scene)


def t2i_plan(rng: random.Random, s: PlanSettings) -> Plan:
    scene = _scene(rng, s)
    return Plan("t2i", (Text(_caption(scene, rng, s), cfg=True), Target(scene, s.t2i_copies)))


def understand_plan(rng: random.Random, s: PlanSettings) -> Plan:
    """One image, then `questions_per_image` turns of question and answer (distinct question kinds). The
    first turn is exactly `understand`'s layout; later turns are a chat about the same image, which triples
    the answers the ViT learns from for a third of the tokens three separate samples would take."""
    scene = sample_scene(rng)
    qas = questions(scene)
    kinds = [k for k in QUESTION_KINDS if any(qa.kind == k for qa in qas)]
    items: list[Item] = [Vit(scene)]
    for kind in rng.sample(kinds, min(s.questions_per_image, len(kinds))):
        qa = rng.choice([qa for qa in qas if qa.kind == kind])
        items += [Text(qa.question), Text(qa.answer, loss=True)]
    return Plan("understand", tuple(items))


def _edit(scene: Scene, rng: random.Random, s: PlanSettings) -> Edit | None:
    """An edit of `scene`, its kind drawn by `s.edit_kinds`; another kind when the scene allows none."""
    kinds = list(EDIT_KINDS)
    weights = list(s.edit_kinds)
    while kinds:
        kind = rng.choices(kinds, weights=weights)[0]
        if (edit := sample_edit(scene, kind, rng)) is not None:
            return edit
        weights.pop(kinds.index(kind))
        kinds.remove(kind)
    return None


def _picture(scene: Scene) -> tuple[Item, Item]:
    """A context picture: clean latent tokens, then the ViT tokens (`Context.append_image`)."""
    return Vae(scene, cfg=True), Vit(scene, cfg=True)


def _drawn(scene: Scene, rng: random.Random, s: PlanSettings) -> tuple[Item, ...]:
    """`generate_images(caption)` with its result appended: caption, target, then the picture."""
    return Text(_caption(scene, rng, s), cfg=True), Target(scene), *_picture(scene)


def edit_plan(rng: random.Random, s: PlanSettings) -> Plan:
    """An edit of the kind `s.edit_kinds` draws, on the first scene that allows it: the kinds' shares are
    their weights (a recolor_shared needs two objects of one shape, which a third of scenes have)."""
    kind = rng.choices(EDIT_KINDS, weights=s.edit_kinds)[0]
    while (edit := sample_edit(sample_scene(rng), kind, rng)) is None:
        pass
    items = (*_picture(edit.before), Text(edit.instruction, cfg=True), Target(edit.after, s.edit_copies))
    return Plan("edit", items)


def chain_plan(rng: random.Random, s: PlanSettings) -> Plan:
    """Text-to-image, then edits in the same context, each of the latest picture (`edit_images(None, ..)`)."""
    scene = _scene(rng, s)
    items: list[Item] = list(_drawn(scene, rng, s))
    for k in range(rng.randint(*s.chain_edits)):
        edit = _edit(scene, rng, s)
        if edit is None:
            break
        if k:
            items += _picture(scene)
        items += [Text(edit.instruction, cfg=True), Target(edit.after)]
        scene = edit.after
    return Plan("chain", tuple(items))


def think_plan(rng: random.Random, s: PlanSettings) -> Plan:
    """`think(mode="generate")` then `generate_images(prompt=None)`: the thought joins the condition, and
    CFG's text-free branch is the system prompt alone, so instruction and thought drop together."""
    ind = sample_indirect(rng)
    return Plan(
        "think",
        (
            Text(GEN_THINK_SYSTEM_PROMPT),
            Text(ind.prompt, cfg=True, group=0),
            Text(ind.thought, loss=True, cfg=True, group=0),
            Target(ind.scene, s.think_copies),
        ),
    )


def _sequence(
    task: str, frames: list[Scene], prompts: list[str], rng: random.Random, s: PlanSettings
) -> Plan:
    """`generate_sequences`: the first image (drawn from its caption in `caption_p` of the plans), then per
    step the prompt, the target, and its clean copy."""
    first = _drawn(frames[0], rng, s) if rng.random() < s.caption_p else _picture(frames[0])
    items: list[Item] = list(first)
    for k, prompt in enumerate(prompts, start=1):
        items += [Text(prompt, cfg=True), Target(frames[k])]
        if k < len(prompts):
            items += _picture(frames[k])
    return Plan(task, tuple(items))


def motion_plan(rng: random.Random, s: PlanSettings) -> Plan:
    while (motion := sample_motion(sample_scene(rng), rng)) is None:
        pass
    frames = list(motion.frames)
    if rng.random() < s.linger_p:  # past the edge the mover stays put (MultiFrame may ask for more frames)
        frames.append(frames[-1])
    frames = frames[: s.max_sequence_steps + 1]
    return _sequence("motion", frames, [motion.instruction] * (len(frames) - 1), rng, s)


def navigate_plan(rng: random.Random, s: PlanSettings) -> Plan:
    world = sample_world(rng)
    window = (rng.randint(0, 2), rng.randint(0, 2))
    frames, moves = [view(world, window)], []
    for _ in range(rng.randint(1, s.max_sequence_steps)):
        move = rng.choice(legal_moves(window))
        window = move_window(window, move)
        frames.append(view(world, window))
        moves.append(move)
    return _sequence("navigate", frames, moves, rng, s)


PLANNERS: dict[str, Callable[[random.Random, PlanSettings], Plan]] = {
    "t2i": t2i_plan,
    "understand": understand_plan,
    "edit": edit_plan,
    "chain": chain_plan,
    "think": think_plan,
    "motion": motion_plan,
    "navigate": navigate_plan,
}

TASKS = tuple(PLANNERS)


def plan_stream(rng: random.Random, mix: dict[str, float], settings: PlanSettings) -> Iterator[Plan]:
    """Endless plans, each task drawn with probability proportional to its weight in `mix`."""
    unknown = set(mix) - set(PLANNERS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; known: {', '.join(PLANNERS)}")
    tasks, weights = list(mix), list(mix.values())
    while True:
        yield PLANNERS[rng.choices(tasks, weights=weights)[0]](rng, settings)


# -- images ----------------------------------------------------------------------------------------------


class ImageBank:
    """Scenes as the network consumes them, cached: ViT patches and clean latent tokens.

    Images go through the inference preprocessing (`prepare_context_image`: the VAE resize, then the ViT
    resize of that), and latents are the frozen AE's posterior mean, as `Context.append_image` makes them.
    Targets are rendered at the model's size; context pictures of `resized_p` of the scenes (fixed per scene,
    so they cache) come from 64 px renders resized, as a user's pictures mostly arrive. Latents of missing
    images are encoded together in one batch (`prefetch`)."""

    def __init__(self, ae: AutoEncoder, cfg: BagelConfig, capacity: int = 50_000, resized_p: float = 0.5):
        # ~4 KB per latent, ~28 KB per ViT patch set: 50k of each stay under 2 GB.
        self.ae, self.cfg, self.capacity, self.resized_p = ae, cfg, capacity, resized_p
        self.size = SIZE
        self._vit: OrderedDict[Shown, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._latent: OrderedDict[Shown, torch.Tensor] = OrderedDict()
        self.encoded = 0  # images encoded so far (cache misses)

    def key(self, scene: Scene, context: bool) -> Shown:
        """The cache key of `scene` shown as a context picture (maybe resized) or as a target (never)."""
        resized = context and zlib.crc32(describe(scene).encode()) % 1000 < self.resized_p * 1000
        return scene, resized

    def _images(self, key: Shown):
        inf = self.cfg.inference
        return prepare_context_image(shown(*key), inf.vae_limits, inf.vit_limits)

    @staticmethod
    def _remember(cache: OrderedDict, key, value, capacity: int) -> None:
        cache[key] = value
        if len(cache) > capacity:
            cache.popitem(last=False)

    def vit(self, scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
        """(patches (m, 3*p*p), position ids (m,)) of `scene` as a context picture."""
        key = self.key(scene, context=True)
        if key not in self._vit:
            pixels = to_tensor(self._images(key)[1])
            p = self.cfg.vit.patch_size
            h, w = pixels.shape[1] // p, pixels.shape[2] // p
            pos = flattened_position_ids(h, w, self.cfg.vit_max_num_patch_per_side)
            self._remember(self._vit, key, (patchify(pixels, p), pos), self.capacity)
        return self._vit[key]

    @torch.no_grad()
    def prefetch(self, keys: list[Shown]) -> None:
        missing = list(dict.fromkeys(k for k in keys if k not in self._latent))
        if not missing:
            return
        pixels = torch.stack([to_tensor(self._images(k)[0]) for k in missing])
        # channels_last: ~2x faster convs
        pixels = pixels.to(self.ae.device, self.ae.dtype, memory_format=torch.channels_last)
        latents = self.ae.encode(pixels).float().cpu()
        for key, latent in zip(missing, latents, strict=True):
            self._remember(self._latent, key, patchify(latent, self.cfg.latent_patch_size), self.capacity)
        self.encoded += len(missing)

    def latent(self, scene: Scene, context: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean latent tokens (h*w, c), position ids (h*w,)) of `scene` as a context picture or target."""
        key = self.key(scene, context)
        if key not in self._latent:
            self.prefetch([key])
        tokens = self._latent[key]
        side = self.size // self.cfg.latent_downsample
        return tokens, flattened_position_ids(side, side, self.cfg.max_latent_size)


# -- packing ---------------------------------------------------------------------------------------------

CAUSAL, FULL, NOISE = 0, 1, 2  # attention mode of a split (official "causal", "full", "noise")


@dataclass(frozen=True)
class PackSettings:
    max_tokens: int = 640  # plans are added while the sequence stays within this (the first always fits)
    text_drop: float = 0.1  # official text_cond_dropout_prob
    vit_drop: float = 0.3  # official vit_cond_dropout_prob
    vae_drop: float = 0.3  # official vae_cond_dropout_prob


@dataclass
class Packed:
    """One training sequence of n tokens. Index tensors point into the sequence (0..n-1)."""

    ids: torch.Tensor  # (n,) token ids; 0 where the token is an image token
    text_index: torch.Tensor  # (n_text,) text and marker tokens
    positions: torch.Tensor  # (n,) RoPE ids
    mask: torch.Tensor  # (n, n) bool, True where query row may attend key column
    is_gen: torch.Tensor  # (n,) bool: VAE latent tokens (generation expert)
    vit_patches: torch.Tensor  # (m, 3*p*p)
    vit_pos: torch.Tensor  # (m,)
    vit_lens: list[int]
    vit_index: torch.Tensor  # (m,)
    latents: torch.Tensor  # (k, c) clean latent tokens of every VAE image (clean and target)
    latent_pos: torch.Tensor  # (k,)
    latent_index: torch.Tensor  # (k,)
    latent_image: torch.Tensor  # (k,) which VAE image each latent token belongs to
    image_noisy: torch.Tensor  # (n_images,) bool: the image is a target
    ce_index: torch.Tensor  # (c,) positions whose next-token logits are scored
    ce_labels: torch.Tensor  # (c,)
    ce_task: torch.Tensor  # (c,) index into TASKS of the plan each scored token belongs to
    image_task: torch.Tensor  # (n_images,) index into TASKS
    tasks: dict[str, int] = field(default_factory=dict)  # plans per task

    @property
    def length(self) -> int:
        return self.ids.shape[0]


@lru_cache(maxsize=65536)
def _encode(tokenizer: BagelTokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text))


def plan_tokens(plan: Plan, latent_tokens: int, vit_tokens: int, tokenizer: BagelTokenizer) -> int:
    """Tokens the plan takes with nothing dropped (for budgeting a pack)."""
    n = 0
    for item in plan.items:
        if isinstance(item, Text):
            n += len(_encode(tokenizer, item.text)) + 2
        elif isinstance(item, Vit):
            n += vit_tokens + 2
        elif isinstance(item, Vae):
            n += latent_tokens + 2
        else:
            n += (latent_tokens + 2) * item.copies
    return n


def kept_items(plan: Plan, settings: PackSettings, rng: random.Random) -> list[tuple[Item, bool]]:
    """(item, kept) after CFG dropout: each droppable item (or group) is dropped with its kind's p."""
    group_kept: dict[int, bool] = {}
    out = []
    for item in plan.items:
        kept = True
        if isinstance(item, Text) and item.cfg:
            if item.group is None:
                kept = rng.random() >= settings.text_drop
            else:
                if item.group not in group_kept:
                    group_kept[item.group] = rng.random() >= settings.text_drop
                kept = group_kept[item.group]
        elif isinstance(item, Vit) and item.cfg:
            kept = rng.random() >= settings.vit_drop
        elif isinstance(item, Vae) and item.cfg:
            kept = rng.random() >= settings.vae_drop
        out.append((item, kept))
    return out


class _Builder:
    """Accumulates tokens, their splits and their targets while plans are laid out."""

    def __init__(self, tokenizer: BagelTokenizer, bank: ImageBank):
        self.tok, self.bank = tokenizer, bank
        m = tokenizer.markers
        self.bos, self.eos, self.soi, self.eoi = m.bos, m.eos, m.start_of_image, m.end_of_image
        self.ids: list[int] = []
        self.is_text: list[bool] = []
        self.is_gen: list[bool] = []
        self.positions: list[int] = []
        self.doc: list[int] = []
        self.split: list[int] = []
        self.mode: list[int] = []
        self.vit: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # patches, pos, start index
        self.lat: list[tuple[torch.Tensor, torch.Tensor, int, bool]] = []  # tokens, pos, start, noisy
        self.ce_index: list[int] = []
        self.ce_labels: list[int] = []
        self.ce_task: list[int] = []
        self.image_task: list[int] = []
        self.task = 0
        self.n_docs = self.n_splits = 0

    def _tokens(self, ids: list[int], text: list[bool], gen: list[bool], rope, mode: int) -> int:
        """Append one split of tokens; returns the index of its first token."""
        start, n = len(self.ids), len(ids)
        self.ids += ids
        self.is_text += text
        self.is_gen += gen
        self.positions += list(rope)
        self.doc += [self.n_docs] * n
        self.split += [self.n_splits] * n
        self.mode += [mode] * n
        self.n_splits += 1
        return start

    def text(self, item: Text, rope: int) -> int:
        seg = [self.bos, *_encode(self.tok, item.text), self.eos]
        start = self._tokens(seg, [True] * len(seg), [False] * len(seg), range(rope, rope + len(seg)), CAUSAL)
        if item.loss:  # [bos] + text predicts text + [eos]
            self.ce_index += range(start, start + len(seg) - 1)
            self.ce_labels += seg[1:]
            self.ce_task += [self.task] * (len(seg) - 1)
        return rope + len(seg)

    def image(self, inner: int, gen: bool, rope: int, mode: int) -> int:
        ids = [self.soi] + [0] * inner + [self.eoi]
        text = [True] + [False] * inner + [True]
        return self._tokens(ids, text, [False] + [gen] * inner + [False], [rope] * (inner + 2), mode) + 1

    def plan(self, task: str, kept: list[tuple[Item, bool]]) -> None:
        self.task = TASKS.index(task)
        rope = 0
        for item, keep in kept:
            if not keep:
                if isinstance(item, Vit | Vae):  # a dropped image still advances RoPE (official)
                    rope += 1
                continue
            if isinstance(item, Text):
                rope = self.text(item, rope)
            elif isinstance(item, Vit):
                patches, pos = self.bank.vit(item.image)
                self.vit.append((patches, pos, self.image(patches.shape[0], False, rope, FULL)))
                rope += 1
            elif isinstance(item, Vae):
                tokens, pos = self.bank.latent(item.image, context=True)
                self.lat.append((tokens, pos, self.image(tokens.shape[0], True, rope, FULL), False))
                self.image_task.append(self.task)
                rope += 1
            else:
                tokens, pos = self.bank.latent(item.image, context=False)
                for _ in range(item.copies):
                    self.lat.append((tokens, pos, self.image(tokens.shape[0], True, rope, NOISE), True))
                    self.image_task.append(self.task)
        self.n_docs += 1

    def build(self, tasks: dict[str, int]) -> Packed:
        long = torch.long
        vit_index = [torch.arange(s, s + p.shape[0]) for p, _, s in self.vit]
        lat_index = [torch.arange(s, s + t.shape[0]) for t, _, s, _ in self.lat]
        empty = torch.zeros(0, dtype=long)
        return Packed(
            ids=torch.tensor(self.ids, dtype=long),
            text_index=torch.tensor(self.is_text).nonzero().squeeze(1),
            positions=torch.tensor(self.positions, dtype=long),
            mask=generalized_causal_mask(
                torch.tensor(self.doc), torch.tensor(self.split), torch.tensor(self.mode)
            ),
            is_gen=torch.tensor(self.is_gen),
            vit_patches=torch.cat([p for p, _, _ in self.vit]) if self.vit else torch.zeros(0, 1),
            vit_pos=torch.cat([q for _, q, _ in self.vit]) if self.vit else empty,
            vit_lens=[p.shape[0] for p, _, _ in self.vit],
            vit_index=torch.cat(vit_index) if vit_index else empty,
            latents=torch.cat([t for t, _, _, _ in self.lat]) if self.lat else torch.zeros(0, 1),
            latent_pos=torch.cat([q for _, q, _, _ in self.lat]) if self.lat else empty,
            latent_index=torch.cat(lat_index) if lat_index else empty,
            latent_image=torch.cat([torch.full((t.shape[0],), i) for i, (t, _, _, _) in enumerate(self.lat)])
            if self.lat
            else empty,
            image_noisy=torch.tensor([noisy for _, _, _, noisy in self.lat], dtype=torch.bool),
            ce_index=torch.tensor(self.ce_index, dtype=long),
            ce_labels=torch.tensor(self.ce_labels, dtype=long),
            ce_task=torch.tensor(self.ce_task, dtype=long),
            image_task=torch.tensor(self.image_task, dtype=long),
            tasks=tasks,
        )


def generalized_causal_mask(doc: torch.Tensor, split: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
    """(n, n) bool, True where query q may attend key k (official `prepare_attention_mask_per_sample`):
    same sample, and k <= q or both in one full/noise split, and k not in a noise split other than q's."""
    n = doc.shape[0]
    q, k = torch.arange(n).unsqueeze(1), torch.arange(n).unsqueeze(0)
    same_split = split.unsqueeze(1) == split.unsqueeze(0)
    bidirectional = same_split & (mode.unsqueeze(1) != CAUSAL)
    hidden_noise = (mode.unsqueeze(0) == NOISE) & ~same_split
    return (doc.unsqueeze(1) == doc.unsqueeze(0)) & ((k <= q) | bidirectional) & ~hidden_noise


def pack(
    plans: Iterator[Plan],
    tokenizer: BagelTokenizer,
    bank: ImageBank,
    settings: PackSettings,
    rng: random.Random,
) -> Packed:
    """Lay out plans from `plans` one after another until the next would pass `settings.max_tokens`.

    The plan that does not fit is kept for the next call (`plans` should be a `PlanQueue`)."""
    cfg = bank.cfg
    side = bank.size // cfg.latent_downsample
    latent_tokens = side * side
    vit_tokens = bank.vit(Scene())[0].shape[0]
    chosen, total = [], 0
    queue = plans if isinstance(plans, PlanQueue) else PlanQueue(plans)
    while True:
        plan = queue.peek()
        if plan is None:  # a finite list of plans ran out
            if not chosen:
                raise ValueError("no plans to pack")
            break
        need = plan_tokens(plan, latent_tokens, vit_tokens, tokenizer)
        if chosen and total + need > settings.max_tokens:
            break
        chosen.append(queue.pop())
        total += need
    return pack_plans(chosen, tokenizer, bank, settings, rng)


def pack_plans(
    plans: list[Plan], tokenizer: BagelTokenizer, bank: ImageBank, settings: PackSettings, rng: random.Random
) -> Packed:
    """These plans as one sequence, one after another (`settings.max_tokens` is not consulted): CFG
    dropout drawn from `rng`, latents of every VAE image encoded first in one `bank.prefetch`."""
    images = [item for plan in plans for item in plan.items if isinstance(item, Vae | Target)]
    bank.prefetch([bank.key(item.image, context=isinstance(item, Vae)) for item in images])
    builder = _Builder(tokenizer, bank)
    tasks: dict[str, int] = {}
    for plan in plans:
        builder.plan(plan.task, kept_items(plan, settings, rng))
        tasks[plan.task] = tasks.get(plan.task, 0) + 1
    return builder.build(tasks)


class PlanQueue:
    """An iterator of plans with one plan of look-ahead, so packing never wastes a drawn plan."""

    def __init__(self, plans: Iterator[Plan]):
        self._plans, self._next = plans, None

    def peek(self) -> Plan | None:
        if self._next is None:
            self._next = next(self._plans, None)
        return self._next

    def pop(self) -> Plan | None:
        plan = self.peek()
        self._next = None
        return plan
