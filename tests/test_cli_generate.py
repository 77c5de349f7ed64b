"""``lora-onnx generate``: streams the ids/text AdapterSession.generate makes; bad input is one line, exit 2."""

from __future__ import annotations

import numpy as np
import pytest

from graph_tools import AdapterSession
from graph_tools.cli import main
from graph_builder import FIXTURES

WORDS = [f"w{i}" for i in range(96)]


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_generate_ids_streams_what_the_session_generates(capsys, decoder_packages):
    pkg = decoder_packages("llama")
    want = AdapterSession(pkg).generate(np.array([[5, 9, 11, 40]]), adapter="second", max_new_tokens=7)[0, 4:]
    code, out, err = _cli(capsys, "generate", pkg, "--adapter", "second", "--ids", "5,9,11,40", "--max-new-tokens", 7)
    assert (code, err) == (0, "")
    assert out == ",".join(map(str, want)) + "\n"


def test_generate_prompt_with_tokenizer_and_sampling(capsys, decoder_packages, tokenizer_dir):
    pkg = decoder_packages("llama")
    session = AdapterSession(pkg)
    want = session.generate(np.array([[5, 9, 11]]), adapter={"default": 1.0, "second": 0.5}, max_new_tokens=6,
                            do_sample=True, top_p=0.9, temperature=0.8, seed=11)[0, 3:]
    code, out, err = _cli(capsys, "generate", pkg, "--adapter", "default=1", "--adapter", "second=0.5",
                          "--prompt", "w5 w9 w11", "--tokenizer", tokenizer_dir, "--max-new-tokens", 6,
                          "--sample", "--top-p", 0.9, "--temperature", 0.8, "--seed", 11)
    assert (code, err) == (0, "")
    # special tokens are skipped (none here: a WordLevel vocabulary without specials)
    assert out == " ".join(WORDS[t] for t in want) + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--ids", "5,9", "--adapter", "nope"], "unknown adapter 'nope'"),
    (["--ids", "5,9", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--ids", ",".join(["5"] * 49)], "longer than the context of 48"),
    (["--ids", "5,x"], "comma-separated token ids"),
    (["--prompt", "w5"], "--prompt needs --tokenizer"),
    (["--prompt", "w5", "--tokenizer", "MISSING"], "tokenizer folder does not exist"),
    (["--prompt", "w5", "--tokenizer", "EMPTY"], "no tokenizer.json"),
])
def test_generate_bad_input_is_one_line_exit_2(capsys, decoder_packages, tmp_path, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [str(tmp_path / "missing") if a == "MISSING" else str(tmp_path / "empty") if a == "EMPTY" else a
            for a in argv]
    code, out, err = _cli(capsys, "generate", decoder_packages("llama"), *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_generate_on_a_package_exported_without_past(capsys, tmp_path):
    from graph_tools import extract_adapters

    pkg = extract_adapters(FIXTURES / "ours_llama.onnx", tmp_path / "pkg").path
    code, out, err = _cli(capsys, "generate", pkg, "--ids", "1,2")
    assert code == 2 and out == "" and err.count("\n") == 1 and "not exported with past" in err
