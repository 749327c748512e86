"""Sharing deltas: a model card that says what a GRIN delta is, and crash-safe saving for `save_pretrained`."""

from __future__ import annotations

import functools
import os

from huggingface_hub import ModelCard

from .config import GrinConfig

CARD_HEADING = "## GRIN unlearning delta"
CARD_TAGS = ("grin", "unlearning", "peft", "sparse-delta")
DELTA_DISCLOSURE = (
    "**Privacy note:** a delta shows which weights unlearning changed and by how much; published attacks use "
    "exactly that to recover forgotten text. To share an unlearned model without revealing it, push the merged "
    "model instead: `peft_model.push_to_hub(repo_id, merged=True)`. Check whether the forgetting holds with "
    "`grin-peft audit`."
)

MERGED_CARD = (
    "---\nlibrary_name: transformers\n---\n\n## Unlearned model (GRIN delta merged)\n\nThe GRIN delta is merged "
    "into the weights and not published, so this repository does not show which entries unlearning changed (a "
    "published delta would). Check whether the forgetting holds with `grin-peft audit`.\n"
)


def describe_adapter(peft_model, adapter_name: str) -> dict:
    """Facts about one GRIN adapter for the model card and for reports."""
    config: GrinConfig = peft_model.peft_config[adapter_name]
    per_module = peft_model.base_model.num_entries(adapter_name)
    targeted = sum(layer.grin_numel for layer in peft_model.base_model.grin_layers(adapter_name).values())
    entries = sum(per_module.values())
    return {
        "adapter": adapter_name,
        "trainable_entries": entries,
        "targeted_entries": targeted,
        "density": entries / targeted if targeted else 0.0,
        "modules": len(per_module),
        "score": config.score,
        "selection": config.selection,
        "noise": f"{config.noise_std} ({config.noise_scale})",
        "forget_description": config.forget_description,
        "base_model_fingerprint": config.base_model_fingerprint,
    }


def update_model_card(peft_model, output_dir: str) -> None:
    """Add GRIN's metadata and a short section to the README that PEFT just wrote."""
    grin_adapters = [name for name, cfg in peft_model.peft_config.items() if isinstance(cfg, GrinConfig)]
    if not grin_adapters:
        return
    filename = os.path.join(output_dir, "README.md")
    card = ModelCard.load(filename)
    card.data["tags"] = sorted(set(card.data.get("tags") or []) | set(CARD_TAGS))
    card.data["library_name"] = "peft"
    base = peft_model.peft_config[grin_adapters[0]].base_model_name_or_path
    if base and not card.data.get("base_model"):
        card.data["base_model"] = base
    if not card.data.get("base_model"):  # a model built from a config has no Hub id to point at
        card.data.pop("base_model", None)
        card.data["tags"] = [t for t in card.data["tags"] if t != "base_model:adapter:"]
    facts = describe_adapter(
        peft_model, peft_model.active_adapter if peft_model.active_adapter in grin_adapters else grin_adapters[0]
    )
    card.data["grin"] = {k: v for k, v in facts.items() if v is not None}
    lines = [
        CARD_HEADING,
        "",
        "A sparse delta made with [grin_peft](https://github.com/) (GRIN: gradient-ratio localisation, noise "
        "injection and training of the selected entries only).",
        "",
    ]
    if facts["forget_description"]:
        lines += [f"**What it makes the model forget:** {facts['forget_description']}", ""]
    lines += [
        f"- trainable entries: {facts['trainable_entries']:,} of {facts['targeted_entries']:,} targeted "
        f"(density {facts['density']:.3g}) in {facts['modules']} modules",
        f"- selection: score `{facts['score']}`, scope `{facts['selection']}`; noise {facts['noise']}",
        f"- base model fingerprint: `{facts['base_model_fingerprint']}`",
        *_unlearning_lines(getattr(peft_model, "grin_unlearn_summary", None)),
        "",
        "Load with `import grin_peft; PeftModel.from_pretrained(base, repo_id)`; deploy with `merge_and_unload()`; "
        "undo a merge exactly with `grin_peft.revert(merged_model, repo_id)`.",
        "",
        DELTA_DISCLOSURE,
    ]
    text = card.text
    if CARD_HEADING in text:
        text = text[: text.index(CARD_HEADING)].rstrip() + "\n"
    card.text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    card.save(filename)


