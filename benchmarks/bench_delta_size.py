"""Adapter file size per density: each module's entries in their smaller stored form (index list or bitmask, see
``grin_peft.delta_file``) next to the index-only form that earlier versions wrote for the same delta.

Targets every linear layer of a Llama built from a config (random weights, random selection: sizes do not depend on
which entries are chosen), saves the adapter and reports bytes on disk.

    python benchmarks/bench_delta_size.py                                              # hidden 128, 2 layers
    python benchmarks/bench_delta_size.py --hidden 768 --layers 4 --intermediate 2112 --vocab 8192   # 41.5M params
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from peft import get_peft_model
from safetensors.torch import load_file

import grin_peft
from grin_peft.tiny import build_model, tiny_llama_config

WEIGHTS = "adapter_model.safetensors"


def index_form_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Payload bytes of the same delta with every bitmask replaced by its int32 index list."""
    total = 0
    for key, tensor in tensors.items():
        if key.endswith(".grin_mask"):
            values = tensors[key.removesuffix("grin_mask") + "grin_values"]
            total += 4 * values.numel()
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 4 x hidden")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--densities", default="1e-3,1e-2,5e-2,0.1,0.25,0.5")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)

    config = tiny_llama_config(args.vocab, args.hidden, args.layers, intermediate_size=args.intermediate)
    params = sum(p.numel() for p in build_model(config).parameters())
    print(
        f"Llama hidden={args.hidden}, layers={args.layers}, vocab={args.vocab}, {params / 1e6:.2f}M parameters, "
        f"{args.dtype}, all-linear, global random selection\n"
    )
    print("| density | entries | masks / modules | file bytes | index-only file bytes (est.) | file / index-only |")
    print("|---|---|---|---|---|---|")
    for density in (float(d) for d in args.densities.split(",")):
        base = build_model(config).to(getattr(torch, args.dtype))
        model = get_peft_model(base, grin_peft.GrinConfig(density=density, score="random"))
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            size = os.path.getsize(os.path.join(tmp, WEIGHTS))
            tensors = load_file(os.path.join(tmp, WEIGHTS))
        masks = sum(k.endswith(".grin_mask") for k in tensors)
        modules = sum(k.endswith(".grin_values") for k in tensors)
        payload = sum(t.numel() * t.element_size() for t in tensors.values())
        index_only = index_form_bytes(tensors) + size - payload  # same header overhead
        entries = sum(model.base_model.num_entries().values())
        cells = [f"{density:g}", f"{entries:,}", f"{masks} / {modules}", f"{size:,}", f"{index_only:,}"]
        print("| " + " | ".join(cells) + f" | {size / index_only:.2f} |", flush=True)


if __name__ == "__main__":
    main()
