"""The bundled model's tokenizer: a small byte-level BPE trained on the shapes world's own text.

The corpus is every kind of text the training plans and the inference tasks use (captions and their
paraphrases, questions and answers, edit instructions, indirect prompts and thoughts, motion prompts,
moves, both thinking system prompts), so each word of the world is one token and sequences stay short.

Not here: tokenizing training text (`data.py` uses `BagelTokenizer` on the written files).
"""

from __future__ import annotations

import random
from pathlib import Path

from .. import tiny
from ..shapes import (
    EDIT_KINDS,
    MOVES,
    describe,
    paraphrase,
    questions,
    sample_edit,
    sample_indirect,
    sample_motion,
    sample_scene,
)
from ..tasks import GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT

VOCAB_SIZE = 512  # 256 bytes + 5 markers + every merge the corpus offers (~490): each word is one token


def shapes_corpus(seed: int = 0, scenes: int = 400) -> list[str]:
    """Lines of shapes-world text, deterministic in `seed`."""
    rng = random.Random(seed)
    lines = [GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT, *MOVES, "nothing"]
    for _ in range(scenes):
        scene = sample_scene(rng)
        lines += [describe(scene), paraphrase(scene, rng)]
        lines += [f"{qa.question} {qa.answer}" for qa in questions(scene)]
        for kind in EDIT_KINDS:
            edit = sample_edit(scene, kind, rng)
            if edit is not None:
                lines.append(edit.instruction)
        motion = sample_motion(scene, rng)
        if motion is not None:
            lines.append(motion.instruction)
        indirect = sample_indirect(rng)
        lines += [indirect.prompt, indirect.thought]
    # The system prompts are long and fixed: repeat them so their words merge into single tokens too.
    return lines + [GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT] * (scenes // 4)


def write_tokenizer(folder: Path, vocab_size: int = VOCAB_SIZE, seed: int = 0) -> None:
    """tokenizer.json, vocab.json, merges.txt and tokenizer_config.json in Qwen2's formats, trained on
    `shapes_corpus(seed)` (`tiny.write_tokenizer` writes the files)."""
    tiny.write_tokenizer(Path(folder), vocab_size, corpus="\n".join(shapes_corpus(seed)))
