"""What a command-line user starts from: a tiny model folder (weights + tokenizer) and forget/retain JSON Lines."""

from __future__ import annotations

from pathlib import Path

from grin_peft.synthetic import SyntheticDataset, generate_dataset, write_jsonl
from grin_peft.tiny import build_model, tiny_llama_config, train_tokenizer


def write_workspace(root: Path, questions_per_person: int = 3) -> SyntheticDataset:
    """Write ``root/model``, ``root/forget.jsonl`` and ``root/retain.jsonl`` (6 invented people, a third forgotten);
    return the data set so a test can check against it."""
    data = generate_dataset(num_people=6, questions_per_person=questions_per_person, forget_fraction=0.34, seed=0)
    tokenizer = train_tokenizer([f"Question: {i['question']}\nAnswer: {i['answer']}" for i in data.train], 400)
    model = build_model(tiny_llama_config(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2), seed=0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_jsonl(data.forget, root / "forget.jsonl")
    write_jsonl(data.retain, root / "retain.jsonl")
    return data
