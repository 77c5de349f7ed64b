"""AIMET encodings files: format, schemas, round trips, ONNX <-> AIMET conversion, graph check."""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import json

import jsonschema
import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graph_builder import GraphBuilder

from graph_tools.errors import EncodingsError, LoraOnnxError
from graph_tools.quant.encodings import (
    VERSIONS,
    Encodings,
    TensorEncoding,
    check_against_graph,
    encodings_from_dict,
    encodings_to_dict,
    from_quantize_linear,
    read_encodings,
    to_quantize_linear,
    validate_encodings,
    write_encodings,
)

RNG = np.random.default_rng(7)
IN, OUT, BLOCK = 8, 3, 4  # a (IN, OUT) MatMul weight, int4 blocks of 4 along IN (axis 0)


# -- helpers -------------------------------------------------------------------------------------
def _scales(*shape: int) -> np.ndarray:
    return (RNG.random(shape) * 0.1 + 0.01).astype(np.float32)


def _onnx_params() -> dict[str, dict]:
    """ONNX QuantizeLinear parameters of one tensor of each kind: scale, zero point, attributes."""
    blocks = (IN // BLOCK, OUT)
    return {
        "per_tensor_asym_uint8": dict(name="act", scale=np.float32(0.02), zero_point=np.uint8(113)),
        "per_tensor_sym_int16": dict(name="act16", scale=np.float32(3e-4), zero_point=np.int16(0)),
        "per_channel_sym_int8": dict(name="w", scale=_scales(OUT), zero_point=np.zeros(OUT, np.int8), axis=1),
        "per_channel_asym_uint8": dict(
            name="w_u8", scale=_scales(OUT), zero_point=np.array([0, 17, 255], np.uint8), axis=-1
        ),
        "blockwise_sym_int4": dict(
            name="w4", scale=_scales(*blocks), zero_point=np.zeros(blocks, ml_dtypes.int4), axis=0, block_size=BLOCK
        ),
        "blockwise_asym_uint4": dict(
            name="w4u",
            scale=_scales(*blocks),
            zero_point=RNG.integers(0, 16, blocks).astype(ml_dtypes.uint4),
            axis=0,
            block_size=BLOCK,
        ),
    }


ONNX = _onnx_params()
CASES = {case: from_quantize_linear(**kwargs) for case, kwargs in ONNX.items()}


def _one(enc: TensorEncoding, *, param: bool = True) -> Encodings:
    encodings = Encodings()
    encodings.add(enc, param=param)
    return encodings


def _as_read_from_1_0_0(enc: TensorEncoding) -> TensorEncoding:
    """1.0.0 stores neither the ONNX axis nor the blockwise scale shape."""
    return dataclasses.replace(enc, axis=None, scale_shape=None)


def _valid_v1() -> dict:
    return {
        "version": "1.0.0",
        "activation_encodings": [
            {"name": "x", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 16, "is_sym": False,
             "scale": [0.001], "offset": [-32768]},
        ],
        "param_encodings": [
            {"name": "w", "dtype": "INT", "enc_type": "PER_CHANNEL", "bw": 8, "is_sym": True,
             "scale": [0.1, 0.2], "offset": [-128, -128]},
        ],
        "excluded_layers": [],
    }


def _valid_v2() -> dict:
    return {
        "version": "2.0.0",
        "encodings": [
            {"name": "x", "output_dtype": "uint16", "y_scale": 0.001, "y_zero_point": 32768},
            {"name": "w", "output_dtype": "int8", "y_scale": [0.1, 0.2], "axis": 0},
        ],
    }


def _model() -> ir.Model:
    """x[2, IN] -> MatMul(w[IN, OUT]) -> "h" -> Relu -> "y"; w is an initializer."""
    b = GraphBuilder(opset=21, seed=7)
    h = b.op("MatMul", b.input("x", [2, IN]), b.weight("w", (IN, OUT)))
    h.name = "h"
    y = b.op("Relu", h)
    y.name = "y"
    return b.model(y)


def _ort_qdq(x: np.ndarray, params) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(x)) run by onnxruntime with ``params`` as initializers."""
    b = GraphBuilder(opset=21)
    scale, zero_point = b.weight("scale", params.scale), b.weight("zero_point", params.zero_point)
    attributes = {"axis": params.axis, "block_size": params.block_size}
    attributes = {key: value for key, value in attributes.items() if value is not None}
    q = b.op("QuantizeLinear", b.input("x", list(x.shape)), scale, zero_point, **attributes)
    y = b.op("DequantizeLinear", q, scale, zero_point, **attributes)
    proto = ir.serde.serialize_model(b.model(y))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _aimet_grid(enc: TensorEncoding, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """AIMET's scale and offset broadcast to a tensor of ``shape``, read from the 1.0.0 fields only."""
    scale = np.asarray(enc.scale, np.float32)
    offset = np.asarray(enc.offset, np.int64)
    if enc.enc_type == "PER_TENSOR":
        return np.full(shape, scale[0]), np.full(shape, offset[0])
    if enc.enc_type == "PER_CHANNEL":  # the cases quantize along the last axis
        return np.broadcast_to(scale, shape), np.broadcast_to(offset, shape)
    # PER_BLOCK, 1.0.0 order: output channel major, then its blocks along the input axis
    per_channel = (scale.reshape(OUT, -1), offset.reshape(OUT, -1))
    return tuple(np.repeat(a.T, enc.block_size, axis=0) for a in per_channel)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# -- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_each_kind(tmp_path, version, case):
    enc = CASES[case]
    path = write_encodings(tmp_path / "m.encodings", _one(enc), version=version)
    back = read_encodings(path, model=None)
    assert back.version == version
    expected = _as_read_from_1_0_0(enc) if version == "1.0.0" else enc
    assert back.tensors == {enc.name: expected}


