"""The Qwen2 BPE tokenizer from a model folder, plus BAGEL's four markers resolved by name.

BAGEL has no chat template: every text segment is `<|im_start|>` + BPE(text) + `<|im_end|>`, every image
segment is wrapped in `<|vision_start|>` ... `<|vision_end|>`. The marker ids differ between checkpoints
(151644.. in Qwen2.5, small numbers in tiny models), so they are looked up by name, never hard-coded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

MARKERS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
_SURROGATE = re.compile("[\ud800-\udfff]")


class TokenizerError(ValueError):
    """The model folder's tokenizer is missing or lacks a BAGEL marker."""


@dataclass(frozen=True)
class MarkerIds:
    bos: int  # <|im_start|>: opens a text segment, and starts decoding
    eos: int  # <|im_end|>: closes a text segment, and stops decoding
    start_of_image: int
    end_of_image: int


class BagelTokenizer:
    def __init__(self, folder: Path):
        self._tok = _load_tokenizer(Path(folder))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        missing = [m for m in MARKERS if m not in vocab]
        if missing:
            raise TokenizerError(
                f"the tokenizer in {folder} lacks the BAGEL marker token(s) {', '.join(missing)}"
            )
        self.markers = MarkerIds(*(vocab[m] for m in MARKERS))

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """BPE ids of plain text, with no BOS/EOS of the tokenizer's own."""
        check_text(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def segment(self, text: str) -> list[int]:
        """The ids of one BAGEL text segment."""
        return [self.markers.bos, *self.encode(text), self.markers.eos]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def check_text(text: str, what: str = "the text") -> str:
    """`text` if it can be tokenized. JSON (ComfyUI's API) can carry half of a UTF-16 surrogate pair, as
    "\\ud800" alone; Python keeps it in a str, but it is no Unicode character and the tokenizer fails on
    it with an opaque `TypeError: TextInputSequence must be str`, so it is refused here by name and place."""
    if bad := _SURROGATE.search(text):
        raise ValueError(
            f"{what} has a lone UTF-16 surrogate U+{ord(bad.group()):04X} at character {bad.start() + 1}, "
            "which is not a character (half of an emoji or of another character beyond U+FFFF, cut by "
            "whatever wrote the text): delete it or retype that character"
        )
    return text


def _load_tokenizer(folder: Path) -> Tokenizer:
    """`tokenizer.json` straight through `tokenizers`, the library behind transformers' fast tokenizers: the
    same ids and text, without transformers' import (1.5-3 s, a third of a small CPU run's overhead). A
    folder with only vocab.json + merges.txt is converted by transformers, which then has to be imported."""
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), use_fast=True).backend_tokenizer
    raise TokenizerError(f"{folder} has no tokenizer (expected tokenizer.json, or vocab.json and merges.txt)")
