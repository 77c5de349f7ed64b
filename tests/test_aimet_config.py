"""The AIMET quantsim config written with every quantized package, and AIMET-loadable encodings
(per-tensor embedding tables). Loading into aimet-onnx itself is checked in
benchmarks/bench_quant_peers.py (aimet-onnx is not a test dependency)."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from graph_tools.adapters.extract import extract_adapters
from graph_tools.errors import EncodingsError
from graph_tools.quant import quantize, read_encodings
from graph_tools.quant import aimet
from graph_tools.quant.aimet import AIMET_CONFIG_FILE, aimet_config, validate_aimet_config

from graph_builder import FIXTURES


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


def test_config_leaves_normalization_parameters_float():
    op_type = aimet_config()["op_type"]
    for op in ("LayerNormalization", "RMSNormalization", "GroupNormalization"):
        assert op_type[op]["params"]["weight"] == {"is_quantized": "False"}
        assert op_type[op]["params"]["bias"] == {"is_quantized": "False"}


def _qdq_inputs(model: ir.Model) -> dict[str, ir.Node]:
    """Tensor name -> the QuantizeLinear reading it."""
    return {n.inputs[0].name: n for n in model.graph if n.op_type == "QuantizeLinear"}


def test_data_movement_outputs_get_no_qdq(packages):
    fpkg, qpkg = packages
    float_model = ir.load(fpkg.model_path)
    moved = {n.outputs[0].name for n in float_model.graph if n.op_type in aimet.UNQUANTIZED_OUTPUT_OPS}
    assert moved
    quantized = _qdq_inputs(ir.load(qpkg.model_path))
    assert quantized and not moved & set(quantized)


@pytest.fixture(scope="module")
def placed(packages, tmp_path_factory):
    fpkg, _ = packages
    rng = np.random.default_rng(3)
    calib = [{"input_ids": rng.integers(0, 64, (2, 8)), "attention_mask": np.ones((2, 8), np.int64),
              "token_type_ids": np.zeros((2, 8), np.int64)} for _ in range(2)]
    calib[0]["attention_mask"][0, 5:] = 0  # padding: the additive mask holds its sentinel
    return quantize(fpkg.path, tmp_path_factory.mktemp("placed") / "q", calib, aimet_placement=True)


def test_aimet_placement(packages, placed):
    fpkg, _ = packages
    float_model, q_model = ir.load(fpkg.model_path), ir.load(placed.model_path)
    info = placed.manifest.extra["quantization"]
    assert info["aimet_placement"] is True and info["per_row_embeddings"] is False
    qnodes = _qdq_inputs(q_model)
    encodings = read_encodings(placed.path / "encodings" / "base.encodings")
    acts = encodings.activation_encodings
    # a MatMul's second input that is no constant (attention K, V) is symmetric: a signed type
    dynamic = aimet.dynamic_weights(float_model, set(acts))
    assert dynamic and dynamic <= set(qnodes)
    assert {(acts[n].bitwidth, acts[n].is_symmetric) for n in dynamic} == {(16, True)}
    assert {(acts[n].bitwidth, acts[n].is_symmetric) for n in set(acts) - dynamic} == {(16, False)}
    # constant inputs (Add biases) and embedding tables are asymmetric 16-bit, like activations
    biases = {n.inputs[1].name for n in float_model.graph if n.op_type == "Add" and n.inputs[1] is not None
              and n.inputs[1].is_initializer() and not n.inputs[1].is_graph_input()}
    tables = {n.inputs[0].name for n in float_model.graph if n.op_type == "Gather" and n.inputs[0].is_initializer()}
    for name in biases | tables:
        e = encodings.tensors[name]
        assert (e.bitwidth, e.is_symmetric, e.enc_type) == (16, False, "PER_TENSOR"), name
    # lora_scale: an unsigned constant (zero point 0); A/B stay int16 symmetric per tensor
    for slot in placed.manifest.slots:
        if slot.role == "lora_scale.quantized":
            assert slot.dtype == "uint16"
        elif slot.role.endswith(".quantized"):
            assert slot.dtype == "int16"
    # the mask sentinel stays float, listed for the AIMET user to disable
    assert info["float_activations"] and not set(info["float_activations"]) & set(qnodes)


def test_aimet_placement_stays_accurate(packages, placed):
    from graph_tools.runtime.session import AdapterSession

    fpkg, _ = packages
    rng = np.random.default_rng(4)
    feeds = {"input_ids": rng.integers(0, 64, (2, 8)), "attention_mask": np.ones((2, 8), np.int64),
             "token_type_ids": np.zeros((2, 8), np.int64)}
    fs, qs = AdapterSession(fpkg.path), AdapterSession(placed.path)
    for adapter in (None, *placed.adapters):
        f, q = fs.run(None, feeds, adapter=adapter)[0], qs.run(None, feeds, adapter=adapter)[0]
        cos = float((f * q).sum() / np.linalg.norm(f) / np.linalg.norm(q))
        assert cos > 0.999, (adapter, cos)


def test_cli_aimet_placement(packages, tmp_path, capsys):
    from graph_tools.cli import main

    fpkg, _ = packages
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, 64, (4, 8)), attention_mask=np.ones((4, 8), np.int64),
             token_type_ids=np.zeros((4, 8), np.int64))
    assert main(["quantize", str(fpkg.path), "-o", str(tmp_path / "q"), "--calibration", str(tmp_path / "calib.npz"),
                 "-q", "--aimet-placement"]) == 0
    info = json.loads((tmp_path / "q" / "manifest.json").read_text())["extra"]["quantization"]
    assert info["aimet_placement"] is True and info["per_row_embeddings"] is False
    capsys.readouterr()
