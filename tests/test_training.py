"""Training: packing (mask, RoPE ids, CFG dropout), both losses going down on a very small model, and the
trainer's checkpoints loading through `bagel_model.load` and resuming from their step.

Everything runs on a toy config (decoder 32 wide, 1 layer) with a random frozen autoencoder: the latent
space only has to be a fixed function of the image for these checks.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import bagel_model
from bagel_model.bundled import default_model_dir
from bagel_model.config import LLMConfig, ViTConfig
from bagel_model.layers.vae import AutoEncoder
from bagel_model.model import Bagel
from bagel_model.shapes import Obj, Scene, questions, render
from bagel_model.tokenizer import BagelTokenizer
from bagel_model.training.autoencoder import TINY_AE, AESettings, train_autoencoder
from bagel_model.training.data import (
    ImageBank,
    PackSettings,
    Plan,
    PlanSettings,
    Target,
    Text,
    Vae,
    Vit,
    chain_plan,
    edit_plan,
    motion_plan,
    pack,
    plan_stream,
    understand_plan,
)
from bagel_model.training.losses import objective, sample_timesteps
from bagel_model.training.recipe import MIX, TOKENIZER_FILES, Recipe, bundled_config, run
from bagel_model.training.trainer import Trainer, TrainSettings, init_weights, latest_checkpoint
from bagel_model.training.vocab import write_tokenizer

RED_CIRCLE = Scene((Obj("red", "circle", "top left"),))
BLUE_SQUARE = Scene((Obj("blue", "square", "center"),))
NO_DROP = PackSettings(text_drop=0.0, vit_drop=0.0, vae_drop=0.0)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes_tokenizer")
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tok_dir) -> BagelTokenizer:
    return BagelTokenizer(tok_dir)


@pytest.fixture(scope="module")
def cfg():
    base = bundled_config()
    return replace(
        base,
        llm=LLMConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=base.llm.vocab_size,
            max_position_embeddings=4096,
        ),
        vit=ViTConfig(32, 64, num_hidden_layers=1, num_attention_heads=2, patch_size=16, image_size=48),
    )


@pytest.fixture(scope="module")
def ae(cfg) -> AutoEncoder:
    torch.manual_seed(0)
    return AutoEncoder(cfg.vae).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def bank(ae, cfg) -> ImageBank:
    return ImageBank(ae, cfg)


def _pack(plans, tokenizer, bank, settings=NO_DROP, seed=0):
    return pack(iter(plans), tokenizer, bank, settings, random.Random(seed))


# -- packing ---------------------------------------------------------------------------------------------


def test_rope_ids_follow_the_official_rules(tokenizer, bank):
    """Text counts up; an image sits at one id (markers included); a clean image advances by 1; a target
    does not advance; ids restart at 0 for the next sample."""
    plans = [
        Plan(
            "edit", (Vae(RED_CIRCLE), Vit(RED_CIRCLE), Text("make the circle green"), Target(BLUE_SQUARE, 2))
        ),
        Plan("t2i", (Text("a red circle at the top left"), Target(RED_CIRCLE))),
    ]
    b = _pack(plans, tokenizer, bank, replace(NO_DROP, max_tokens=10_000))
    pos = b.positions.tolist()
    n_instr = len(tokenizer.segment("make the circle green"))
    n_cap = len(tokenizer.segment("a red circle at the top left"))
    expected = (
        [0] * 11  # VAE image: markers + 9 latent tokens (48 px: one per grid cell)
        + [1] * 11  # ViT image: markers + 9 patches
        + list(range(2, 2 + n_instr))
        + [2 + n_instr] * 22  # two copies of the target, at the same id, after the text
        + list(range(n_cap))  # the next sample starts again at 0
        + [n_cap] * 11
    )
    assert pos == expected
    gen = b.is_gen.tolist()
    assert gen[:11] == [False] + [True] * 9 + [False]  # markers use the understanding expert
    assert not any(gen[11 : 22 + n_instr])


def test_dropped_images_still_advance_rope_and_dropped_text_does_not(tokenizer, bank):
    condition = (Vae(RED_CIRCLE, cfg=True), Vit(RED_CIRCLE, cfg=True), Text("remove the circle", cfg=True))
    plan = Plan("edit", (*condition, Target(BLUE_SQUARE)))
    images_dropped = _pack([plan], tokenizer, bank, PackSettings(text_drop=0.0, vit_drop=1.0, vae_drop=1.0))
    n = len(tokenizer.segment("remove the circle"))
    assert images_dropped.positions.tolist() == list(range(2, 2 + n)) + [2 + n] * 11
    text_dropped = _pack([plan], tokenizer, bank, PackSettings(text_drop=1.0, vit_drop=0.0, vae_drop=0.0))
    assert text_dropped.positions.tolist() == [0] * 11 + [1] * 11 + [2] * 11


def test_think_instruction_and_thought_drop_together(tokenizer, bank):
    items = (Text("system"), Text("draw", cfg=True, group=0), Text("plan", loss=True, cfg=True, group=0))
    plan = Plan("think", (*items, Target(RED_CIRCLE)))
    lengths = {_pack([plan], tokenizer, bank, PackSettings(text_drop=0.5), seed=s).length for s in range(40)}
    system, draw, thought = (len(tokenizer.segment(t)) for t in ("system", "draw", "plan"))
    assert lengths == {system + 11, system + draw + thought + 11}


def test_mask_hides_noisy_targets_from_later_tokens(tokenizer, bank):
    """Generalized causal: text is causal; each image is bidirectional and sees what came before; a noisy
    target is seen by nothing after it (not even the next copy); samples never see each other."""
    prompt = Text("the red circle moves right")
    plans = [
        Plan(
            "motion",
            (Vae(RED_CIRCLE), prompt, Target(BLUE_SQUARE, 2), Vae(BLUE_SQUARE), prompt, Target(BLUE_SQUARE)),
        ),
        Plan("understand", (Vit(RED_CIRCLE), Text("how many shapes are there?"), Text("1", loss=True))),
    ]
    b = _pack(plans, tokenizer, bank, replace(NO_DROP, max_tokens=10_000))
    m, n = b.mask, b.length
    n_text = len(tokenizer.segment("the red circle moves right"))
    image = 11  # markers + 9 latent tokens
    vae0 = range(0, image)
    text0 = range(image, image + n_text)
    t1, t2 = range(text0.stop, text0.stop + image), range(text0.stop + image, text0.stop + 2 * image)
    vae1 = range(t2.stop, t2.stop + image)
    text1 = range(vae1.stop, vae1.stop + n_text)
    t3 = range(text1.stop, text1.stop + image)
    second = range(t3.stop, n)

    def block(rows, cols):
        return m[rows.start : rows.stop, cols.start : cols.stop]

    assert block(vae0, vae0).all()  # an image is bidirectional
    assert block(text0, text0).equal(torch.ones(n_text, n_text, dtype=torch.bool).tril())  # text is causal
    assert block(text0, vae0).all() and not block(vae0, text0).any()
    assert block(t1, t1).all() and block(t1, text0).all() and block(t1, vae0).all()
    assert not block(t2, t1).any()  # a second copy does not see the first
    for later in (t2, vae1, text1, t3, second):
        assert not block(later, t1).any()  # no one after a target sees it
    assert block(t3, vae1).all() and block(t3, text1).all() and block(t3, vae0).all()
    assert not block(second, range(0, t3.stop)).any() and not block(range(0, t3.stop), second).any()
    assert m.diagonal().all()


def test_ce_labels_are_the_next_tokens_ending_with_im_end(tokenizer, bank):
    plan = Plan("understand", (Vit(RED_CIRCLE), Text("what color is the circle?"), Text("red", loss=True)))
    b = _pack([plan], tokenizer, bank)
    seg = tokenizer.segment("red")
    assert b.ce_labels.tolist() == seg[1:]
    assert b.ids[b.ce_index].tolist() == seg[:-1]
    assert seg[-1] == tokenizer.markers.eos


def test_understanding_plans_ask_distinct_kinds_about_one_image():
    rng = random.Random(3)
    for _ in range(20):
        plan = understand_plan(rng, PlanSettings(questions_per_image=3))
        vit, *turns = plan.items
        scene = vit.image
        asked = [t.text for t in turns[0::2]]
        answers = {qa.question: qa.answer for qa in questions(scene)}
        assert len(set(asked)) == len(asked) >= 2  # every scene offers at least count, shape and describe
        assert [t.text for t in turns[1::2]] == [answers[q] for q in asked]
        assert [t.loss for t in turns] == [False, True] * len(asked)


def test_chain_plans_edit_the_latest_picture_of_a_text_to_image_context():
    """Text to Image -> Edit -> Edit -> Edit: caption, target, then per edit the latest picture (VAE, ViT),
    the instruction and the edited target; every picture is the previous target."""
    rng = random.Random(4)
    for _ in range(30):
        items = chain_plan(rng, PlanSettings()).items
        caption, first, *rest = items
        assert isinstance(caption, Text) and isinstance(first, Target)
        edits = len(rest) // 4
        assert 2 <= edits <= 3 and len(rest) == 4 * edits
        previous = first.image
        for k in range(edits):
            vae, vit, instruction, target = rest[4 * k : 4 * k + 4]
            assert isinstance(vae, Vae) and isinstance(vit, Vit) and isinstance(instruction, Text)
            assert vae.image == vit.image == previous and isinstance(target, Target)
            previous = target.image


def test_edit_kinds_follow_their_weights_and_sequences_sometimes_start_from_a_caption():
    rng = random.Random(5)
    # recolor, recolor_shared, move, add, remove: a shared-shape recolor is drawn as often as its weight
    # says although only a third of scenes allow one, since the plan redraws the scene, not the kind.
    settings = PlanSettings(edit_kinds=(0.1, 0.6, 0.1, 0.1, 0.1), caption_p=0.5)
    words = [edit_plan(rng, settings).items[2].text.split() for _ in range(400)]
    shared = [w for w in words if w[0] == "make" and len(w) == 5]  # make the <color> <shape> <color>
    assert 0.5 < len(shared) / len(words) < 0.7
    assert 0.05 < sum(w[0] == "make" and len(w) == 4 for w in words) / len(words) < 0.15
    firsts = [type(motion_plan(rng, settings).items[0]) for _ in range(400)]
    assert 0.4 < firsts.count(Text) / len(firsts) < 0.6
    assert set(firsts) == {Text, Vae}


def test_timesteps_are_shifted_sigmoid_normals():
    g = torch.Generator().manual_seed(0)
    t1 = sample_timesteps(20_000, 1.0, g)
    assert 0 < t1.min() and t1.max() < 1 and abs(float(t1.median()) - 0.5) < 0.02
    g = torch.Generator().manual_seed(0)
    t3 = sample_timesteps(20_000, 3.0, g)
    assert torch.allclose(t3, 3 * t1 / (1 + 2 * t1))


# -- training --------------------------------------------------------------------------------------------


def _net(cfg, seed=0):
    net = Bagel(cfg)
    init_weights(net, torch.Generator().manual_seed(seed))
    return net


def _batches(tokenizer, bank, count, seed=0):
    rng = random.Random(seed)
    plans = plan_stream(rng, MIX, PlanSettings())
    return [pack(plans, tokenizer, bank, replace(PackSettings(), max_tokens=300), rng) for _ in range(count)]


def _losses(net, batches):
    """Mean CE and MSE over the batches that have each, at fixed flow times and noise."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        outs = [(objective(net, b, generator=g), b) for b in batches]
    ce = [float(o.ce) for o, b in outs if b.ce_index.numel()]
    mse = [float(o.mse) for o, b in outs if b.image_noisy.any()]
    return sum(ce) / len(ce), sum(mse) / len(mse)


