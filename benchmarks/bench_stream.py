"""Decoding speed with and without streaming the text, on the bundled model, in one process.

    python benchmarks/bench_stream.py [--repeats 50] [--device cpu] [--out bench_stream.json]

Streaming costs, after every token, decoding the ids since the text last ended whole (the callback's
payload, `engine.TextSoFar`) and printing the new part (`--stream`'s `cli.Stream`, here into memory). Each
repeat runs Understand (the answer about a drawn picture) and Think (a plan) once without a callback and
once streaming, in turn, the first mode alternating between repeats, so both modes see the same machine
load and neither always runs first; tokens/s is decoded tokens over the task's wall time (its prefill
included, as a user waits for it), summed over the repeats.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bagel_model  # noqa: E402
from bagel_model import bundled, cli, tasks  # noqa: E402
from bagel_model.sampling import T2I_SETTINGS, flow_settings  # noqa: E402

PICTURE = "a green triangle at the center, a yellow circle at the bottom right"
PLAN = "draw a shape with three corners in the color of the sky at the center"


def decoded_tokens(model: bagel_model.BagelModel, text: str) -> int:
    """The tokens decoding ran for `text`: its own and the closing <|im_end|>."""
    return len(model.tokenizer.encode(text)) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the numbers here as JSON")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    model = bagel_model.load(bundled.default_model_dir(), device=args.device)
    image = tasks.generate_images(model, PICTURE, settings=flow_settings(T2I_SETTINGS, steps=12)).images[0]
    question = "describe the image."
    runs = {
        "understand": lambda callback: tasks.understand(model, question, image=image, callback=callback),
        "think": lambda callback: tasks.think(model, PLAN, callback=callback),
    }
    totals = {(task, mode): [0, 0.0] for task in runs for mode in ("plain", "stream")}
    for task, run in runs.items():
        run(None)  # warm-up
        for repeat in range(args.repeats):
            for mode in ("plain", "stream")[:: 1 if repeat % 2 == 0 else -1]:
                stream = cli.Stream(io.StringIO()) if mode == "stream" else None
                start = time.perf_counter()
                text, _ = run(stream)
                if stream is not None:
                    stream.finish(text)
                seconds = time.perf_counter() - start
                totals[task, mode][0] += decoded_tokens(model, text)
                totals[task, mode][1] += seconds
    rows = []
    for task in runs:
        plain, streamed = (totals[task, m][0] / totals[task, m][1] for m in ("plain", "stream"))
        rows.append({"task": task, "tokens": totals[task, "plain"][0] // args.repeats,
                     "plain tok/s": round(plain, 1), "stream tok/s": round(streamed, 1),
                     "slowdown %": round(100 * (plain / streamed - 1), 1)})  # fmt: skip
    print(f"bundled model on {args.device}, {args.repeats} repeats")
    print(f"{'task':<12} {'tokens':>6} {'plain tok/s':>12} {'stream tok/s':>13} {'slowdown %':>11}")
    for row in rows:
        print(
            f"{row['task']:<12} {row['tokens']:>6} {row['plain tok/s']:>12} {row['stream tok/s']:>13} "
            f"{row['slowdown %']:>11}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "repeats": args.repeats, "rows": rows}))


if __name__ == "__main__":
    main()
