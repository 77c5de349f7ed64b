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
        (["--base", "builtin:tiny-llama", "--adapter", "a=x", "--prompt", "hi"], "--task text-generation"),
        (["--task", "text-generation", "--base", "builtin:minilm", "--adapter", "a=x"], "needs a causal LM"),
        (["--task", "text-generation", "--base", "builtin:tiny-llama", "--adapter", "a=x", "--max-new-tokens", "0"],
         "max_new_tokens must be a positive integer"),
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


# ------------------------------------------------------------------ --task text-generation

CORPUS = ["the cat sat on the mat", "a dog ran in the park", "the sun is warm today", "we like green tea and red apples"]


@pytest.fixture(scope="module")
def causal_folders(tmp_path_factory):
    """A tiny Llama saved with save_pretrained (with a tokenizer) and two PEFT adapter folders."""
    import decoder_models
    from exporters.demo_models import byte_bpe_tokenizer

    root = tmp_path_factory.mktemp("causal")
    base, adapters = decoder_models.save_hf_folders("llama", root)
    tok = byte_bpe_tokenizer(CORPUS, base, vocab_size=90)
    assert tok.eos_token_id == 2 and len(tok) <= decoder_models.VOCAB
    return base, adapters


@pytest.fixture(scope="module")
def generation_run(causal_folders, tmp_path_factory):
    """``lora-onnx pipeline --task text-generation`` in-process (cli.main), quantized W8A16: the
    command's exit code and what it wrote to Python's stdout/stderr (C++ output is not seen here;
    test_pipeline_cli_on_local_folder runs the real CLI in a subprocess for that)."""
    import contextlib
    import io

    from graph_tools import cli

    base, adapters = causal_folders
    out = tmp_path_factory.mktemp("gen") / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["pipeline", "--task", "text-generation", "--base", str(base), "--adapter", f"a={adapters['a']}",
                         "--adapter", f"b={adapters['b']}", "-o", str(out), "--quantize", "w8a16", "--prompt", "the cat",
                         "--prompt", "we like red", "--max-new-tokens", "12", "-q"])
    return out, subprocess.CompletedProcess([], code, stdout.getvalue(), stderr.getvalue())


def test_text_generation_pipeline_cli(generation_run, causal_folders):
    import json

    out, res = generation_run
    base, adapters = causal_folders
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr == ""
    # the summary: fp32 greedy tokens == PEFT generate for the base model and each adapter (2
    # prompts x 12), and the QDQ package's logit cosine and token agreement beside them
    header = next(line for line in res.stdout.splitlines() if "greedy == PEFT" in line)
    assert "qdq cos" in header and "qdq tokens" in header, header
    for name in ("(base)", "a", "b"):
        row = next(line for line in res.stdout.splitlines() if line.startswith(name + " "))
        cells = row.split()  # adapter rank sites KiB max-abs greedy qdq-cos qdq-tokens ms/token ok
        assert len(cells) == 10 and cells[5] == "24/24" and cells[-1] == "yes", row
        assert float(cells[6]) > 0.99 and cells[7].endswith("/24"), row
    assert "prompt 0: 'the cat'" in res.stdout
    assert (out / "quantized" / "encodings" / "a.encodings").is_file()
    # the manifest names the user's folders, not the pipeline's temporary export
    manifest = json.loads((out / "package" / "manifest.json").read_text())
    assert {a["name"]: a["source"] for a in manifest["adapters"]} == {n: f"peft:{d.resolve()}" for n, d in adapters.items()}
    assert manifest["extra"]["base"] == str(base.resolve())
    assert ".tmp" not in json.dumps(manifest)
    # the genai folder, with the base folder's tokenizer files
    genai = out / "genai"
    for name in ("genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json", "adapters/a.onnx_adapter",
                 "adapters/b.onnx_adapter"):
        assert (genai / name).is_file(), name
    assert "id='generation'" in (out / "report.html").read_text()


def test_text_generation_genai_folder_generates_like_the_package(generation_run):
    """The folder the pipeline wrote loads in onnxruntime-genai and gives the package's greedy tokens."""
    import numpy as np
    import onnxruntime_genai as og

    from graph_tools.runtime.session import AdapterSession

    out, res = generation_run
    assert res.returncode == 0, res.stderr
    session = AdapterSession(out / "package")
    model = og.Model(str(out / "genai"))
    tokenizer = og.Tokenizer(model)
    adapters = og.Adapters(model)
    adapters.load(str(out / "genai" / "adapters" / "b.onnx_adapter"), "b")
    ids = [int(i) for i in tokenizer.encode("the dog")]
    for choice in (None, "b"):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 8, do_sample=False)
        generator = og.Generator(model, params)
        if choice:
            generator.set_active_adapter(adapters, choice)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        got = [int(t) for t in generator.get_sequence(0)]
        want = session.generate(np.array([ids]), adapter=choice, max_new_tokens=8)[0].tolist()
        assert got == want[: len(got)] and len(got) > len(ids), choice


