"""graph_tools.find_lora_sites: every source of graphs, hand-built variants, and look-alikes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import graph_builder as gb
import models
from graph_tools import find_lora_sites

ZOO = list(models.ZOO)
LABELED = ("ours", "dynamo", "torchscript", "inputs")


def _props(site) -> dict:
    scale = site.scale if isinstance(site.scale, str) else pytest.approx(site.scale, rel=1e-5)
    return dict(kind=site.kind, rank=site.rank, in_features=site.in_features, out_features=site.out_features, scale=scale)


def _ort(model_or_path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    if isinstance(model_or_path, ir.Model):
        model_or_path = ir.serde.serialize_model(model_or_path).SerializeToString()
    session = ort.InferenceSession(model_or_path if isinstance(model_or_path, bytes) else str(model_or_path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


# -- zoo models, every exporter ------------------------------------------------------------------
@pytest.mark.parametrize("source", LABELED)
@pytest.mark.parametrize("name", ZOO)
def test_sites_and_labels(name, source, zoo, graphs):
    """Every site found, labeled with PEFT's module path and adapter, with PEFT's rank/features/scale."""
    model, _ = zoo[name]
    path = graphs(source, name)
    expected = models.expected_sites(model)
    sites = find_lora_sites(path)
    assert len(sites) == len(expected)
    found = {s.key: s for s in sites}
    assert set(found) == set(expected)
    for key, site in found.items():
        want = expected[key]
        got = _props(site)
        if source == "inputs":  # A/B/scale are graph inputs: rank symbolic, scale is the input's name
            inputs = {v.name for v in ir.load(path).graph.inputs}
            assert isinstance(site.rank, str) and site.rank.startswith("lora_r")
            assert site.scale == site.scale_value and site.scale in inputs
            assert {site.lora_a, site.lora_b} <= inputs
            got.update(rank=want["rank"], scale=want["scale"])
        assert got == want, key
        assert site.labeled_by in ("names", "metadata")


@pytest.mark.parametrize("source", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ZOO)
def test_plain_exports_are_faithful(name, source, zoo, graphs):
    """The plain torch.onnx graphs under test compute what PEFT computes (all adapters active)."""
    model, _ = zoo[name]
    inputs = models.example_inputs(name, batch=3, seq=7)
    want = next(iter(models.reference_output(model, inputs).values()))
    got = _ort(graphs(source, name), {k: v.numpy() for k, v in inputs.items()})
    assert float(np.abs(got - want).max()) <= 1e-4


def test_dynamo_optimizer_renames_and_folds(graphs):
    """The case names cannot solve: dynamo's optimizer folds LoRA transposes into ``val_N``."""
    sites = find_lora_sites(graphs("dynamo", "bert"))
    emb = next(s for s in sites if s.kind == "embedding")
    assert (emb.module, emb.adapter) == ("embeddings.word_embeddings", "default")
    assert "lora" not in emb.lora_a and "lora" not in emb.lora_b


@pytest.mark.parametrize("name", ZOO)
def test_inputs_graph_runs_with_fed_weights(name, zoo, graphs):
    model, _ = zoo[name]
    weights = {v.name: v.const_value.numpy() for v in ir.load(graphs("ours", name)).graph.initializers.values()}
    inputs = models.example_inputs(name, batch=3, seq=7)
    feeds = {k: v.numpy() for k, v in inputs.items()} | weights
    want = next(iter(models.reference_output(model, inputs).values()))
    assert float(np.abs(_ort(graphs("inputs", name), feeds) - want).max()) <= 1e-4


@pytest.mark.parametrize("name", ZOO)
def test_stripped_graph_still_yields_every_site(name, zoo, graphs):
    model, _ = zoo[name]
    path = graphs("stripped", name)
    graph = ir.load(path).graph
    assert not any(n.name or n.metadata_props for n in graph)
    assert not any("lora" in v for v in graph.initializers)
    expected = models.expected_sites(model)
    sites = find_lora_sites(path)
    assert all(s.labeled_by == "structure" for s in sites)
    key = lambda p: (p["kind"], p["rank"], p["in_features"], p["out_features"], round(p["scale"], 5))  # noqa: E731
    assert Counter(key(dict(_props(s), scale=s.scale)) for s in sites) == Counter(key(p) for p in expected.values())
    # one structural module label per adapted layer, adapters numbered along each layer's chain
    modules = Counter(s.module for s in sites)
    assert len(modules) == len({m for m, _ in expected})
    assert all(m.startswith("site_") for m in modules)
    for module, count in modules.items():
        assert [s.adapter for s in sites if s.module == module] == [f"adapter_{k}" for k in range(count)]
    inputs = models.example_inputs(name, batch=3, seq=7)
    want = next(iter(models.reference_output(model, inputs).values()))
    assert float(np.abs(_ort(path, {k: v.numpy() for k, v in inputs.items()}) - want).max()) <= 1e-4


@pytest.mark.parametrize("name", ZOO)
def test_ours_points_at_peft_tensors(name, graphs):
    graph = ir.load(graphs("ours", name)).graph
    nodes = {n.name for n in graph}
    for site in find_lora_sites(graphs("ours", name)):
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


@pytest.fixture(scope="module")
def plain_llama_exports(tmp_path_factory):
    model, inputs = models.plain_llama()
    folder = tmp_path_factory.mktemp("plain")
    paths = {}
    for source in ("dynamo", "torchscript"):
        paths[source] = models.export_source(source, "plain_llama", folder / f"{source}.onnx", model, inputs)
    return paths


@pytest.mark.parametrize("source", ["dynamo", "torchscript"])
def test_plain_model_has_no_sites(source, plain_llama_exports):
    graph = ir.load(plain_llama_exports[source]).graph
    assert sum(n.op_type == "MatMul" for n in graph) >= 7  # q/k/v/o/gate/up/down: plenty of candidates
    assert find_lora_sites(plain_llama_exports[source]) == []
