"""merge_adapter (one adapter folded into the base weights) and strip_adapters (the base model),
checked against PEFT, from every kind of package and from the exported LoRA graph."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

import models
import package_helpers as H
from graph_tools.lora import find_lora_sites
from graph_tools.adapters.merge import merge_adapter
from graph_tools.adapters.strip import strip_adapters


@pytest.fixture(scope="module", params=H.MODELS)
def case(request, zoo, tmp_path_factory):
    return H.get_case(request.param, zoo, tmp_path_factory)


def _run_plain(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in session.get_inputs()) == sorted(feeds), "LoRA inputs left in the graph"
    return [o.name for o in session.get_outputs()], session.run(None, feeds)


def _plain_graph(path):
    """A plain ONNX model: valid, no LoRA site, no slot, no adapter weight."""
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    names = [t.name for t in proto.graph.initializer] + [i.name for i in proto.graph.input]
    assert not [n for n in names if ".lora_" in n or n.startswith("lora_pack.")], names
    assert not find_lora_sites(path)


#: every mode on llama and the CNN, inputs and external on GPT-2 and BERT
MERGE_CASES = [(n, m) for n in ("llama", "cnn") for m in H.MODES] + [(n, m) for n in ("gpt2", "bert") for m in ("inputs", "external")]


@pytest.mark.parametrize("name,mode", MERGE_CASES)
def test_merge_matches_peft(name, mode, zoo, tmp_path_factory, tmp_path):
    case = H.get_case(name, zoo, tmp_path_factory)
    package = H.get_package(case, mode)
    for adapter in ("default", "second"):
        out = merge_adapter(package, adapter, tmp_path / adapter / "model.onnx")
        assert out == (tmp_path / adapter / "model.onnx").resolve()
        _plain_graph(out)
        names, got = _run_plain(out, case.feeds)
        err = H.max_error(names, got, case.ref(adapter))
        print(f"ERR merge {case.name} {mode} {adapter} {err:.2e}")
        assert err <= H.TOL


@pytest.mark.parametrize("source", ["export", "inputs", "pack", "external", "folder"])
def test_strip_matches_base(case, source, tmp_path):
    if source == "export":
        path = case.export
    elif source == "folder":
        path = H.get_package(case, "max_rank")  # the package folder itself
    else:
        path = H.get_package(case, source) / "model.onnx"
    out = strip_adapters(path, tmp_path / "base.onnx")
    _plain_graph(out)
    names, got = _run_plain(out, case.feeds)
    assert H.max_error(names, got, case.ref("base")) <= H.TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.onnx", "base.onnx.data"]


@pytest.mark.parametrize("source,name", [("torchscript", "bert"), ("dynamo", "gpt2")])
def test_other_exporters_graphs(zoo, source, name, tmp_path):
    """Packages of plain torch.onnx exports (torchscript: biases shared through Identity nodes;
    dynamo: its own optimizer; the committed fixtures) serve, merge and strip like ours."""
    from graph_tools.adapters.extract import extract_adapters
    from graph_tools.runtime.session import AdapterSession

    model, _ = zoo[name]
    torch_feeds = models.example_inputs(name, 3, 7)
    feeds = {k: v.numpy() for k, v in torch_feeds.items()}
    graph = Path(__file__).resolve().parent.parent / "fixtures" / f"{source}_{name}.onnx"
    package = extract_adapters(graph, tmp_path / "pkg").path
    session = AdapterSession(package)
    (out_name,) = [o.name for o in session.get_outputs()]
    first = lambda ref: {out_name: next(iter(ref.values()))}  # noqa: E731  (plain exports: one output)
    for choice in (None, "default"):
        got = session.run(None, feeds, adapter=choice)
        assert H.max_error([out_name], got, first(H.peft_outputs(model, torch_feeds, choice))) <= H.TOL
    merged = merge_adapter(package, "default", tmp_path / "merged.onnx")
    stripped = strip_adapters(graph, tmp_path / "base.onnx")
    for path, choice in ((merged, "default"), (stripped, None)):
        _plain_graph(path)
        names, got = _run_plain(path, feeds)
        assert H.max_error(names, got, first(H.peft_outputs(model, torch_feeds, choice))) <= H.TOL
