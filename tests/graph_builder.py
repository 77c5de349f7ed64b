"""Hand-built ONNX graphs for tests, with onnx-ir: one builder, the LoRA variants, graph edits.

* :class:`GraphBuilder`: inputs, weights and ops in a few lines; ``model()`` runs shape inference.
* :func:`lora_variant`: one LoRA linear layer ``y = x W + s * (x A) B`` drawn in one of the ways
  exporters and hand-written graphs draw it (``VARIANTS``), or a look-alike that is *not* LoRA
  (``NEGATIVES``); each comes with what detection must report and a numpy reference.
* :func:`lora_to_inputs`, :func:`strip_names`, :func:`drop_debug_metadata`: edits of exported
  graphs (LoRA weights as graph inputs with a symbolic rank; every name removed; stack traces off).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

__all__ = [
    "GraphBuilder",
    "Variant",
    "VARIANTS",
    "NEGATIVES",
    "lora_variant",
    "lora_to_inputs",
    "strip_names",
    "drop_debug_metadata",
]

FLOAT = ir.DataType.FLOAT


class GraphBuilder:
    """Build a small graph: ``b = GraphBuilder(); x = b.input("x", ["batch", 16]); y = b.op("Relu", x)``.

    Weights are initializers (random when given a shape); ``op`` returns the first output.
    """

    def __init__(self, opset: int = 18, seed: int = 0):
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.inputs: list[ir.Value] = []
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self._count = 0

    def input(self, name: str, shape, dtype: ir.DataType = FLOAT) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))
        self.inputs.append(value)
        return value

    def weight(self, name: str, array_or_shape, scale: float = 0.3) -> ir.Value:
        array = array_or_shape
        if not isinstance(array, np.ndarray):
            array = (self.rng.standard_normal(tuple(array_or_shape)) * scale).astype(np.float32)
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.initializers.append(value)
        return value

    def const(self, name: str, value, dtype=np.float32) -> ir.Value:
        return self.weight(name, np.asarray(value, dtype=dtype))

    def op(self, op_type: str, *inputs: ir.Value | None, name: str | None = None, **attributes) -> ir.Value:
        self._count += 1
        node = ir.Node(
            "",
            op_type,
            inputs,
            attributes=ir.convenience.convert_attributes(attributes),
            name=name if name is not None else f"{op_type}_{self._count}",
            num_outputs=1,
        )
        node.outputs[0].name = f"{node.name}_out"
        self.nodes.append(node)
        return node.outputs[0]

    def model(self, *outputs: ir.Value) -> ir.Model:
        graph = ir.Graph(
            self.inputs,
            outputs,
            nodes=self.nodes,
            initializers=self.initializers,
            opset_imports={"": self.opset},
            name="hand_built",
        )
        model = ir.Model(graph, ir_version=10, producer_name="lora-onnx tests")
        return _infer_shapes(model)


def _infer_shapes(model: ir.Model) -> ir.Model:
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass()(model)
    return model


# -- LoRA variants -----------------------------------------------------------------------------
IN, OUT, RANK, SEQ = 16, 12, 4, 5


@dataclasses.dataclass(frozen=True)
class Variant:
    """A hand-built graph, the sites detection must find in it, and its numpy reference."""

    model: ir.Model
    sites: list[dict]  # kind, rank, in_features, out_features, scale (+ module/adapter if named)
    reference: Callable[[dict[str, np.ndarray]], np.ndarray]
    feeds: dict[str, np.ndarray]


def lora_variant(name: str) -> Variant:
    """Build variant ``name`` of ``VARIANTS`` or ``NEGATIVES``."""
    return (VARIANTS | NEGATIVES)[name]()


def _site(scale: float | str, rank=RANK, adapter: str = "adapter_0", **labels) -> dict:
    """A site as detection must report it; ``adapter_<k>``: the graph names no adapter."""
    return dict(kind="linear", rank=rank, in_features=IN, out_features=OUT, scale=scale, adapter=adapter, **labels)


def _x(b: GraphBuilder, two_d: bool = False) -> tuple[ir.Value, dict[str, np.ndarray]]:
    shape = ["batch", IN] if two_d else ["batch", SEQ, IN]
    x = b.input("x", shape)
    feeds = {"x": np.random.default_rng(7).standard_normal((3, IN) if two_d else (3, SEQ, IN)).astype(np.float32)}
    return x, feeds


def _arrays(b: GraphBuilder, rank: int = RANK):
    w = (b.rng.standard_normal((IN, OUT)) * 0.3).astype(np.float32)
    a = (b.rng.standard_normal((IN, rank)) * 0.3).astype(np.float32)
    bb = (b.rng.standard_normal((rank, OUT)) * 0.3).astype(np.float32)
    return w, a, bb


def _variant(scale_at: str = "after_b", *, peft_names: bool = False, commute: bool = False, dropout: bool = False, bias: bool = False):
    """MatMul base + MatMul A/B branch; ``scale_at``: after_b | between | folded | div."""

    def build() -> Variant:
        b = GraphBuilder()
        x, feeds = _x(b)
        w, a, bb = _arrays(b)
        s = 1.5
        prefix = "base_model.model.layer" if peft_names else "layer"
        b_arr = bb * s if scale_at == "folded" else bb
        W = b.weight(f"{prefix}.base_layer.weight" if peft_names else "W", w)
        A = b.weight(f"{prefix}.lora_A.default.weight" if peft_names else "A", a)
        B = b.weight(f"{prefix}.lora_B.default.weight" if peft_names else "B", b_arr)
        base = b.op("MatMul", x, W)
        base_name = base.producer().name
        bias_arr = np.linspace(-1, 1, OUT, dtype=np.float32)
        if bias:
            base = b.op("Add", base, b.const("bias", bias_arr))
        xa = b.op("Dropout", x) if dropout else x
        h = b.op("MatMul", xa, A)
        if scale_at == "between":
            h = b.op("Mul", h, b.const("s", s))
        h = b.op("MatMul", h, B)
        if scale_at == "after_b":
            h = b.op("Mul", *((b.const("s", s), h) if commute else (h, b.const("s", s))))
        elif scale_at == "div":
            h = b.op("Div", h, b.const("d", 1.0 / s))
        y = b.op("Add", *((h, base) if commute else (base, h)))
        labels = dict(module="layer", adapter="default") if peft_names else dict(module=base_name)

        def ref(f):
            out = f["x"] @ w + s * (f["x"] @ a @ bb)
            return out + bias_arr if bias else out

        return Variant(b.model(y), [_site(1.0 if scale_at == "folded" else s, **labels)], ref, feeds)

    return build


def _cast_reshape_transpose() -> Variant:
    """Branch on a 2-D view: Reshape(x) -> Cast -> MatMul(Transpose(A_peft)) -> ... -> Reshape back."""
    b = GraphBuilder()
    x, feeds = _x(b)
    w, a, bb = _arrays(b)
    s = 0.5
    W = b.weight("W", w)
    A = b.weight("A_peft", np.ascontiguousarray(a.T))  # PEFT layout [r, in]
    B = b.weight("B_peft", np.ascontiguousarray(bb.T))  # PEFT layout [out, r]
    base = b.op("MatMul", x, W)
    x2 = b.op("Reshape", x, b.const("flat", [-1, IN], np.int64))
    x2 = b.op("Cast", x2, to=FLOAT)
    h = b.op("MatMul", x2, b.op("Transpose", A, perm=[1, 0]))
    h = b.op("MatMul", h, b.op("Transpose", B, perm=[1, 0]))
    h = b.op("Mul", h, b.const("s", s))
    h = b.op("Reshape", h, b.op("Shape", base))
    y = b.op("Add", base, b.op("Cast", h, to=FLOAT))
    return Variant(b.model(y), [_site(s, module=base.producer().name)], lambda f: f["x"] @ w + s * (f["x"] @ a @ bb), feeds)


def _gemm_transb() -> Variant:
    """Gemm everywhere with weights stored [out, in] (transB=1), base bias in the Gemm."""
    b = GraphBuilder()
    x, feeds = _x(b, two_d=True)
    w, a, bb = _arrays(b)
    bias = np.linspace(-1, 1, OUT, dtype=np.float32)
    s = 2.0
    base = b.op("Gemm", x, b.weight("W", np.ascontiguousarray(w.T)), b.const("bias", bias), transB=1)
    h = b.op("Gemm", x, b.weight("A", np.ascontiguousarray(a.T)), transB=1)
    h = b.op("Gemm", h, b.weight("B", np.ascontiguousarray(bb.T)), transB=1, alpha=1.0)
    y = b.op("Add", base, b.op("Mul", h, b.const("s", s)))
    site = _site(s, module=base.producer().name)
    return Variant(b.model(y), [site], lambda f: f["x"] @ w + bias + s * (f["x"] @ a @ bb), feeds)


def _two_adapters() -> Variant:
    """Two adapters of different rank chained on one layer: ((x W + b) + s1 B1 A1 x) + s2 B2 A2 x."""
    b = GraphBuilder()
    x, feeds = _x(b)
    w, a1, b1 = _arrays(b)
    _, a2, b2 = _arrays(b, rank=2)
    bias = np.linspace(-1, 1, OUT, dtype=np.float32)
    y = b.op("Add", b.op("MatMul", x, b.weight("W", w)), b.const("bias", bias))
    for k, (a, bb, s) in enumerate(((a1, b1, 2.0), (a2, b2, 0.25))):
        h = b.op("MatMul", b.op("MatMul", x, b.weight(f"A{k}", a)), b.weight(f"B{k}", bb))
        y = b.op("Add", y, b.op("Mul", h, b.const(f"s{k}", s)))

    def ref(f):
        x_ = f["x"]
        return x_ @ w + bias + 2.0 * (x_ @ a1 @ b1) + 0.25 * (x_ @ a2 @ b2)

    sites = [_site(2.0, module="MatMul_1"), _site(0.25, rank=2, adapter="adapter_1", module="MatMul_1")]
    return Variant(b.model(y), sites, ref, feeds)


def _inputs() -> Variant:
    """A, B (PEFT layout) and the scale are graph inputs; the rank is a symbolic dim."""
    b = GraphBuilder()
    x, feeds = _x(b)
    w, a, bb = _arrays(b)
    A = b.input("layer.lora_A.weight", ["lora_r", IN])
    B = b.input("layer.lora_B.weight", [OUT, "lora_r"])
    S = b.input("layer.lora_scale", [])
    base = b.op("MatMul", x, b.weight("layer.base_layer.weight", w))
    h = b.op("MatMul", x, b.op("Transpose", A, perm=[1, 0]))
    h = b.op("MatMul", h, b.op("Transpose", B, perm=[1, 0]))
    y = b.op("Add", base, b.op("Mul", h, S))
    feeds |= {"layer.lora_A.weight": np.ascontiguousarray(a.T), "layer.lora_B.weight": np.ascontiguousarray(bb.T)}
    feeds["layer.lora_scale"] = np.array(0.75, np.float32)
    site = _site("layer.lora_scale", rank="lora_r", module="layer")
    return Variant(b.model(y), [site], lambda f: f["x"] @ w + 0.75 * (f["x"] @ a @ bb), feeds)


# -- look-alikes that are not LoRA -------------------------------------------------------------
def _lowrank() -> Variant:
    """A factorized layer x U V (+ bias): low rank, but no Add to a base path."""
    b = GraphBuilder()
    x, feeds = _x(b)
    _, u, v = _arrays(b)
    bias = np.linspace(-1, 1, OUT, dtype=np.float32)
    y = b.op("Add", b.op("MatMul", b.op("MatMul", x, b.weight("U", u)), b.weight("V", v)), b.const("bias", bias))
    return Variant(b.model(y), [], lambda f: f["x"] @ u @ v + bias, feeds)


def _residual_mlp() -> Variant:
    """h = x W0; y = h + (h W1) W2 with a rank-4 bottleneck: the branch does not read the base input."""
    b = GraphBuilder()
    x, feeds = _x(b)
    w0 = (b.rng.standard_normal((IN, OUT)) * 0.3).astype(np.float32)
    w1 = (b.rng.standard_normal((OUT, RANK)) * 0.3).astype(np.float32)
    w2 = (b.rng.standard_normal((RANK, OUT)) * 0.3).astype(np.float32)
    h = b.op("MatMul", x, b.weight("W0", w0))
    y = b.op("Add", h, b.op("MatMul", b.op("MatMul", h, b.weight("W1", w1)), b.weight("W2", w2)))

    def ref(f):
        h_ = f["x"] @ w0
        return h_ + h_ @ w1 @ w2

    return Variant(b.model(y), [], ref, feeds)


def _residual_relu() -> Variant:
    """y = x + W2 relu(W1 x): a classic residual MLP block on the graph input."""
    b = GraphBuilder()
    x, feeds = _x(b)
    w1 = (b.rng.standard_normal((IN, RANK)) * 0.3).astype(np.float32)
    w2 = (b.rng.standard_normal((RANK, IN)) * 0.3).astype(np.float32)
    h = b.op("Relu", b.op("MatMul", x, b.weight("W1", w1)))
    y = b.op("Add", x, b.op("MatMul", h, b.weight("W2", w2)))
    return Variant(b.model(y), [], lambda f: f["x"] + np.maximum(f["x"] @ w1, 0) @ w2, feeds)


VARIANTS: dict[str, Callable[[], Variant]] = {
    "mul_after_b": _variant("after_b", peft_names=True),
    "scale_folded": _variant("folded"),
    "mul_between": _variant("between"),
    "div_const": _variant("div"),
    "commuted": _variant("after_b", commute=True),
    "dropout_kept": _variant("after_b", dropout=True),
    "bias_add": _variant("after_b", bias=True),
    "cast_reshape_transpose": _cast_reshape_transpose,
    "gemm_transb": _gemm_transb,
    "two_adapters": _two_adapters,
    "inputs": _inputs,
}

NEGATIVES: dict[str, Callable[[], Variant]] = {
    "lowrank": _lowrank,
    "residual_mlp": _residual_mlp,
    "residual_relu": _residual_relu,
}


# -- edits of exported graphs ------------------------------------------------------------------
def lora_to_inputs(model: ir.Model, sites) -> ir.Model:
    """Turn every site's A, B and scale initializers into graph inputs; rank dims become symbolic.

    Site ``k`` gets the rank dim ``lora_r<k>``; shapes inferred inside the graph are cleared
    (they held the old static rank). Returns the same model, edited.
    """
    graph = model.graph
    done: set[str] = set()
    for k, site in enumerate(sites):
        rank = site.rank
        for name in (site.lora_a, site.lora_b, site.scale_value):
            if not name or name in done or name not in graph.initializers:
                continue
            value = graph.initializers.pop(name)
            dims = [f"lora_r{k}" if d == rank else d for d in value.shape] if name != site.scale_value else list(value.shape)
            value.const_value = None
            value.shape = ir.Shape(dims)
            graph.inputs.append(value)
            done.add(name)
    outputs = set(graph.outputs)
    for node in graph:
        for out in node.outputs:
            if out not in outputs:
                out.shape = None
    return model


def strip_names(model: ir.Model) -> ir.Model:
    """Remove every name a detector could read: initializers -> ``w<k>``, values -> ``v<k>``,
    node names and all metadata cleared. Graph inputs/outputs keep their names (to run it)."""
    graph = model.graph
    keep = set(graph.inputs) | set(graph.outputs)
    for k, value in enumerate(list(graph.initializers.values())):
        graph.initializers.pop(value.name)
        value.name = f"w{k}"
        value.metadata_props.clear()
        graph.register_initializer(value)
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(graph):
        node.name = ""
        node.metadata_props.clear()
        node.doc_string = None
        for out in node.outputs:
            out.metadata_props.clear()
            if out not in keep:
                out.name = f"v{count}"
                count += 1
    graph.metadata_props.clear()
    model.metadata_props.clear()
    model.producer_name = None
    return model


#: Metadata torch.onnx writes for debugging (stack traces hold machine paths); detection does not read them.
DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "namespace", "pkg.torch.onnx.class_hierarchy")


def drop_debug_metadata(model: ir.Model) -> ir.Model:
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for key in DEBUG_METADATA:
            node.metadata_props.pop(key, None)
    return model


# -- golden files of fixtures/ (fixtures/make_fixtures.py writes them, tests/test_fixtures.py reads them)
#: the committed fixture graphs (fixtures/make_fixtures.py writes them)
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MAX_BYTES = 200 * 1024
GOLDEN_FIELDS = ("module", "adapter", "kind", "rank", "in_features", "out_features", "scale")


def golden(sites) -> list[dict]:
    """The stable part of each site, sorted: what the golden files hold."""
    rows = []
    for site in sites:
        row = {k: getattr(site, k) for k in GOLDEN_FIELDS}
        if not isinstance(row["scale"], str):
            row["scale"] = round(float(row["scale"]), 6)
        rows.append(row)
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


# -- several adapted layers with PEFT names (slots, pack, compose tests) -------------------------
@dataclasses.dataclass(frozen=True)
class LoraLayers:
    """Parallel LoRA linear layers on one input ``x``, one output ``y.<module>`` each.

    ``weights[adapter][module] = (A [r, in], B [out, r], scale)`` in PEFT's parameter layout (what
    :func:`graph_tools.adapters.compose.compose` takes); :meth:`reference` is the numpy output with
    the given adapters active, each times its weight (``[]``: the base model)."""

    model: ir.Model
    feeds: dict[str, np.ndarray]
    base: dict[str, np.ndarray]  # module -> W [in, out]
    weights: dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]]

    def reference(self, active: list[tuple[str, float]]) -> dict[str, np.ndarray]:
        x = self.feeds["x"].astype(np.float64)
        out = {}
        for module, w in self.base.items():
            y = x @ w.astype(np.float64)
            for adapter, factor in active:
                if module in self.weights[adapter]:
                    a, b, s = self.weights[adapter][module]
                    y = y + factor * s * (x @ a.T.astype(np.float64) @ b.T.astype(np.float64))
            out[f"y.{module}"] = y
        return out


def lora_layers(
    modules: tuple[str, ...] = ("q_proj", "k_proj"),
    ranks: dict[str, int] | None = None,
    *,
    skip: dict[str, tuple[str, ...]] | None = None,
    dtype=np.float32,
    seed: int = 0,
) -> LoraLayers:
    """Layers ``modules`` (``IN -> OUT``) with adapters ``ranks`` (``{adapter: r}``, default
    ``{"default": 4, "second": 2}``) chained on each, named as PEFT names them; ``skip[adapter]``:
    modules that adapter does not adapt. Weights, input and scales in ``dtype``."""
    ranks = ranks or {"default": 4, "second": 2}
    skip = skip or {}
    b = GraphBuilder(seed=seed)
    elem = ir.DataType.from_numpy(np.dtype(dtype))
    x = b.input("x", ["batch", SEQ, IN], elem)
    feeds = {"x": np.random.default_rng(seed + 7).standard_normal((2, SEQ, IN)).astype(dtype)}
    base, weights, outputs = {}, {a: {} for a in ranks}, []
    for i, module in enumerate(modules):
        prefix = f"base_model.model.{module}"
        w = (b.rng.standard_normal((IN, OUT)) * 0.3).astype(dtype)
        base[module] = w
        y = b.op("MatMul", x, b.weight(f"{prefix}.base_layer.weight", w))
        for k, (adapter, rank) in enumerate(ranks.items()):
            if module in skip.get(adapter, ()):
                continue
            a = (b.rng.standard_normal((IN, rank)) * 0.3).astype(dtype)
            bb = (b.rng.standard_normal((rank, OUT)) * 0.3).astype(dtype)
            s = 0.5 + i + 0.25 * k
            h = b.op("MatMul", b.op("MatMul", x, b.weight(f"{prefix}.lora_A.{adapter}.weight", a)),
                     b.weight(f"{prefix}.lora_B.{adapter}.weight", bb))
            y = b.op("Add", y, b.op("Mul", h, b.const(f"{prefix}.scale.{adapter}", s, dtype)))
            weights[adapter][module] = (np.ascontiguousarray(a.T), np.ascontiguousarray(bb.T), s)
        y.name = f"y.{module}"
        outputs.append(y)
    return LoraLayers(b.model(*outputs), feeds, base, weights)
