"""Quantization that holds for every adapter (issue 11): partial adapters at W8A8 (no empty inner
dimension reaches ORT's fused 8-bit kernels), the per-activation shared/per-adapter decision of
``activation_scope="auto"``, W8A8 mixed precision, and declared concurrencies. Tiny Llama with two
random adapters (``default`` on every projection, ``second`` only on q/v: a partial adapter)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graph_tools import AdapterError, QuantizationError
from graph_tools.adapters import files
from graph_tools.quant import quantize, read_encodings
from graph_tools.quant.scope import norm_tensors
from graph_tools.runtime.session import AdapterSession

W8A8 = dict(activations="uint8", lora_weights="int8")


def _batches(n: int, seed: int, batch: int = 2, seq: int = 12):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (batch, seq), generator=g).numpy(),
             "attention_mask": np.ones((batch, seq), np.int64)} for _ in range(n)]


def _cos(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


CALIB = _batches(16, seed=7)  # 32 calibration rows
HELD_OUT = _batches(4, seed=99)  # 8 held-out rows, never calibrated


@pytest.fixture(scope="module")
def fpkg(tiny_llama_package):
    return tiny_llama_package


@pytest.fixture(scope="module")
def w8a8(fpkg, tmp_path_factory):
    return quantize(fpkg.path, tmp_path_factory.mktemp("w8a8") / "q", CALIB[:4], **W8A8)


@pytest.fixture(scope="module")
def w8a16(fpkg, tmp_path_factory):
    return quantize(fpkg.path, tmp_path_factory.mktemp("w8a16") / "q", CALIB, concurrencies=[("second", "default")])


def _plain_ort(qpkg, adapter_file, feeds):
    """The quantized graph in plain onnxruntime (ORT_ENABLE_ALL: QDQ fused), adapter via LoraAdapter."""
    session = ort.InferenceSession(str(qpkg.model_path), providers=["CPUExecutionProvider"])
    adapter = ort.LoraAdapter()
    adapter.Load(str(adapter_file))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return session.run(None, feeds, options)[0]


# -- 1. partial adapters at W8A8 --------------------------------------------------------------
def test_partial_adapter_at_w8a8_in_adapter_session_and_plain_ort(fpkg, w8a8):
    untouched = {s.name for s in fpkg.manifest.slots if "mlp" in s.site}  # `second` adapts q/v only
    raw = files.read_adapter(fpkg.adapter_path("second"))
    assert untouched and all(raw[n].size and not raw[n].any() for n in untouched)  # rank-1 zeros, not rank 0
    stored = files.read_adapter(w8a8.adapter_path("second"))
    assert all(min(v.shape) > 0 for v in stored.values())
    fs, qs = AdapterSession(fpkg.path), AdapterSession(w8a8.path)
    feeds = CALIB[0]
    for adapter in ("second", "default"):
        ref = fs.run(None, feeds, adapter=adapter)[0]
        served = qs.run(None, feeds, adapter=adapter)[0]
        plain = _plain_ort(w8a8, w8a8.adapter_path(adapter), feeds)
        assert _cos(ref, served) > 0.99, adapter  # was ~0.01 for `second` with rank-0 tensors
        assert _cos(ref, plain) > 0.99, adapter
        np.testing.assert_allclose(plain, served, atol=1e-5)


def test_adapter_file_with_empty_ranks_is_widened_when_served(fpkg, w8a8, tmp_path):
    """Files written before rank-1 zeros were the rule (rank 0 for untouched modules)."""
    stored = files.read_adapter(w8a8.adapter_path("second"))
    slots = {s.name: s for s in w8a8.manifest.slots}
    legacy = {}
    for name, value in stored.items():
        spec = slots[name]
        if "mlp" in spec.site and spec.role in ("lora_A.quantized", "lora_B.quantized", "lora_scale.quantized"):
            axis = 1 if spec.role == "lora_B.quantized" else 0
            value = np.take(value, [], axis=axis)
        legacy[name] = value
    path = files.write_adapter(tmp_path / "legacy.onnx_adapter", legacy)
    qs = AdapterSession(w8a8.path)
    qs.load_adapter("legacy", path)
    np.testing.assert_array_equal(qs.run(None, CALIB[0], adapter="legacy")[0], qs.run(None, CALIB[0], adapter="second")[0])


# -- 2. activation_scope="auto" ---------------------------------------------------------------
def test_auto_scope_holds_every_adapter_on_held_out_inputs(fpkg, w8a16):
    fs, qs = AdapterSession(fpkg.path), AdapterSession(w8a16.path)
    for adapter in (None, "default", "second"):
        cos = min(_cos(fs.run(None, f, adapter=adapter)[0], qs.run(None, f, adapter=adapter)[0]) for f in HELD_OUT)
        assert cos >= 0.999, (adapter, cos)


def test_auto_scope_records_what_is_shared_and_why(w8a16):
    info = w8a16.manifest.extra["quantization"]
    shared, per = set(info["shared_activations"]), set(info["adapter_dependent_activations"])
    assert info["activation_scope"] == "auto" and shared and per and not shared & per
    assert set(info["per_adapter_reasons"]) == per
    assert all("shared step" in r and "x its own" in r for r in info["per_adapter_reasons"].values())
    assert f"{len(shared)} shared, {len(per)} per adapter" in info["activation_summary"]
    encs = {run: read_encodings(w8a16.path / "encodings" / f"{run}.encodings")
            for run in ("base", "default", "second", "default+second")}
    for name in shared:  # one encoding, identical in every file
        assert len({encs[run].activation_encodings[name] for run in encs}) == 1, name
    assert any(encs["default"].activation_encodings[n] != encs["second"].activation_encodings[n] for n in per)


def test_auto_scope_shares_only_what_fits(fpkg, tmp_path):
    calib = CALIB[:3]
    tight = quantize(fpkg.path, tmp_path / "tight", calib, share_tolerance=0.0).manifest.extra["quantization"]
    loose = quantize(fpkg.path, tmp_path / "loose", calib, share_tolerance=1e6).manifest.extra["quantization"]
    lora = quantize(fpkg.path, tmp_path / "lora", calib, activation_scope="lora").manifest.extra["quantization"]
    assert len(tight["shared_activations"]) < len(lora["shared_activations"])
    assert loose["adapter_dependent_activations"] == []  # everything fits a wide enough tolerance
    with pytest.raises(QuantizationError, match="share_tolerance"):
        quantize(fpkg.path, tmp_path / "bad", calib, share_tolerance=-1)
    assert not (tmp_path / "bad").exists()


# -- 3. mixed precision -----------------------------------------------------------------------
def _act_bits(qpkg) -> dict[str, int]:
    encs = read_encodings(qpkg.path / "encodings" / "base.encodings")
    return {name: e.bitwidth for name, e in encs.activation_encodings.items()}


def test_mixed_precision_layernorm_keeps_norm_tensors_at_16_bits(fpkg, tmp_path):
    import onnx_ir as ir

    qpkg = quantize(fpkg.path, tmp_path / "mixed", CALIB[:4], mixed_precision="layernorm", **W8A8)
    info = qpkg.manifest.extra["quantization"]
    norms = norm_tensors(ir.load(fpkg.model_path))
    wide = set(info["activations_16bit"])
    assert wide and wide <= norms and info["mixed_precision"] == "layernorm"
    bits = _act_bits(qpkg)
    assert {bits[n] for n in wide} == {16} and {b for n, b in bits.items() if n not in wide} == {8}
    graph = onnx.load(str(qpkg.model_path), load_external_data=False).graph
    types = {i.name: i.data_type for i in graph.initializer} | {i.name: i.type.tensor_type.elem_type for i in graph.input}
    reshaped = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Reshape"}  # per-adapter zero points
    q_types = {n.input[0]: types[reshaped.get(n.input[2], n.input[2])] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert {q_types[n] for n in wide} == {onnx.TensorProto.UINT16}
    fs, qs = AdapterSession(fpkg.path), AdapterSession(qpkg.path)
    for adapter in (None, "default", "second"):
        assert _cos(fs.run(None, CALIB[0], adapter=adapter)[0], qs.run(None, CALIB[0], adapter=adapter)[0]) > 0.99


def test_mixed_precision_auto_picks_by_measured_error(fpkg, tmp_path):
    calib = CALIB[:3]
    every = quantize(fpkg.path, tmp_path / "all16", calib, mixed_precision="auto", mixed_error=0.0, **W8A8)
    none = quantize(fpkg.path, tmp_path / "none16", calib, mixed_precision="auto", mixed_error=10.0, **W8A8)
    some = quantize(fpkg.path, tmp_path / "some16", calib, mixed_precision="auto", mixed_error=0.005, **W8A8)
    n = {k: len(p.manifest.extra["quantization"]["activations_16bit"]) for k, p in (("all", every), ("none", none), ("some", some))}
    assert n["none"] == 0 < n["some"] < n["all"]
    assert set(_act_bits(every).values()) == {16} and set(_act_bits(none).values()) == {8}
    fs = AdapterSession(fpkg.path)
    errs = {}
    for label, pkg in (("all", every), ("none", none)):
        qs = AdapterSession(pkg.path)
        errs[label] = np.abs(fs.run(None, CALIB[0], adapter="default")[0] - qs.run(None, CALIB[0], adapter="default")[0]).max()
    assert errs["all"] < errs["none"] / 3  # the rest is the int8 weights' error
    with pytest.raises(QuantizationError, match="needs 8-bit activations"):
        quantize(fpkg.path, tmp_path / "bad", calib, mixed_precision="auto")


# -- 4. declared concurrencies ----------------------------------------------------------------
def test_declared_concurrency_is_served_and_others_refused(fpkg, w8a16):
    info = w8a16.manifest.extra["quantization"]
    assert [c["adapters"] for c in info["concurrencies"]] == [["default", "second"]]
    assert (w8a16.path / "adapters" / "default+second.onnx_adapter").is_file()
    assert (w8a16.path / "encodings" / "default+second.encodings").is_file()
    fs, qs = AdapterSession(fpkg.path), AdapterSession(w8a16.path)
    assert qs.concurrencies == [("default", "second")]
    both = {"default": 1.0, "second": 1.0}
    ref = fs.run(None, CALIB[0], adapter=both)[0]
    out = qs.run(None, CALIB[0], adapter=both)[0]
    assert _cos(ref, out) > 0.999
    # really both: differs from each adapter alone far beyond the quantization error
    for single in ("default", "second"):
        assert np.abs(out - qs.run(None, CALIB[0], adapter=single)[0]).max() > 10 * np.abs(ref - out).max()
    plain = _plain_ort(w8a16, w8a16.path / "adapters" / "default+second.onnx_adapter", CALIB[0])
    np.testing.assert_allclose(plain, out, atol=1e-5)
    with pytest.raises(AdapterError, match=r"declared: default\+second.*not default\+second=0.5"):
        qs.run(None, CALIB[0], adapter={"default": 1.0, "second": 0.5})


def test_undeclared_concurrency_and_bad_declarations(fpkg, w8a8, tmp_path):
    qs = AdapterSession(w8a8.path)
    with pytest.raises(AdapterError, match="one adapter at a time.*declared: none"):
        qs.run(None, CALIB[0], adapter={"default": 1.0, "second": 1.0})
    for bad, message in (([("default",)], "two or more"), ([("default", "nope")], "'nope' is not an adapter"),
                         ("default+second", "list of adapter-name tuples")):
        with pytest.raises(QuantizationError, match=message):
            quantize(fpkg.path, tmp_path / "out", CALIB[:1], concurrencies=bad)
        assert not (tmp_path / "out").exists()


def test_cli_quantize_reports_decisions(fpkg, tmp_path, capsys):
    from graph_tools.cli import main

    rows = {k: np.concatenate([b[k] for b in CALIB[:2]]) for k in CALIB[0]}
    np.savez(tmp_path / "calib.npz", **rows)
    code = main(["quantize", str(fpkg.path), "-o", str(tmp_path / "q"), "--calibration", str(tmp_path / "calib.npz"),
                 "--activations", "uint8", "--lora-weights", "int8", "--mixed-precision", "layernorm",
                 "--concurrency", "default+second"])
    out = capsys.readouterr().out
    info = AdapterSession(tmp_path / "q").manifest.extra["quantization"]
    assert code == 0 and info["activation_summary"] in out and "per adapter" in out
    assert f"{len(info['activations_16bit'])} at 16 bits" in out and "concurrency default+second" in out
    assert AdapterSession(tmp_path / "q").concurrencies == [("default", "second")]
