"""`grin-peft unlearn/eval --template/--chat/--no-chat/--system-prompt` lay examples out as the Python API's QAFormat
does, on a tokenizer with a chat template; `eval --lm-eval` runs lm-evaluation-harness on the loaded model."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from grin_peft import GrinConfig, unlearn
from grin_peft.cli import main
from grin_peft.data import QAFormat
from grin_peft.metrics import evaluate_qa
from grin_peft.synthetic import generate_dataset, write_jsonl
from grin_peft.tiny import build_model, tiny_llama_config, train_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SYSTEM = "Answer briefly."


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_format")
    data = generate_dataset(num_people=6, questions_per_person=3, forget_fraction=0.34, seed=0)
    tokenizer = train_tokenizer([f"<|user|>{i['question']}<|assistant|>{i['answer']}" for i in data.train], 400)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = build_model(tiny_llama_config(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2), seed=0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_jsonl(data.forget, root / "forget.jsonl")
    write_jsonl(data.retain, root / "retain.jsonl")
    return root, data


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _eval_json(workspace, capsys, tmp_path, *flags):
    root, _ = workspace
    out = tmp_path / f"scores{len(list(tmp_path.iterdir()))}.json"
    code, _, err = run(capsys, "eval", "--model", root / "model", "--data", root / "forget.jsonl",
                       "--max-new-tokens", "4", "--json", out, *flags)  # fmt: skip
    assert code == 0, err
    return json.loads(out.read_text())["per_item"]["nll"]


def _api_nll(workspace, **format_options):
    root, data = workspace
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    fmt = QAFormat(AutoTokenizer.from_pretrained(root / "model"), **format_options)
    return evaluate_qa(model, fmt, data.forget, generate=False, progress=False)["per_item"]["nll"]


def test_eval_layouts_match_the_python_api(workspace, capsys, tmp_path):
    chat = _eval_json(workspace, capsys, tmp_path, "--system-prompt", SYSTEM)  # the chat template by default
    assert chat == pytest.approx(_api_nll(workspace, chat=True, system_prompt=SYSTEM), abs=1e-6)
    plain = _eval_json(workspace, capsys, tmp_path, "--no-chat", "--template", "Q: {question}\\nA: {answer}")
    assert plain == pytest.approx(_api_nll(workspace, chat=False, template="Q: {question}\nA: {answer}"), abs=1e-6)
    assert chat != pytest.approx(plain, abs=1e-3)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--template", "Q: {question} A: {answer}"], "add --no-chat"),
        (["--no-chat", "--system-prompt", SYSTEM], "--system-prompt needs the chat layout"),
        (["--no-chat", "--template", "no placeholders"], "template must contain"),
    ],
)
def test_flags_a_layout_would_ignore_are_one_line_errors(workspace, capsys, tmp_path, flags, message):
    root, _ = workspace
    for command in ("eval", "unlearn"):
        target = ["--data", root / "forget.jsonl"] if command == "eval" else [
            "--forget", root / "forget.jsonl", "--output", tmp_path / "delta", "--epochs", "1"]  # fmt: skip
        code, _, err = run(capsys, command, "--model", root / "model", *target, *flags)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "delta").exists()


def test_eval_needs_data_or_lm_eval(workspace, capsys):
    root, _ = workspace
    code, _, err = run(capsys, "eval", "--model", root / "model")
    assert code == 1 and "--data, --lm-eval" in err


def test_unlearn_with_chat_flags_trains_what_the_api_trains(workspace, capsys, tmp_path):
    root, data = workspace
    code, _, err = run(capsys, "unlearn", "--model", root / "model", "--forget", root / "forget.jsonl",
                       "--retain", root / "retain.jsonl", "--output", tmp_path / "cli", "--density", "0.05",
                       "--lr", "1e-3", "--epochs", "1", "--objective", "grad_diff", "--chat",
                       "--system-prompt", SYSTEM)  # fmt: skip
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    fmt = QAFormat(AutoTokenizer.from_pretrained(root / "model"), chat=True, system_prompt=SYSTEM)
    config = GrinConfig(density=0.05, seed=0)
    result = unlearn(model, data.forget, data.retain, config=config, objective="grad_diff", tokenizer=fmt,
                     learning_rate=1e-3, num_train_epochs=1, seed=0, per_device_train_batch_size=8,
                     disable_tqdm=True, verbose=False)  # fmt: skip
    result.peft_model.save_pretrained(tmp_path / "api")
    cli, api = (
        load_file(tmp_path / "cli" / "adapter_model.safetensors"),
        load_file(tmp_path / "api" / "adapter_model.safetensors"),
    )
    assert cli.keys() == api.keys()
    for key in cli:
        assert (cli[key] == api[key]).all() if "index" in key else cli[key].allclose(api[key], atol=1e-6), key


def test_eval_runs_lm_eval_on_a_local_task(workspace, capsys, tmp_path):
    pytest.importorskip("lm_eval")
    root, _ = workspace
    task = tmp_path / "wmdp-chem.jsonl"
    items = [
        {"question": f"Which is {n}?", "choices": ["one", "two", "three", "four"], "answer": n % 4} for n in range(4)
    ]
    task.write_text("".join(json.dumps(item) + "\n" for item in items))
    code, out, err = run(capsys, "eval", "--model", root / "model", "--lm-eval", task, "--json", tmp_path / "o.json")
    assert code == 0, err
    assert "| local_wmdp_chem |" in out
    assert 0.0 <= json.loads((tmp_path / "o.json").read_text())["lm_eval"]["local_wmdp_chem"]["acc,none"] <= 1.0