def _saved(model: ir.Model, path):
    ir.save(model, path)
    return path


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_whole_file(tmp_path, version):
    quantizer_args = {"activation_bitwidth": 16, "param_bitwidth": 8, "dtype": "int", "is_symmetric": True,
                      "per_channel_quantization": True, "quant_scheme": "post_training_tf"}  # fmt: skip
    encodings = Encodings(excluded_layers=["lm_head"], quantizer_args=quantizer_args)
    for name, enc in CASES.items():
        encodings.add(enc, param=name.startswith(("per_channel", "blockwise")))
    encodings.add(TensorEncoding("softmax_out", 16, dtype="float"))
    path = write_encodings(tmp_path / "m.encodings", encodings, version=version)
    params = {e.name for e in encodings.param_encodings.values()}
    model = _model_with_initializers(params)
    for name in sorted(set(encodings.activation_encodings) - {v.name for v in model.graph.inputs}):
        model.graph.inputs.append(ir.Value(name=name))  # activations must be values of the graph too
    back = read_encodings(path, model=model)
    for form in (ir.to_proto(model), _saved(model, tmp_path / "m.onnx")):  # every model form reads the same
        assert read_encodings(path, model=form) == back
    if version == "1.0.0":
        assert back.param_encodings == {k: _as_read_from_1_0_0(v) for k, v in encodings.param_encodings.items()}
        assert back.activation_encodings == encodings.activation_encodings
        assert back.excluded_layers == ["lm_head"] and back.quantizer_args == encodings.quantizer_args
    else:  # float16 has no 2.0.0 entry; 2.0.0 has no metadata; params are told apart by the model
        assert back.param_encodings == encodings.param_encodings
        expected = {k: v for k, v in encodings.activation_encodings.items() if k != "softmax_out"}
        assert back.activation_encodings == expected
        assert back.excluded_layers == [] and back.quantizer_args is None


