"""Adapter files: round trips, refusals, corrupt files, and how onnxruntime consumes them."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graph_builder import GraphBuilder

from graph_tools.adapters.files import (
    ADAPTER_FORMATS,
    ADAPTER_SUFFIX,
    SUPPORTED_DTYPES,
    adapter_format_of,
    read_adapter,
    read_adapter_metadata,
    write_adapter,
)
from graph_tools.errors import AdapterError, LoraOnnxError

RNG = np.random.default_rng(0)
IN, OUT, RANK, BATCH = 4, 5, 3, 2


def _path(tmp_path, fmt, stem="adapter"):
    return tmp_path / f"{stem}{ADAPTER_SUFFIX[fmt]}"


def _sample(dtype: str) -> np.ndarray:
    values = np.arange(-6, 6).reshape(3, 4)
    if np.dtype(dtype).kind == "u":
        values = values + 6
    return values.astype(np.dtype(dtype) if dtype != "bfloat16" else ml_dtypes.bfloat16)


def _lora_model(slots: str = "input+initializer", dtype: ir.DataType = ir.DataType.FLOAT) -> bytes:
    """``Y = X @ W + (X @ A) @ B`` with A, B as slots of the given kind, serialized for ORT.

    ``slots``: ``input+initializer`` (graph inputs with zero-rank defaults, our package layout),
    ``input`` (pure graph inputs) or ``initializer`` (plain initializers holding real weights).
    """
    np_type = dtype.numpy()
    b = GraphBuilder()
    x = b.input("X", [BATCH, IN], dtype)
    w = b.weight("W", RNG.standard_normal((IN, OUT)).astype(np_type))
    values = {}
    for name, shape, rank_shape in (("A", [IN, "rank"], (IN, RANK)), ("B", ["rank", OUT], (RANK, OUT))):
        if slots == "initializer":
            values[name] = b.weight(name, RNG.standard_normal(rank_shape).astype(np_type))
            continue
        values[name] = b.input(name, shape, dtype)
        if slots == "input+initializer":
            default = np.zeros([0 if dim == "rank" else dim for dim in shape], np_type)
            values[name].const_value = ir.tensor(default, name=name)
            b.initializers.append(values[name])
    y = b.op("Add", b.op("MatMul", x, w), b.op("MatMul", b.op("MatMul", x, values["A"]), values["B"]))
    y.name = "Y"
    proto = ir.to_proto(b.model(y))
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def _session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # "initializer appears in graph inputs" is expected for slots
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _active(path) -> tuple[ort.RunOptions, ort.LoraAdapter]:
    """RunOptions with the adapter active, and the adapter: the caller must keep it referenced."""
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    return run_options, adapter


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ADAPTER_FORMATS)
@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_round_trip_every_dtype(tmp_path, fmt, dtype):
    tensors = {"base_model.model.layer.lora_A.weight": _sample(dtype), "empty": np.zeros((4, 0), _sample(dtype).dtype)}
    path = write_adapter(_path(tmp_path, fmt), tensors, format=fmt)
    back = read_adapter(path)
    assert set(back) == set(tensors)
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape
        assert back[name].tobytes() == array.tobytes()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def _ort_export(path, tensors, adapter_version=1, model_version=1):
    """What ``write_adapter`` did before it wrote the flatbuffer itself: onnxruntime's own writer."""
    params = {}
    for name, array in tensors.items():
        if array.dtype == ml_dtypes.bfloat16:
            params[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), ir.DataType.BFLOAT16.value)
        else:
            params[name] = ort.OrtValue.ortvalue_from_numpy(array)
    writer = ort.AdapterFormat()
    writer.set_adapter_version(adapter_version)
    writer.set_model_version(model_version)
    writer.set_parameters(params)
    writer.export_adapter(str(path))


