"""Sharing deltas: a model card that is all signal, folder-atomic saves with a manifest, and pushes that keep both.

`install()` hooks PEFT's save path for GRIN models: `save_pretrained` writes the delta into a temporary folder beside
the target, adds the manifest (`grin.sha256`) and GRIN's model card, and swaps the folder in as one unit
(:mod:`grin_peft.atomic_folder`); the delta digest is then `peft_model.grin_delta_sha256`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import yaml

from .atomic_folder import save_folder
from .config import GrinConfig
from .delta_file import SAVE_METADATA, looks_local
from .fingerprint import SHAPES_KEY, adapted_shapes
from .integrity import MANIFEST_NAME, write_manifest

CARD_TAGS = ("grin", "unlearning", "peft", "sparse-delta")
CARD_NAME = "README.md"
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


def hub_base_id(config: GrinConfig) -> str | None:
    """The base model's Hub id, when the config names one (a local path is not one, and never goes in a card)."""
    base = config.base_model_name_or_path
    if not base or looks_local(base) or os.path.exists(base):
        return None
    return base


def model_card(peft_model, adapter_name: str, digest: str | None, repo_id: str | None) -> str:
    """GRIN's model card: what was forgotten, how, measured before/after, how to load pinned and how to revert.

    `repo_id` is where the delta is pushed; a local save has none, and the card then says "this folder" (a local
    path in a card would be wrong wherever the folder is copied to)."""
    config: GrinConfig = peft_model.peft_config[adapter_name]
    facts = describe_adapter(peft_model, adapter_name)
    base = hub_base_id(config)
    metadata = {"library_name": "peft", "tags": list(CARD_TAGS), "grin": {k: v for k, v in facts.items() if v}}
    if base:
        metadata["base_model"] = base
        metadata["tags"].append(f"base_model:adapter:{base}")
    if digest:
        metadata["grin"]["delta_sha256"] = digest
    pin = f', expected_sha256="{digest}"' if digest else ""
    source = f'"{repo_id}"' if repo_id else "delta"
    where = repo_id or "DELTA_FOLDER"
    forgotten = facts["forget_description"] or (
        "Not described by its author (set `forget_description` in `GrinConfig`, or `--forget-description`)."
    )
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).rstrip(),
        "---",
        "",
        f"# GRIN unlearning delta{f' for {base}' if base else ''}",
        "",
        "## What it makes the model forget",
        "",
        forgotten,
        "",
        "## How",
        "",
        "GRIN ([grin_peft](https://pypi.org/project/grin-peft/)): entries scored by gradient ratio (how much they "
        "matter for the data to forget versus the data to keep), a sparse delta on the top-scored entries, noise "
        "injected there, and only those entries trained with an unlearning objective.",
        "",
        f"- trainable entries: {facts['trainable_entries']:,} of {facts['targeted_entries']:,} targeted "
        f"(density {facts['density']:.3g}) in {facts['modules']} modules",
        f"- selection: score `{facts['score']}`, scope `{facts['selection']}`; noise {facts['noise']}",
        "",
        "## Measured",
        "",
        *(
            _unlearning_lines(getattr(peft_model, "grin_unlearn_summary", None))
            or ["No before/after measurement was saved with this delta (it was not made by `grin_peft.unlearn`)."]
        ),
        "",
        "## Use, deploy, revert",
        "",
        "```python",
        "import grin_peft  # registers GRIN with PEFT",
        "from peft import PeftModel",
        "",
        *([] if repo_id else ["# base: the base model below; delta: the path of this folder"]),
        f"model = PeftModel.from_pretrained(base, {source}{pin})",
        "merged = model.merge_and_unload()  # deploy",
        f"grin_peft.revert(merged, {source})  # exact, bit-for-bit undo of that merge",
        "```",
        "",
        f"Command line: `grin-peft merge --model BASE --delta {where} --output merged/`, then "
        f"`grin-peft revert --model merged/ --delta {where} --output restored/`"
        + (f" (add `--expected-sha256 {digest}` to either to pin it)." if digest else "."),
        "",
        DELTA_DISCLOSURE,
        "",
        "## Integrity",
        "",
    ]
    if digest:
        lines += [
            f"- delta sha256: `{digest}` (the sha256 of `{MANIFEST_NAME}`, which lists the sha256 of the config "
            "and the weights). Pinning it at load detects tampering only if you got it from a channel you trust; "
            "read from this card, it only detects corruption.",
        ]
    lines += [
        f"- base model fingerprint: `{facts['base_model_fingerprint']}`; loading onto another base is refused.",
        "",
    ]
    return "\n".join(lines)


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


def _grin_adapter(peft_model) -> str | None:
    names = [name for name, cfg in peft_model.peft_config.items() if isinstance(cfg, GrinConfig)]
    if not names:
        return None
    return peft_model.active_adapter if peft_model.active_adapter in names else names[0]


