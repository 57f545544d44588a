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
from bagel_model.context import (  # noqa: E402  # noqa: E402
    Context,
    History,
    Query,
    Segment,
    image_routing,
    latent_positions,
    run_query,
    text_query,
)
from bagel_model.layers.decoder import Routing  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_tiny" / "model"


def rel(ours: torch.Tensor, official: torch.Tensor) -> float:
    return float((ours.float() - official.float()).norm() / official.float().norm())


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    args = parser.parse_args()
    p = load_file(args.probe)
    m = load(args.model)
    markers = m.tokenizer.markers
    start, end = m.net.embed_text(torch.tensor([markers.start_of_image, markers.end_of_image])).split(1)
    zeros = lambda n: torch.zeros(n, dtype=torch.long)  # noqa: E731  one RoPE position per image

    vit = m.net.embed_vit(p["vit_pixels"], p["vit_position_ids"], [p["vit_pixels"].shape[0]])
    print(f"vit_embeds          rel {rel(vit, p['vit_embeds']):.2e}")
    image = Query(torch.cat([start, vit, end]), zeros(vit.shape[0] + 2), Routing(), causal=False)
    _, kv = run_query(m, History(), image)
    history = History().then(Segment(kind="vit", kv=kv), 1)
    prompt = text_query(m, "describe the image.")
    _, kv = run_query(m, history, prompt)
    history = history.then(Segment(kind="text", kv=kv), prompt.embeds.shape[0])
    assert [history.tokens, history.rope] == p["und_context_len"].tolist(), "context layout differs"
    bos = Query(m.net.embed_text(torch.tensor([markers.bos])), zeros(1), Routing(), causal=True)
    hidden, _ = run_query(m, history, bos)
    print(f"und_logits          rel {rel(m.net.logits(hidden[-1]), p['und_logits']):.2e}")

    h = w = 4  # the probe's 64x64 target
    latents = m.net.embed_latents(p["x_t"], torch.tensor(0.7), latent_positions(m, h, w))
    query = Query(torch.cat([start, latents, end]), zeros(h * w + 2), image_routing(h * w, m.device), False)
    text = Context.empty(m).append_text("a red circle at the top left").cond
    for name, hist in (("gen_velocity", text), ("gen_velocity_empty", History())):
        hidden, _ = run_query(m, hist, query)
        print(f"{name:<19} rel {rel(m.net.velocity(hidden[1:-1]), p[name]):.2e}")

    print(f"vae_latent          rel {rel(m.vae.encode(p['vae_input']), p['vae_latent']):.2e}")
    print(f"vae_decoded         rel {rel(m.vae.decode(p['vae_latent']), p['vae_decoded']):.2e}")


if __name__ == "__main__":
    main()
