"""write_genai_folder / `lora-onnx genai`: onnxruntime-genai generates what PEFT generates.

Each decoder family's tiny model (two adapters of different ranks and targets) is exported with
past, extracted into a package and written as a genai folder; one ``og.Model`` then generates
greedily for the base model and each adapter, switching between generations, and every sequence
must equal PEFT ``model.generate(do_sample=False)``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import decoder_models
from graph_tools import PackageError, TokenizerError, write_genai_folder
from graph_tools import extract_adapters
from graph_tools.cli import main as cli_main

import onnxruntime_genai as og
from graph_builder import FIXTURES

NEW_TOKENS = 10
EOS = 2


@pytest.fixture(scope="module")
def packages(decoders, tmp_path_factory):
    root = tmp_path_factory.mktemp("genai_pkgs")
    built = {}

    def get(family):
        if family not in built:
            model, path = decoders(family)
            built[family] = (model, extract_adapters(path, root / family))
        return built[family]

    return get


def _peft_generate(model, prompt: list[int], adapter: str | None) -> list[int]:
    ids = torch.tensor([prompt])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                  pad_token_id=EOS)
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                out = model.generate(**kwargs)
        else:
            model.set_adapter(adapter)
            out = model.generate(**kwargs)
    return _until_eos(out[0].tolist(), len(prompt))


def _until_eos(seq: list[int], prompt_len: int) -> list[int]:
    new = seq[prompt_len:]
    return seq[:prompt_len] + (new[: new.index(EOS)] if EOS in new else new)


def _og_generate(model, adapters, prompt: list[int], adapter: str | None) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return _until_eos([int(t) for t in generator.get_sequence(0)], len(prompt))


@pytest.mark.parametrize("family", decoder_models.FAMILIES)
def test_og_greedy_equals_peft_switching_adapters_in_one_model(family, packages, tmp_path):
    model, package = packages(family)
    folder = write_genai_folder(package.path, tmp_path / "genai")
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is False
    assert config["model"]["decoder"]["num_hidden_layers"] == model.config.num_hidden_layers
    og_model = og.Model(str(folder))
    adapters = og.Adapters(og_model)
    for name in package.adapters:
        adapters.load(str(folder / "adapters" / f"{name}.onnx_adapter"), name)
    prompts = [[5, 17, 33, 9, 40, 7], [60, 3, 81]]
    outputs: dict[tuple, set] = {tuple(p): set() for p in prompts}
    for adapter in [None, "default", "second", None, "second", "default"]:  # switch back and forth
        for prompt in prompts:
            got = _og_generate(og_model, adapters, prompt, adapter)
            want = _peft_generate(model, prompt, adapter)
            assert got == want, (family, adapter, prompt)
            outputs[tuple(prompt)].add(tuple(got))
    # the adapters change the continuation (else switching could go unnoticed)
    assert max(len(v) for v in outputs.values()) == 3


CORPUS = ["the cat sat on the mat", "a dog ran in the park", "the sun is warm today", "we like green tea and red apples"]


def _tiny_tokenizer(folder):
    """A byte-level BPE (GPT-2 style, what og.Tokenizer reads) of < 96 tokens, saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=90, special_tokens=["<pad>", "<s>", "</s>"]))
    assert tok.get_vocab_size() <= decoder_models.VOCAB and tok.token_to_id("</s>") == EOS
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return fast


def test_tokenizer_files_copied_and_og_tokenizer_round_trips(packages, tmp_path):
    model, package = packages("llama")
    hf = _tiny_tokenizer(tmp_path / "tok")
    folder = write_genai_folder(package.path, tmp_path / "genai", tokenizer_dir=tmp_path / "tok")
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    og_model = og.Model(str(folder))
    tokenizer = og.Tokenizer(og_model)
    text = "the cat ran in the park"
    ids = [int(i) for i in tokenizer.encode(text)]
    assert ids == hf(text)["input_ids"] and len(ids) > 3
    out = _og_generate(og_model, og.Adapters(og_model), ids, None)
    assert out == _peft_generate(model, ids, None)
    assert tokenizer.decode(np.array(out, dtype=np.int32)) == hf.decode(out)


def test_safetensors_package_adapters_are_converted(decoders, tmp_path):
    model, path = decoders("qwen2")
    package = extract_adapters(path, tmp_path / "pkg", format="safetensors")
    folder = write_genai_folder(package, tmp_path / "genai")
    assert sorted(p.name for p in (folder / "adapters").iterdir()) == ["default.onnx_adapter", "second.onnx_adapter"]
    og_model = og.Model(str(folder))
    adapters = og.Adapters(og_model)
    adapters.load(str(folder / "adapters" / "second.onnx_adapter"), "second")
    prompt = [5, 17, 33, 9]
    assert _og_generate(og_model, adapters, prompt, "second") == _peft_generate(model, prompt, "second")


# -- bad input: one typed error, nothing written ---------------------------------------------------
def _only_entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_existing_target_refused_and_left_alone(packages, tmp_path):
    _, package = packages("llama")
    target = tmp_path / "genai"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(PackageError, match="already exists"):
        write_genai_folder(package.path, target)
    assert _only_entries(target) == ["keep.txt"]
    assert _only_entries(tmp_path) == ["genai"]


@pytest.mark.parametrize("missing", ["tokenizer.json", "tokenizer_config.json"])
def test_tokenizer_folder_missing_files_refused(missing, packages, tmp_path):
    _, package = packages("llama")
    _tiny_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / missing).unlink()
    with pytest.raises(TokenizerError, match=missing):
        write_genai_folder(package.path, tmp_path / "genai", tokenizer_dir=tmp_path / "tok")
    assert _only_entries(tmp_path) == ["tok"]


def test_package_without_past_refused(tmp_path):
    package = extract_adapters(FIXTURES / "ours_llama.onnx", tmp_path / "pkg")
    with pytest.raises(PackageError, match="without past"):
        write_genai_folder(package.path, tmp_path / "genai")
    assert _only_entries(tmp_path) == ["pkg"]


def test_external_mode_package_refused(decoders, tmp_path):
    _, path = decoders("llama")
    package = extract_adapters(path, tmp_path / "pkg", mode="external")
    with pytest.raises(PackageError, match="mode='inputs'"):
        write_genai_folder(package.path, tmp_path / "genai")
    assert _only_entries(tmp_path) == ["pkg"]


def test_cli_genai(packages, tmp_path, capsys):
    _, package = packages("llama")
    _tiny_tokenizer(tmp_path / "tok")
    assert cli_main(["genai", str(package.path), "-o", str(tmp_path / "g"), "--tokenizer", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert "genai_config.json" in out and (tmp_path / "g" / "tokenizer.json").is_file()
    og.Model(str(tmp_path / "g"))  # loads as it is
    # bad input: one error line, exit 2
    assert cli_main(["genai", str(package.path), "-o", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "already exists" in err[0]
    assert cli_main(["genai", str(package.path), "-o", str(tmp_path / "h"), "--tokenizer", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such tokenizer folder" in err[0]
    assert not (tmp_path / "h").exists()