def test_text_generation_default_prompts_are_seeded_ids_shown_as_text(causal_folders):
    """Without ``prompts`` the verify batch is two rows of seeded random ids (8 and 5 tokens),
    left-padded, decoded with the base folder's tokenizer for the summary (no export needed)."""
    from transformers import AutoModelForCausalLM

    from exporters.pipelines import _prompts
    from graph_tools.runtime.generate import load_tokenizer

    base, _ = causal_folders
    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = load_tokenizer(base)
    first = _prompts(model, None, tokenizer, 6)
    assert [len(r) for r in first.rows] == [8, 5] and first.ids.shape == (2, 8)
    assert first.mask.tolist()[1] == [0, 0, 0] + [1] * 5  # left padding
    assert first.ids[0].tolist() == first.rows[0] and first.ids[1, 3:].tolist() == first.rows[1]
    assert first.texts is not None and len(first.texts) == 2 and all(isinstance(t, str) for t in first.texts)
    again = _prompts(model, None, tokenizer, 6)
    assert again.rows == first.rows  # seeded: every run verifies on the same rows
    given = _prompts(model, ["the cat"], tokenizer, 6)
    assert given.texts == ["the cat"] and given.rows == [list(tokenizer.encode("the cat").ids)]


def test_text_generation_refuses_an_encoder(hf_folders, tmp_path, capsys):
    from graph_tools import cli

    base, adapters = hf_folders
    code = cli.main(["pipeline", "--task", "text-generation", "--base", str(base), "--adapter", f"alpha={adapters['alpha']}",
                     "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def loud_transformers():
    """transformers' progress bars on and its warnings shown, as in a fresh process (an in-process
    CLI run earlier in this worker turned them off for good), restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_warning()
    yield hf_logging
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
    hf_logging.set_verbosity(level)


def test_generation_demo_at_reduced_size(tmp_path, capfd, loud_transformers):
    """The demo's generation half (fewer training steps): a small LM and two topic adapters trained
    in-process, greedy continuations from one session == PEFT generate, shown in the report; quiet
    means quiet (no transformers progress bars either)."""
    from exporters.demo_models import DEMO_LM_ADAPTERS, DEMO_LM_PROMPTS, generation_demo
    from graph_tools.report import write_report

    out = tmp_path / "demo" / "generation"
    result = generation_demo(out, quantize="w8a16", quiet=True, base_steps=30, adapter_steps=20, max_new_tokens=10)
    assert capfd.readouterr().err == ""
    assert loud_transformers.is_progress_bar_enabled()  # and restored afterwards
    assert result.passed, result.table()
    assert [c.adapter for c in result.checks] == ["(base)", *sorted(DEMO_LM_ADAPTERS)]
    assert result.prompt_texts == DEMO_LM_PROMPTS
    for c in result.checks:
        assert c.tokens_same == c.tokens_total > 0 and c.texts and all(isinstance(t, str) for t in c.texts)
    assert len({tuple(c.continuations[0]) for c in result.checks}) == len(result.checks)  # the adapters change it
    for name in ("base/tokenizer.json", "base/config.json", *(f"{a}/adapter_config.json" for a in DEMO_LM_ADAPTERS)):
        assert (out / "text_model" / name).is_file(), name
    import json

    for folder in ("package", "quantized"):  # trained beside the output, moved in: the manifests follow
        manifest = json.loads((out / folder / "manifest.json").read_text())
        assert {a["source"] for a in manifest["adapters"]} == {f"peft:{out.resolve() / 'text_model' / a}" for a in DEMO_LM_ADAPTERS}
        assert manifest["extra"]["base"] == str(out.resolve() / "text_model" / "base")
    page = (out / "report.html").read_text()
    assert "id='generation'" in page and result.checks[1].texts[0].strip()[:8] in page
    # the demo's main report shows the generation run as a companion section
    main = write_report(result, tmp_path / "main.html", companions=[("Text generation", result, "generation/report.html")])
    assert "id='companion'" in main.read_text() and "generation/report.html" in main.read_text()


def test_progress_is_one_plain_line_per_stage_in_a_log(monkeypatch):
    """stderr not a terminal (a log, CI): one line per finished stage, no carriage returns; quiet:
    nothing at all."""
    import io

    from exporters.pipelines import _Progress

    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    bar = _Progress("export", 2, quiet=False)
    bar.step()
    assert log.getvalue() == ""
    bar.step()
    bar.step()  # past the total: still one line
    quiet = _Progress("verify", 1, quiet=True)
    quiet.step()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export     2/2 [") and lines[0].endswith("s]"), lines
    assert "\r" not in log.getvalue()
