"""One rank of the DDP conformance test: a GRIN adapter whose global budget leaves a targeted module without entries,
trained for a few steps under DistributedDataParallel (gloo, CPU).

Run as ``python peft_ddp_worker.py WORKDIR RANK WORLD``: joins a gloo group (rendezvous through a file in WORKDIR),
trains on rank-specific data and saves the adapter's values and the modules' entry counts to ``rank{RANK}.pt``.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch

STEPS = 3


def main(workdir: str, rank: int, world: int) -> None:
    from gloo_ranks import exit_rank
    from peft import get_peft_model
    from tiny_models import build

    from grin_peft import GrinConfig

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(workdir, 'rendezvous')}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    # one entry over two modules: the global ranking gives it to one of them, the other gets none
    config = GrinConfig(target_modules=["lin0", "lin1"], num_entries=1, score="magnitude", seed=0)
    model = get_peft_model(build("mlp"), config)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.5)
    generator = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        x = torch.randn(8, 10, generator=generator)
        loss = ddp(x=x).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layers = model.base_model.grin_layers()
    torch.save(
        {
            "entries": {name: layer.grin_num_entries("default") for name, layer in layers.items()},
            "trainable": {n: p.numel() for n, p in model.named_parameters() if p.requires_grad},
            "values": {name: layer.grin_values["default"].detach().clone() for name, layer in layers.items()},
        },
        os.path.join(workdir, f"rank{rank}.pt"),
    )
    exit_rank()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