def test_a_short_run_lowers_both_losses(cfg, ae, bank, tokenizer, tok_dir):
    torch.manual_seed(0)
    batches = _batches(tokenizer, bank, 3)
    net = _net(cfg)
    trainer = Trainer(
        net, ae, cfg, tok_dir, TrainSettings(lr=1e-2, warmup_steps=5, seconds=1e9, max_steps=36)
    )
    ce0, mse0 = _losses(net, batches)
    for step in range(36):
        trainer.train_step(batches[step % len(batches)])
    ce1, mse1 = _losses(net, batches)
    assert ce1 < 0.6 * ce0, (ce0, ce1)
    assert mse1 < 0.9 * mse0, (mse0, mse1)


def test_checkpoint_loads_and_runs_a_task_and_resume_continues(cfg, ae, bank, tokenizer, tok_dir, tmp_path):
    batches = _batches(tokenizer, bank, 2, seed=1)
    settings = TrainSettings(warmup_steps=2, seconds=1e9, max_steps=100)
    trainer = Trainer(_net(cfg), ae, cfg, tok_dir, settings, seed=5)
    for b in batches:
        trainer.train_step(b)
    folder = trainer.save_checkpoint(tmp_path / "ckpt", {"marker": 7})
    assert latest_checkpoint(tmp_path / "ckpt") == folder and folder.name == "0000002"

    model = bagel_model.load(folder)
    for name, p in trainer.ema.state_dict().items():
        assert torch.equal(model.net.state_dict()[name], p), name
    answer, _ = bagel_model.understand(
        model, "how many shapes are there?", image=render(RED_CIRCLE), settings=bagel_model.TextSettings(8)
    )
    assert isinstance(answer, str)
    few_steps = replace(bagel_model.T2I_SETTINGS, num_steps=3)
    image = bagel_model.generate_images(model, "a red circle at the top left", settings=few_steps).images[0]
    assert image.size == (48, 48)

    fresh = Trainer(_net(cfg, seed=9), ae, cfg, tok_dir, settings, seed=0)
    assert fresh.resume(tmp_path / "ckpt") == {"marker": 7}
    assert fresh.step == 2
    for (name, a), b in zip(trainer.net.state_dict().items(), fresh.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert fresh.generator.get_state().equal(trainer.generator.get_state())
    row_a, row_b = trainer.train_step(batches[0]), fresh.train_step(batches[0])
    assert row_b["step"] == 3 and row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-5)