@pytest.mark.parametrize("versions", [(1, 1), (0, 0), (7, 2**31 - 1)])
def test_onnx_adapter_reads_as_onnxruntimes_own(tmp_path, versions):
    """Our flatbuffer writer against ``AdapterFormat.export_adapter``: onnxruntime reads both into
    the same parameters (names, dtypes, shapes, bytes, order) and versions, and runs both."""
    tensors = {f"t.{dtype}": _sample(dtype) for dtype in SUPPORTED_DTYPES}
    tensors |= {"empty": np.zeros((4, 0), np.float32), "ünïcode/name": RNG.standard_normal((2, 3, 1)).astype(np.float16),
                "odd": np.arange(3, dtype=np.uint8), "row": RNG.standard_normal((1, 5)).astype(np.float32)}
    meta = {"adapter_version": str(versions[0]), "model_version": str(versions[1])}
    ours = write_adapter(tmp_path / "ours.onnx_adapter", tensors, metadata=meta)
    _ort_export(tmp_path / "theirs.onnx_adapter", tensors, *versions)
    mine, theirs = ort.AdapterFormat.read_adapter(str(ours)), ort.AdapterFormat.read_adapter(str(tmp_path / "theirs.onnx_adapter"))
    assert (mine.get_adapter_version(), mine.get_model_version()) == versions
    assert (theirs.get_adapter_version(), theirs.get_model_version()) == versions
    a, b = mine.get_parameters(), theirs.get_parameters()
    assert list(a) == list(b)
    for name in a:
        assert (a[name].element_type(), a[name].shape(), a[name].tensor_size_in_bytes()) == \
            (b[name].element_type(), b[name].shape(), b[name].tensor_size_in_bytes()), name
    back = read_adapter(ours)
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape and back[name].tobytes() == array.tobytes()
    # and a run through a LoRA graph: the same outputs as with onnxruntime's file
    feeds = {"A": RNG.standard_normal((IN, RANK)).astype(np.float32), "B": RNG.standard_normal((RANK, OUT)).astype(np.float32)}
    session = _session(_lora_model())
    x = {"X": RNG.standard_normal((BATCH, IN)).astype(np.float32)}
    outs = []
    for writer in ("ours", "theirs"):
        path = tmp_path / f"run-{writer}.onnx_adapter"
        write_adapter(path, feeds) if writer == "ours" else _ort_export(path, feeds)
        run_options, adapter = _active(path)
        outs.append(session.run(None, x, run_options)[0])
        del adapter
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], session.run(None, {**x, **feeds})[0], rtol=1e-6)


@pytest.mark.parametrize("fmt", ADAPTER_FORMATS)
def test_onnx_adapter_and_bfloat16_load_in_ort(tmp_path, fmt):
    path = write_adapter(_path(tmp_path, fmt), {"A": _sample("bfloat16"), "B": _sample("int8")})
    if fmt == "onnx_adapter":
        ort.LoraAdapter().Load(str(path))
    assert read_adapter(path)["A"].dtype == ml_dtypes.bfloat16


def test_format_inferred_from_suffix_and_checked(tmp_path):
    assert adapter_format_of("x/a.onnx_adapter") == "onnx_adapter"
    assert adapter_format_of("a.safetensors") == "safetensors"
    with pytest.raises(AdapterError, match="unknown adapter file suffix '.bin'"):
        adapter_format_of("a.bin")
    with pytest.raises(AdapterError, match="must end in '.safetensors'"):
        write_adapter(tmp_path / "a.onnx_adapter", {"a": np.ones(2, np.float32)}, format="safetensors")
    with pytest.raises(AdapterError, match="unknown adapter format 'npz'"):
        write_adapter(tmp_path / "a.npz", {"a": np.ones(2, np.float32)}, format="npz")
    assert list(tmp_path.iterdir()) == []


def test_metadata(tmp_path):
    meta = {"adapter": "french", "model_version": "7"}
    st = write_adapter(_path(tmp_path, "safetensors"), {"a": np.ones(2, np.float32)}, metadata=meta)
    assert read_adapter_metadata(st) == meta
    oa = write_adapter(_path(tmp_path, "onnx_adapter"), {"a": np.ones(2, np.float32)}, metadata=meta)
    assert read_adapter_metadata(oa) == {"adapter_version": "1", "model_version": "7"}
    with pytest.raises(AdapterError, match="'model_version' must be an integer"):
        write_adapter(_path(tmp_path, "onnx_adapter", "b"), {"a": np.ones(2)}, metadata={"model_version": "x"})
    with pytest.raises(AdapterError, match="metadata must map str to str"):
        write_adapter(_path(tmp_path, "safetensors", "b"), {"a": np.ones(2, np.float32)}, metadata={"k": 1})


def test_non_contiguous_input_is_written_as_seen(tmp_path):
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T
    for fmt in ADAPTER_FORMATS:
        path = write_adapter(_path(tmp_path, fmt), {"t": array})
        np.testing.assert_array_equal(read_adapter(path)["t"], array)


# -------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("fmt", ADAPTER_FORMATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused_and_nothing_written(tmp_path, fmt, bad):
    tensor = np.ones((2, 2), np.float16)
    tensor[1, 0] = bad
    with pytest.raises(AdapterError, match=r"tensor 'layer.lora_B.weight' has 1 non-finite values"):
        write_adapter(_path(tmp_path, fmt), {"ok": np.ones(2, np.float32), "layer.lora_B.weight": tensor})
    assert list(tmp_path.iterdir()) == []


def test_non_finite_bfloat16_refused(tmp_path):
    tensor = np.array([1.0, np.nan], dtype=ml_dtypes.bfloat16)
    with pytest.raises(AdapterError, match="'t' has 1 non-finite"):
        write_adapter(_path(tmp_path, "safetensors"), {"t": tensor})


