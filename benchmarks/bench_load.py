"""Peak host RAM of loading a bf16 checkpoint, relative to its size on disk.

    python benchmarks/bench_load.py [--preset mid]

Writes a random checkpoint of the preset with bf16 weights (as the released BAGEL is stored), then loads it
in a fresh process with dtype=bfloat16 and reports the growth of the peak resident set (VmHWM) over the
resident set after imports (VmRSS), divided by the weight files' size. Loading streams tensor by tensor, so
the ratio should stay near 1.0 (no fp32 copy, no second copy of the file).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = """
import sys, torch
sys.path.insert(0, {repo!r})
import bagel_model
from bagel_model.tokenizer import BagelTokenizer
BagelTokenizer({folder!r})  # import and build what loading needs besides the weights

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

base = status_kib("VmRSS")
model = bagel_model.load({folder!r}, dtype=torch.bfloat16, vae_dtype=torch.bfloat16)
print(base, status_kib("VmHWM"))
"""


def write_bf16_checkpoint(preset: str, folder: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from bagel_model.config import PRESETS
    from bagel_model.tiny import make_tiny

    make_tiny(folder, seed=0, cfg=PRESETS[preset])
    for name in ("ema.safetensors", "ae.safetensors"):
        tensors = {k: v.to(torch.bfloat16) for k, v in load_file(folder / name).items()}
        save_file(tensors, folder / name, metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mid")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bagel_load_")) / args.preset
    write_bf16_checkpoint(args.preset, folder)
    size = sum((folder / n).stat().st_size for n in ("ema.safetensors", "ae.safetensors"))
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(repo=str(REPO), folder=str(folder))],
        capture_output=True,
        text=True,
        check=True,
    )
    base, peak = (int(v) for v in out.stdout.split())
    growth = (peak - base) * 1024
    print(f"weights on disk: {size / 2**20:.1f} MiB (bf16)")
    print(f"peak RSS growth while loading: {growth / 2**20:.1f} MiB = {growth / size:.2f}x the checkpoint")


if __name__ == "__main__":
    main()