def test_autoencoder_training_runs_and_freezes():
    small = replace(TINY_AE)
    ae, cfg = train_autoencoder(small, AESettings(max_steps=2, batch=2), log=lambda _: None)
    assert not any(p.requires_grad for p in ae.parameters())
    assert cfg.scale_factor > 0 and ae.cfg == cfg
    assert ae.encode(torch.zeros(1, 3, 48, 48)).shape == (1, 16, 6, 6)


def test_the_vit_is_frozen_at_first_then_trained(cfg, ae, bank, tokenizer, tok_dir):
    batch = _batches(tokenizer, bank, 1, seed=2)[0]
    settings = TrainSettings(warmup_steps=1, seconds=1e9, max_steps=4, vit_frozen_fraction=0.5)
    trainer = Trainer(_net(cfg), ae, cfg, tok_dir, settings)
    vit0 = [p.clone() for p in trainer.net.vit_model.parameters()]
    head0 = trainer.net.connector.fc1.weight.clone()
    trainer.train_step(batch)
    trainer.train_step(batch)
    assert all(torch.equal(a, b) for a, b in zip(vit0, trainer.net.vit_model.parameters(), strict=True))
    assert not torch.equal(head0, trainer.net.connector.fc1.weight)  # the connector learns from the start
    trainer.train_step(batch)  # progress 2/4: the ViT now trains
    assert not all(torch.equal(a, b) for a, b in zip(vit0, trainer.net.vit_model.parameters(), strict=True))


def test_a_warm_start_continues_the_init_model_with_its_tokenizer_and_autoencoder(tmp_path):
    """`--init DIR --init-ae`: the token ids and the latent space stay those the weights were trained on,
    so the first steps already have the trained model's loss (a network from scratch starts above 6: CE
    over 512 tokens, plus a flow MSE near 1)."""
    init = default_model_dir()
    steps = TrainSettings(max_steps=10)
    recipe = Recipe(minutes=5.0, eval_n=0, init=init, init_ae=True, init_lr=1e-5, train=steps)
    model = run(tmp_path, recipe)
    for name in ("ae.safetensors", *TOKENIZER_FILES):
        assert (model / name).read_bytes() == (init / name).read_bytes(), name
    (first,) = json.loads((tmp_path / "history.json").read_text())
    assert first["step"] == 10 and first["loss"] < 0.5
