"""LoRA training on the bundled model, measured: teach it a word or an edit it does not know.

1. Writes a data folder in the `train-lora` layout from the shapes world, `--examples` of each concept in
   `--concepts`: captions that call blue "azure" (`name.png` + `name.txt`), and edits (`name_src.png` +
   `name_tgt.png` + `name.txt`) "mirror the picture", "paint everything <color>" and "turn the <shape>
   into a <shape>"; with `--preserve N`, N of each kind of what the model already does (prior
   preservation).
2. Trains a LoRA with `python -m bagel_model train-lora` settings (library call, same code).
3. Scores held-out cases (scenes from another seed) of every concept before and after, with the shapes
   scorer (the read image equals the asked scene); with `--old-rows`, the capability table of the adapted
   model too (`bench-shapes` rows), to compare with the base model's card.

    python benchmarks/bench_lora.py --out runs/lora_azure --concepts azure --preserve 40 --steps 3000 \
        --targets gen --timestep-shift 3 [--n 50] [--old-rows]

Writes `<out>/data/`, `<out>/adapter/` and `<out>/report.json`; prints the table."""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bagel_model import lora  # noqa: E402
from bagel_model.bundled import default_model_dir  # noqa: E402
from bagel_model.checkpoint import load  # noqa: E402
from bagel_model.shapes import (  # noqa: E402
    COLORS,
    EDIT_KINDS,
    SHAPES,
    Obj,
    Scene,
    describe,
    legal_moves,
    move_window,
    questions,
    read_scene,
    render,
    sample_edit,
    sample_motion,
    sample_scene,
    sample_world,
    shape_is_unique,
    view,
)
from bagel_model.tasks import edit_images, generate_images  # noqa: E402
from bagel_model.training.evaluate import CAPABILITIES, TABLE, evaluate  # noqa: E402
from bagel_model.training.finetune import LoraSettings, train_lora  # noqa: E402
from bagel_model.training.folder import read_folder  # noqa: E402

WORD, COLOR = "azure", "blue"
MIRROR = "mirror the picture"
PAINT = "paint everything"
_SWAP = {"left": "right", "right": "left"}


def mirrored(scene: Scene) -> Scene:
    """Left and right columns swapped."""

    def cell(name: str) -> str:
        words = name.split()
        return " ".join(_SWAP.get(w, w) for w in words)

    return Scene(tuple(Obj(o.color, o.shape, cell(o.cell)) for o in scene.objects))


def azure_scene(rng: random.Random) -> Scene:
    """1-3 objects, at least one of them blue."""
    while True:
        count = rng.choice((1, 2, 3))
        scene = sample_scene(rng, count, count)
        if any(o.color == COLOR for o in scene.objects):
            return scene


def mirror_scene(rng: random.Random) -> Scene:
    """A scene that mirroring changes."""
    while True:
        scene = sample_scene(rng)
        if mirrored(scene) != scene:
            return scene


def paint_case(rng: random.Random) -> tuple[Scene, str, Scene]:
    """A scene of 2-3 objects, "paint everything <color>" and the scene with every object that color."""
    while True:
        count = rng.choice((2, 3))
        scene = sample_scene(rng, count, count)
        color = rng.choice(list(COLORS))
        after = Scene(tuple(Obj(color, o.shape, o.cell) for o in scene.objects))
        if after != scene:
            return scene, f"{PAINT} {color}", after


def reshape_case(rng: random.Random) -> tuple[Scene, str, Scene]:
    """ "turn the <shape> into a <other shape>": the world's edits change color, place and presence, never
    shape; the object named by its (unique) shape changes shape in place, the others stay."""
    while True:
        scene = sample_scene(rng)
        named = [o for o in scene.objects if shape_is_unique(scene, o)]
        if named:
            obj = rng.choice(named)
            new = rng.choice([s for s in SHAPES if s != obj.shape])
            after = scene.replace(obj, Obj(obj.color, new, obj.cell))
            return scene, f"turn the {obj.shape} into a {new}", after


def caption(scene: Scene) -> str:
    return describe(scene).replace(COLOR, WORD)


CONCEPTS = ("azure", "mirror", "paint", "reshape")


