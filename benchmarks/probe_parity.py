"""Our forward passes against the official code's, tensor by tensor, on the official probe's own inputs.

    python benchmarks/probe_parity.py PROBE.safetensors [--model DIR]

PROBE comes from `official_runner.py forward` (README_official.md §4 defines every tensor). We feed the
probe's inputs (ViT pixels and position ids, x_t, the VAE input) to our modules, so resizing and
tokenization are checked separately, and print the relative error of each output: ViT embeddings,
next-token logits after [ViT image, prompt], velocity with and without a text context, VAE latent and
decode. Measured on the official tiny checkpoint: every error <= 2e-6 (fp32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bagel_model import load  # noqa: E402
from bagel_model.context import Context, History, Segment  # noqa: E402
from bagel_model.layers.decoder import Routing  # noqa: E402
from bagel_model.model import Query  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_tiny" / "model"


def rel(ours: torch.Tensor, official: torch.Tensor) -> float:
    return float((ours.float() - official.float()).norm() / official.float().norm())


def run(m, history: History, query: Query):
    """One pass of `query` after `history`: (hidden states, the query's K/V)."""
    cache = m.net.new_cache(query.length, history.kvs())
    return m.run([query], [history.rope], [cache]), cache.new_kv()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    args = parser.parse_args()
    p = load_file(args.probe)
    m = load(args.model)
    markers = m.tokenizer.markers

    vit = m.net.embed_vit(p["vit_pixels"], p["vit_position_ids"], [p["vit_pixels"].shape[0]])
    print(f"vit_embeds          rel {rel(vit, p['vit_embeds']):.2e}")
    frame = m.image_frame(4, 4)  # the probe's 64x64 target
    image = Query(
        torch.cat([frame.markers[:1], vit, frame.markers[1:]]),
        torch.zeros(vit.shape[0] + 2, dtype=torch.long),
        Routing(),  # ViT tokens: the understanding expert throughout
        causal=False,
    )
    _, kv = run(m, History(), image)
    history = History().then(Segment(kind="vit", kv=kv), 1)
    prompt = m.text_query("describe the image.")
    _, kv = run(m, history, prompt)
    history = history.then(Segment(kind="text", kv=kv), prompt.length)
    assert [history.tokens, history.rope] == p["und_context_len"].tolist(), "context layout differs"
    hidden, _ = run(m, history, m.token_query(markers.bos))
    print(f"und_logits          rel {rel(m.net.logits(hidden[-1]), p['und_logits']):.2e}")

    query = m.latent_query(frame, p["x_t"], 0.7)
    text = Context.empty(m).append_text("a red circle at the top left").cond
    for name, hist in (("gen_velocity", text), ("gen_velocity_empty", History())):
        hidden, _ = run(m, hist, query)
        print(f"{name:<19} rel {rel(m.net.velocity(hidden[1:-1]), p[name]):.2e}")

    print(f"vae_latent          rel {rel(m.vae.encode(p['vae_input']), p['vae_latent']):.2e}")
    print(f"vae_decoded         rel {rel(m.vae.decode(p['vae_latent']), p['vae_decoded']):.2e}")


if __name__ == "__main__":
    main()
