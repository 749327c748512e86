"""One rank of the distributed localization test, and the planted-sequence task the localization tests share.

Run as ``python localize_dist_worker.py WORKDIR RANK WORLD``: joins a gloo group (rendezvous through a file in
WORKDIR, so no port can be taken in between; traffic over loopback), loads the model and data the test saved
there, localizes with each config in ``configs.json`` and saves every module's selected indices and values to
``rank{RANK}.pt``.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

VOCAB = 64
PROMPT, ANSWER = 4, 8


def planted_model(hidden: int = 64, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised tiny Llama, the same for the same seed."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def planted_sequences(n: int, generator: torch.Generator) -> list[dict[str, list[int]]]:
    """Random token sequences; loss on the last ANSWER tokens only (the prompt is -100)."""
    ids = torch.randint(4, VOCAB, (n, PROMPT + ANSWER), generator=generator)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return [{"input_ids": i.tolist(), "labels": lab.tolist()} for i, lab in zip(ids, labels)]


def main(workdir: str, rank: int, world: int) -> None:
    from gloo_ranks import exit_rank
    from peft import get_peft_model

    import grin_peft  # noqa: F401  (registers GRIN)
    from grin_peft import GrinConfig

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(workdir, 'rendezvous')}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    data = json.load(open(os.path.join(workdir, "data.json")))
    state = torch.load(os.path.join(workdir, "model.pt"))
    results = []
    for options in json.load(open(os.path.join(workdir, "configs.json"))):
        model = planted_model()
        model.load_state_dict(state)
        unit = options.pop("grad_unit", None)
        # eps and seed pinned as in test_localize.grin(), so both sides use the same settings whatever the default;
        # torch's RNG differs per rank, so a config with seed=None draws a different seed on each
        config = GrinConfig(target_modules="all-linear", **{"eps": 0.01, "seed": 0, **options})
        torch.manual_seed(1000 + rank)
        if unit is not None:
            config.grad_unit = unit
        peft_model = get_peft_model(model, config)
        peft_model.localize(data["forget"], data["retain"], batch_size=data["batch_size"], progress=False)
        results.append(
            {
                name: (layer.grin_indices["default"].clone(), layer.grin_values["default"].detach().clone())
                for name, layer in peft_model.base_model.grin_layers("default").items()
            }
        )
    torch.save(results, os.path.join(workdir, f"rank{rank}.pt"))
    exit_rank()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