def _model_with_initializers(names: set[str]) -> ir.Model:
    model = _model()
    for name in sorted(names - {"w"}):
        model.graph.register_initializer(ir.Value(name=name, const_value=ir.tensor(np.zeros(1, np.float32), name=name)))
    return model


def test_2_0_0_without_model_reads_every_entry_as_activation(tmp_path):
    path = write_encodings(tmp_path / "m.encodings", _one(CASES["per_channel_sym_int8"], param=True), version="2.0.0")
    back = read_encodings(path)
    assert back.param_encodings == {} and list(back.activation_encodings) == ["w"]


def test_1_0_0_to_2_0_0_and_back_keeps_1_0_0_content(tmp_path):
    enc = CASES["blockwise_asym_uint4"]
    first = read_encodings(write_encodings(tmp_path / "a.encodings", _one(enc), version="2.0.0"))
    again = read_encodings(write_encodings(tmp_path / "b.encodings", first, version="1.0.0"))
    assert again.tensors == {enc.name: _as_read_from_1_0_0(enc)}


# -- what the files look like --------------------------------------------------------------------
def test_1_0_0_entries_are_aimet_fields_with_unsigned_offsets():
    encodings = Encodings()
    encodings.add(from_quantize_linear("x", np.float32(0.5), np.uint8(113)))
    encodings.add(from_quantize_linear("w", np.float32(0.25), np.int8(0)), param=True)
    obj = encodings_to_dict(encodings)
    assert obj == {
        "version": "1.0.0",
        "activation_encodings": [
            {"name": "x", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": False,
             "scale": [0.5], "offset": [-113]},
        ],
        "param_encodings": [
            {"name": "w", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": True,
             "scale": [0.25], "offset": [-128]},
        ],
        "excluded_layers": [],
    }


def test_2_0_0_entries_are_quantize_linear_inputs():
    encodings = Encodings()
    encodings.add(from_quantize_linear("x", np.float32(0.5), np.uint8(113)))
    weight = from_quantize_linear("w", np.array([0.25, 0.5], np.float32), np.zeros(2, np.int8), axis=0)
    encodings.add(weight, param=True)
    assert encodings_to_dict(encodings, "2.0.0") == {
        "version": "2.0.0",
        "encodings": [
            {"name": "w", "output_dtype": "int8", "y_scale": [0.25, 0.5], "axis": 0},
            {"name": "x", "output_dtype": "uint8", "y_scale": 0.5, "y_zero_point": 113},
        ],
    }


