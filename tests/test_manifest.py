"""Package manifest: round trip, refusals with one clear line, slot checks, graph fingerprint."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_tools.adapters.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    AdapterSpec,
    Manifest,
    SlotSpec,
    check_adapter_tensors,
    graph_fingerprint,
    read_manifest,
    write_manifest,
)
from graph_tools.errors import AdapterError, PackageError

A = "base_model.model.q_proj.lora_A.weight"
B = "base_model.model.q_proj.lora_B.weight"
S = "q_proj.lora_scale"


def _manifest() -> Manifest:
    return Manifest(
        graph_fingerprint="sha256:00",
        mode="inputs",
        pack=False,
        max_rank=None,
        slot_layout="peft",
        slots=[
            SlotSpec(name=A, shape=["lora_r_q_proj", 8], dtype="float32", site="q_proj", role="lora_A", layout="peft"),
            SlotSpec(name=B, shape=[6, "lora_r_q_proj"], dtype="float32", site="q_proj", role="lora_B", layout="peft"),
            SlotSpec(name=S, shape=[1], dtype="float32", site="q_proj", role="lora_scale", layout="peft"),
        ],
        adapters=[
            AdapterSpec(name="french", file="adapters/french.onnx_adapter", rank=4, alpha=8.0, scale={"q_proj": 2.0},
                        source="graph:model.onnx", format="onnx_adapter"),
            AdapterSpec(name="german", file="adapters/german.safetensors", rank={"q_proj": 2}, alpha={"q_proj": 3.0},
                        scale={"q_proj": 1.5}, source="peft:german", format="safetensors"),
        ],
        extra={"exporter": "dynamo"},
    )


def test_round_trip_sorted_and_indented(tmp_path):
    manifest = _manifest()
    path = write_manifest(tmp_path, manifest)
    assert path == tmp_path / MANIFEST_NAME
    assert read_manifest(tmp_path) == manifest == read_manifest(path)
    text = path.read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    assert json.loads(text)["format_version"] == FORMAT_VERSION
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]


def test_lookups_and_with_adapter():
    manifest = _manifest()
    assert manifest.slot(B).role == "lora_B"
    assert manifest.adapter("german").rank == {"q_proj": 2}
    with pytest.raises(AdapterError, match="unknown adapter 'spanish' \\(package has: french, german\\)"):
        manifest.adapter("spanish")
    with pytest.raises(PackageError, match="no slot 'nope'"):
        manifest.slot("nope")
    replaced = manifest.with_adapter(dataclasses.replace(manifest.adapters[0], rank=8))
    assert [a.name for a in replaced.adapters] == ["german", "french"] and replaced.adapter("french").rank == 8
    assert manifest.adapter("french").rank == 4  # the original is untouched


def _write_raw(tmp_path, data) -> str:
    path = tmp_path / MANIFEST_NAME
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _broken(change):
    data = _manifest().to_dict()
    change(data)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "manifest is not valid JSON"),
        ('{"format_version": NaN}', "manifest is not valid JSON"),
        ("[]", "manifest: expected an object, got list"),
        (_broken(lambda d: d.update(format_version=99)), "format_version 99 is newer than this lora-onnx reads"),
        (_broken(lambda d: d.update(format_version="1")), "format_version: expected 1, got '1'"),
        (_broken(lambda d: d.pop("format_version")), "format_version: expected 1, got None"),
        (_broken(lambda d: d.pop("graph_fingerprint")), "manifest: missing field 'graph_fingerprint'"),
        (_broken(lambda d: d.update(surprise=1)), "manifest: unknown field 'surprise'"),
        (_broken(lambda d: d.update(mode="weird")), "mode: expected one of inputs, external, got 'weird'"),
        (_broken(lambda d: d.update(pack="yes")), "pack: expected true or false"),
        (_broken(lambda d: d.update(max_rank=0)), "max_rank: expected an integer >= 1, got 0"),
        (_broken(lambda d: d["slots"][1].pop("dtype")), "slots\\[1\\]: missing field 'dtype'"),
        (_broken(lambda d: d["slots"][0].update(shape=[-1, 8])), "slots\\[0\\].shape\\[0\\]: expected a size >= 0"),
        (_broken(lambda d: d["slots"][0].update(dtype="float33")), "slots\\[0\\].dtype: unknown dtype 'float33'"),
        (_broken(lambda d: d["slots"].append(d["slots"][0])), f"slots: slot '{A}' is listed twice"),
        (_broken(lambda d: d["adapters"][1].update(rank=True)), r"adapters\[1\].rank: expected an integer >= 0"),
        (_broken(lambda d: d["adapters"][1]["rank"].update(q_proj=1.5)), r"adapters\[1\].rank\['q_proj'\]: expected"),
        (_broken(lambda d: d["adapters"][0].update(file="../escape.onnx_adapter")), "a relative path inside"),
        (_broken(lambda d: d["adapters"][0].update(file="/abs.onnx_adapter")), "a relative path inside"),
        (_broken(lambda d: d["adapters"][0].update(format="npz")), r"adapters\[0\].format: expected one of"),
        (_broken(lambda d: d["adapters"][0]["scale"].update(q_proj="2")), r"scale\['q_proj'\]: expected a finite"),
        (_broken(lambda d: d["adapters"][1].update(name="french")), "adapters: adapter 'french' is listed twice"),
    ],
)
def test_bad_manifest_is_one_line(tmp_path, data, message):
    path = _write_raw(tmp_path, data)
    with pytest.raises(PackageError, match=message) as info:
        read_manifest(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(PackageError, match="no manifest \\(not an adapter package\\?\\)"):
        read_manifest(tmp_path)


def test_invalid_manifest_is_never_written(tmp_path):
    bad = dataclasses.replace(_manifest(), mode="weird")
    with pytest.raises(PackageError, match="mode: expected one of"):
        write_manifest(tmp_path / MANIFEST_NAME, bad)
    nan = _manifest().with_adapter(dataclasses.replace(_manifest().adapters[0], scale={"q_proj": float("nan")}))
    with pytest.raises(PackageError, match="expected a finite number"):
        write_manifest(tmp_path / MANIFEST_NAME, nan)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------- adapter tensors


def _tensors(rank_a=4, rank_b=4, dtype=np.float32):
    return {A: np.zeros((rank_a, 8), dtype), B: np.zeros((6, rank_b), dtype), S: np.ones(1, dtype)}


def test_check_adapter_tensors():
    manifest = _manifest()
    check_adapter_tensors(manifest, _tensors())
    check_adapter_tensors(manifest, _tensors(rank_a=0, rank_b=0))  # zero rank: the base model
    with pytest.raises(AdapterError, match=f"french: missing tensor '{S}'"):
        check_adapter_tensors(manifest, {k: v for k, v in _tensors().items() if k != S}, source="french")
    with pytest.raises(AdapterError, match="tensor 'extra' is not a slot of the package"):
        check_adapter_tensors(manifest, {**_tensors(), "extra": np.ones(1, np.float32)})
    with pytest.raises(AdapterError, match=f"'{B}' has lora_r_q_proj=3 on axis 1 but '{A}' has lora_r_q_proj=4"):
        check_adapter_tensors(manifest, _tensors(rank_b=3))
    with pytest.raises(AdapterError, match=f"tensor '{A}' has dtype float16, the slot needs float32"):
        check_adapter_tensors(manifest, _tensors(dtype=np.float16))
    wrong = _tensors()
    wrong[A] = np.zeros((4, 9), np.float32)
    with pytest.raises(AdapterError, match=r"has shape \[4, 9\], the slot needs \['lora_r_q_proj', 8\]"):
        check_adapter_tensors(manifest, wrong)
    wrong[A] = np.zeros((4, 8, 1), np.float32)
    with pytest.raises(AdapterError, match=r"has shape \[4, 8, 1\]"):
        check_adapter_tensors(manifest, wrong)


# ----------------------------------------------------------------------------- fingerprint


def _proto(*, w_shape=(8, 6), op="Relu", rank_dim="lora_r", extra_attr=None) -> onnx.ModelProto:
    """``Y = act(X @ W + (X @ A) @ B)`` with A, B slots; an If subgraph and a Constant for coverage."""
    rng = np.random.default_rng(0)
    inputs = [
        helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", w_shape[0]]),
        helper.make_tensor_value_info("A", TensorProto.FLOAT, [w_shape[0], rank_dim]),
        helper.make_tensor_value_info("B", TensorProto.FLOAT, [rank_dim, w_shape[1]]),
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal(w_shape).astype(np.float32), "W"),
        numpy_helper.from_array(np.zeros((w_shape[0], 0), np.float32), "A"),
        numpy_helper.from_array(np.zeros((0, w_shape[1]), np.float32), "B"),
    ]
    branch = lambda name, value: helper.make_graph(  # noqa: E731
        [helper.make_node("Constant", [], [f"{name}_out"], value=numpy_helper.from_array(np.array([value], "f")))],
        name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1])],
    )
    act = helper.make_node(op, ["sum"], ["act"], **(extra_attr or {}))
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["xw"], name="base"),
        helper.make_node("MatMul", ["X", "A"], ["xa"]),
        helper.make_node("MatMul", ["xa", "B"], ["xab"]),
        helper.make_node("Add", ["xw", "xab"], ["sum"]),
        act,
        helper.make_node("If", ["cond"], ["gain"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0)),
        helper.make_node("Mul", ["act", "gain"], ["Y"]),
    ]
    output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", w_shape[1]])
    graph = helper.make_graph(nodes, "g", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_fingerprint_stable_across_save_load_and_lazy_external_data(tmp_path):
    model = ir.from_proto(_proto())
    before = graph_fingerprint(model)
    assert before.startswith("sha256:") and len(before) == len("sha256:") + 64
    path = tmp_path / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=0)
    assert (tmp_path / "model.onnx.data").is_file()
    loaded = ir.load(path)
    assert isinstance(loaded.graph.initializers["W"].const_value, ir.ExternalTensor)
    assert graph_fingerprint(loaded) == before
    # weight bytes are never read: the fingerprint works with the data file gone
    (tmp_path / "model.onnx.data").unlink()
    assert graph_fingerprint(ir.load(path)) == before
    # and through a plain onnx round trip with different weight values
    proto = _proto()
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((8, 6), np.float32), "W"))
    assert graph_fingerprint(ir.from_proto(proto)) == before


def test_fingerprint_ignores_names_of_intermediates_and_nodes():
    proto = _proto()
    for node in proto.graph.node:
        node.name = node.name + "_renamed"
    renamed = {"xw": "t0", "xa": "t1"}
    for node in proto.graph.node:
        node.input[:] = [renamed.get(n, n) for n in node.input]
        node.output[:] = [renamed.get(n, n) for n in node.output]
    assert graph_fingerprint(ir.from_proto(proto)) == graph_fingerprint(ir.from_proto(_proto()))


@pytest.mark.parametrize(
    "changed",
    [
        dict(w_shape=(8, 7)),
        dict(op="Sigmoid"),
        dict(rank_dim="lora_r_q_proj"),
        dict(op="LeakyRelu", extra_attr={"alpha": 0.1}),
    ],
    ids=["initializer shape", "op type", "input dim name", "attribute"],
)
def test_fingerprint_sees_structure(changed):
    assert graph_fingerprint(ir.from_proto(_proto(**changed))) != graph_fingerprint(ir.from_proto(_proto()))


def test_fingerprint_sees_edges_and_subgraphs():
    base = graph_fingerprint(ir.from_proto(_proto()))
    swapped = _proto()
    swapped.graph.node[3].input[:] = ["xab", "xw"]  # Add(xab, xw): different edges
    assert graph_fingerprint(ir.from_proto(swapped)) != base
    sub = _proto()
    then_branch = sub.graph.node[5].attribute[0].g
    then_branch.node[0].op_type = "ConstantOfShape"
    assert graph_fingerprint(ir.from_proto(sub)) != base


def test_schema_choices_are_the_code_s():
    """The schema's enums repeat MODES and the adapter formats: they must not drift apart."""
    from graph_tools.adapters.files import ADAPTER_FORMATS
    from graph_tools.adapters.manifest import MODES, _validator

    schema = _validator().schema
    assert schema["properties"]["mode"]["enum"] == list(MODES)
    assert schema["$defs"]["adapter"]["properties"]["format"]["enum"] == list(ADAPTER_FORMATS)
    assert schema["properties"]["format_version"]["const"] == FORMAT_VERSION
    assert set(schema["required"]) == {f.name for f in dataclasses.fields(Manifest)}
    assert set(schema["$defs"]["slot"]["required"]) == {f.name for f in dataclasses.fields(SlotSpec)}
    assert set(schema["$defs"]["adapter"]["required"]) == {f.name for f in dataclasses.fields(AdapterSpec)}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["slots"][0].update(name=""), r"slots\[0\].name: expected a non-empty string, got ''"),
        (lambda d: d["slots"][0].update(shape=["", 8]), r"slots\[0\].shape\[0\]: expected a size >= 0 or a dim name, got ''"),
        (lambda d: d["slots"][2].update(shape="r"), r"slots\[2\].shape: expected a list, got 'r'"),
        (lambda d: d["adapters"][0].update(scale=[2.0]), r"adapters\[0\].scale: expected an object, got list"),
        (lambda d: d["adapters"][1]["alpha"].update(q_proj=None), r"adapters\[1\].alpha\['q_proj'\]: expected a finite number"),
        (lambda d: d["adapters"][0].update(alpha="8"), r"adapters\[0\].alpha: expected a finite number, got '8'"),
        (lambda d: d["adapters"][0].pop("source"), r"adapters\[0\]: missing field 'source'"),
        (lambda d: d["slots"][0].update(extra=1), r"slots\[0\]: unknown field 'extra'"),
        (lambda d: d.update(extra=[]), "extra: expected an object, got list"),
    ],
)
def test_schema_errors_name_the_field(tmp_path, change, message):
    path = _write_raw(tmp_path, _broken(change))
    with pytest.raises(PackageError, match=message) as info:
        read_manifest(path)
    assert "\n" not in str(info.value)
