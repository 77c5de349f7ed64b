"""passes/slots.py + passes/extract.py on hand-built graphs: the slot plan (names, shapes, dtype,
rank axes) and the graph ``ReplaceLoraWithSlotsPass`` makes of it (defaults run as the base model,
fed tensors run as the LoRA model).

The slot layout (PEFT's or pre-transposed) is decided in passes/slots.py: these tests read it from
the plan (rank axes) and the manifest (shapes, ``slot_layout``), never assume one.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import graph_builder as gb
from graph_tools import extract_adapters, find_lora_sites
from graph_tools.adapters.compose import compose, slot_tensors
from graph_tools.errors import AdapterError, NoLoraError
from graph_tools.lora.naming import PEFT_PREFIX
from graph_tools.passes._base import run_passes
from graph_tools.passes.extract import ReplaceLoraWithSlotsPass
from graph_tools.passes.slots import SLOT_LAYOUT, plan_slots, read_adapter_weights, slot_names


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _slotted(layers: gb.LoraLayers, **plan_kwargs):
    model = ir.from_proto(ir.to_proto(layers.model))  # keep layers.model for the manifest route
    groups = plan_slots(model, find_lora_sites(model), **plan_kwargs)
    run_passes(model, ReplaceLoraWithSlotsPass(groups))
    return model, groups


def _manifest_slots(layers: gb.LoraLayers, tmp_path, **kwargs):
    return extract_adapters(layers.model, tmp_path / "pkg", **kwargs).manifest


def _close(got: dict, want: dict, tol: float = 1e-4) -> None:
    assert set(got) == set(want)
    for name in want:
        assert float(np.abs(got[name].astype(np.float64) - want[name]).max()) <= tol, name


# ------------------------------------------------------------------------------------ the plan


def test_names_are_the_keys_peft_saves():
    layers = gb.lora_layers()
    groups = plan_slots(layers.model, find_lora_sites(layers.model))
    assert [g.module for g in groups] == ["q_proj", "k_proj"]
    for g in groups:
        assert g.slot_names == (f"{PEFT_PREFIX}{g.module}.lora_A.weight", f"{PEFT_PREFIX}{g.module}.lora_B.weight",
                                f"{PEFT_PREFIX}{g.module}.lora_scale") == slot_names(g.module, "linear")
        assert [(s.module, s.adapter) for s in g.sites] == [(g.module, "default"), (g.module, "second")]
    assert slot_names("model.embed_tokens", "embedding")[:2] == (
        f"{PEFT_PREFIX}model.embed_tokens.lora_embedding_A", f"{PEFT_PREFIX}model.embed_tokens.lora_embedding_B")


def test_rank_axis_is_one_dim_name_per_module_and_features_fill_the_rest():
    model = gb.lora_layers().model
    groups = plan_slots(model, find_lora_sites(model))
    names = set()
    for g in groups:
        assert isinstance(g.rank, str) and g.a_shape[g.rank_axis_a] == g.b_shape[g.rank_axis_b] == g.rank
        assert g.scale_shape == [g.rank]
        assert sorted(d for d in g.a_shape if d != g.rank) == [gb.IN]
        assert sorted(d for d in g.b_shape if d != g.rank) == [gb.OUT]
        names.add(g.rank)
    assert len(names) == len(groups)  # sites of different ranks fit one graph


def test_fixed_ranks_give_int_rank_axes():
    layers = gb.lora_layers()
    groups = plan_slots(layers.model, find_lora_sites(layers.model), fixed_ranks={"q_proj": 6})
    q, k = groups
    assert q.rank == 6 and q.a_shape[q.rank_axis_a] == q.b_shape[q.rank_axis_b] == 6 and q.scale_shape == [6]
    assert isinstance(k.rank, str)  # modules absent from fixed_ranks stay dynamic


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dtype_is_the_a_weights(dtype):
    layers = gb.lora_layers(dtype=dtype)
    groups = plan_slots(layers.model, find_lora_sites(layers.model))
    assert {g.dtype for g in groups} == {ir.DataType.from_numpy(np.dtype(dtype))}


def test_dtype_without_value_types_follows_the_stored_tensor_and_casts():
    """A graph without value types: the dtype is read off the stored A (behind a Cast: its ``to``)."""
    layers = gb.lora_layers(dtype=np.float16, ranks={"default": 2})
    graph = layers.model.graph
    a_name = f"{PEFT_PREFIX}q_proj.lora_A.default.weight"
    a16 = graph.initializers[a_name]
    a32 = ir.Value(name=a_name + ".fp32", const_value=ir.tensor(a16.const_value.numpy().astype(np.float32), name=a_name + ".fp32"))
    graph.register_initializer(a32)
    cast = ir.node("Cast", [a32], attributes={"to": ir.DataType.FLOAT16})
    user = a16.uses()[0].node
    graph.insert_before(user, cast)
    ir.convenience.replace_all_uses_with(a16, cast.outputs[0])
    graph.initializers.pop(a_name)
    for node in graph:
        for out in node.outputs:
            if not out.is_graph_output():
                out.type, out.shape = None, None
    sites = find_lora_sites(layers.model)
    assert {s.module for s in sites} == {"q_proj", "k_proj"}
    assert {g.module: g.dtype for g in plan_slots(layers.model, sites)} == {
        "q_proj": ir.DataType.FLOAT16, "k_proj": ir.DataType.FLOAT16}


def test_plan_refusals():
    layers = gb.lora_layers()
    with pytest.raises(NoLoraError):
        plan_slots(layers.model, [])
    other = gb.lora_layers()  # same graph, another copy: its sites point into other objects
    with pytest.raises(AdapterError, match="belongs to another graph"):
        plan_slots(layers.model, find_lora_sites(other.model))


def test_read_adapter_weights_are_the_peft_tensors():
    layers = gb.lora_layers()
    groups = plan_slots(layers.model, find_lora_sites(layers.model))
    read = read_adapter_weights(layers.model, groups)
    assert set(read) == set(layers.weights)
    for adapter, modules in layers.weights.items():
        assert set(read[adapter]) == set(modules)
        for module, (a, b, s) in modules.items():
            ra, rb, rs = read[adapter][module]
            np.testing.assert_array_equal(ra, a)  # PEFT layout, whatever the slots hold
            np.testing.assert_array_equal(rb, b)
            assert rs == pytest.approx(s)


# --------------------------------------------------------------------------- the slot graph


def test_slots_are_inputs_with_empty_defaults():
    model, groups = _slotted(gb.lora_layers())
    inputs = {v.name: v for v in model.graph.inputs}
    for g in groups:
        for name, shape in zip(g.slot_names, (g.a_shape, g.b_shape, g.scale_shape)):
            value = inputs[name]
            assert model.graph.initializers[name] is value
            assert list(value.shape) == shape and value.dtype == g.dtype
            default = value.const_value.numpy()
            assert list(default.shape) == [0 if isinstance(d, str) else d for d in shape]
    assert not any("lora_A.default" in n or "lora_B.second" in n for n in model.graph.initializers)  # old weights gone
    assert find_lora_sites(model) != []  # the slot branch is a LoRA site itself


def test_defaults_run_as_the_base_model_fixed_rank_too():
    layers = gb.lora_layers()
    for kwargs in ({}, {"fixed_ranks": {"q_proj": 6, "k_proj": 3}}):
        model, _ = _slotted(layers, **kwargs)
        _close(_run(model, {"x": layers.feeds["x"]}), layers.reference([]))


def test_fed_tensors_run_as_the_lora_model(tmp_path):
    layers = gb.lora_layers()
    model, groups = _slotted(layers)
    manifest = _manifest_slots(layers, tmp_path)
    assert manifest.slot_layout == SLOT_LAYOUT
    specs = {s.name: s for s in manifest.slots}
    for g in groups:  # the manifest records the plan
        for name, shape in zip(g.slot_names, (g.a_shape, g.b_shape, g.scale_shape)):
            assert specs[name].shape == shape and specs[name].site == g.module and specs[name].layout == SLOT_LAYOUT
    x = {"x": layers.feeds["x"]}
    for adapter in layers.weights:
        feed = slot_tensors(manifest.slots, layers.weights[adapter])
        _close(_run(model, x | feed), layers.reference([(adapter, 1.0)]))
    both = compose(manifest.slots, [(layers.weights["default"], 1.0), (layers.weights["second"], -0.5)])
    _close(_run(model, x | both), layers.reference([("default", 1.0), ("second", -0.5)]))


def test_fixed_rank_graph_with_padded_tensors(tmp_path):
    layers = gb.lora_layers()
    manifest = _manifest_slots(layers, tmp_path, max_rank=8)
    model, groups = _slotted(layers, fixed_ranks={g: 8 for g in ("q_proj", "k_proj")})
    assert {s.name: s.shape for s in manifest.slots} == {
        n: shape for g in groups for n, shape in zip(g.slot_names, (g.a_shape, g.b_shape, g.scale_shape))}
    feed = slot_tensors(manifest.slots, layers.weights["second"])
    _close(_run(model, {"x": layers.feeds["x"]} | feed), layers.reference([("second", 1.0)]))


def test_fp16_slots_run(tmp_path):
    layers = gb.lora_layers(dtype=np.float16)
    model, groups = _slotted(layers)
    manifest = _manifest_slots(layers, tmp_path)
    assert {s.dtype for s in manifest.slots} == {"float16"}
    feed = slot_tensors(manifest.slots, layers.weights["default"])
    assert {v.dtype for v in feed.values()} == {np.dtype(np.float16)}
    _close(_run(model, {"x": layers.feeds["x"]} | feed), layers.reference([("default", 1.0)]), tol=2e-2)


def test_external_mode_slots_are_initializers_not_inputs():
    layers = gb.lora_layers()
    groups = plan_slots(layers.model, find_lora_sites(layers.model), fixed_ranks={"q_proj": 4, "k_proj": 4})
    run_passes(layers.model, ReplaceLoraWithSlotsPass(groups, as_inputs=False))
    inputs = {v.name for v in layers.model.graph.inputs}
    for g in groups:
        for name in g.slot_names:
            assert name in layers.model.graph.initializers and name not in inputs
    _close(_run(layers.model, {"x": layers.feeds["x"]}), layers.reference([]))


def test_a_taken_slot_name_is_refused():
    layers = gb.lora_layers()
    groups = plan_slots(layers.model, find_lora_sites(layers.model))
    taken = groups[0].a_name
    layers.model.graph.register_initializer(ir.Value(name=taken, const_value=ir.tensor(np.zeros(1, np.float32), name=taken)))
    with pytest.raises(AdapterError, match="already exists"):
        run_passes(layers.model, ReplaceLoraWithSlotsPass(groups))


def test_shared_mapping_reads_what_onnx_ir_reads(tmp_path):
    """One map per data file; every tensor equals ``ExternalTensor.numpy()``; sub-byte, empty and
    in-memory tensors take onnx-ir's own path; a path outside the model folder is still refused."""
    import ml_dtypes

    from graph_tools.passes._weights import SharedMapping

    rng = np.random.default_rng(0)
    arrays = {
        "f16": rng.standard_normal((3, 5)).astype(np.float16), "f32": rng.standard_normal((4,)).astype(np.float32),
        "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16), "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "u8": np.arange(7, dtype=np.uint8), "empty": np.zeros((0, 3), np.float32),
        "i4": np.array([1, -2, 3, -4], dtype=ml_dtypes.int4),
    }
    graph = ir.Graph([], [], nodes=[], initializers=[ir.Value(name=k, const_value=ir.tensor(v, name=k)) for k, v in arrays.items()],
                     opset_imports={"": 18})
    ir.save(ir.Model(graph, ir_version=10), tmp_path / "m.onnx", external_data="m.onnx.data", size_threshold_bytes=0)
    model = ir.load(tmp_path / "m.onnx")
    mapping = SharedMapping()
    for name, want in arrays.items():
        tensor = model.graph.initializers[name].const_value
        got = mapping.array(tensor)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32), err_msg=name)
    assert len(mapping._maps) == 1
    assert mapping.array(ir.tensor(np.ones(2, np.float32))).tolist() == [1.0, 1.0]
    outside = ir.ExternalTensor("../elsewhere.data", offset=0, length=8, dtype=ir.DataType.FLOAT, shape=ir.Shape([2]),
                                name="x", base_dir=tmp_path / "sub")
    with pytest.raises(ValueError, match="outside the base directory"):
        SharedMapping().array(outside)
