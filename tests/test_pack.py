"""passes/pack.py: the pack plan (one input per role, shape and dtype) and PackSlotsPass on a
hand-built slot graph (Gathers from the packed input; same outputs as the unpacked graph), plus
compose's pack_tensors / unpack_tensors that fill and read packed inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import graph_builder as gb
from graph_tools import extract_adapters, find_lora_sites
from graph_tools.adapters import files
from graph_tools.adapters.compose import pack_tensors, slot_tensors, unpack_tensors
from graph_tools.errors import AdapterError
from graph_tools.passes._base import run_passes
from graph_tools.passes.extract import ReplaceLoraWithSlotsPass
from graph_tools.passes.pack import PackSlotsPass, plan_packs
from graph_tools.passes.slots import plan_slots

RANK = 4


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        assert float(np.abs(got[name] - want[name]).max()) <= 1e-4, name


@pytest.fixture
def layers():
    return gb.lora_layers(("q_proj", "k_proj", "v_proj"))


def _fixed(layers, tmp_path):
    """The manifest slots of a fixed-rank package and the same graph with slots (not packed)."""
    slots = extract_adapters(layers.model, tmp_path / "pkg", max_rank=RANK + 2).manifest.slots
    model = ir.from_proto(ir.to_proto(layers.model))
    groups = plan_slots(model, find_lora_sites(model), fixed_ranks={m: RANK + 2 for m in layers.base})
    run_passes(model, ReplaceLoraWithSlotsPass(groups))
    return slots, model


def test_plan_groups_by_role_shape_and_dtype(layers, tmp_path):
    slots, _ = _fixed(layers, tmp_path)
    packs = plan_packs(slots)
    assert [p["name"] for p in packs] == ["lora_pack.lora_A.0", "lora_pack.lora_B.0", "lora_pack.lora_scale.0"]
    for pack in packs:
        members = [s for s in slots if s.role == pack["role"]]
        assert pack["members"] == [s.name for s in members]  # slot order kept
        assert pack["shape"] == [len(members), *members[0].shape] and pack["dtype"] == members[0].dtype


def test_plan_splits_different_shapes_and_dtypes(layers, tmp_path):
    slots, _ = _fixed(layers, tmp_path)
    # v_proj's slots one row wider on the rank axis (every dim equal to the rank grows), q_proj's in float16
    wider = [dataclasses.replace(s, shape=[d + 1 if d == RANK + 2 else d for d in s.shape]) if s.site == "v_proj" else s for s in slots]
    mixed = [dataclasses.replace(s, dtype="float16") if s.site == "q_proj" else s for s in wider]
    packs = plan_packs(mixed)
    a_packs = [p for p in packs if p["role"] == "lora_A"]
    assert [p["name"] for p in a_packs] == ["lora_pack.lora_A.0", "lora_pack.lora_A.1", "lora_pack.lora_A.2"]
    assert sorted(len(p["members"]) for p in a_packs) == [1, 1, 1]
    assert {p["dtype"] for p in a_packs} == {"float16", "float32"}


def test_plan_refuses_dynamic_shapes(layers, tmp_path):
    slots = extract_adapters(layers.model, tmp_path / "pkg").manifest.slots  # dynamic rank
    with pytest.raises(AdapterError, match="dynamic shape"):
        plan_packs(slots)


def test_packed_graph_runs_as_the_unpacked_one(layers, tmp_path):
    slots, model = _fixed(layers, tmp_path)
    packs = plan_packs(slots)
    unpacked = ir.from_proto(ir.to_proto(model))
    run_passes(model, PackSlotsPass(packs))
    inputs = {v.name for v in model.graph.inputs}
    assert inputs == {"x"} | {p["name"] for p in packs}
    gathers = [n for n in model.graph if n.metadata_props.get("lora_onnx.role") == "unpack"]
    assert len(gathers) == len(slots) and {n.op_type for n in gathers} == {"Gather"}
    x = {"x": layers.feeds["x"]}
    _close(_run(model, x), layers.reference([]))  # the packed defaults are zeros: the base model
    feed = slot_tensors(slots, layers.weights["default"])
    _close(_run(model, x | pack_tensors(packs, feed)), _run(unpacked, x | feed))
    _close(_run(model, x | pack_tensors(packs, feed)), layers.reference([("default", 1.0)]))


def test_pass_refuses_a_member_that_is_not_an_input_with_a_default(layers, tmp_path):
    slots, model = _fixed(layers, tmp_path)
    packs = plan_packs(slots)
    member = packs[0]["members"][0]
    value = next(v for v in model.graph.inputs if v.name == member)
    model.graph.inputs.remove(value)  # an initializer only: not an input a feed can replace
    with pytest.raises(AdapterError, match="not a graph input with a default"):
        run_passes(model, PackSlotsPass(packs))


def test_pass_refuses_a_member_of_another_shape(layers, tmp_path):
    slots, model = _fixed(layers, tmp_path)
    packs = plan_packs(slots)
    packs[0] = dict(packs[0], shape=[packs[0]["shape"][0], *[d + 1 for d in packs[0]["shape"][1:]]])
    with pytest.raises(AdapterError, match="is not the pack's"):
        run_passes(model, PackSlotsPass(packs))


def test_pack_and_unpack_tensors_round_trip(layers, tmp_path):
    slots, _ = _fixed(layers, tmp_path)
    packs = plan_packs(slots)
    feed = slot_tensors(slots, layers.weights["second"])
    packed = pack_tensors(packs, feed)
    assert set(packed) == {p["name"] for p in packs}
    for pack in packs:
        assert list(packed[pack["name"]].shape) == pack["shape"]
        for i, member in enumerate(pack["members"]):
            np.testing.assert_array_equal(packed[pack["name"]][i], feed[member])
    back = unpack_tensors(packs, packed)
    assert set(back) == set(feed)
    for name in feed:
        np.testing.assert_array_equal(back[name], feed[name])


def test_unpack_refuses_a_missing_or_misshapen_pack(layers, tmp_path):
    slots, _ = _fixed(layers, tmp_path)
    packs = plan_packs(slots)
    packed = pack_tensors(packs, slot_tensors(slots, layers.weights["default"]))
    with pytest.raises(AdapterError, match="missing tensor 'lora_pack.lora_B.0'"):
        unpack_tensors(packs, {k: v for k, v in packed.items() if k != "lora_pack.lora_B.0"}, source="f.onnx_adapter")
    packed["lora_pack.lora_A.0"] = packed["lora_pack.lora_A.0"][:2]
    with pytest.raises(AdapterError, match="has shape"):
        unpack_tensors(packs, packed)


def test_packed_package_files_hold_only_packs(layers, tmp_path):
    package = extract_adapters(layers.model, tmp_path / "pkg", pack=True)
    packs = package.manifest.extra["packs"]
    assert package.manifest.pack and len(packs) == 3
    for adapter in package.manifest.adapters:
        tensors = files.read_adapter(package.path / adapter.file)
        assert set(tensors) == {p["name"] for p in packs}
