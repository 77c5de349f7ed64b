"""graph_tools.find_lora_sites: every source of graphs, hand-built variants, and look-alikes.

Exported graphs are the committed fixtures (fixtures/make_fixtures.py exports them; torch export is
tested in test_export*.py): detection is compared with what PEFT says (the zoo models are built,
not exported, for that: torch) and ORT on them with PEFT's outputs. Graph-only checks and the
hand-built graphs run without torch."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import graph_builder as gb
from graph_tools import find_lora_sites

from graph_builder import FIXTURES
ZOO = sorted(p.name.removeprefix("ours_").removesuffix(".onnx") for p in FIXTURES.glob("ours_*.onnx"))
EXPORTERS = ("dynamo", "torchscript")
LABELED = ("ours", *EXPORTERS, "inputs")


def _graph(source: str, name: str) -> ir.Model:
    """Zoo model ``name`` from ``source``: a committed fixture, or (``inputs``/``stripped`` where
    none is committed) the graph edit of the committed ``ours`` fixture that makes one."""
    path = FIXTURES / f"{source}_{name}.onnx"
    if path.is_file():
        return ir.load(path)
    assert source in ("inputs", "stripped"), f"no fixture {path.name}: add it to fixtures/make_fixtures.py"
    model = ir.load(FIXTURES / f"ours_{name}.onnx")
    return gb.lora_to_inputs(model, find_lora_sites(model)) if source == "inputs" else gb.strip_names(model)


def _props(site) -> dict:
    scale = site.scale if isinstance(site.scale, str) else pytest.approx(site.scale, rel=1e-5)
    return dict(kind=site.kind, rank=site.rank, in_features=site.in_features, out_features=site.out_features, scale=scale)


def _ort(model_or_path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    if isinstance(model_or_path, ir.Model):
        model_or_path = ir.serde.serialize_model(model_or_path).SerializeToString()
    session = ort.InferenceSession(model_or_path if isinstance(model_or_path, bytes) else str(model_or_path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def _peft_output(zoo, name: str):
    """(feeds, PEFT's output with every adapter active) for zoo model ``name``."""
    import models

    model, _ = zoo[name]
    inputs = models.example_inputs(name, batch=3, seq=7)
    want = next(iter(models.reference_output(model, inputs).values()))
    return {k: v.numpy() for k, v in inputs.items()}, want


def test_every_zoo_model_has_fixtures():
    assert len(ZOO) >= 7
    for name in ZOO:
        for source in EXPORTERS:
            assert (FIXTURES / f"{source}_{name}.onnx").is_file(), f"{source}_{name}"


# -- zoo models, every exporter ------------------------------------------------------------------
@pytest.mark.parametrize("source", LABELED)
@pytest.mark.parametrize("name", ZOO)
def test_sites_and_labels(name, source, zoo):
    """Every site found, labeled with PEFT's module path and adapter, with PEFT's rank/features/scale."""
    import models

    model, _ = zoo[name]
    graph = _graph(source, name)
    expected = models.expected_sites(model)
    sites = find_lora_sites(graph)
    assert len(sites) == len(expected)
    found = {s.key: s for s in sites}
    assert set(found) == set(expected)
    inputs = {v.name for v in graph.graph.inputs}
    for key, site in found.items():
        want = expected[key]
        got = _props(site)
        if source == "inputs":  # A/B/scale are graph inputs: rank symbolic, scale is the input's name
            assert isinstance(site.rank, str) and site.rank.startswith("lora_r")
            assert site.scale == site.scale_value and site.scale in inputs
            assert {site.lora_a, site.lora_b} <= inputs
            got.update(rank=want["rank"], scale=want["scale"])
        assert got == want, key
        assert site.labeled_by in ("names", "metadata")


@pytest.mark.parametrize("source", ["ours", *EXPORTERS])
@pytest.mark.parametrize("name", ZOO)
def test_exported_graphs_are_faithful(name, source, zoo):
    """The graphs under test compute what PEFT computes (all adapters active)."""
    feeds, want = _peft_output(zoo, name)
    assert float(np.abs(_ort(FIXTURES / f"{source}_{name}.onnx", feeds) - want).max()) <= 1e-4


def test_dynamo_optimizer_renames_and_folds():
    """The case names cannot solve: dynamo's optimizer folds LoRA transposes into ``val_N``."""
    sites = find_lora_sites(FIXTURES / "dynamo_bert.onnx")
    emb = next(s for s in sites if s.kind == "embedding")
    assert (emb.module, emb.adapter) == ("embeddings.word_embeddings", "default")
    assert "lora" not in emb.lora_a and "lora" not in emb.lora_b


@pytest.mark.parametrize("name", ZOO)
def test_inputs_graph_runs_with_fed_weights(name, zoo):
    feeds, want = _peft_output(zoo, name)
    weights = {v.name: v.const_value.numpy() for v in ir.load(FIXTURES / f"ours_{name}.onnx").graph.initializers.values()}
    assert float(np.abs(_ort(_graph("inputs", name), feeds | weights) - want).max()) <= 1e-4


@pytest.mark.parametrize("name", ZOO)
def test_stripped_graph_still_yields_every_site(name, zoo):
    import models

    model, _ = zoo[name]
    stripped = _graph("stripped", name)
    graph = stripped.graph
    assert not any(n.name or n.metadata_props for n in graph)
    assert not any("lora" in v for v in graph.initializers)
    expected = models.expected_sites(model)
    sites = find_lora_sites(stripped)
    assert all(s.labeled_by == "structure" for s in sites)
    key = lambda p: (p["kind"], p["rank"], p["in_features"], p["out_features"], round(p["scale"], 5))  # noqa: E731
    assert Counter(key(dict(_props(s), scale=s.scale)) for s in sites) == Counter(key(p) for p in expected.values())
    # one structural module label per adapted layer, adapters numbered along each layer's chain
    modules = Counter(s.module for s in sites)
    assert len(modules) == len({m for m, _ in expected})
    assert all(m.startswith("site_") for m in modules)
    for module, count in modules.items():
        assert [s.adapter for s in sites if s.module == module] == [f"adapter_{k}" for k in range(count)]
    feeds, want = _peft_output(zoo, name)
    assert float(np.abs(_ort(stripped, feeds) - want).max()) <= 1e-4


@pytest.mark.parametrize("name", ZOO)
def test_ours_points_at_peft_tensors(name):
    graph = ir.load(FIXTURES / f"ours_{name}.onnx").graph
    nodes = {n.name for n in graph}
    sites = find_lora_sites(FIXTURES / f"ours_{name}.onnx")
    assert sites
    for site in sites:
        a_role = "lora_embedding_A" if site.kind == "embedding" else "lora_A"
        b_role = "lora_embedding_B" if site.kind == "embedding" else "lora_B"
        suffix = "" if site.kind == "embedding" else ".weight"
        assert site.lora_a == f"base_model.model.{site.module}.{a_role}.{site.adapter}{suffix}"
        assert site.lora_b == f"base_model.model.{site.module}.{b_role}.{site.adapter}{suffix}"
        assert site.base_weight in graph.initializers
        assert {site.base_node, site.a_node, site.b_node, site.add_node} <= nodes


# -- hand-built variants -------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(gb.VARIANTS))
def test_variant(variant):
    v = gb.lora_variant(variant)
    got_y = _ort(v.model, v.feeds)
    np.testing.assert_allclose(got_y, v.reference(v.feeds), atol=1e-5)  # the graph is the LoRA we claim
    sites = find_lora_sites(v.model)
    assert len(sites) == len(v.sites)
    for site, want in zip(sites, v.sites):
        got = _props(site) | dict(adapter=site.adapter, module=site.module)
        want = dict(want)
        if isinstance(want["scale"], float):
            want["scale"] = pytest.approx(want["scale"], rel=1e-6)
        got = {k: got[k] for k in want}
        assert got == want


def test_two_adapters_share_the_base():
    first, second = find_lora_sites(gb.lora_variant("two_adapters").model)
    assert first.base_node == second.base_node and first.add_node != second.add_node


def test_scale_folded_has_no_scale_node():
    (site,) = find_lora_sites(gb.lora_variant("scale_folded").model)
    assert site.scale == 1.0 and site.scale_node is None and site.scale_value is None


def test_pre_transposed_weights_report_their_perm():
    (site,) = find_lora_sites(gb.lora_variant("cast_reshape_transpose").model)
    assert (site.lora_a, site.lora_a_perm, site.lora_b, site.lora_b_perm) == ("A_peft", (1, 0), "B_peft", (1, 0))


# -- no false positives --------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(gb.NEGATIVES))
def test_look_alikes_are_not_sites(variant):
    v = gb.lora_variant(variant)
    np.testing.assert_allclose(_ort(v.model, v.feeds), v.reference(v.feeds), atol=1e-5)
    assert find_lora_sites(v.model) == []


@pytest.mark.parametrize("source", EXPORTERS)
def test_plain_model_has_no_sites(source):
    path = FIXTURES / f"negative_plain_llama_{source}.onnx"
    graph = ir.load(path).graph
    assert sum(n.op_type == "MatMul" for n in graph) >= 7  # q/k/v/o/gate/up/down: plenty of candidates
    assert find_lora_sites(path) == []
