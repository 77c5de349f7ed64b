"""The AIMET quantsim config written with every quantized package, and AIMET-loadable encodings
(per-tensor embedding tables). Loading into aimet-onnx itself is checked in
benchmarks/bench_quant_peers.py (aimet-onnx is not a test dependency)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from graph_tools.adapters.extract import extract_adapters
from graph_tools.errors import EncodingsError
from graph_tools.quant import quantize, read_encodings
from graph_tools.quant.aimet import AIMET_CONFIG_FILE, aimet_config, validate_aimet_config

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("aimet")
    fpkg = extract_adapters(FIXTURES / "dynamo_bert.onnx", root / "pkg")
    rng = np.random.default_rng(0)
    calib = [{"input_ids": rng.integers(0, 64, (2, 8)), "attention_mask": np.ones((2, 8), np.int64),
              "token_type_ids": np.zeros((2, 8), np.int64)} for _ in range(2)]
    qpkg = quantize(fpkg.path, root / "q", calib, per_row_embeddings=False)
    return fpkg, qpkg


def test_config_keeps_every_op_output_its_own_quantizer():
    config = aimet_config()
    assert config["supergroup_pass_list"] == []  # no MatMul+Add -> Gemm fusion: MatMul outputs stay tensors
    assert config["supergroups"] == []
    assert config["defaults"]["per_channel_quantization"] == "True"
    assert aimet_config(per_channel=False)["defaults"]["per_channel_quantization"] == "False"
    assert aimet_config(symmetric_activations=True)["defaults"]["ops"]["is_symmetric"] == "True"


def test_bad_config_is_refused():
    config = aimet_config()
    config["defaults"]["per_channel_quantization"] = True  # AIMET spells booleans as strings
    with pytest.raises(EncodingsError, match="per_channel_quantization"):
        validate_aimet_config(config)
    with pytest.raises(EncodingsError, match="top level"):
        validate_aimet_config({"defaults": {}})


def test_package_writes_config_and_aimet_loadable_encodings(packages):
    fpkg, qpkg = packages
    written = json.loads((qpkg.path / "encodings" / AIMET_CONFIG_FILE).read_text())
    validate_aimet_config(written)
    assert written == aimet_config()
    float_model = ir.load(fpkg.model_path)
    names = {v.name for v in float_model.graph.inputs} | set(float_model.graph.initializers)
    names |= {o.name for node in float_model.graph for o in node.outputs}
    gathers = {n.inputs[0].name for n in float_model.graph if n.op_type == "Gather" and n.inputs[0].is_initializer()}
    assert gathers
    for name in ["base", *qpkg.adapters]:
        encodings = read_encodings(qpkg.path / "encodings" / f"{name}.encodings")
        missing = [t for t in encodings.tensors if t not in names]
        assert not missing, missing[:3]  # every name is a tensor of the fp32 graph AIMET is given
        for table in gathers:
            assert encodings.param_encodings[table].enc_type == "PER_TENSOR"
    assert qpkg.manifest.extra["quantization"]["per_row_embeddings"] is False


def test_per_tensor_embeddings_stay_accurate(packages):
    from graph_tools.runtime.session import AdapterSession

    fpkg, qpkg = packages
    rng = np.random.default_rng(1)
    feeds = {"input_ids": rng.integers(0, 64, (2, 8)), "attention_mask": np.ones((2, 8), np.int64),
             "token_type_ids": np.zeros((2, 8), np.int64)}
    fs, qs = AdapterSession(fpkg.path), AdapterSession(qpkg.path)
    for adapter in (None, *qpkg.adapters):
        f, q = fs.run(None, feeds, adapter=adapter)[0], qs.run(None, feeds, adapter=adapter)[0]
        cos = float((f * q).sum() / np.linalg.norm(f) / np.linalg.norm(q))
        assert cos > 0.999, (adapter, cos)


def test_cli_per_tensor_embeddings(packages, tmp_path, capsys):
    from graph_tools.cli import main

    fpkg, _ = packages
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, 64, (4, 8)), attention_mask=np.ones((4, 8), np.int64),
             token_type_ids=np.zeros((4, 8), np.int64))
    tables = {n.inputs[0].name for n in ir.load(fpkg.model_path).graph if n.op_type == "Gather" and n.inputs[0].is_initializer()}
    for flag, kind in (([], "PER_CHANNEL"), (["--per-tensor-embeddings"], "PER_TENSOR")):
        out = tmp_path / f"q{len(flag)}"
        assert main(["quantize", str(fpkg.path), "-o", str(out), "--calibration", str(tmp_path / "calib.npz"), "-q", *flag]) == 0
        info = json.loads((out / "manifest.json").read_text())["extra"]["quantization"]
        assert info["per_row_embeddings"] is (not flag)
        encodings = read_encodings(out / "encodings" / "base.encodings")
        assert {encodings.param_encodings[t].enc_type for t in tables} == {kind}
    capsys.readouterr()
