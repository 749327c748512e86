"""lm-evaluation-harness as a library on the in-memory model (``pip install grin-peft[lm-eval]``).

:func:`lm_eval` wraps the model (base, with the GRIN adapter active, or merged) in lm-eval's ``HFLM`` and runs
``simple_evaluate`` on registered task names (``wmdp_bio``, ``mmlu``: those download their data from the Hub) or on
local JSON Lines files of ``{question, choices, answer}`` items, which become lm-eval tasks laid out exactly as its
``wmdp`` task (:func:`local_mcq_task`) and run offline. Tested with lm-eval 0.4.13 (see ``LM_EVAL_REQUIREMENT``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.specifiers import SpecifierSet
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..errors import GrinError
from .multiple_choice import WMDP_SUBJECTS
from .passes import inference

LM_EVAL_REQUIREMENT = "lm-eval>=0.4.13,<0.5"  # the tested range; keep in step with setup.cfg's [lm-eval] extra


def _require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise GrinError(
            f"lm-evaluation-harness is not installed: pip install 'grin-peft[lm-eval]' ({LM_EVAL_REQUIREMENT})."
        ) from None
    version = metadata.version("lm-eval")
    if version not in SpecifierSet(LM_EVAL_REQUIREMENT.removeprefix("lm-eval")):
        raise GrinError(f"lm-eval {version} is untested here; grin_peft needs {LM_EVAL_REQUIREMENT}.")
    return lm_eval


@functools.cache
def _task_manager() -> Any:
    """lm-eval's task index (it reads every bundled task file, seconds), built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _subject(path: Path) -> str | None:
    """``wmdp-bio.jsonl`` -> "biology": the description line lm-eval's wmdp task puts first; None otherwise."""
    stem = path.stem.lower()
    return next((word for key, word in WMDP_SUBJECTS.items() if stem == f"wmdp-{key}"), None)


def local_mcq_task(path: str | os.PathLike[str], name: str | None = None, subject: str | None = None) -> dict:
    """An lm-eval task config for a local JSON Lines file of ``{question, choices: [4], answer: int}`` items.

    Prompt, choices and metric are copied from lm-eval's ``wmdp/_default_template_yaml``; the description names
    ``subject`` (default: inferred from ``wmdp-{bio,chem,cyber}.jsonl``, none for other names). The data is read
    with ``datasets``' ``json`` builder, so nothing is downloaded.
    """
    file = Path(path)
    if not file.is_file():
        raise GrinError(f"lm-eval task file {file} does not exist.")
    subject = subject or _subject(file)
    description = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    return {
        "task": name or f"local_{file.stem.replace('-', '_')}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(file.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
        "D. {{choices[3]}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "answer",
        "description": description,
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1},
    }


def _task_specs(tasks: str | Sequence[str | Mapping[str, Any]]) -> list[str | dict]:
    """Task names stay names; ``.jsonl``/``.json`` paths become :func:`local_mcq_task` configs; dicts pass through."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise GrinError("lm_eval needs at least one task.")
    specs: list[str | dict] = []
    for task in tasks:
        if isinstance(task, Mapping):
            specs.append(dict(task))
        elif str(task).endswith((".jsonl", ".json")) or os.path.isfile(task):
            specs.append(local_mcq_task(task))
        else:
            specs.append(str(task))
    return specs


def lm_eval(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: str | Sequence[str | Mapping[str, Any]],
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    system_instruction: str | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run lm-evaluation-harness on ``model`` as it is in memory and return ``simple_evaluate``'s result dict.

    ``tasks``: a comma-separated string or a list of registered task names (``"wmdp_bio"``, ``"mmlu"``), paths to
    local multiple-choice JSON Lines files (:func:`local_mcq_task`) or task config dicts. ``result["results"][task]
    ["acc,none"]`` is the accuracy; ``log_samples`` keeps every request's log-likelihoods in ``result["samples"]``.
    The model's train/eval flags are restored afterwards.
    """
    lm = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise GrinError(f"lm_eval needs a Hugging Face tokenizer; got {type(tokenizer).__name__}.")
    specs = _task_specs(tasks)
    with inference(model):
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            result = lm.simple_evaluate(
                model=wrapped,
                tasks=specs,
                num_fewshot=num_fewshot,
                limit=limit,
                log_samples=log_samples,
                apply_chat_template=apply_chat_template,
                system_instruction=system_instruction,
                task_manager=_task_manager(),
                bootstrap_iters=0,
            )
        except (KeyError, ValueError, FileNotFoundError, ConnectionError) as exc:
            raise GrinError(f"lm-eval could not run {tasks!r}: {type(exc).__name__}: {exc}") from exc
    if result is None:
        raise GrinError("lm-eval returned no result (it only reports on the main process).")
    return dict(result)
