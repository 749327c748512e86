"""`grin-peft` on the command line: useful output on good input, one clear line and nothing written on bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from cli_workspace import write_workspace
from safetensors.torch import load_file

from grin_peft.cli import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_workspace(root)
    return root


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_unlearn_merge_revert_round_trip(workspace, capsys, tmp_path):
    code, out, err = run(
        capsys,
        "unlearn",
        "--model",
        workspace / "model",
        "--forget",
        workspace / "forget.jsonl",
        "--retain",
        workspace / "retain.jsonl",
        "--output",
        tmp_path / "delta",
        "--density",
        "0.05",
        "--epochs",
        "1",
        "--objective",
        "grad_diff",
    )
    assert code == 0, err
    assert "delta written" in out
    assert (tmp_path / "delta" / "adapter_model.safetensors").exists()
    assert (tmp_path / "delta" / "localization.json").exists()

    code, out, err = run(
        capsys, "merge", "--model", workspace / "model", "--delta", tmp_path / "delta", "--output", tmp_path / "merged"
    )
    assert code == 0, err
    code, out, err = run(
        capsys,
        "revert",
        "--model",
        tmp_path / "merged",
        "--delta",
        tmp_path / "delta",
        "--output",
        tmp_path / "restored",
    )
    assert code == 0, err
    original = load_file(workspace / "model" / "model.safetensors")
    restored = load_file(tmp_path / "restored" / "model.safetensors")
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_unlearn_accepts_the_inverted_hinge_loss(workspace, capsys, tmp_path):
    code, out, err = run(
        capsys,
        "unlearn",
        "--model",
        workspace / "model",
        "--forget",
        workspace / "forget.jsonl",
        "--retain",
        workspace / "retain.jsonl",
        "--output",
        tmp_path / "delta",
        "--density",
        "0.05",
        "--epochs",
        "1",
        "--objective",
        "ihl",
    )
    assert code == 0, err
    assert (tmp_path / "delta" / "adapter_model.safetensors").exists()


def test_unlearn_sam_rho_trains_a_different_delta_sharpness_aware(workspace, capsys, tmp_path):
    deltas = []
    for rho in ("0", "0.5"):
        argv = ["--forget", workspace / "forget.jsonl", "--retain", workspace / "retain.jsonl", "--density", "0.05"]
        out_dir = tmp_path / f"delta{rho}"
        code, out, err = run(
            capsys, "unlearn", "--model", workspace / "model", *argv, "--epochs", "1", "--sam-rho", rho,
            "--output", out_dir,
        )  # fmt: skip
        assert code == 0, err
        deltas.append(load_file(out_dir / "adapter_model.safetensors"))
    values = [k for k in deltas[0] if "grin_values" in k]
    assert values and any(not torch.equal(deltas[0][k], deltas[1][k]) for k in values)
    assert all(torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0] if "grin_indices" in k)  # same entries


def test_eval_prints_a_table_and_writes_json(workspace, capsys, tmp_path):
    code, out, err = run(
        capsys,
        "eval",
        "--model",
        workspace / "model",
        "--data",
        workspace / "forget.jsonl",
        "--max-new-tokens",
        "8",
        "--json",
        tmp_path / "scores.json",
    )
    assert code == 0, err
    assert "| probability |" in out
    assert "summary" in json.loads((tmp_path / "scores.json").read_text())


@pytest.mark.parametrize(
    ("setup", "argv", "message"),
    [
        (None, ["--forget", "missing.jsonl"], "no such file"),
        ("malformed", ["--forget", "{bad}"], "line 2"),
        ("empty", ["--forget", "{bad}"], "no records"),
        (None, ["--model", "{nomodel}"], "no such file or directory"),
        (None, ["--threads", "0"], "--threads must be a positive integer"),
        (None, ["--sam-rho", "-0.5"], "sam_rho must be a finite number >= 0"),
    ],
)
def test_unlearn_bad_input_is_one_line_and_writes_nothing(workspace, capsys, tmp_path, setup, argv, message):
    bad = tmp_path / "bad.jsonl"
    if setup == "malformed":
        bad.write_text('{"question": "q", "answer": "a"}\n{"question": oops}\n')
    elif setup == "empty":
        bad.write_text("")
    args = {
        "--model": str(workspace / "model"),
        "--forget": str(workspace / "forget.jsonl"),
        "--retain": str(workspace / "retain.jsonl"),
        "--output": str(tmp_path / "out"),
    }
    for key, value in zip(argv[::2], argv[1::2]):
        args[key] = value.format(bad=bad, nomodel=tmp_path / "no-such-model")
    code, out, err = run(capsys, "unlearn", *[x for pair in args.items() for x in pair])
    assert code != 0
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_refuses_to_overwrite_a_non_empty_output(workspace, capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    code, _, err = run(
        capsys, "merge", "--model", workspace / "model", "--delta", workspace / "nodelta", "--output", tmp_path / "out"
    )
    assert code != 0
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_installed_entry_point_teaches_with_help():
    result = subprocess.run([sys.executable, "-m", "grin_peft_launcher", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("unlearn", "merge", "revert", "eval", "demo"):
        assert command in result.stdout
    assert "examples:" in result.stdout


def test_unlearn_paper_preset_writes_the_papers_score(workspace, capsys, tmp_path):
    common = ["--model", workspace / "model", "--forget", workspace / "forget.jsonl", "--retain"]
    code, _, err = run(capsys, "unlearn", *common, workspace / "retain.jsonl", "--output", tmp_path / "delta",
                       "--density", "0.05", "--epochs", "1", "--score", "paper")  # fmt: skip
    assert code == 0, err
    saved = json.loads((tmp_path / "delta" / "adapter_config.json").read_text())
    assert (saved["score"], saved["grad_statistic"], saved["eps_mode"], saved["eps"]) == (
        "gradient_ratio",
        "abs_sum",
        "absolute",
        1e-8,
    )


@pytest.fixture(scope="module")
def crafted(workspace):
    """Deltas for the CLI model, each broken the way an attacker or a bad disk would break one."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from grin_peft import GrinConfig
    from grin_peft.delta_file import atomic_save_file
    from grin_peft.integrity import write_manifest

    good = workspace / "good-delta"
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    get_peft_model(base, GrinConfig(target_modules="all-linear", density=0.05, score="random")).save_pretrained(good)
    out = {}
    for name in ("extra", "float8", "listconfig", "pickle"):
        path = workspace / f"delta-{name}"
        shutil.copytree(good, path)
        tensors = load_file(path / "adapter_model.safetensors")
        if name == "extra":
            tensors["base_model.model.lm_head.weight"] = torch.zeros(base.lm_head.weight.shape)
        elif name == "float8":
            key = next(k for k in sorted(tensors) if k.endswith("grin_values"))
            tensors[key] = tensors[key].to(torch.float8_e4m3fn)
        elif name == "listconfig":
            (path / "adapter_config.json").write_text("[]")
        atomic_save_file(tensors, str(path / "adapter_model.safetensors"))
        write_manifest(path)  # the attacker re-writes the manifest too: the checks behind it must hold
        if name == "pickle":
            torch.save(tensors, path / "adapter_model.bin")
            (path / "adapter_model.safetensors").unlink()
            (path / "grin.sha256").unlink()
        out[name] = path
    return out