def _unlearning_lines(summary: dict | None) -> list[str]:
    """What the training achieved, when this model came out of `grin_peft.unlearn`: a card must not claim more."""
    if not summary or not summary.get("before") or not summary.get("after"):
        return []
    before, after, record = summary["before"], summary["after"], summary.get("operating_point")
    lines = [
        f"- {label}: {before[key]:.4f} -> {after[key]:.4f}"
        for label, key in (
            ("forget answer probability", "forget_prob"),
            ("retain answer probability", "retain_prob"),
            ("held-out retain answer probability", "heldout_retain_prob"),
        )
        if key in before and key in after
    ]
    if record is None:
        return [*lines, "- schedule: fixed (no forget target was set)"]
    return [
        *lines,
        f"- target: forget answer probability <= {record['target_forget_prob']:.4f} with held-out retain >= "
        f"{record['floor_heldout_retain_prob']:.4f}: **{'met' if record['target_met'] else 'NOT met'}** "
        f"(automatic operating point: lr {record['learning_rate']:.3g}, kept step {record['steps']})",
    ]


def push_delta_to_hub(
    peft_model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    **save_kwargs,
):
    """Save the delta (with GRIN's model card) to a temporary folder and upload it as one commit.

    transformers' push_to_hub would overwrite the README with its own generic card after saving; GRIN deltas keep
    theirs, because the card is how people find out what a delta forgets.
    """
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as work_dir:
        peft_model.save_pretrained(work_dir, **save_kwargs)
        if tags:
            card = ModelCard.load(os.path.join(work_dir, "README.md"))
            card.data["tags"] = sorted(set(card.data.get("tags") or []) | set(tags))
            card.save(os.path.join(work_dir, "README.md"))
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=work_dir,
            commit_message=commit_message or "Upload GRIN unlearning delta",
            revision=revision,
            create_pr=create_pr,
        )


def push_merged_to_hub(
    peft_model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    **save_kwargs,
):
    """Push the merged model (base + delta, one ordinary transformers model) instead of the delta, so the Hub copy
    does not say which entries unlearning changed. Merges a copy: ``peft_model`` keeps its adapters."""
    import copy
    import tempfile

    from huggingface_hub import HfApi

    merged = copy.deepcopy(peft_model).merge_and_unload(safe_merge=True)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as work_dir:
        merged.save_pretrained(work_dir, **save_kwargs)
        card = ModelCard(MERGED_CARD)
        card.data["tags"] = sorted({"grin", "unlearning", *(tags or [])})
        card.save(os.path.join(work_dir, "README.md"))
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=work_dir,
            commit_message=commit_message or "Upload unlearned model (GRIN delta merged)",
            revision=revision,
            create_pr=create_pr,
        )


def install() -> None:
    """Hook GRIN's card and atomic writes into PEFT's save path, once (idempotent)."""
    import peft.peft_model as peft_model_module

    from .delta_file import atomic_save_file

    if getattr(peft_model_module, "_grin_installed", False):
        return
    peft_model_module.safe_save_file = atomic_save_file
    original = peft_model_module.PeftModel.create_or_update_model_card

    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir: str):
        original(self, output_dir)
        update_model_card(self, output_dir)

    peft_model_module.PeftModel.create_or_update_model_card = create_or_update_model_card
    original_push = peft_model_module.PeftModel.push_to_hub

    @functools.wraps(original_push)
    def push_to_hub(self, repo_id: str, *args, **kwargs):
        if args or not any(isinstance(cfg, GrinConfig) for cfg in self.peft_config.values()):
            return original_push(self, repo_id, *args, **kwargs)
        for unsupported in ("use_temp_dir", "max_shard_size", "safe_serialization"):
            kwargs.pop(unsupported, None)
        if kwargs.pop("merged", False):  # the merged model instead of the delta, which reveals the changed entries
            return push_merged_to_hub(self, repo_id, **kwargs)
        return push_delta_to_hub(self, repo_id, **kwargs)

    peft_model_module.PeftModel.push_to_hub = push_to_hub
    peft_model_module._grin_installed = True