def write_card(peft_model, folder: str | os.PathLike, digest: str | None = None, repo_id: str | None = None) -> None:
    """Write GRIN's model card into `folder` (replacing PEFT's template, which is mostly placeholders)."""
    adapter = _grin_adapter(peft_model)
    if adapter is not None:
        text = model_card(peft_model, adapter, digest, repo_id)
        Path(folder, CARD_NAME).write_text(text)


def save_delta_folder(peft_model, original_save, save_directory, *args, **kwargs) -> None:
    """PEFT's save_pretrained into a temporary folder, plus manifests and the card, swapped in as one unit."""

    def write(work: Path) -> None:
        token = SAVE_METADATA.set({SHAPES_KEY: json.dumps(adapted_shapes(peft_model))})
        try:
            original_save(peft_model, str(work), *args, **kwargs)
        finally:
            SAVE_METADATA.reset(token)
        digest = None
        for config_file in sorted(work.rglob("adapter_config.json")):
            if (config_file.parent / "adapter_model.safetensors").is_file():
                folder_digest = write_manifest(config_file.parent)
                digest = folder_digest if config_file.parent == work else digest
        peft_model.grin_delta_sha256 = digest
        write_card(peft_model, work, digest)

    save_folder(save_directory, write)


def _upload(repo_id: str, fill, *, token, private, commit_message: str, revision, create_pr: bool):
    """Create the repo if needed, let ``fill(folder, repo_id)`` write a temporary folder, upload it as one commit."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as work_dir:
        folder = os.path.join(work_dir, "upload")
        fill(folder, repo_id)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )


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
    """Save the delta (with manifest and GRIN's card) to a temporary folder and upload it as one commit; prints the
    delta's sha256, which the card records too.

    transformers' push_to_hub would overwrite the README with its own generic card after saving; GRIN deltas keep
    theirs, because the card is how people find out what a delta forgets.
    """
    from huggingface_hub import ModelCard

    def fill(folder: str, resolved_id: str) -> None:
        peft_model.save_pretrained(folder, **save_kwargs)
        write_card(peft_model, folder, peft_model.grin_delta_sha256, resolved_id)
        if tags:
            card = ModelCard.load(os.path.join(folder, CARD_NAME))
            card.data["tags"] = sorted(set(card.data.get("tags") or []) | set(tags))
            card.save(os.path.join(folder, CARD_NAME))

    info = _upload(
        repo_id,
        fill,
        token=token,
        private=private,
        commit_message=commit_message or "Upload GRIN unlearning delta",
        revision=revision,
        create_pr=create_pr,
    )
    print(f"pushed {repo_id}; delta sha256 {peft_model.grin_delta_sha256}", file=sys.stderr)
    return info


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

    from huggingface_hub import ModelCard

    merged = copy.deepcopy(peft_model).merge_and_unload(safe_merge=True)

    def fill(folder: str, resolved_id: str) -> None:
        merged.save_pretrained(folder, **save_kwargs)
        card = ModelCard(MERGED_CARD)
        card.data["tags"] = sorted({"grin", "unlearning", *(tags or [])})
        card.save(os.path.join(folder, CARD_NAME))

    return _upload(
        repo_id,
        fill,
        token=token,
        private=private,
        commit_message=commit_message or "Upload unlearned model (GRIN delta merged)",
        revision=revision,
        create_pr=create_pr,
    )


def install() -> None:
    """Hook GRIN's card, manifest and atomic writes into PEFT's save path, once (idempotent)."""
    import peft.peft_model as peft_model_module

    from .delta_file import atomic_save_file

    if getattr(peft_model_module, "_grin_installed", False):
        return
    PeftModel = peft_model_module.PeftModel
    peft_model_module.safe_save_file = atomic_save_file
    original_card = PeftModel.create_or_update_model_card
    original_save = PeftModel.save_pretrained
    original_push = PeftModel.push_to_hub

    @functools.wraps(original_card)
    def create_or_update_model_card(self, output_dir: str):
        if _grin_adapter(self) is None:
            return original_card(self, output_dir)
        write_card(self, output_dir)  # the save below rewrites it with the digest

    @functools.wraps(original_save)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if _grin_adapter(self) is None or not kwargs.get("is_main_process", True):
            return original_save(self, save_directory, *args, **kwargs)
        return save_delta_folder(self, original_save, save_directory, *args, **kwargs)

    @functools.wraps(original_push)
    def push_to_hub(self, repo_id: str, *args, **kwargs):
        if args or _grin_adapter(self) is None:
            return original_push(self, repo_id, *args, **kwargs)
        for unsupported in ("use_temp_dir", "max_shard_size", "safe_serialization"):
            kwargs.pop(unsupported, None)
        if kwargs.pop("merged", False):  # the merged model instead of the delta, which reveals the changed entries
            return push_merged_to_hub(self, repo_id, **kwargs)
        return push_delta_to_hub(self, repo_id, **kwargs)

    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel.save_pretrained = save_pretrained
    PeftModel.push_to_hub = push_to_hub
    peft_model_module._grin_installed = True
