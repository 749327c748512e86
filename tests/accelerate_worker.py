"""One process of the accelerate test: localise and train with UnlearningTrainer, save what rank 0 trained.

Run as ``python accelerate_worker.py WORKDIR BATCH`` alone, or under ``accelerate launch --multi_gpu
--num_processes 2`` (CPU: the arguments' ``use_cpu`` makes the group gloo). Reads the tiny model and data the test
saved in WORKDIR; writes ``{world}proc.pt`` with every GRIN layer's mask, noise-injected and trained values.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from grin_peft import GrinConfig, UnlearningArguments, UnlearningTrainer


def main(workdir: str, batch: int) -> None:
    torch.manual_seed(0)
    args = UnlearningArguments(
        output_dir=os.path.join(workdir, "out"),
        use_cpu=True,
        num_threads=1,
        per_device_train_batch_size=batch,
        learning_rate=1e-2,
        num_train_epochs=2,
        objective="grad_diff",
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
    )
    world = args.world_size  # sets up the process group (gloo on CPU) before localising, so scoring is dealt out
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(workdir, "model"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "model"))
    data = json.load(open(os.path.join(workdir, "data.json")))
    peft_model = get_peft_model(model, GrinConfig(density=0.05, seed=0))
    peft_model.localize(data["forget"], data["retain"], tokenizer=tokenizer, batch_size=4, progress=False)
    layers = peft_model.base_model.grin_layers("default")
    initial = {name: layer.grin_values["default"].detach().clone() for name, layer in layers.items()}
    UnlearningTrainer(peft_model, args, data["forget"], data["retain"], processing_class=tokenizer).train()
    if int(os.environ.get("RANK", "0")) == 0:
        result = {
            name: {
                "indices": layer.grin_indices["default"].clone(),
                "initial": initial[name],
                "trained": layer.grin_values["default"].detach().clone(),
            }
            for name, layer in layers.items()
        }
        torch.save(result, os.path.join(workdir, f"{world}proc.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
