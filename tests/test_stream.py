"""Live text: decoding hands its callback the text so far, growing by prefixes up to the final answer (on
the bundled model, which writes real answers, and on the tiny random one, whose tokens are any bytes), the
reasoning loop hands it the transcript so far with a marker while a picture is drawn, and `--stream`
prints it as it comes while `--json` stays one object.
"""

from __future__ import annotations

import io
import json
import random

import pytest

import bagel_model
from bagel_model import BagelModel, bundled, cli, engine, reasoning, tasks
from bagel_model.reasoning import ZEBRA_COT, reason
from bagel_model.sampling import EDIT_SETTINGS, T2I_SETTINGS, flow_settings

QUESTION = "describe the image."
PLAN = "draw a shape with three corners in the color of the sky at the center"


@pytest.fixture(scope="module")
def model() -> BagelModel:
    return bagel_model.load(bundled.default_model_dir())


@pytest.fixture(scope="module")
def drawn(model):
    return tasks.generate_images(
        model, "a green triangle at the center", settings=flow_settings(T2I_SETTINGS, steps=12)
    ).images[0]


def texts_of(calls: list[tuple]) -> list[str]:
    return [payload for _, _, payload in calls if isinstance(payload, str)]


def assert_streams_to(texts: list[str], final: str) -> None:
    assert len(texts) > 1
    for before, after in zip(texts, texts[1:], strict=False):
        assert after.startswith(before), (before, after)
    assert all(final.startswith(text) for text in texts)
    assert texts[-1] == final


def test_understand_streams_growing_prefixes_ending_at_the_answer(model, drawn):
    calls = []
    answer, _ = tasks.understand(model, QUESTION, image=drawn, callback=lambda *c: calls.append(c))
    assert answer == "a green triangle at the center"
    assert_streams_to(texts_of(calls), answer)
    assert [step for step, _, _ in calls] == list(range(1, len(calls) + 1))  # still one call per token


def test_think_streams_growing_prefixes_ending_at_the_thought(model):
    calls = []
    thought, _ = tasks.think(model, PLAN, callback=lambda *c: calls.append(c))
    assert thought.startswith("<think>") and thought.endswith("a blue triangle at the center")
    assert_streams_to(texts_of(calls), thought)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_tokens_stream_as_prefixes(tiny_model, seed):
    """The tiny random model writes arbitrary token runs (bytes cut inside characters, markers mid-text):
    the text so far still only grows, and ends at the answer."""
    calls = []
    settings = tasks.TextSettings(max_new_tokens=40, do_sample=True, temperature=2.0)
    answer, _ = tasks.understand(
        tiny_model, QUESTION, settings=settings, seed=seed, callback=lambda *c: calls.append(c)
    )
    texts = texts_of(calls)
    assert len(texts) == len(calls) >= 1
    assert all(after.startswith(before) for before, after in zip(texts, texts[1:], strict=False))
    assert all(answer.startswith(text) for text in texts)
    # beyond the last text, at most a character the last token left broken
    assert answer.startswith(texts[-1]) and not answer[len(texts[-1]) :].strip("\ufffd")


@pytest.mark.parametrize("seed", range(4))
def test_text_so_far_equals_decoding_the_whole_run_at_every_token(model, seed):
    """The callback's text is decoded piecewise (only the ids since the text last ended whole): at every
    token it equals decoding the whole run as the answer is decoded, on runs of any ids: byte tokens that
    cut characters (also ones never completed), markers mid-text, emoji and CJK split across tokens."""
    tokenizer, rng = model.tokenizer, random.Random(seed)
    pieces = tokenizer.encode("日本語のテキスト 😀🎨 naïve café")
    pool = [lambda: rng.randrange(len(tokenizer)), lambda: rng.randrange(256), lambda: rng.choice(pieces)]
    ids = [rng.choice(pool)() for _ in range(300)]
    marker = [tokenizer.markers.bos, tokenizer.markers.eos][seed % 2]  # cuts the text from there on
    ids.insert(rng.randrange(150, 300), marker)
    so_far = engine.TextSoFar(model)
    for n, token_id in enumerate(ids, start=1):
        expected = engine._text_of(model, [tokenizer.markers.bos, *ids[:n]]).rstrip(engine.PARTIAL_CHARACTER)
        assert so_far.add(token_id) == expected, (n, ids[:n])


def test_reason_streams_the_transcript_with_a_marker_while_drawing(model, drawn, monkeypatch):
    """Zebra-CoT: every segment without a final answer asks for a picture, so one round draws one picture
    between two segments. The segments are scripted (the bundled model writes nothing after a picture),
    each reported token by token as decoding does; the picture is drawn for real."""
    segments = ["it is at", "Final Answer: the center"]

    def decode(model, history, settings, seed=0, callback=None):
        words = segments.pop(0).split(" ")
        for n in range(1, len(words) + 1):
            callback(n, 8, " ".join(words[:n]))
        return engine.Answer(" ".join(words), engine.STOP_END)

    monkeypatch.setattr(reasoning, "decode_text", decode)
    calls = []
    settings = flow_settings(EDIT_SETTINGS, steps=4)
    out = reason(
        model, "where is it?", image=drawn, protocol=ZEBRA_COT, max_rounds=1, flow_settings=settings,
        callback=lambda *c: calls.append(c),
    )  # fmt: skip
    assert len(out.images) == 1
    assert out.transcript == "it is at\n[image 1]\nFinal Answer: the center"
    assert [c[2] for c in calls[:4]] == ["it", "it is", "it is at", "it is at\n[drawing image 1]"]
    assert calls[3][:2] == (0, 3)  # step 0 of the picture's 3 evaluated steps
    assert [(step, isinstance(payload, str)) for step, _, payload in calls[4:7]] == [
        (1, False),
        (2, False),
        (3, False),
    ]
    assert_streams_to(texts_of(calls[7:]), out.transcript)
    assert texts_of(calls[7:])[0] == "it is at\n[image 1]\nFinal"


def test_stream_prints_new_parts_and_a_changed_line_again():
    out = io.StringIO()
    stream = cli.Stream(out)
    for text in ["a", "a b", "a b\n[drawing image 1]", "a b\n[image 1]\nc", "a b\n[image 1]\nc d"]:
        stream(1, 9, text)
    stream(1, 9, object())  # a denoising step's latent: nothing to print
    stream.finish("a b\n[image 1]\nc d e")
    assert out.getvalue() == "a b\n[drawing image 1]\n[image 1]\nc d e\n"


def _cli(capsys, *argv) -> tuple[str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out, err


def test_cli_understand_stream_prints_the_answer_as_it_comes(capsys, monkeypatch):
    printed = []
    real = cli.Stream._show

    def show(self, text):
        printed.append(text)
        real(self, text)

    monkeypatch.setattr(cli.Stream, "_show", show)
    out, _ = _cli(capsys, "understand", "--prompt", PLAN, "--think", "--stream", "--device", "cpu")
    (answer_line,) = [line for line in out.splitlines() if line.startswith("text: ")]
    answer = answer_line.removeprefix("text: ")
    assert out == f"{answer}\ntext: {answer}\nstop: end\n"
    assert len(printed) > 5 and printed[-1] == answer  # token by token, then the final text


def test_cli_json_is_unchanged_by_stream(capsys):
    args = ["understand", "--prompt", PLAN, "--think", "--device", "cpu", "--json"]
    plain, _ = _cli(capsys, *args)
    streamed, err = _cli(capsys, *args, "--stream")
    assert streamed == plain and json.loads(plain)["stop"] == "end"
    assert err == json.loads(plain)["text"] + "\n"  # the stream went to stderr
