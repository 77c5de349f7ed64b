"""Adapter packages (issue 3): extraction in every mode, served by AdapterSession, against PEFT.

Llama-, GPT-2-, BERT-shaped and CNN models, each with two adapters of different ranks (``second``
on a subset of the targets plus a module of its own; BERT's includes the word embeddings), are
exported once; every mode (inputs, packed, fixed rank, external, safetensors) must reproduce
PEFT with each adapter, with none, with both at once and with a weighted combination.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import models
import package_helpers as H
from graph_builder import FIXTURES
from graph_tools.adapters import files
from graph_tools.adapters import manifest as mf
from graph_tools.adapters.extract import extract_adapters
from graph_tools.adapters.load import EXTERNAL_SLOT_FILE, load_package
from graph_tools.lora import find_lora_sites
from graph_tools.runtime.session import AdapterSession

#: filled by test_matches_peft: (model, mode, choice) -> max abs error (printed with -s)
ERRORS: dict[tuple[str, str, str], float] = {}


@pytest.fixture(scope="module", params=H.MODELS)
def case(request, zoo, tmp_path_factory):
    return H.get_case(request.param, zoo, tmp_path_factory)


@pytest.mark.parametrize("mode", list(H.MODES))
def test_matches_peft(case, mode):
    package = H.get_package(case, mode)
    session = AdapterSession(package)
    assert sorted(session.adapters) == ["default", "second"]
    names = [o.name for o in session.get_outputs()]
    assert sorted(i.name for i in session.get_inputs()) == sorted(case.feeds)
    for label, choice in H.CHOICES.items():
        err = H.max_error(names, session.run(None, case.feeds, adapter=choice), case.ref(label))
        ERRORS[(case.name, mode, label)] = err
        print(f"ERR {case.name:6s} {mode:12s} {label:9s} {err:.2e}")
        assert err <= H.TOL, f"{case.name}/{mode}/{label}: max abs error {err:.3g}"
    # the adapters really differ from each other and from the base (the test would be blind otherwise)
    outs = {label: session.run(None, case.feeds, adapter=choice)[0] for label, choice in H.CHOICES.items()}
    for a in outs:
        for b in outs:
            if a < b:
                assert np.abs(outs[a] - outs[b]).max() > 1e-3, (a, b)


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in model.graph.input]


def _check_model_full(package, mode, tmp_path):
    path = package / "model.onnx"
    if mode == "external":
        # the slot data file is not part of the package by design (values come from an adapter
        # file at session creation); check the graph with a stand-in of the right size
        stand_in = H.copy_package(package, tmp_path / "checked")
        proto = onnx.load(str(path), load_external_data=False)
        end = 0
        for init in proto.graph.initializer:
            info = {e.key: e.value for e in init.external_data}
            if info.get("location") == EXTERNAL_SLOT_FILE:
                end = max(end, int(info.get("offset", 0)) + int(info["length"]))
        assert end > 0
        (stand_in / EXTERNAL_SLOT_FILE).write_bytes(bytes(end))
        path = stand_in / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)


@pytest.mark.parametrize("mode", list(H.MODES))
def test_extracted_graph(case, mode, tmp_path):
    package = H.get_package(case, mode)
    _check_model_full(package, mode, tmp_path)
    man = load_package(package).manifest
    assert man.mode == ("external" if mode == "external" else "inputs")
    assert man.pack == (mode == "pack")
    proto = onnx.load(str(package / "model.onnx"), load_external_data=False)
    inputs = _graph_inputs(proto)
    assert len(inputs) == len(set(inputs)), "an input is listed twice"
    inits = {t.name: t for t in proto.graph.initializer}
    packs = (man.extra or {}).get("packs") or []
    slot_names = [s.name for s in man.slots]
    assert len(slot_names) == len(set(slot_names))
    if mode == "external":
        assert not set(slot_names) & set(inputs)
        for name in slot_names:  # initializers pointing to the file that is not shipped
            info = {e.key: e.value for e in inits[name].external_data}
            assert info["location"] == EXTERNAL_SLOT_FILE
        assert not (package / EXTERNAL_SLOT_FILE).exists()
    elif packs:
        for pack in packs:
            assert inputs.count(pack["name"]) == 1
        assert not set(slot_names) & set(inputs)
        assert sorted(m for p in packs for m in p["members"]) == sorted(slot_names)
    else:
        for name in slot_names:
            assert inputs.count(name) == 1, name
    # graph fingerprint of what was saved
    assert mf.graph_fingerprint(ir.load(package / "model.onnx")) == man.graph_fingerprint
    # adapter files hold exactly the slot (or pack) names the graph takes
    wanted = sorted(p["name"] for p in packs) if packs else sorted(slot_names)
    for spec in man.adapters:
        assert sorted(files.read_adapter(package / spec.file)) == wanted
        assert spec.format == ("safetensors" if mode == "safetensors" else "onnx_adapter")


@pytest.mark.parametrize("mode", ["inputs", "safetensors", "max_rank"])
def test_slot_shapes_and_rank_dims(case, mode):
    """Every site's rank axis has its own name (A, B and scale share it); zero-rank defaults sit on
    the rank axis for every slot layout (linear, Conv1D, conv kernels, embeddings)."""
    package = H.get_package(case, mode)
    man = load_package(package).manifest
    proto = onnx.load(str(package / "model.onnx"), load_external_data=False)
    inputs = {i.name: i for i in proto.graph.input}
    inits = {t.name: t for t in proto.graph.initializer}
    rank_axis = {"lora_A": 0, "lora_B": 1, "lora_scale": 0}
    rank_dims: dict[str, set] = {}
    for slot in man.slots:
        dims = inputs[slot.name].type.tensor_type.shape.dim
        graph_shape = [d.dim_param or d.dim_value for d in dims]
        assert graph_shape == slot.shape, slot.name
        axis = rank_axis[slot.role]
        default = list(inits[slot.name].dims)
        if mode == "max_rank":
            assert graph_shape[axis] == 8 and default == graph_shape, slot.name
            continue
        rank_dim = graph_shape[axis]
        assert isinstance(rank_dim, str), slot.name
        rank_dims.setdefault(slot.site, set()).add(rank_dim)
        # the default has rank 0 on the rank axis, every other dim as the slot says
        assert default[axis] == 0, (slot.name, default)
        assert [d for i, d in enumerate(default) if i != axis] == [d for i, d in enumerate(graph_shape) if i != axis]
    if mode != "max_rank":
        assert all(len(v) == 1 for v in rank_dims.values()), rank_dims
        names = [next(iter(v)) for v in rank_dims.values()]
        assert len(names) == len(set(names)), "two sites share a rank dimension name"
    kinds = {s.kind for s in find_lora_sites(case.export)}
    if case.name == "bert":
        assert "embedding" in kinds and any(s.name.endswith("lora_embedding_A") for s in man.slots)
    if case.name == "cnn":
        assert kinds == {"conv"} and any(len(s.shape) == 4 for s in man.slots) and any(len(s.shape) == 3 for s in man.slots)


@pytest.mark.parametrize("mode", list(H.MODES))
def test_no_lora_bytes_in_graph(case, mode):
    """The extracted graph carries no adapter bytes: no initializer of the original LoRA weights,
    and none of their bytes in model.onnx or its data file; the adapter files hold them."""
    package = H.get_package(case, mode)
    export = ir.load(case.export)
    sites = find_lora_sites(export)
    lora_names = {n for s in sites for n in (s.lora_a, s.lora_b)}
    originals = {n: export.graph.initializers[n].const_value.numpy() for n in lora_names}
    proto = onnx.load(str(package / "model.onnx"), load_external_data=False)
    assert not lora_names & {t.name for t in proto.graph.initializer}
    blobs = b"".join(p.read_bytes() for p in package.iterdir() if p.is_file() and p.name.startswith("model.onnx"))
    for name, array in originals.items():
        assert np.abs(array).max() > 0
        assert array.tobytes() not in blobs, f"bytes of {name} found in the package graph"
    # every adapter's lora_A rows (PEFT layout, contiguous even when padded/packed) are in its file
    man = load_package(package).manifest
    for spec in man.adapters:
        blob = (package / spec.file).read_bytes()
        for site in sites:
            if site.adapter == spec.name:
                a = originals[site.lora_a]  # PEFT layout [r, ...], or [num, r] for a folded embedding A
                assert any(np.ascontiguousarray(x).tobytes() in blob for x in (a, a.T)), site.lora_a


def test_manifest_records_adapters(case):
    package = H.get_package(case, "inputs")
    data = json.loads((package / "manifest.json").read_text())
    assert data["format_version"] == mf.FORMAT_VERSION and data["graph_fingerprint"].startswith("sha256:")
    expected = models.expected_sites(case.model)
    for spec in data["adapters"]:
        mine = {m: v for (m, a), v in expected.items() if a == spec["name"]}
        assert spec["file"] == f"adapters/{spec['name']}.onnx_adapter"
        assert spec["rank"] == {m: v["rank"] for m, v in mine.items()}
        assert spec["scale"] == pytest.approx({m: v["scale"] for m, v in mine.items()})
    assert {s["site"] for s in data["slots"]} == {m for m, _ in expected}
    for slot in data["slots"]:
        assert {"name", "shape", "dtype", "site", "role", "layout"} <= set(slot)


def test_rank_pattern_model(zoo, tmp_path):
    """rank_pattern/alpha_pattern: sites of one adapter with different ranks run in one graph."""
    model, _ = zoo["llama_patterns"]
    package = extract_adapters(FIXTURES / "ours_llama_patterns.onnx", tmp_path / "pkg").path
    man = load_package(package).manifest
    ranks = man.adapters[0].rank
    assert len(set(ranks.values())) > 1, ranks
    proto = onnx.load(str(package / "model.onnx"), load_external_data=False)
    rank_dims = {i.type.tensor_type.shape.dim[0].dim_param for i in proto.graph.input if i.name.endswith(".lora_A.weight")}
    assert len(rank_dims) == len(ranks)
    feeds = models.example_inputs("llama_patterns", 2, 6)
    session = AdapterSession(package)
    got = session.run(None, {k: v.numpy() for k, v in feeds.items()}, adapter="default")
    names = [o.name for o in session.get_outputs()]
    assert H.max_error(names, got, H.peft_outputs(model, feeds, "default")) <= H.TOL
    base = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    assert H.max_error(names, base, H.peft_outputs(model, feeds, None)) <= H.TOL
    # fixed rank + pack too: padding per site up to the largest rank
    packed = extract_adapters(FIXTURES / "ours_llama_patterns.onnx", tmp_path / "packed", pack=True).path
    got = AdapterSession(packed).run(None, {k: v.numpy() for k, v in feeds.items()}, adapter="default")
    assert H.max_error(names, got, H.peft_outputs(model, feeds, "default")) <= H.TOL


def test_extract_from_ir_model_and_overwrite(case, tmp_path):
    """extract_adapters takes an ir.Model too, and replaces an existing package folder whole
    (a folder that is not a package is refused: tests/test_hostile.py)."""
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # an earlier package
    (out / "stale.txt").write_text("old")
    package = extract_adapters(ir.load(case.export), out)
    assert not (out / "stale.txt").exists()
    assert sorted(package.adapters) == ["default", "second"]
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]  # no temp folder left beside it


def test_extraction_reads_no_base_weight_values(case, tmp_path, monkeypatch):
    """Base weights stay lazy external tensors: extraction evaluates only LoRA tensors (saving
    streams base bytes tensor by tensor into the package's data file, never as arrays)."""
    source = tmp_path / "src" / "model.onnx"
    source.parent.mkdir()
    ir.save(ir.load(case.export), source, external_data="model.onnx.data")
    lora_names = {n for s in find_lora_sites(source) for n in (s.lora_a, s.lora_b)}
    evaluated: list[str] = []
    real = ir.ExternalTensor.numpy
    monkeypatch.setattr(ir.ExternalTensor, "numpy", lambda self: evaluated.append(self.name) or real(self))
    package = extract_adapters(source, tmp_path / "pkg", mode="external").path
    monkeypatch.undo()
    assert evaluated and set(evaluated) <= lora_names, sorted(set(evaluated) - lora_names)
    session = AdapterSession(package)
    names = [o.name for o in session.get_outputs()]
    assert H.max_error(names, session.run(None, case.feeds, adapter="second"), case.ref("second")) <= H.TOL
