"""Quick start: a GRIN delta on a tiny Llama, end to end, in well under a minute on 2 CPU cores.

Run: python examples/quickstart.py [--out runs/quickstart]

Builds a small Llama from a config (no downloads), adds a GRIN adapter, trains only its sparse values for a few
steps to lower the likelihood of one "secret" sentence, then saves, reloads, merges and reverts the delta exactly.
"""

from __future__ import annotations

import argparse
import os

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

import grin_peft


def build_base(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    return AutoModelForCausalLM.from_config(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="where the delta is written")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)

    secret = torch.tensor([list(b"Alice's PIN is 4921.")])
    other = torch.tensor([list(b"The sky is often blue.")])
    base = build_base()
    original = {k: v.clone() for k, v in base.state_dict().items()}

    config = grin_peft.GrinConfig(
        target_modules="all-linear", density=1e-2, score="random", seed=0, forget_description="one secret sentence"
    )
    model = get_peft_model(base, config)
    model.print_trainable_parameters()

    def nll(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    before = (nll(secret).item(), nll(other).item())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(args.steps):  # gradient difference: raise the secret's loss, keep the other's
        loss = -nll(secret).clamp(max=20) + nll(other)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = (nll(secret).item(), nll(other).item())
    print(f"secret NLL {before[0]:.2f} -> {after[0]:.2f}   other NLL {before[1]:.2f} -> {after[1]:.2f}")

    model.save_pretrained(args.out)
    size = os.path.getsize(os.path.join(args.out, "adapter_model.safetensors"))
    print(f"delta written to {args.out} ({size:,} bytes)")

    loaded = PeftModel.from_pretrained(build_base(), args.out)
    merged = loaded.merge_and_unload()
    grin_peft.revert(merged, args.out)
    exact = all(torch.equal(v, original[k]) for k, v in merged.state_dict().items())
    print(f"merged, then reverted: base restored bit for bit = {exact}")


if __name__ == "__main__":
    main()