def test_blockwise_1_0_0_order_is_output_channel_major():
    onnx_scale = np.arange(1, 1 + (IN // BLOCK) * OUT, dtype=np.float32).reshape(IN // BLOCK, OUT) / 64
    enc = from_quantize_linear("w4", onnx_scale, np.zeros(onnx_scale.shape, ml_dtypes.int4), axis=0, block_size=BLOCK)
    (entry,) = encodings_to_dict(_one(enc))["param_encodings"]
    assert entry["enc_type"] == "PER_BLOCK" and entry["block_size"] == BLOCK and entry["bw"] == 4
    assert entry["scale"] == [float(onnx_scale[b, o]) for o in range(OUT) for b in range(IN // BLOCK)]
    assert entry["offset"] == [-8] * onnx_scale.size
    (v2,) = encodings_to_dict(_one(enc), "2.0.0")["encodings"]
    assert v2["y_scale"] == onnx_scale.tolist() and v2["axis"] == 0 and v2["output_dtype"] == "int4"


def test_reads_a_file_as_aimet_writes_it(tmp_path):
    """AIMET writes offsets as floats (-128.0), quantizer_args, excluded_layers and FLOAT entries."""
    aimet = {
        "activation_encodings": [
            {"bw": 16, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False, "name": "/relu/Relu_output_0",
             "offset": [-31768.0], "scale": [2.1e-05]},
            {"bw": 16, "dtype": "FLOAT", "enc_type": "PER_TENSOR", "name": "/softmax/Softmax_output_0"},
        ],
        "excluded_layers": [],
        "param_encodings": [
            {"bw": 4, "block_size": 64, "dtype": "INT", "enc_type": "PER_BLOCK", "is_sym": True, "name": "fc.weight",
             "offset": [-8.0, -8.0], "scale": [0.01, 0.02]},
        ],
        "quantizer_args": {"activation_bitwidth": 16, "dtype": "int", "is_symmetric": True, "param_bitwidth": 4,
                           "per_channel_quantization": True, "quant_scheme": "post_training_tf"},
        "version": "1.0.0",
    }  # fmt: skip
    path = tmp_path / "aimet.encodings"
    path.write_text(json.dumps(aimet))
    back = read_encodings(path)
    assert back.param_encodings["fc.weight"].offset == (-8, -8)
    assert back.param_encodings["fc.weight"].block_size == 64
    assert back.activation_encodings["/relu/Relu_output_0"].offset == (-31768,)
    assert back.activation_encodings["/softmax/Softmax_output_0"] == TensorEncoding(
        "/softmax/Softmax_output_0", 16, dtype="float"
    )
    assert back.quantizer_args["param_bitwidth"] == 4


# -- schemas and rejection -----------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_schemas_are_valid_2020_12_and_shipped_as_package_data(version):
    resource = importlib.resources.files("graph_tools.quant").joinpath(f"schemas/encodings_{version}.schema.json")
    schema = json.loads(resource.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["version"] == {"const": version}


def _v1_param(**change):
    obj = _valid_v1()
    entry = obj["param_encodings"][0]
    for key, value in change.items():
        if value is None:
            del entry[key]
        else:
            entry[key] = value
    return obj


def _v2_entry(**change):
    obj = _valid_v2()
    entry = obj["encodings"][1]
    for key, value in change.items():
        if value is None:
            del entry[key]
        else:
            entry[key] = value
    return obj


BAD_FILES = {
    "v1 missing scale": (_v1_param(scale=None), r"param_encodings\[0\] 'w': 'scale' is a required property"),
    "v1 missing bw": (_v1_param(bw=None), r"'w': 'bw' is a required property"),
    "v1 bw as string": (_v1_param(bw="8"), r"'w', field bw: '8' is not of type 'integer'"),
    "v1 bitwidth 2": (_v1_param(bw=2), r"'w', field bw: 2 is less than the minimum of 4"),
    "v1 bitwidth 33": (_v1_param(bw=33), r"'w', field bw: 33 is greater than the maximum of 32"),
    "v1 is_sym as string": (_v1_param(is_sym="True"), r"'w', field is_sym: 'True' is not of type 'boolean'"),
    "v1 unknown enc_type": (_v1_param(enc_type="PER_ROW"), r"'w', field enc_type: 'PER_ROW' is not one of"),
    "v1 lowercase dtype": (_v1_param(dtype="int"), r"'w', field dtype: 'int' is not one of"),
    "v1 misspelt field": (_v1_param(scales=[0.1, 0.2]), r"'w': Additional properties are not allowed \('scales'"),
    "v1 zero scale": (_v1_param(scale=[0.1, 0.0]), r"'w', field scale\[1\]: 0.0 is less than or equal to the minimum"),
    "v1 fractional offset": (
        _v1_param(offset=[-128, -127.5]),
        r"'w', field offset\[1\]: -127.5 is not of type 'integer'",
    ),
    "v1 per-block without block_size": (_v1_param(enc_type="PER_BLOCK"), r"'w': 'block_size' is a required property"),
    "v1 offset sign": (_v1_param(offset=[-128, 128]), r"tensor 'w': offset 128 outside \[-255, 0\]"),
    "v1 count mismatch": (_v1_param(offset=[-128]), r"tensor 'w': needs as many offsets as scales"),
    "v1 per-tensor with 2 scales": (_v1_param(enc_type="PER_TENSOR"), r"'w', field scale: \[0.1, 0.2\] is too long"),
    "v1 LPBQ": (
        _v1_param(enc_type="LPBQ", block_size=64, compressed_bw=4, per_block_int_scale=[1, 2]),
        r"tensor 'w': enc_type LPBQ is not supported",
    ),
    "v1 list as param_encodings dict": (
        {**_valid_v1(), "param_encodings": {"w": []}},
        r"param_encodings: \{'w': \[\]\} is not of type 'array'",
    ),
    "v1 duplicate name": (
        {**_valid_v1(), "activation_encodings": _valid_v1()["param_encodings"]},
        r"tensor 'w': encoded twice",
    ),
    "v2 missing output_dtype": (_v2_entry(output_dtype=None), r"encodings\[1\] 'w': 'output_dtype' is a required"),
    "v2 int3": (_v2_entry(output_dtype="int3"), r"'w', field output_dtype: 'int3' does not match"),
    "v2 negative scale": (_v2_entry(y_scale=[0.1, -0.2]), r"'w', field y_scale\[1\]: -0.2 is less than or equal to"),
    "v2 block_size without axis": (_v2_entry(axis=None, block_size=32), r"'w': 'axis' is a dependency of 'block_size'"),
    "v2 per-channel without axis": (_v2_entry(axis=None), r"tensor 'w': per-channel scale must be 1-D with an axis"),
    "v2 zero point out of range": (_v2_entry(y_zero_point=[0, 200]), r"tensor 'w': zero point outside \[-128, 127\]"),
    "v2 LPBQ": (
        _v2_entry(
            y_scale=None, per_channel_float_scale=[0.1, 0.2], per_block_int_scale=[[1, 2], [3, 4]], block_size=32
        ),
        r"tensor 'w': LPBQ encodings are not supported",
    ),
    "legacy 0.6.1": (
        {"version": "0.6.1", "activation_encodings": {}, "param_encodings": {}},
        r"unsupported encodings version '0.6.1'",
    ),
    "no version": ({"activation_encodings": [], "param_encodings": []}, r"no 'version' key"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_files_are_refused_in_one_line_naming_file_and_entry(tmp_path, case):
    obj, pattern = BAD_FILES[case]
    path = tmp_path / "bad.encodings"
    path.write_text(json.dumps(obj))
    with pytest.raises(EncodingsError, match=pattern) as exc:
        read_encodings(path)
    assert _one_line(exc).startswith(f"{path}: ")
    with pytest.raises(EncodingsError, match=pattern):
        validate_encodings(obj)


@pytest.mark.parametrize("obj", [_valid_v1(), _valid_v2()])
def test_valid_files_validate(obj):
    assert validate_encodings(copy.deepcopy(obj)) == obj["version"]
    assert validate_encodings(obj, obj["version"]) == obj["version"]


def test_validate_with_the_wrong_version_is_refused():
    with pytest.raises(EncodingsError, match="encodings are version 2.0.0, expected 1.0.0"):
        validate_encodings(_valid_v2(), "1.0.0")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [("{not json", r"not valid JSON \(line 1, column 2"), ("[1, 2]", "top level must be a JSON object, got list")],
)
def test_unreadable_files(tmp_path, text, pattern):
    path = tmp_path / "bad.encodings"
    path.write_text(text)
    with pytest.raises(EncodingsError, match=pattern) as exc:
        read_encodings(path)
    assert _one_line(exc).startswith(str(path))
    with pytest.raises(EncodingsError, match="no such file"):
        read_encodings(tmp_path / "missing.encodings")
    assert issubclass(EncodingsError, LoraOnnxError)


def test_tensor_encoding_is_checked_when_built():
    with pytest.raises(EncodingsError, match=r"tensor 'w': needs as many offsets as scales"):
        TensorEncoding("w", 8, scale=[0.1, 0.2], offset=[-128])
    with pytest.raises(EncodingsError, match=r"tensor 'w': bitwidth must be an integer in \[4, 32\], got 3"):
        TensorEncoding("w", 3, scale=[0.1], offset=[0])
    with pytest.raises(EncodingsError, match=r"tensor 'w': block_size goes with enc_type PER_BLOCK"):
        TensorEncoding("w", 8, scale=[0.1], offset=[0], block_size=32)
    with pytest.raises(EncodingsError, match=r"tensor 'w': offset values must be integers"):
        TensorEncoding("w", 8, scale=[0.1], offset=[-0.5])
    with pytest.raises(EncodingsError, match=r"tensor 'w': scales must be finite and > 0, got nan"):
        TensorEncoding("w", 8, scale=[float("nan")], offset=[0])


# -- atomic writes -------------------------------------------------------------------------------
def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "out" / "adapter.encodings"
    from_1_0_0 = _one(_as_read_from_1_0_0(CASES["per_channel_sym_int8"]))
    with pytest.raises(EncodingsError, match=r"adapter.encodings: tensor 'w': PER_CHANNEL encoding has no axis") as exc:
        write_encodings(path, from_1_0_0, version="2.0.0")
    _one_line(exc)
    assert not path.exists() and not any(tmp_path.rglob("*.tmp-*"))

    write_encodings(path, _one(CASES["per_tensor_asym_uint8"]))
    before = path.read_text()
    wrong_key = Encodings(param_encodings={"not_w": CASES["per_channel_sym_int8"]})
    with pytest.raises(EncodingsError, match=r"param encoding stored under 'not_w' is named 'w'"):
        write_encodings(path, wrong_key)
    with pytest.raises(EncodingsError, match="unsupported encodings version '3.0.0'"):
        write_encodings(path, _one(CASES["per_tensor_asym_uint8"]), version="3.0.0")
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapter.encodings"]


def test_same_name_as_param_and_activation_is_refused():
    enc = CASES["per_tensor_asym_uint8"]
    encodings = Encodings(activation_encodings={enc.name: enc}, param_encodings={enc.name: enc})
    with pytest.raises(EncodingsError, match=r"tensor 'act': both a param and an activation encoding"):
        encodings_to_dict(encodings)


# -- ONNX QuantizeLinear <-> AIMET ---------------------------------------------------------------
QDQ_SHAPES = {
    "per_tensor_asym_uint8": (5, OUT),
    "per_tensor_sym_int16": (5, OUT),
    "per_channel_sym_int8": (5, OUT),
    "per_channel_asym_uint8": (5, OUT),
    "blockwise_sym_int4": (IN, OUT),
    "blockwise_asym_uint4": (IN, OUT),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_aimet_dequantization_equals_onnx_dequantization(case):
    """ONNX ``(q - zero_point) * scale`` (run by onnxruntime) == AIMET ``(q_u + offset) * scale``."""
    enc = CASES[case]
    params = to_quantize_linear(enc)
    shape = QDQ_SHAPES[case]
    scale, offset = _aimet_grid(enc, shape)
    qmax_u = 2**enc.bitwidth - 1
    # values well beyond the grid on both sides, so clamping is exercised too
    x = (RNG.standard_normal(shape) * scale * qmax_u * 0.7).astype(np.float32)
    q_u = np.clip(np.round(x / scale.astype(np.float32)) - offset, 0, qmax_u)
    aimet = ((q_u + offset) * scale).astype(np.float32)
    onnx = _ort_qdq(x, params)
    np.testing.assert_allclose(onnx, aimet, rtol=1e-6, atol=0)
    assert np.any(q_u == 0) and np.any(q_u == qmax_u)


@pytest.mark.parametrize("case", sorted(CASES))
def test_offset_is_qmin_minus_zero_point_over_the_whole_grid(case):
    enc, onnx = CASES[case], ONNX[case]
    signed = np.dtype(onnx["zero_point"].dtype).name.startswith("int")
    qmin = -(2 ** (enc.bitwidth - 1)) if signed else 0
    zp = np.asarray(onnx["zero_point"]).astype(np.int64)
    scale = np.asarray(onnx["scale"], np.float64)
    if enc.enc_type == "PER_BLOCK":  # 1.0.0 order: output channel major
        zp, scale = zp.T, scale.T
    zp, scale = zp.reshape(-1), scale.reshape(-1)
    assert enc.offset == tuple((qmin - zp).tolist())
    assert enc.scale == tuple(scale.tolist())
    assert enc.is_symmetric == signed
    q = np.arange(qmin, qmin + 2**enc.bitwidth)[:, None]  # every quantized value of the type
    onnx_values = (q - zp) * scale
    aimet_values = ((q - qmin) + np.asarray(enc.offset)) * np.asarray(enc.scale)
    np.testing.assert_array_equal(onnx_values, aimet_values)


def test_sign_conventions_by_example():
    assert from_quantize_linear("a", np.float32(1), np.uint8(113)).offset == (-113,)
    assert from_quantize_linear("a", np.float32(1), np.int8(0)).offset == (-128,)
    assert from_quantize_linear("a", np.float32(1), np.int8(-3)).offset == (-125,)
    assert from_quantize_linear("a", np.float32(1), np.uint16(0)).offset == (0,)
    assert from_quantize_linear("a", np.float32(1), np.int16(0)).offset == (-32768,)
    assert from_quantize_linear("a", np.float32(1), np.zeros((), ml_dtypes.int4)).offset == (-8,)
    assert from_quantize_linear("a", np.float32(1)).offset == (0,)  # ONNX default: uint8, zero point 0
    sym = from_quantize_linear("a", np.float32(1), 0, qtype=ir.DataType.INT8)
    assert sym.is_symmetric and sym.offset == (-128,)


@pytest.mark.parametrize("case", sorted(CASES))
def test_to_quantize_linear_inverts_from_quantize_linear(case):
    enc, onnx = CASES[case], ONNX[case]
    params = to_quantize_linear(enc)
    np.testing.assert_array_equal(params.scale, onnx["scale"])
    assert params.scale.dtype == np.float32
    np.testing.assert_array_equal(params.zero_point.astype(np.int64), np.asarray(onnx["zero_point"]).astype(np.int64))
    assert params.zero_point.dtype == np.asarray(onnx["zero_point"]).dtype
    assert params.qtype == np.dtype(np.asarray(onnx["zero_point"]).dtype).name
    assert params.block_size == onnx.get("block_size")
    assert params.axis == onnx.get("axis")
    again = from_quantize_linear(
        enc.name, params.scale, params.zero_point, axis=params.axis, block_size=params.block_size
    )
    assert again == enc


def test_1_0_0_encodings_need_axis_and_shape_for_onnx():
    per_channel = _as_read_from_1_0_0(CASES["per_channel_sym_int8"])
    with pytest.raises(EncodingsError, match=r"tensor 'w': PER_CHANNEL encoding has no axis"):
        to_quantize_linear(per_channel)
    assert to_quantize_linear(per_channel, axis=1).axis == 1
    block = CASES["blockwise_asym_uint4"]
    from_file = _as_read_from_1_0_0(block)
    with pytest.raises(EncodingsError, match=r"tensor 'w4u': PER_BLOCK encoding has no axis"):
        to_quantize_linear(from_file)
    with pytest.raises(EncodingsError, match=r"tensor 'w4u': per-block encoding has no scale shape"):
        to_quantize_linear(from_file, axis=0)
    params = to_quantize_linear(from_file, axis=0, weight_shape=(IN, OUT))
    expected = to_quantize_linear(block)
    np.testing.assert_array_equal(params.scale, expected.scale)
    np.testing.assert_array_equal(params.zero_point, expected.zero_point)


def test_from_quantize_linear_refuses_what_it_cannot_express():
    with pytest.raises(EncodingsError, match=r"tensor 'w': per-channel scale must be 1-D with an axis"):
        from_quantize_linear("w", np.ones(3, np.float32), np.zeros(3, np.int8))
    with pytest.raises(EncodingsError, match=r"tensor 'w': 'float8e4m3fn' is not an integer quantization type"):
        from_quantize_linear("w", np.float32(1), qtype="float8e4m3fn")
    with pytest.raises(EncodingsError, match=r"tensor 'w': zero point outside \[0, 255\]"):
        from_quantize_linear("w", np.float32(1), 300, qtype="uint8")
    with pytest.raises(EncodingsError, match=r"tensor 'w': blockwise needs a 2-D scale and axis 0 or 1"):
        from_quantize_linear("w", np.ones(3, np.float32), np.zeros(3, np.int8), axis=0, block_size=4)
    with pytest.raises(EncodingsError, match=r"tensor 'w': a float encoding has no QuantizeLinear parameters"):
        to_quantize_linear(TensorEncoding("w", 16, dtype="float"))


# -- against a graph -----------------------------------------------------------------------------
def test_check_against_graph_accepts_graph_values():
    model = _model()
    encodings = Encodings()
    encodings.add(from_quantize_linear("x", np.float32(0.01), np.uint16(30000)))
    encodings.add(from_quantize_linear("h", np.float32(0.01), np.uint16(0)))
    encodings.add(from_quantize_linear("y", np.float32(0.01), np.uint16(0)))
    encodings.add(from_quantize_linear("w", _scales(OUT), np.zeros(OUT, np.int8), axis=1), param=True)
    check_against_graph(encodings, model)
    blockwise = Encodings()
    blockwise.add(dataclasses.replace(CASES["blockwise_sym_int4"], name="w"), param=True)
    check_against_graph(blockwise, model)


def test_check_against_graph_names_the_missing_tensor():
    encodings = Encodings()
    encodings.add(from_quantize_linear("x", np.float32(0.01), np.uint16(0)))
    encodings.add(from_quantize_linear("/attn/Gone_output_0", np.float32(0.01), np.uint16(0)))
    encodings.add(from_quantize_linear("gone.weight", np.float32(0.01), np.int8(0)), param=True)
    pattern = r"tensor 'gone.weight' has an encoding but is not a value of the graph \(1 more missing\)"
    with pytest.raises(EncodingsError, match=pattern) as exc:
        check_against_graph(encodings, _model())
    _one_line(exc)


def test_check_against_graph_checks_channel_counts_and_block_shapes():
    model = _model()
    wrong_axis = Encodings()
    wrong_axis.add(from_quantize_linear("w", _scales(OUT), np.zeros(OUT, np.int8), axis=0), param=True)
    with pytest.raises(EncodingsError, match=r"tensor 'w': 3 per-channel scales, axis 0 has 8"):
        check_against_graph(wrong_axis, model)
    wrong_blocks = Encodings()
    enc = from_quantize_linear("w", _scales(IN // 2, OUT), np.zeros((IN // 2, OUT), np.int8), axis=0, block_size=2)
    wrong_blocks.add(dataclasses.replace(enc, block_size=BLOCK), param=True)
    pattern = r"tensor 'w': block scales of shape \(4, 3\), shape \(8, 3\) with block_size 4 needs \(2, 3\)"
    with pytest.raises(EncodingsError, match=pattern):
        check_against_graph(wrong_blocks, model)


def test_2_0_0_params_are_split_by_the_model_initializers(tmp_path):
    encodings = Encodings()
    encodings.add(from_quantize_linear("h", np.float32(0.01), np.uint16(7)))
    encodings.add(from_quantize_linear("w", _scales(OUT), np.zeros(OUT, np.int8), axis=1), param=True)
    back = encodings_from_dict(encodings_to_dict(encodings, "2.0.0"), model=_model())
    assert list(back.param_encodings) == ["w"] and list(back.activation_encodings) == ["h"]
    assert back.tensors == encodings.tensors