@pytest.mark.parametrize("command", ["merge", "revert", "eval"])
@pytest.mark.parametrize("kind", ["extra", "float8", "listconfig", "pickle"])
def test_a_crafted_delta_is_one_line_and_a_non_zero_exit(workspace, crafted, capsys, tmp_path, command, kind):
    argv = [command, "--model", workspace / "model", "--delta", crafted[kind]]
    argv += ["--data", workspace / "forget.jsonl", "--max-new-tokens", "2"] if command == "eval" else []
    argv += ["--output", tmp_path / "out"] if command != "eval" else []
    code, out, err = run(capsys, *argv)
    assert code == 1, err
    assert err.startswith(f"grin-peft {command}: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_merge_checks_its_output_and_the_delta_type_before_loading_anything(workspace, crafted, capsys, tmp_path,
                                                                           monkeypatch):  # fmt: skip
    import grin_peft.cli.commands as commands

    def no_loading(name):
        raise AssertionError("the model was loaded before the cheap checks")

    monkeypatch.setattr(commands, "load_model", no_loading)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    code, _, err = run(capsys, "merge", "--model", workspace / "model", "--delta", crafted["extra"], "--output",
                       tmp_path / "out")  # fmt: skip
    assert code == 1 and "already exists and is not empty" in err
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    code, _, err = run(capsys, "merge", "--model", workspace / "model", "--delta", lora, "--output", tmp_path / "new")
    assert code == 1 and "not a GRIN delta (peft_type='LORA')" in err
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- issue 11: the command line as a new user meets it
def test_help_and_a_mistyped_flag_answer_before_torch_or_peft_is_imported():
    script = (
        "import sys, grin_peft_launcher\n"
        "for argv in (['--help'], ['unlearn', '--modle', 'x']):\n"
        "    sys.argv = ['grin-peft', *argv]\n"
        "    try:\n"
        "        grin_peft_launcher.main()\n"
        "    except SystemExit as exc:\n"
        "        print(exc.code, 'torch' in sys.modules, 'peft' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.splitlines()[-2:] == ["0 False False", "2 False False"], result.stderr
    assert "unrecognized arguments: --modle" in result.stderr or "required: --model" in result.stderr


@pytest.mark.parametrize("flag", ["--model", "--delta"])
@pytest.mark.parametrize("path", ["./typo", "{tmp}/typo", "{tmp}/../typo/x", "runs/typo"])
def test_a_mistyped_local_path_fails_at_once_without_a_hub_lookup(workspace, capsys, tmp_path, monkeypatch, flag,
                                                                  path):  # fmt: skip
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path was looked up on the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # `runs/typo` is a Hub-shaped name, but runs/ is a folder here
    args = {"--model": workspace / "model", "--delta": workspace / "good-delta"}
    args[flag] = path.format(tmp=tmp_path)
    code, _, err = run(capsys, "merge", "--model", args["--model"], "--delta", args["--delta"], "--output", "out")
    assert code == 1 and "no such file or directory" in err, err
    assert len(err.strip().splitlines()) == 1


def test_offline_mode_is_respected_for_hub_ids(workspace, capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, err = run(capsys, "merge", "--model", workspace / "model", "--delta", "someone/never-downloaded",
                       "--output", tmp_path / "out")  # fmt: skip
    assert code == 1 and "offline, not cached" in err, err


@pytest.fixture(scope="module")
def merged(workspace, crafted, tmp_path_factory):
    """The CLI model with the good delta merged, and the delta's manifest."""
    out = tmp_path_factory.mktemp("merged") / "merged"
    assert main(["merge", "--model", str(workspace / "model"), "--delta", str(workspace / "good-delta"),
                 "--output", str(out)]) == 0  # fmt: skip
    return out, (workspace / "good-delta" / "grin.sha256").read_bytes()


def other_base(workspace, root, **sizes):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = AutoModelForCausalLM.from_pretrained(workspace / "model").config
    for key, value in sizes.items():
        setattr(config, key, value)
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root)
    AutoTokenizer.from_pretrained(workspace / "model").save_pretrained(root)
    return root


def test_messages_name_flags_and_the_flag_to_accept_another_base_exists(workspace, crafted, merged, capsys, tmp_path):
    other = other_base(workspace, tmp_path / "other")
    argv = ["merge", "--model", other, "--delta", workspace / "good-delta"]
    code, _, err = run(capsys, *argv, "--output", tmp_path / "m1")
    assert code == 1 and "--fingerprint-check warn" in err and "grin_fingerprint_check" not in err, err
    code, _, err = run(capsys, *argv, "--output", tmp_path / "m2", "--fingerprint-check", "warn")
    assert code == 0, err
    code, _, err = run(capsys, "revert", "--model", workspace / "model", "--delta", workspace / "good-delta",
                       "--output", tmp_path / "r")  # fmt: skip
    assert code == 1 and "--force" in err and "force=True" not in err, err
    code, _, err = run(capsys, "unlearn", "--model", workspace / "model", "--forget", workspace / "forget.jsonl",
                       "--objective", "idk_nll", "--output", tmp_path / "u")  # fmt: skip
    assert code == 1 and "--refusals FILE" in err and "refusals=[" not in err, err


def test_a_base_of_other_shapes_says_what_differs(workspace, crafted, capsys, tmp_path):
    bigger = other_base(workspace, tmp_path / "bigger", intermediate_size=96)
    code, _, err = run(capsys, "merge", "--model", bigger, "--delta", workspace / "good-delta",
                       "--output", tmp_path / "m", "--fingerprint-check", "off")  # fmt: skip
    assert code == 1 and "other shapes" in err, err
    assert "down_proj is (32, 96) here, (32, 128) in the delta's base" in err, err


def test_a_pinned_digest_on_the_command_line(workspace, crafted, merged, capsys, tmp_path):
    import hashlib

    merged_model, manifest = merged
    digest = hashlib.sha256(manifest).hexdigest()
    argv = ["revert", "--model", merged_model, "--delta", workspace / "good-delta"]
    code, _, err = run(capsys, *argv, "--output", tmp_path / "r1", "--expected-sha256", "0" * 64)
    assert code == 1 and "not the delta you pinned" in err, err
    code, _, err = run(capsys, *argv, "--output", tmp_path / "r2", "--expected-sha256", digest)
    assert code == 0, err


def test_output_folders_follow_the_umask(workspace, crafted, capsys, tmp_path):
    previous = os.umask(0o022)
    try:
        code, _, err = run(capsys, "merge", "--model", workspace / "model", "--delta", workspace / "good-delta",
                           "--output", tmp_path / "merged")  # fmt: skip
    finally:
        os.umask(previous)
    assert code == 0, err
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o755
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "merged").iterdir()} == {
        p.name: "0o644" for p in (tmp_path / "merged").iterdir()
    }
