"""Training the bundled tiny BAGEL on the shapes world, with the inference library's own modules.

- `vocab`: the shapes-world BPE tokenizer;
- `autoencoder`: the tiny FLUX-architecture AE, trained first and then frozen;
- `data`: sequence plans per task (laid out as `tasks.py` lays out contexts) and packing, with the
  generalized-causal mask, official RoPE ids and CFG dropout;
- `losses`: next-token CE and rectified-flow MSE over one packed sequence;
- `schedule`: the warm-up + cosine learning rate both loops follow;
- `trainer`: AdamW, EMA, clipping, checkpoints in the official layout, resume;
- `evaluate`: held-out capability accuracy through the real tasks and the shapes scorer;
- `recipe`: `python -m bagel_model.training.recipe --out DIR` makes the bundled model.

LoRA training of any BAGEL on a user's examples reuses `data` (plans, packing) and `losses`:

- `folder`: a data folder (kohya layout) read into plans, every bad file named first;
- `adapters`: LoRA factors hooked onto a frozen network, saved as PEFT adapters;
- `finetune`: the training loop (`train_lora`), deterministic and resumable;
- `plot`: the loss curve as a picture.

Outside this package only the CLI (`train-lora`, `bench-shapes`) imports it, and the Train LoRA node.
"""
