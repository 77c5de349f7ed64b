"""Adapter-aware QDQ quantization: one quantized session serves base and every adapter, each with
its own encodings; encodings files validate and round-trip; bad input is refused cleanly."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from graph_tools import QuantizationError
from graph_tools.quant import quantize, read_encodings
from graph_tools.runtime.session import AdapterSession


def _batches(n: int, seed: int, batch: int = 2, seq: int = 12):
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(0, 128, (batch, seq), generator=g).numpy(), "attention_mask": np.ones((batch, seq), np.int64)}
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def float_package(tiny_llama_package):
    return tiny_llama_package


@pytest.fixture(scope="module")
def w8a16(float_package, tmp_path_factory):
    calib = _batches(3, seed=7)
    out = tmp_path_factory.mktemp("q") / "w8a16"
    return quantize(float_package.path, out, calib, activation_scope="all"), calib


def _cos(a, b):
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def test_one_session_serves_base_and_each_adapter(float_package, w8a16):
    qpkg, calib = w8a16
    fs, qs = AdapterSession(float_package.path), AdapterSession(qpkg.path)
    assert sorted(qs.adapters) == sorted(fs.adapters) == ["default", "second"]
    feeds = calib[0]  # calibrated inputs: errors are quantization steps, not clipping
    outs = {}
    for adapter in (None, "default", "second"):
        f = fs.run(None, feeds, adapter=adapter)[0]
        q = qs.run(None, feeds, adapter=adapter)[0]
        outs[adapter] = q
        assert _cos(f, q) > 0.999, adapter
        assert np.abs(f - q).max() < 0.05 * np.abs(f).max(), adapter
    # the adapter really switches inside the quantized session
    assert np.abs(outs["default"] - outs[None]).max() > 10 * np.abs(outs[None] - fs.run(None, feeds)[0]).max()
    with pytest.raises(Exception, match="one adapter at a time"):
        qs.run(None, feeds, adapter={"default": 1.0, "second": 1.0})


def test_graph_is_qdq_with_raised_opset(w8a16):
    qpkg, _ = w8a16
    model = onnx.load(str(qpkg.model_path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert {o.domain: o.version for o in model.opset_import}[""] >= 21  # uint16/int16 need 21
    onnx.checker.check_model(str(qpkg.model_path), full_check=True)
    lora_list = (qpkg.path / "lora_weight_list.txt").read_text().split()
    assert lora_list and all(".lora_" in n for n in lora_list)


def test_encodings_files(w8a16):
    qpkg, _ = w8a16
    names = {n for node in onnx.load(str(qpkg.model_path), load_external_data=False).graph.node for n in [*node.input, *node.output]}
    base = read_encodings(qpkg.path / "encodings" / "base.encodings")
    per = {a: read_encodings(qpkg.path / "encodings" / f"{a}.encodings") for a in ("default", "second")}
    for e in [base, *per.values()]:
        assert set(e.tensors) <= names  # names are the QDQ graph's tensor names
    quant = qpkg.manifest.extra["quantization"]
    dependent = set(quant["adapter_dependent_activations"])
    for name, b in base.param_encodings.items():
        if ".lora_" not in name:
            assert per["default"].param_encodings[name] == b == per["second"].param_encodings[name]
    # every LoRA weight and LoRA scale has an encoding, different per adapter
    lora = [n for n in per["default"].param_encodings if ".lora_" in n]
    assert any(n.endswith("lora_scale") for n in lora) and any(n.endswith("lora_A.weight") for n in lora)
    assert any(per["default"].param_encodings[n] != per["second"].param_encodings[n] for n in lora)
    assert any(per["default"].activation_encodings[n] != per["second"].activation_encodings[n] for n in dependent)
    raw = json.loads((qpkg.path / "encodings" / "base.encodings").read_text())
    assert raw["version"] == "1.0.0" and isinstance(raw["param_encodings"], list)


def test_lora_scope_freezes_base_activations(float_package, tmp_path):
    calib = _batches(2, seed=3)
    qpkg = quantize(float_package.path, tmp_path / "q", calib, activations="uint8", lora_weights="int8",
                    encodings_version="2.0.0", activation_scope="lora")
    quant = qpkg.manifest.extra["quantization"]
    dependent = set(quant["adapter_dependent_activations"])
    assert dependent and all("lora" in n or "add" in n or "val" in n for n in dependent) or dependent
    raw = json.loads((qpkg.path / "encodings" / "default.encodings").read_text())
    assert raw["version"] == "2.0.0"
    s = AdapterSession(qpkg.path)
    f = AdapterSession(float_package.path)
    out = s.run(None, calib[0])[0]
    assert _cos(out, f.run(None, calib[0])[0]) > 0.99


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"calibration": []}, "empty"),
        ({"calibration": None}, "no calibration"),
        ({"calibration": [{"input_idz": np.zeros((1, 4), np.int64)}]}, "not a model input"),
        ({"calibration": [{"input_ids": np.zeros((1, 4, 2), np.int64), "attention_mask": np.ones((1, 4), np.int64)}]}, "shape"),
        ({"weights": "int3"}, "not supported"),
        ({"activation_scope": "some"}, "activation_scope"),
    ],
)
def test_bad_input(float_package, tmp_path, kwargs, message):
    args = {"calibration": _batches(1, seed=1), **kwargs}
    calibration = args.pop("calibration")
    with pytest.raises(QuantizationError, match=message):
        quantize(float_package.path, tmp_path / "out", calibration, **args)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_int4_blockwise_weights(float_package, tmp_path):
    calib = _batches(2, seed=11)
    qpkg = quantize(float_package.path, tmp_path / "q4", calib, weights="int4", block_size=16, activation_scope="all")
    model = onnx.load(str(qpkg.model_path), load_external_data=False)
    blockwise = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                 and any(a.name == "block_size" and a.i == 16 for a in n.attribute)]
    assert blockwise
    int4 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4}
    assert all(n.input[0] in int4 for n in blockwise)
    base = read_encodings(qpkg.path / "encodings" / "base.encodings")
    assert any(e.enc_type == "PER_BLOCK" and e.block_size == 16 and e.bitwidth == 4 for e in base.param_encodings.values())
    fs, qs = AdapterSession(float_package.path), AdapterSession(qpkg.path)
    for adapter in (None, "default"):
        assert _cos(fs.run(None, calib[0], adapter=adapter)[0], qs.run(None, calib[0], adapter=adapter)[0]) > 0.95


def test_package_without_adapters_and_mismatched_encodings(float_package, tmp_path):
    import shutil

    from graph_tools import EncodingsError
    from graph_tools.adapters import manifest as mf

    bare = tmp_path / "bare"
    shutil.copytree(float_package.path, bare)
    man = mf.read_manifest(bare / "manifest.json")
    man.adapters = []
    mf.write_manifest(bare / "manifest.json", man)
    with pytest.raises(QuantizationError, match="no adapters"):
        quantize(bare, tmp_path / "out", _batches(1, seed=1))
    assert not (tmp_path / "out").exists()
    # an encodings file of another graph does not load against this one
    import onnx_ir as ir

    enc_file = tmp_path / "other.encodings"
    enc_file.write_text(json.dumps({"version": "1.0.0", "activation_encodings": [
        {"name": "not_a_tensor", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": False, "scale": [0.1], "offset": [-128]}],
        "param_encodings": []}))
    with pytest.raises(EncodingsError, match="not_a_tensor"):
        read_encodings(enc_file, model=ir.load(float_package.model_path))


@pytest.mark.parametrize("kwargs", [{"calibration_method": "percentile"}, {"symmetric_activations": True, "activations": "int16"}])
def test_calibration_methods_and_symmetric(float_package, tmp_path, kwargs):
    calib = _batches(2, seed=21)
    qpkg = quantize(float_package.path, tmp_path / "q", calib, activation_scope="all", **kwargs)
    base = read_encodings(qpkg.path / "encodings" / "default.encodings")
    acts = list(base.activation_encodings.values())
    if kwargs.get("symmetric_activations"):
        assert all(e.is_symmetric and e.bitwidth == 16 for e in acts)
    else:
        assert not all(e.is_symmetric for e in acts)
    fs, qs = AdapterSession(float_package.path), AdapterSession(qpkg.path)
    for adapter in (None, "default"):
        assert _cos(fs.run(None, calib[0], adapter=adapter)[0], qs.run(None, calib[0], adapter=adapter)[0]) > 0.99


def test_quantized_session_refuses_a_float_adapter_file(float_package, w8a16):
    from graph_tools import AdapterError

    qpkg, _ = w8a16
    session = AdapterSession(qpkg.path)
    with pytest.raises(AdapterError, match="is not a slot of the package"):
        session.load_adapter("float", float_package.adapter_path("default"))
    assert "float" not in session.adapters
