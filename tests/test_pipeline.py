"""`lora-onnx pipeline` on a local Hugging Face folder with two adapter folders saved by PEFT."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "graph_tools.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(root / "base")
    adapters = {}
    for name, cfg in {
        "alpha": LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False),
        "beta": LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["query", "key", "dense"], init_lora_weights=False),
    }.items():
        model = get_peft_model(BertModel.from_pretrained(root / "base"), cfg)
        with torch.no_grad():  # trained-adapter-sized updates
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.mul_(0.1)
        model.save_pretrained(root / name)
        adapters[name] = root / name
    return root / "base", adapters


def test_pipeline_cli_on_local_folder(hf_folders, tmp_path):
    base, adapters = hf_folders
    out = tmp_path / "out"
    res = _cli("pipeline", "--base", str(base), "--adapter", f"alpha={adapters['alpha']}", "--adapter",
               f"beta={adapters['beta']}", "-o", str(out), "--quantize", "w8a16", "-q")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(base)" in res.stdout and "alpha" in res.stdout and "beta" in res.stdout
    assert "stages:" in res.stdout and "report:" in res.stdout
    assert (out / "report.html").is_file()
    assert (out / "package" / "manifest.json").is_file()
    assert (out / "quantized" / "encodings" / "alpha.encodings").is_file()
    assert res.stderr == ""  # --quiet: no progress bars, no library chatter


def test_pipeline_python_api_matches(hf_folders, tmp_path):
    from exporters import pipeline

    base, adapters = hf_folders
    result = pipeline(str(base), adapters, tmp_path / "o", quantize="none", mode="external", quiet=True, report=False)
    assert result.passed
    assert [c.adapter for c in result.checks] == ["(base)", "alpha", "beta"]
    assert all(c.float_max_abs <= 1e-4 for c in result.checks)
    from safetensors.numpy import load_file

    expected = {n: sum(".lora_A." in k for k in load_file(d / "adapter_model.safetensors")) for n, d in adapters.items()}
    assert {c.adapter: c.sites for c in result.checks} == {"(base)": 0, **expected}
    assert expected == {"alpha": 4, "beta": 11}  # beta's "dense" matches 3 per layer + the pooler


@pytest.mark.parametrize(
    "args, message",
    [
        (["--base", "no/such/folder", "--adapter", "a=x"], "not a Hugging Face model folder"),
        (["--base", "builtin:nothing", "--adapter", "a=x"], "unknown built-in"),
        (["--base", "builtin:tiny-llama", "--adapter", "broken"], "NAME=PEFT_DIR"),
        (["--base", "builtin:tiny-llama", "--adapter", "a=no/such/adapter"], "no/such/adapter"),
    ],
)
def test_pipeline_bad_input(args, message, tmp_path, capsys):
    from graph_tools import cli

    code = cli.main(["pipeline", *args, "-o", str(tmp_path / "out"), "-q"])  # in-process: the exit code is main's
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert "Traceback" not in err
