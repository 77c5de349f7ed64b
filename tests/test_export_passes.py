"""exporters/passes.py on hand-built graphs: the exporter's graph edits as onnx-ir passes (names
restored, base-weight transposes folded and LoRA ones kept, sites annotated or a lost branch
refused, stack traces dropped), each checked with onnxruntime where it changes the graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import graph_builder as gb
from exporters.passes import (
    AnnotateLoraSitesPass,
    DropStackTracesPass,
    FoldWeightTransposesPass,
    RestoreNamesPass,
    export_passes,
)
from graph_tools.errors import ExportError
from graph_tools.lora import META_ADAPTER, META_MODULE, META_ROLE
from graph_tools.passes._base import run_passes

P = "peft_model."
M = "base_model.model.layer"


def _exported():
    """What torch.onnx hands the exporter: wrapper-prefixed names, weights behind Transposes
    (base [out, in]; LoRA in PEFT layout), a stack trace on every node."""
    b = gb.GraphBuilder()
    x = b.input("x", ["batch", gb.IN])
    rng = np.random.default_rng(1)
    w, a, bb = (rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((gb.OUT, gb.IN), (4, gb.IN), (gb.OUT, 4)))
    t = lambda v: b.op("Transpose", v, perm=[1, 0])  # noqa: E731
    base = b.op("MatMul", x, t(b.weight(f"{P}{M}.base_layer.weight", w)))
    h = b.op("MatMul", b.op("MatMul", x, t(b.weight(f"{P}{M}.lora_A.default.weight", a))), t(b.weight(f"{P}{M}.lora_B.default.weight", bb)))
    y = b.op("Add", base, b.op("Mul", h, b.weight(f"{P}{M}.lora_scale.default", np.array(2.0, np.float32))))
    model = b.model(y)
    for node in model.graph:
        node.metadata_props["pkg.torch.onnx.stack_trace"] = "File /home/someone/model.py, line 1"
    feeds = {"x": rng.standard_normal((3, gb.IN)).astype(np.float32)}
    return model, feeds, feeds["x"] @ w.T + 2.0 * (feeds["x"] @ a.T @ bb.T)


def _run(model, feeds):
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_restore_names_drops_the_wrapper_prefix():
    model, _, _ = _exported()
    run_passes(model, RestoreNamesPass(P))
    assert sorted(model.graph.initializers) == sorted([f"{M}.base_layer.weight", f"{M}.lora_A.default.weight",
                                                       f"{M}.lora_B.default.weight", f"{M}.lora_scale.default"])


def test_fold_transposes_folds_base_weights_only():
    model, feeds, want = _exported()
    run_passes(model, RestoreNamesPass(P), FoldWeightTransposesPass())
    transposed = [n.inputs[0].name for n in model.graph if n.op_type == "Transpose"]
    assert sorted(transposed) == [f"{M}.lora_A.default.weight", f"{M}.lora_B.default.weight"]  # PEFT layout kept
    base = model.graph.initializers[f"{M}.base_layer.weight"]
    assert list(base.shape) == [gb.IN, gb.OUT] and base.metadata_props["lora_onnx.transposed"] == "1,0"
    np.testing.assert_allclose(_run(model, feeds), want, atol=1e-5)


def test_export_passes_annotate_and_clean():
    model, feeds, want = _exported()
    passes, annotate = export_passes(P, {("layer", "default")})
    run_passes(model, passes)
    (site,) = annotate.sites
    assert site.key == ("layer", "default")
    assert site.lora_a == f"{M}.lora_A.default.weight"  # the optimizer kept the LoRA weight by name
    roles = {n.metadata_props.get(META_ROLE) for n in model.graph if n.metadata_props.get(META_MODULE) == "layer"}
    assert {"base", "lora_A", "lora_B", "lora_scale", "lora_add"} <= roles
    assert all(n.metadata_props.get(META_ADAPTER) == "default" for n in model.graph
               if n.metadata_props.get(META_ROLE, "base") != "base")
    assert not any("pkg.torch.onnx.stack_trace" in n.metadata_props for n in model.graph)
    np.testing.assert_allclose(_run(model, feeds), want, atol=1e-5)


def test_a_lost_branch_is_an_export_error():
    model, _, _ = _exported()
    with pytest.raises(ExportError, match="module 'other', adapter 'default'"):
        run_passes(model, RestoreNamesPass(P), AnnotateLoraSitesPass({("layer", "default"), ("other", "default")}))


def test_drop_stack_traces_only_those():
    model, _, _ = _exported()
    node = next(iter(model.graph))
    node.metadata_props["keep"] = "1"
    assert DropStackTracesPass()(model).modified
    assert node.metadata_props == {"keep": "1"}
    assert not DropStackTracesPass()(model).modified
