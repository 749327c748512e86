"""Tiny models built from configs (no downloads): the matrix every tuner test runs on."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

VOCAB = 97


class MLP(nn.Module):
    """PEFT's custom-model test shape: a plain torch model with Linear layers of different sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 16, bias=False)
        self.lin2 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.relu(self.lin1(self.relu(self.lin0(x)))))


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def build(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny model of `kind` ('mlp', 'llama', 'gpt2', 'opt'), deterministic for a seed."""
    torch.manual_seed(seed)
    if kind == "mlp":
        model = MLP()
    elif kind == "llama":
        model = AutoModelForCausalLM.from_config(llama_config())
    elif kind == "gpt2":
        model = AutoModelForCausalLM.from_config(
            GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        )
    elif kind == "opt":
        model = AutoModelForCausalLM.from_config(
            OPTConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                ffn_dim=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
            )
        )
    else:
        raise ValueError(kind)
    return model.to(dtype).eval()


def example_input(kind: str, dtype: torch.dtype = torch.float32, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"x": torch.randn(4, 10, generator=generator).to(dtype)}
    return {"input_ids": torch.randint(0, VOCAB, (2, 12), generator=generator)}


def output(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
