"""exporters.export_peft: numerics vs PEFT, restored names, per-site scales, metadata, refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import models
from exporters import export_peft
from graph_tools import ExportError, NoLoraError, UnsupportedAdapterError, find_lora_sites
from graph_tools.lora import META_ADAPTER, META_MODULE, META_ROLE

ZOO = list(models.ZOO)
TOL = 1e-4


def _run(path, inputs: dict) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    return dict(zip(names, session.run(None, feeds)))


def max_export_error(path, model, name: str) -> float:
    """Max abs error of ORT vs PEFT (all adapters active), on another batch/sequence size."""
    inputs = models.example_inputs(name, batch=3, seq=7)
    got = _run(path, inputs)
    want = models.reference_output(model, inputs)
    assert set(got) <= set(want), f"graph outputs {sorted(got)} not among the model's {sorted(want)}"
    return max(float(np.abs(got[k] - want[k]).max()) for k in got)


@pytest.mark.parametrize("name", ZOO)
def test_ort_matches_peft_with_all_adapters(name, zoo, graphs):
    model, example = zoo[name]
    path = graphs("ours", name)
    inputs = models.example_inputs(name, batch=3, seq=7)
    assert inputs[next(iter(inputs))].shape != example[next(iter(example))].shape
    assert max_export_error(path, model, name) <= TOL


@pytest.mark.parametrize("name", ZOO)
def test_every_adapter_is_an_unmerged_branch(name, zoo, graphs):
    model, _ = zoo[name]
    result = graphs.result(name)
    assert result.adapters == models.adapter_names(model)
    expected = models.expected_sites(model)
    assert {s.key for s in result.sites} == set(expected) == models.EXPECTED[name]
    assert {s.key for s in find_lora_sites(result.path)} == set(expected)


@pytest.mark.parametrize("name", ZOO)
def test_peft_names_restored_on_initializers(name, zoo, graphs):
    model, _ = zoo[name]
    graph = ir.load(graphs("ours", name)).graph
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    lora = [k for k in state if ".lora_" in k]
    assert lora
    for key in lora:
        assert key in graph.initializers, f"{key} is not an initializer name"
        # LoRA weights keep PEFT's layout and values: a PEFT checkpoint maps onto them 1:1
        np.testing.assert_array_equal(graph.initializers[key].const_value.numpy(), state[key])
    base = [k for k in state if k.endswith(".base_layer.weight")]
    assert base and all(k in graph.initializers for k in base)


def test_peft_name_example(graphs):
    graph = ir.load(graphs("ours", "llama")).graph
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in graph.initializers
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight" in graph.initializers


@pytest.mark.parametrize("name", ZOO)
def test_scale_is_a_per_site_per_adapter_initializer(name, zoo, graphs):
    model, _ = zoo[name]
    expected = models.expected_sites(model)
    graph = ir.load(graphs("ours", name)).graph
    sites = graphs.result(name).sites
    names = [s.scale_value for s in sites]
    assert None not in names and len(set(names)) == len(names), f"scales shared across sites: {names}"
    for site in sites:
        assert site.scale_value == f"base_model.model.{site.module}.lora_scale.{site.adapter}"
        value = graph.initializers[site.scale_value].const_value.numpy()
        assert value.size == 1
        assert float(value.reshape(())) == pytest.approx(expected[site.key]["scale"], rel=1e-6)
        assert site.scale == pytest.approx(expected[site.key]["scale"], rel=1e-6)


@pytest.mark.parametrize("name", ZOO)
def test_lora_nodes_carry_metadata(name, graphs):
    graph = ir.load(graphs("ours", name)).graph
    nodes = {n.name: n for n in graph}
    for site in graphs.result(name).sites:
        for role, node_name in (("lora_A", site.a_node), ("lora_B", site.b_node), ("lora_add", site.add_node), ("lora_scale", site.scale_node)):
            assert node_name, (site.key, role)
            meta = nodes[node_name].metadata_props
            assert (meta[META_MODULE], meta[META_ADAPTER], meta[META_ROLE]) == (site.module, site.adapter, role)
        base = nodes[site.base_node].metadata_props
        assert (base[META_MODULE], base[META_ROLE]) == (site.module, "base")


def test_gpt2_conv1d_and_bert_embedding_kinds(graphs):
    gpt2 = {s.module: s for s in graphs.result("gpt2").sites}
    c_attn = gpt2["transformer.h.0.attn.c_attn"]
    assert (c_attn.kind, c_attn.in_features, c_attn.out_features, c_attn.rank) == ("linear", 32, 96, 4)
    bert = {s.module: s for s in graphs.result("bert").sites}
    emb = bert["embeddings.word_embeddings"]
    assert (emb.kind, emb.in_features, emb.out_features, emb.lora_a) == (
        "embedding",
        models.VOCAB,
        models.HIDDEN,
        "base_model.model.embeddings.word_embeddings.lora_embedding_A.default",
    )
    cnn = {s.module: s.kind for s in graphs.result("cnn").sites}
    assert set(cnn.values()) == {"conv"}


def test_two_adapters_have_their_own_ranks(graphs):
    sites = {s.key: s for s in graphs.result("llama_two_adapters").sites}
    q = "model.layers.1.self_attn.q_proj"
    assert (sites[(q, "default")].rank, sites[(q, "second")].rank) == (4, 2)
    assert sites[(q, "default")].base_node == sites[(q, "second")].base_node
    assert sites[(q, "second")].scale == pytest.approx(3.0)


def test_rslora_and_patterns_scales(graphs):
    rs = {s.module: s for s in graphs.result("llama_rslora").sites}
    assert rs["model.layers.0.self_attn.q_proj"].scale == pytest.approx(8 / 4**0.5)
    pat = {s.module: s for s in graphs.result("llama_patterns").sites}
    assert (pat["model.layers.0.self_attn.k_proj"].rank, pat["model.layers.0.self_attn.k_proj"].scale) == (2, pytest.approx(4.0))
    assert (pat["model.layers.0.self_attn.v_proj"].rank, pat["model.layers.0.self_attn.v_proj"].scale) == (4, pytest.approx(0.75))
    assert (pat["model.layers.0.mlp.up_proj"].rank, pat["model.layers.0.mlp.up_proj"].scale) == (8, pytest.approx(0.5))


@pytest.mark.parametrize(
    "builder, error",
    [(models.llama_dora, UnsupportedAdapterError), (models.llama_loha, UnsupportedAdapterError), (models.plain_llama, NoLoraError)],
    ids=["dora", "loha", "no_lora"],
)
def test_refused_models(builder, error, tmp_path):
    model, inputs = builder()
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(error) as info:
        export_peft(model, inputs, out)
    assert "\n" not in str(info.value)
    assert not out.exists() and not (tmp_path / "out").exists()


def test_output_path_must_be_onnx(zoo, tmp_path):
    model, inputs = zoo["cnn"]
    with pytest.raises(ExportError):
        export_peft(model, inputs, tmp_path / "model.bin")


def test_external_data(zoo, tmp_path):
    model, inputs = zoo["cnn"]
    path = tmp_path / "ext" / "model.onnx"
    result = export_peft(model, inputs, path, dynamic_shapes=models.dynamic_axes("cnn", inputs), external_data=True)
    assert result.external_data == "model.onnx.data"
    data = path.parent / "model.onnx.data"
    assert data.is_file()
    proto = onnx.load(path, load_external_data=False)
    external = {t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert "base_model.model.conv1.base_layer.weight" in external
    assert "base_model.model.conv2.lora_A.default.weight" in external
    assert sum(t.ByteSize() for t in proto.graph.initializer) < data.stat().st_size
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]  # no temp leftovers
    assert {s.key for s in find_lora_sites(path)} == models.EXPECTED["cnn"]
    assert max_export_error(path, model, "cnn") <= TOL


def test_stem_conv_with_rank_above_input_channels(tmp_path):
    """A stem conv on RGB with r=4 > C_in=3 (A reads C_in * 3 * 3 = 27 numbers per output): kept
    as a branch and detected, and ORT matches PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(models.SEED)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["conv1"], lora_dropout=0.0, init_lora_weights=False)
    model = models._finish(get_peft_model(models.TinyCNN().eval(), config), models.SEED)
    inputs = {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))}
    result = export_peft(model, inputs, tmp_path / "stem.onnx", dynamic_shapes=models.dynamic_axes("cnn", inputs))
    (site,) = find_lora_sites(result.path)
    assert (site.module, site.kind, site.rank, site.in_features) == ("conv1", "conv", 4, 3)
    assert max_export_error(result.path, model, "cnn") <= TOL