def test_failed_write_keeps_existing_file(tmp_path):
    path = write_adapter(_path(tmp_path, "onnx_adapter"), {"t": np.ones(3, np.float32)})
    before = path.read_bytes()
    with pytest.raises(AdapterError):
        write_adapter(path, {"t": np.full(3, np.nan, np.float32)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize(
    ("tensors", "fmt", "message"),
    [
        ({"t": np.ones(2, bool)}, "safetensors", "tensor 't' has dtype bool, adapter files hold float32"),
        ({"t": np.ones(2, np.complex64)}, "onnx_adapter", "tensor 't' has dtype complex64"),
        ({"t": [1.0, 2.0]}, "safetensors", "tensor 't' is a list, not a numpy array"),
        ({"": np.ones(2, np.float32)}, "safetensors", "tensor names must be non-empty strings"),
        ({"s": np.array(2.0, np.float32)}, "onnx_adapter", "tensor 's' is 0-d"),
    ],
)
def test_bad_tensors_refused(tmp_path, tensors, fmt, message):
    with pytest.raises(AdapterError, match=message):
        write_adapter(_path(tmp_path, fmt), tensors)
    assert list(tmp_path.iterdir()) == []


def test_scalar_allowed_in_safetensors(tmp_path):
    path = write_adapter(_path(tmp_path, "safetensors"), {"s": np.array(2.0, np.float32)})
    assert read_adapter(path)["s"].shape == ()


# --------------------------------------------------------------------------- broken files


@pytest.mark.parametrize("fmt", ADAPTER_FORMATS)
@pytest.mark.parametrize("keep", [0.0, 0.02, 0.5, 0.95])
def test_truncated_file_is_one_clear_line(tmp_path, fmt, keep):
    path = write_adapter(_path(tmp_path, fmt), {"a": RNG.standard_normal((16, 16)).astype(np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(AdapterError) as info:
        read_adapter(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert ".cc:" not in message and "onnxruntime::" not in message


@pytest.mark.parametrize("fmt", ADAPTER_FORMATS)
def test_garbage_missing_and_nan_files(tmp_path, fmt):
    path = _path(tmp_path, fmt)
    with pytest.raises(AdapterError, match="no such adapter file"):
        read_adapter(path)
    path.write_bytes(b"not an adapter at all" * 10)
    with pytest.raises(AdapterError, match=f"not a valid {fmt}"):
        read_adapter(path)
    with pytest.raises(LoraOnnxError):
        read_adapter_metadata(path)
    # a file written by another tool with NaN inside is refused on read as well
    bad = {"t": np.array([1.0, np.nan], np.float32)}
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(bad, str(path))
    else:
        writer = ort.AdapterFormat()
        writer.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in bad.items()})
        writer.export_adapter(str(path))
    with pytest.raises(AdapterError, match="tensor 't' has 1 non-finite"):
        read_adapter(path)


# ------------------------------------------------------- onnxruntime: how names are matched


def _weights():
    return {
        "A": RNG.standard_normal((IN, RANK)).astype(np.float32),
        "B": RNG.standard_normal((RANK, OUT)).astype(np.float32),
    }


def test_active_adapter_feeds_inputs_with_default_initializers(tmp_path):
    model = _lora_model("input+initializer")
    session = _session(model)
    w = next(onnx.numpy_helper.to_array(i) for i in onnx.load_from_string(model).graph.initializer if i.name == "W")
    x = RNG.standard_normal((BATCH, IN)).astype(np.float32)
    weights = _weights()
    path = write_adapter(_path(tmp_path, "onnx_adapter"), weights)
    run_options, _adapter = _active(path)
    (with_adapter,) = session.run(None, {"X": x}, run_options)
    np.testing.assert_allclose(with_adapter, x @ w + x @ weights["A"] @ weights["B"], atol=1e-5)
    (base,) = session.run(None, {"X": x})  # zero-rank defaults: the base model
    np.testing.assert_allclose(base, x @ w, atol=1e-5)
    # the same tensors fed by hand (the safetensors route) give the same output
    st = write_adapter(_path(tmp_path, "safetensors"), weights)
    (fed,) = session.run(None, {"X": x, **read_adapter(st)})
    np.testing.assert_allclose(fed, with_adapter, atol=1e-6)
    # a feed and an active adapter of the same name are not combined: one of them is used
    # (1.32: the adapter's)
    (both,) = session.run(None, {"X": x, "A": 2 * weights["A"]}, run_options)
    (fed_double,) = session.run(None, {"X": x, "A": 2 * weights["A"], "B": weights["B"]})
    assert np.allclose(both, with_adapter, atol=1e-6) or np.allclose(both, fed_double, atol=1e-6)


def test_adapter_cannot_set_plain_initializers(tmp_path):
    session = _session(_lora_model("initializer"))
    path = write_adapter(_path(tmp_path, "onnx_adapter"), _weights())
    run_options, _adapter = _active(path)
    with pytest.raises(Exception, match="Invalid input name: [AB]"):
        session.run(None, {"X": np.ones((BATCH, IN), np.float32)}, run_options)


def test_pure_inputs_are_rejected_by_the_python_wrapper(tmp_path):
    session = _session(_lora_model("input"))
    path = write_adapter(_path(tmp_path, "onnx_adapter"), _weights())
    x = np.ones((BATCH, IN), np.float32)
    run_options, _adapter = _active(path)
    with pytest.raises(ValueError, match="Required inputs"):
        session.run(None, {"X": x}, run_options)
    run_options, _adapter = _active(path)
    (out,) = session._sess.run(["Y"], {"X": x}, run_options)  # ORT's core itself would accept them
    assert out.shape == (BATCH, OUT)


def test_extra_name_or_wrong_dtype_breaks_the_run(tmp_path):
    session = _session(_lora_model("input+initializer"))
    x = np.ones((BATCH, IN), np.float32)
    extra = write_adapter(_path(tmp_path, "onnx_adapter", "extra"), {**_weights(), "C": np.ones((1,), np.float32)})
    run_options, _adapter = _active(extra)
    with pytest.raises(Exception, match="Invalid input name: C"):
        session.run(None, {"X": x}, run_options)
    weights = _weights()
    mixed = {"A": weights["A"].astype(np.float16), "B": weights["B"]}
    half = write_adapter(_path(tmp_path, "onnx_adapter", "half"), mixed)
    run_options, _adapter = _active(half)
    with pytest.raises(Exception, match="Unexpected input data type"):
        session.run(None, {"X": x}, run_options)


def test_float16_graph_with_float16_adapter(tmp_path):
    session = _session(_lora_model("input+initializer", ir.DataType.FLOAT16))
    weights = {k: v.astype(np.float16) for k, v in _weights().items()}
    path = write_adapter(_path(tmp_path, "onnx_adapter"), weights)
    x = np.ones((BATCH, IN), np.float16)
    run_options, _adapter = _active(path)
    (with_adapter,) = session.run(None, {"X": x}, run_options)
    (base,) = session.run(None, {"X": x})
    expected = (x.astype(np.float32) @ weights["A"].astype(np.float32)) @ weights["B"].astype(np.float32)
    np.testing.assert_allclose(with_adapter.astype(np.float32) - base.astype(np.float32), expected, atol=5e-2)


def test_several_active_adapters_do_not_add_up(tmp_path):
    session = _session(_lora_model("input+initializer"))
    weights = _weights()
    first = write_adapter(_path(tmp_path, "onnx_adapter", "first"), weights)
    second = write_adapter(_path(tmp_path, "onnx_adapter", "second"), {"A": 2 * weights["A"], "B": weights["B"]})
    x = RNG.standard_normal((BATCH, IN)).astype(np.float32)
    run_options, first_adapter = _active(first)
    (only_first,) = session.run(None, {"X": x}, run_options)
    second_adapter = ort.LoraAdapter()
    second_adapter.Load(str(second))
    run_options.add_active_adapter(second_adapter)
    (both,) = session.run(None, {"X": x}, run_options)
    (only_second,) = session.run(None, {"X": x, "A": 2 * weights["A"], "B": weights["B"]})
    # duplicate names are not summed or concatenated: one of them is used (1.32: the first added)
    assert np.allclose(both, only_first, atol=1e-6) or np.allclose(both, only_second, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ml_dtypes.bfloat16])
def test_finite_check_by_exponent_bits_is_exact(tmp_path, dtype):
    """The fast check (all exponent bits set) refuses exactly NaN and +-inf: the largest finite
    value, subnormals and -0 pass; each non-finite value is found wherever it sits, strided too."""
    info = ml_dtypes.finfo(dtype) if dtype is ml_dtypes.bfloat16 else np.finfo(dtype)
    edge = np.array([info.max, -info.max, info.smallest_subnormal, -0.0, 0.0, info.tiny], dtype=dtype)
    write_adapter(_path(tmp_path, "safetensors"), {"t": edge, "strided": np.tile(edge, (2, 1))[:, ::2]})
    for bad in (np.nan, np.inf, -np.inf):
        for where in (0, 3, 5):
            tensor = edge.copy()
            tensor[where] = bad
            with pytest.raises(AdapterError, match="'t' has 1 non-finite"):
                write_adapter(_path(tmp_path, "safetensors"), {"t": tensor})
        strided = np.tile(edge, (2, 1))
        strided[1, 2] = bad
        with pytest.raises(AdapterError, match="'t' has 1 non-finite"):
            write_adapter(_path(tmp_path, "safetensors"), {"t": strided[:, ::2]})
