"""`grin-peft audit` from the command line: a GRIN delta, a LoRA adapter and a plain unlearned model audited end to
end on the tiny model of test_audit, and bad input refused with one line on stderr before anything is written."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_audit import FORGET, RETAIN, train  # noqa: F401  (the module's single-thread fixture is not needed here)
from test_metrics import HOLDOUT

from grin_peft.cli import main
from grin_peft.synthetic import write_jsonl

pytest.importorskip("bitsandbytes")

FAST = ["--relearn-items", "1", "--relearn-steps", "2", "--max-new-tokens", "8", "--quantization", "8bit,nf4"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """On disk: the original model, a GRIN delta, a LoRA adapter, a merged (plain) unlearned model and the data."""
    from test_audit import make_tokenizer, tiny_llama

    from grin_peft import GrinConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("audit_cli")
    tok = make_tokenizer()
    original = train(tiny_llama(len(tok)), tok, FORGET + RETAIN, steps=80, lr=2e-2)
    original.save_pretrained(root / "original")
    tok.save_pretrained(root / "original")
    grin = get_peft_model(copy.deepcopy(original), GrinConfig(density=0.2, score="magnitude", init_weights=False))
    grin = train(grin, tok, FORGET, steps=8, lr=1e-2, sign=-1.0)
    grin.save_pretrained(root / "grin")
    merged = copy.deepcopy(grin).merge_and_unload()
    merged.save_pretrained(root / "merged")
    tok.save_pretrained(root / "merged")
    lora = get_peft_model(copy.deepcopy(original), LoraConfig(r=4, target_modules="all-linear"))
    train(lora, tok, FORGET, steps=4, lr=1e-2, sign=-1.0).save_pretrained(root / "lora")
    for name, items in (("forget", FORGET), ("retain", RETAIN), ("holdout", HOLDOUT)):
        write_jsonl(items, root / f"{name}.jsonl")
    write_jsonl(RETAIN[:2], root / "related.jsonl")
    (root / "bad_holdout.jsonl").write_text('{"question": "Q?", "text": "no answer"}\n')
    (root / "empty.jsonl").write_text("")
    yield root
    torch.set_num_threads(threads)


def data(root, holdout="holdout.jsonl"):
    args = ["--forget", str(root / "forget.jsonl"), "--retain", str(root / "retain.jsonl")]
    return args + (["--holdout", str(root / holdout)] if holdout else [])


def test_grin_delta_audit_writes_the_report_and_prints_verdicts(files, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["audit", "--model", str(files / "original"), "--delta", str(files / "grin"), *data(files),
                 "--output", str(out), *FAST])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"audit.md", "audit.json", "audit.png"}
    report = json.loads((out / "audit.json").read_text())
    assert [r["variant"].split(":")[0] for r in report["rows"]][:2] == ["8bit", "nf4"]
    assert len(report["membership"]) == 4
    assert "quantization (nf4):" in printed and "thresholds: < 10% holds" in printed


@pytest.mark.parametrize("kind", ["lora", "merged"])
def test_lora_adapters_and_plain_unlearned_models_are_audited(files, tmp_path, kind):
    model = ["--model", str(files / "original"), "--delta", str(files / "lora")]
    if kind == "merged":
        model = ["--model", str(files / "merged"), "--original", str(files / "original")]
    out = tmp_path / kind
    assert main(["audit", *model, *data(files, None), "--output", str(out), "--attacks", "jailbreak", *FAST]) == 0
    assert json.loads((out / "audit.json").read_text())["rows"][0]["attack"] == "jailbreak"


def test_related_data_replaces_the_retain_set_in_the_second_relearning_attack(files, tmp_path):
    out = tmp_path / "related"
    argv = ["audit", "--model", str(files / "original"), "--delta", str(files / "grin"), *data(files, None)]
    argv += ["--relearn-data", str(files / "related.jsonl"), "--attacks", "relearning", "--output", str(out), *FAST]
    assert main(argv) == 0
    report = json.loads((out / "audit.json").read_text())
    assert report["settings"]["relearning"]["data_items"] == 2  # the related file's, not the retain set's
    assert [r["variant"].split(":")[0] for r in report["rows"]] == ["forget data", "related data"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--forget", "empty.jsonl"], "holds no records"),
        (["--relearn-data", "empty.jsonl"], "holds no records"),
        (["--holdout", "bad_holdout.jsonl"], "lacks field"),
        (["--attacks", "quantisation"], "--attacks: unknown"),
        (["--quantization", "int3"], "--quantization: unknown"),
        (["--no-delta"], "needs --original"),
        (["--original", "original"], "not both"),
        (["--relearn-items", "0"], "relearning needs items"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_writes_nothing(files, tmp_path, capsys, extra, message):
    args = ["audit", "--model", str(files / "original"), "--delta", str(files / "grin"), *data(files, None)]
    if extra == ["--no-delta"]:
        args, extra = args[:3] + args[5:], []
    extra = [str(files / e) if not e.startswith("-") and e.endswith((".jsonl", "original")) else e for e in extra]
    out = tmp_path / "never"
    assert main([*args, "--output", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("grin-peft audit: error:")
    assert not out.exists()


def test_an_existing_output_is_refused_before_any_model_loads(files, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["audit", "--model", "no/such-model", "--original", "x", *data(files), "--output",
                 str(tmp_path / "taken")]) == 1  # fmt: skip
    assert "already exists" in capsys.readouterr().err