def write_data(folder: Path, concepts: list[str], n: int, size: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        scene = azure_scene(rng)
        if "azure" in concepts:
            render(scene, size).save(folder / f"azure_{i:03d}.png")
            (folder / f"azure_{i:03d}.txt").write_text(caption(scene))
        scene = mirror_scene(rng)
        if "mirror" in concepts:
            render(scene, size).save(folder / f"mirror_{i:03d}_src.png")
            render(mirrored(scene), size).save(folder / f"mirror_{i:03d}_tgt.png")
            (folder / f"mirror_{i:03d}.txt").write_text(MIRROR)
        before, instruction, after = paint_case(rng)
        if "paint" in concepts:
            render(before, size).save(folder / f"paint_{i:03d}_src.png")
            render(after, size).save(folder / f"paint_{i:03d}_tgt.png")
            (folder / f"paint_{i:03d}.txt").write_text(instruction)
        before, instruction, after = reshape_case(rng)
        if "reshape" in concepts:
            _pair(folder, f"reshape_{i:03d}", before, after, instruction, size)


def _pair(folder: Path, stem: str, before: Scene, after: Scene, text: str, size: int) -> None:
    render(before, size).save(folder / f"{stem}_src.png")
    render(after, size).save(folder / f"{stem}_tgt.png")
    (folder / f"{stem}.txt").write_text(text)


def write_preservation(folder: Path, n: int, size: int, seed: int, answers: bool) -> None:
    """Prior preservation (kohya's regularization images): n each of what the model already does, drawn by
    the world: an ordinary edit, a recolor, a caption, a question, a motion step and a navigation move (one
    frame after another is laid out as an edit), so that an adapter for one instruction learns that
    instruction rather than "always do this" to every picture it draws."""
    rng = random.Random(seed)
    for i in range(n):
        edit = None
        while edit is None:
            edit = sample_edit(sample_scene(rng), rng.choice(EDIT_KINDS), rng)
        _pair(folder, f"keep_edit_{i:03d}", edit.before, edit.after, edit.instruction, size)
        recolor = None  # the instruction closest to painting everything: recolor one object
        while recolor is None:
            recolor = sample_edit(sample_scene(rng), "recolor", rng)
        _pair(folder, f"keep_recolor_{i:03d}", recolor.before, recolor.after, recolor.instruction, size)
        scene = sample_scene(rng)
        render(scene, size).save(folder / f"keep_{i:03d}.png")
        (folder / f"keep_{i:03d}.txt").write_text(describe(scene))
        motion = None
        while motion is None:
            motion = sample_motion(sample_scene(rng), rng)
        _pair(folder, f"keep_motion_{i:03d}", motion.frames[0], motion.frames[1], motion.instruction, size)
        scene = sample_scene(rng)
        qa = rng.choice(questions(scene))
        if answers:  # only an adapter of the understanding expert learns from answers
            render(scene, size).save(folder / f"keep_qa_{i:03d}.png")
            text = json.dumps({"question": qa.question, "answer": qa.answer})
            (folder / f"keep_qa_{i:03d}.qa.json").write_text(text)
        world, window = sample_world(rng), (rng.randint(0, 2), rng.randint(0, 2))
        move = rng.choice(legal_moves(window))
        _pair(
            folder,
            f"keep_move_{i:03d}",
            view(world, window),
            view(world, move_window(window, move)),
            move,
            size,
        )


def new_rows(model, n: int, size: int, seed: int) -> dict[str, float]:
    """Held-out accuracy of the two new capabilities (n cases each)."""
    rng = random.Random(seed)
    right = dict.fromkeys(CONCEPTS, 0)
    for i in range(n):
        scene = azure_scene(rng)
        image = generate_images(model, caption(scene), seed=i).images[0]
        right["azure"] += read_scene(image) == scene
        scene = mirror_scene(rng)
        image = edit_images(model, [render(scene, size)], MIRROR, seed=i).images[0]
        right["mirror"] += read_scene(image) == mirrored(scene)
        before, instruction, after = paint_case(rng)
        image = edit_images(model, [render(before, size)], instruction, seed=i).images[0]
        right["paint"] += read_scene(image) == after
        before, instruction, after = reshape_case(rng)
        image = edit_images(model, [render(before, size)], instruction, seed=i).images[0]
        right["reshape"] += read_scene(image) == after
    return {k: v / n for k, v in right.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--examples", type=int, default=40, help="training examples of each kind")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all")
    p.add_argument(
        "--concepts", default="azure,mirror", help="what the data folder teaches (comma-separated)"
    )
    p.add_argument(
        "--preserve", type=int, default=0, help="ordinary edits and captions added (prior preservation)"
    )
    p.add_argument("--timestep-shift", type=float, default=LoraSettings.timestep_shift)
    p.add_argument("--batch", type=int, default=LoraSettings.batch)
    p.add_argument("--n", type=int, default=50, help="held-out cases per row")
    p.add_argument("--old-rows", action="store_true", help="also the capability table of the adapted model")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = load(default_model_dir())
    size = model.config.inference.default_height
    data = args.out / "data"
    shutil.rmtree(data, ignore_errors=True)  # a folder of an earlier run would add its examples
    write_data(data, args.concepts.split(","), args.examples, size, seed=1)
    write_preservation(data, args.preserve, size, seed=2, answers=args.targets != "gen")
    examples = read_folder(data, model.config)
    report: dict = {"examples": examples.counts, "n": args.n}

    report["before"] = new_rows(model, args.n, size, seed=20_000)
    print("before:", report["before"], flush=True)
    settings = LoraSettings(
        steps=args.steps, lr=args.lr, rank=args.rank, targets=args.targets,
        timestep_shift=args.timestep_shift, batch=args.batch,
        gradient_checkpointing=False,
    )  # fmt: skip
    start = time.monotonic()

    def log(r) -> None:
        if r.step % 100 == 0:
            print(f"step {r.step} loss {r.loss:.4f} {r.seconds:.0f} s", flush=True)

    done = train_lora(model, examples, args.out / "adapter", settings, callback=log)
    report["train_seconds"] = time.monotonic() - start
    report["settings"] = vars(settings) | {"steps": done.steps}
    adapted = lora.apply(model, lora.read(done.adapter))
    report["after"] = new_rows(adapted, args.n, size, seed=20_000)
    print("after:", report["after"], flush=True)
    if args.old_rows:
        wanted = CAPABILITIES
        report["old_rows_after"] = evaluate(adapted, n=args.n, capabilities=wanted, log=print)
        report["old_rows_labels"] = {k: TABLE[k][0] for k in wanted}
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
