"""Calibration and scale/zero-point math (issue 9: a library where it does the job, our own where it
differs, and a test saying which).

* ``scales.act_params`` / ``quantize_array`` / ``quantize_per_tensor`` are
  ``onnxruntime.quantization.quant_utils``: checked equal to ``compute_scale_zp`` /
  ``quantize_data`` on edge cases (all-zero, negative-only, positive-only, symmetric, 8/16-bit,
  per channel with a zero channel).
* ``scales.quantize_blockwise`` (int4) is our own: quant_utils' symmetric int4 grid clips +amax.
* ``calibrate.Ranges`` and ``collect_ranges`` (graph outputs appended with onnx-ir) on a tiny graph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnxruntime.quantization import quant_utils as qu

from graph_tools.errors import QuantizationError
from graph_tools.quant.calibrate import Ranges, collect_ranges, session_with_outputs
from graph_tools.quant.scales import act_params, quantize_array, quantize_asymmetric, quantize_blockwise, quantize_per_tensor

TYPES = [ir.DataType.UINT8, ir.DataType.INT8, ir.DataType.UINT16, ir.DataType.INT16]
RANGES = {"all-zero": (0.0, 0.0), "negative-only": (-3.5, -0.25), "positive-only": (0.5, 7.0),
          "mixed": (-1.25, 3.0), "tiny": (-1e-7, 2e-7), "wide": (-6e4, 6e4)}


def _ort(lo, hi, qtype, symmetric):
    sym = symmetric or qtype.is_signed()
    qmin, qmax = qu.get_qmin_qmax_for_qType(int(qtype), symmetric=sym)
    zp, scale = qu.compute_scale_zp(np.array(lo, np.float32), np.array(hi, np.float32), qmin, qmax, symmetric=sym)
    return float(scale), int(zp)


def _qdq(x, scale, zp, qtype):
    return (np.clip(np.round(x / scale) + zp, qtype.min, qtype.max) - zp) * scale


@pytest.mark.parametrize("case", sorted(RANGES))
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_activation_params_are_quant_utils(case, qtype, symmetric):
    lo, hi = RANGES[case]
    scale, zp = act_params(lo, hi, qtype, symmetric)
    assert (scale, zp) == _ort(lo, hi, qtype, symmetric)
    assert qtype.min <= zp <= qtype.max and scale > 0
    x = np.array([min(lo, 0.0), 0.0, max(hi, 0.0)], np.float64)
    # zero is exact; the range is covered to within one step (a symmetric unsigned grid holds one
    # code more below zero than above: +amax may round one step short)
    assert _qdq(np.array(0.0), scale, zp, qtype) == 0.0
    assert np.max(np.abs(_qdq(x, scale, zp, qtype) - x)) <= scale * (1.0 + 1e-6)
    if case == "all-zero":
        assert (scale, zp) == (1.0, 0)  # degenerate range: quant_utils' unit scale, zero point 0


def test_symmetric_unsigned_covers_the_whole_range():
    # the grid we had before quant_utils: scale amax/255 around 128 held only half of [-amax, amax]
    scale, zp = act_params(-2.0, 2.0, ir.DataType.UINT8, symmetric=True)
    assert zp == 128 and scale == pytest.approx(4.0 / 255)
    assert _qdq(np.array(-2.0), scale, zp, ir.DataType.UINT8) == pytest.approx(-2.0, abs=scale)


@pytest.mark.parametrize("qtype", [ir.DataType.INT8, ir.DataType.INT16], ids=lambda t: t.name)
@pytest.mark.parametrize("data", ["random", "negative-only", "all-zero"])
def test_weights_per_tensor_are_quantize_data(qtype, data):
    rng = np.random.default_rng(0)
    w = {"random": rng.normal(size=(8, 5)), "negative-only": -rng.random((8, 5)) - 0.1,
         "all-zero": np.zeros((8, 5))}[data].astype(np.float32)
    q, scale = quantize_array(w, qtype)
    zp, ref_scale, ref_q = qu.quantize_data(w, int(qtype), symmetric=True)
    assert scale.shape == () and scale == np.float32(ref_scale) and int(zp) == 0
    np.testing.assert_array_equal(q, ref_q)
    assert q.dtype == qtype.numpy()
    q2, s2 = quantize_per_tensor(w, qtype)
    np.testing.assert_array_equal(q2, q)
    assert s2 == float(scale)


@pytest.mark.parametrize("axis", [0, 1, 3])
def test_weights_per_channel_are_quantize_data_per_slice(axis):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 6, 2, 3)).astype(np.float32)
    np.moveaxis(w, axis, 0)[1] = 0.0  # one all-zero channel: scale 1, codes 0
    q, scale = quantize_array(w, ir.DataType.INT8, axis)
    assert scale.shape == (w.shape[axis],) and scale.dtype == np.float32
    for c in range(w.shape[axis]):
        zp, ref_scale, ref_q = qu.quantize_data(np.take(w, c, axis=axis), int(ir.DataType.INT8), symmetric=True)
        assert scale[c] == np.float32(ref_scale), c
        np.testing.assert_array_equal(np.take(q, c, axis=axis), ref_q)
    assert scale[1] == 1.0 and not np.take(q, 1, axis=axis).any()


@pytest.mark.parametrize("qtype", [ir.DataType.UINT8, ir.DataType.UINT16], ids=lambda t: t.name)
@pytest.mark.parametrize("data", ["random", "negative-only", "positive-only", "all-zero"])
def test_constants_as_activations_are_quantize_data(qtype, data):
    rng = np.random.default_rng(6)
    x = {"random": rng.normal(size=17), "negative-only": -rng.random(17) - 0.5, "positive-only": rng.random(17) + 0.5,
         "all-zero": np.zeros(17)}[data].astype(np.float32)
    q, scale, zp = quantize_asymmetric(x, qtype)
    ref_zp, ref_scale, ref_q = qu.quantize_data(x, int(qtype), symmetric=False)
    assert scale == np.float32(ref_scale) and zp == ref_zp and zp.dtype == qtype.numpy()
    np.testing.assert_array_equal(q, ref_q)


def test_unsigned_per_tensor_for_nonnegative_values():
    x = np.array([0.0, 0.25, 1.5, 3.0], np.float32)
    q, scale = quantize_per_tensor(x, ir.DataType.UINT16)
    assert q.dtype == np.uint16 and scale == pytest.approx(3.0 / 65535)
    np.testing.assert_allclose(q * scale, x, atol=scale / 2)


def test_int4_blockwise_is_our_own_grid():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(64, 3)).astype(np.float32)  # [in, out], blocks of 32 along the input axis
    q, scale = quantize_blockwise(w, 32, 0)
    assert scale.shape == (2, 3) and str(q.dtype) == "int4"
    amax = np.abs(w.reshape(2, 32, 3)).max(axis=1)
    np.testing.assert_allclose(scale, amax / 7, rtol=1e-6)  # ours: +amax exact
    deq = q.astype(np.float32) * np.repeat(scale, 32, axis=0)
    assert np.max(np.abs(deq - w)) <= scale.max() / 2 + 1e-6
    # quant_utils' symmetric int4 grid is [-8, 7] with scale 2*amax/15: its +amax clips
    zp, ort_scale = qu.compute_scale_zp_blocked(w, int(ir.DataType.INT4), 0, 32, symmetric=True)
    np.testing.assert_allclose(ort_scale, 2 * amax / 15, rtol=1e-6)
    assert not np.allclose(ort_scale, scale)


def test_ranges_edge_cases():
    r = Ranges()
    r.update("z", np.zeros((2, 3), np.float32))
    r.update("n", np.array([-3.0, -1.0], np.float32))
    r.update("n", np.array([-0.5, -2.0], np.float32))
    r.update("e", np.zeros((0, 4), np.float32))
    assert r.get("z") == (0.0, 0.0) and r.get("n") == (-3.0, -0.5)
    assert r.get("e") == (0.0, 0.0) and not r.seen("e") and r.seen("z")  # only ever empty: quantize keeps it float
    r.update("n", np.zeros((0, 2), np.float32))  # an empty batch leaves a seen range alone
    assert r.get("n") == (-3.0, -0.5)
    p = Ranges("percentile", percentile=100.0)
    p.update("x", np.array([1.0, 2.0, 3.0], np.float32))
    p.update("x", np.array([-1.0, 5.0], np.float32))
    assert p.get("x") == (0.0, 4.0)  # mean of per-batch extremes
    with pytest.raises(QuantizationError, match="not calibrated"):
        r.get("missing")
    with pytest.raises(QuantizationError, match="minmax or percentile"):
        Ranges("entropy")


def _tiny_model(path):
    x = ir.Value(name="x", shape=ir.Shape(["n", 3]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", shape=ir.Shape([3, 2]), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.tensor(np.array([[1, -1], [2, 0], [0, 3]], np.float32), name="w"))
    mm = ir.node("MatMul", [x, w], name="mm")
    mm.outputs[0].name = "h"
    relu = ir.node("Relu", [mm.outputs[0]], name="relu")
    relu.outputs[0].name = "y"
    graph = ir.Graph([x], [relu.outputs[0]], nodes=[mm, relu], initializers=[w], opset_imports={"": 21}, name="g")
    ir.save(ir.Model(graph, ir_version=10), path, external_data="tiny.onnx.data", size_threshold_bytes=0)
    return path


def test_collect_ranges_appends_outputs_with_onnx_ir(tmp_path):
    path = _tiny_model(tmp_path / "tiny.onnx")
    feeds = [{"x": np.array([[1, 0, 0], [0, 1, 1]], np.float32)}, {"x": np.array([[-1, -1, -1]], np.float32)}]
    ranges = collect_ranges(path, ["h", "y", "x"], {None: None}, feeds)[None]
    # h rows: [1,-1], [2,3], [-3,-2]
    assert ranges.get("h") == (-3.0, 3.0) and ranges.get("y") == (0.0, 3.0) and ranges.get("x") == (-1.0, 1.0)
    session = session_with_outputs(path, ["h"])
    assert [o.name for o in session.get_outputs()] == ["y", "h"]  # the file itself is unchanged
    assert [o.name for o in ir.load(path).graph.outputs] == ["y"]
    with pytest.raises(QuantizationError, match="'nope' not found"):
        session_with_outputs(path, ["nope"])


def test_missing_types_are_inferred_and_shapes_kept(tmp_path):
    from graph_tools.quant.quantize import _activations, _fill_missing_dtypes

    model = ir.load(_tiny_model(tmp_path / "tiny.onnx"))
    h = next(n for n in model.graph if n.name == "mm").outputs[0]
    h.type, h.shape = None, None  # as an extractor may leave a rewired branch
    assert "h" not in _activations(model, set())  # untyped: would be left unquantized
    _fill_missing_dtypes(model)
    assert h.dtype == ir.DataType.FLOAT and h.shape is None
    assert "h" in _activations(model, set())
