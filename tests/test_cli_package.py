"""``lora-onnx extract / convert / run / merge / strip`` end to end on the Llama-shaped model,
outputs checked against PEFT. Commands run in-process through ``cli.main`` (what the entry point
calls); the first one goes through the installed entry point, so the script itself is covered."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from peft import LoraConfig

import models
import package_helpers as H
from graph_tools import cli

LORA_ONNX = shutil.which("lora-onnx", path=str(Path(sys.executable).parent)) or "lora-onnx"


def _entry_point(*argv) -> str:
    proc = subprocess.run([LORA_ONNX, *map(str, argv)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout


@pytest.fixture
def run_cli(capsys):
    def run(*argv) -> str:
        capsys.readouterr()
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "Traceback" not in err
        return out

    return run


@pytest.fixture(scope="module")
def case(zoo, tmp_path_factory):
    return H.get_case("llama", zoo, tmp_path_factory)


def _npz_error(path, ref) -> float:
    with np.load(path) as data:
        return H.max_error(list(data.files), [data[k] for k in data.files], ref)


def test_cli_end_to_end(case, tmp_path, run_cli):
    np.savez(tmp_path / "feeds.npz", **case.feeds)
    feeds = tmp_path / "feeds.npz"
    # an adapter trained after export, saved by PEFT
    model, _ = models.ZOO[H.ZOO_NAME["llama"]]()
    model.add_adapter("trained", LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                            init_lora_weights=False))
    model.eval()
    model.save_pretrained(tmp_path / "peft", selected_adapters=["trained"])
    trained_ref = H.peft_outputs(model, case.torch_feeds, "trained")

    out = _entry_point("extract", case.export, "-o", tmp_path / "pkg")
    assert "adapter default" in out and "adapter second" in out
    pkg = tmp_path / "pkg"
    assert "wrote" in run_cli("convert", tmp_path / "peft" / "trained", "--package", pkg)
    assert (pkg / "adapters" / "trained.onnx_adapter").is_file()

    out = run_cli("run", pkg, "--adapter", "trained", "--feeds", feeds, "-o", tmp_path / "trained.npz")
    assert "logits: shape=[3, 7, " in out
    assert _npz_error(tmp_path / "trained.npz", trained_ref) <= H.TOL
    run_cli("run", pkg, "--feeds", feeds, "-o", tmp_path / "base.npz")
    assert _npz_error(tmp_path / "base.npz", case.ref("base")) <= H.TOL
    run_cli("run", pkg, "--adapter", "default=0.5", "--adapter", "second=1.5", "--feeds", feeds, "-o", tmp_path / "w.npz")
    assert _npz_error(tmp_path / "w.npz", case.ref("weighted")) <= H.TOL

    run_cli("merge", pkg, "--adapter", "trained", "-o", tmp_path / "merged" / "model.onnx")
    run_cli("strip", case.export, "-o", tmp_path / "base" / "model.onnx")
    for path, ref in ((tmp_path / "merged" / "model.onnx", trained_ref), (tmp_path / "base" / "model.onnx", case.ref("base"))):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, case.feeds)
        assert H.max_error([o.name for o in session.get_outputs()], got, ref) <= H.TOL

    # the other extraction options
    out = run_cli("extract", case.export, "-o", tmp_path / "packed", "--pack", "--max-rank", 6, "--format", "safetensors", "-q")
    assert "pack=True" in out and "second.safetensors" in out
    run_cli("run", tmp_path / "packed", "--adapter", "second", "--feeds", feeds, "-o", tmp_path / "second.npz")
    assert _npz_error(tmp_path / "second.npz", case.ref("second")) <= H.TOL
    out = run_cli("extract", case.export, "-o", tmp_path / "ext", "--mode", "external", "-q")
    assert "mode=external" in out
    run_cli("run", tmp_path / "ext", "--adapter", "default=1", "--adapter", "second=1", "--feeds", feeds, "-o", tmp_path / "both.npz")
    assert _npz_error(tmp_path / "both.npz", case.ref("both")) <= H.TOL
    # nothing but the outputs asked for
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["feeds.npz", "peft", "pkg", "trained.npz", "base.npz", "w.npz", "merged", "base", "packed", "second.npz", "ext", "both.npz"])
