"""Mixed-adapter batches: one adapter choice per batch row, all rows in one run.

The package graph is left as it is (one adapter per run, no extra node: the single-adapter path
keeps its speed); this pass derives a second graph, the *mixed form*, whose slot branches take
per-row values. Rows are axis 0 of every model input.

Before: the package graph's slot branch, one adapter for the whole batch
(``x -> MatMul(x, Transpose(A slot)) -> Mul(scale slot) -> MatMul(., Transpose(B slot)) -> Add``, as read by
:func:`graph_tools.passes.slots.find_slot_branches`). After: the mixed form below.

One graph, two feed *layouts* chosen per run (:mod:`graph_tools.runtime.mixed`): each Linear /
Conv1D site is three ops besides its Add, and the inputs A/B have no declared rank, so the same
MatMuls serve both::

    before:  x ─> base ───────────────────────────────────────────────────────> Add ─> y
             └──> MatMul(x, Transpose(A)) ─> Mul(scale) ─> MatMul(., Transpose(B)) ┘

    after:   x ─> base ──────────────────────────────────────────────> Add ─> y
             └──> MatMul(x, rows.A) ─> Mul(., rows.mask) ─> MatMul(., rows.B) ┘

    "rows"   (BGMV-style): rows.A [rows, in, r] = A_row^T * scale_row (zero-padded to the
             batch's largest rank), rows.B [rows, r, out] = B_row^T, rows.mask [1, 1, 1] = 1:
             batched MatMuls, each row pays its own rank.
    "concat": rows.A [in, R] and rows.B [R, out] = every distinct adapter of the
             batch concatenated along rank (transposed), rows.mask [rows, 1, R] = row b's
             scale * weight on its adapters' rank blocks, 0 elsewhere: one GEMM per MatMul over
             all rows, each row pays R (the sum of the batch's distinct ranks). Chosen when it
             costs no more rank than "rows" (few distinct adapters in the batch).

  x is read as [rows, tokens, in] (a Reshape pair is added only where x is not known to be rank 3;
  the branch's values get their shapes stated, since A and B have none, so that ORT's fusions
  after the site still apply).

Embedding sites: ``Gather(rows.A, ids + rows.offset) * rows.mask -> MatMul(., rows.B)``; "rows":
rows.A [rows * num, r] (row b's A^T * scale at rows b*num..), rows.offset [rows, 1] = b * num;
"concat": rows.A [num, R], rows.offset [1, 1] = 0, mask as for Linear.

Conv sites (a per-row kernel would need ``group = rows``, a static attribute) take the "concat"
values in both layouts::

    x ─> Conv(x, rows.A [R, C, k..]) ─> Mul(., rows.mask [rows, R, 1..]) ─> Conv(., rows.B [out, R, k..]) ─> Add

Inputs are named ``lora_rows.<module>.A`` / ``.B`` / ``.mask`` (/ ``.offset``); the slot (and pack)
inputs leave the mixed graph. :func:`graph_tools.runtime.mixed.mixed_feeds` computes the values.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from graph_tools.errors import AdapterError
from graph_tools.passes.slots import find_slot_branches

__all__ = ["MixedSite", "mixed_sites", "MakeMixedBatchPass", "ROWS_PREFIX", "DESIGN", "LAYOUTS"]

logger = logging.getLogger(__name__)

ROWS_PREFIX = "lora_rows."
#: what the manifest records about the mixed form
DESIGN = {
    "version": 2,
    "layouts": "one graph; per run the 'rows' layout (per-row stacked) or 'concat' (rank concat + row mask)",
    "linear": "MatMul(x[rows,t,in], A) * mask -> MatMul(., B); rows: A [rows,in,r] = A^T*scale, B [rows,r,out], "
              "mask [1,1,1]; concat: A [in,R], B [R,out], mask [rows,1,R]",
    "embedding": "Gather(A, ids + offset) * mask -> MatMul(., B); rows: A [rows*num,r], offset [rows,1] = row*num; "
                 "concat: A [num,R], offset [1,1] = 0",
    "conv": "concat only: Conv(x, A [R,C,k..]) * mask [rows,R,1..] -> Conv(., B [out,R,k..])",
    "row_axis": 0,
    "inputs": "lora_rows.<module>.A, .B, .mask, .offset (embedding)",
}
LAYOUTS = ("rows", "concat")


@dataclasses.dataclass(frozen=True)
class MixedSite:
    """One module's mixed-form inputs.

    Attributes:
        module: module path (the manifest slot's ``site``).
        kind: ``linear``, ``embedding`` or ``conv``.
        dtype: numpy dtype name of the slot values.
        a_name, b_name, mask_name, offset_name: the mixed-form input names (``offset_name`` only
            for embeddings).
        a_slot, b_slot, scale_slot: the slot names of the package graph.
        a_shape, b_shape: the A/B slot shapes of the manifest (PEFT layout).
    """

    module: str
    kind: str
    dtype: str
    a_name: str
    b_name: str
    mask_name: str
    offset_name: str | None
    a_slot: str
    b_slot: str
    scale_slot: str
    a_shape: tuple
    b_shape: tuple


def mixed_sites(slots) -> list[MixedSite]:
    """The mixed-form inputs for the manifest ``slots`` (``SlotSpec``s), one entry per module."""
    by_module: dict[str, dict[str, object]] = {}
    for slot in slots:
        by_module.setdefault(slot.site, {})[slot.role] = slot
    sites = []
    for module, roles in by_module.items():
        if not {"lora_A", "lora_B", "lora_scale"} <= set(roles):
            continue
        a = roles["lora_A"]
        kind = "conv" if len(a.shape) > 2 else "embedding" if a.name.endswith(".lora_embedding_A") else "linear"
        prefix = f"{ROWS_PREFIX}{module}"
        sites.append(MixedSite(module, kind, a.dtype, f"{prefix}.A", f"{prefix}.B", f"{prefix}.mask",
                               f"{prefix}.offset" if kind == "embedding" else None,
                               a.name, roles["lora_B"].name, roles["lora_scale"].name,
                               tuple(a.shape), tuple(roles["lora_B"].shape)))
    return sites


class MakeMixedBatchPass(ir.passes.InPlacePass):
    """Replace every slot branch by its mixed form (see the module docstring).

    Attributes:
        sites: from :func:`mixed_sites`.
    """

    def __init__(self, sites: list[MixedSite]):
        super().__init__()
        self.sites = sites

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        triples = [(s.module, s.a_slot, s.b_slot, s.scale_slot) for s in self.sites]
        branches = {b.module: b for b in find_slot_branches(model, triples)}
        for site in self.sites:
            branch = branches.get(site.module)
            if branch is None or branch.lora_x is None:
                raise AdapterError(f"module {site.module!r}: slot branch not found in the package graph")
            dtype = ir.DataType.from_numpy(np.dtype(site.dtype)) if site.dtype != "bfloat16" else ir.DataType.BFLOAT16
            builder = _Builder(graph, site, dtype)
            if site.kind == "conv":
                out = builder.conv(branch)
            else:
                out = builder.rows(branch)
            add = branch.add
            index = next(i for i, v in enumerate(add.inputs) if v is not branch.base_input)
            graph.insert_before(add, builder.nodes)
            add.replace_input_with(index, out)
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
        for value in list(graph.inputs):  # slot and pack inputs: no longer read
            if not value.uses() and value.name in graph.initializers:
                graph.inputs.remove(value)
                del graph.initializers[value.name]
        for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
            del graph.initializers[name]  # external-mode slots, pack indices
        logger.info("mixed form: %d modules", len(self.sites))
        return ir.passes.PassResult(model, modified=bool(self.sites))


class _Builder:
    def __init__(self, graph: ir.Graph, site: MixedSite, dtype: ir.DataType):
        self.graph, self.site, self.dtype = graph, site, dtype
        self.nodes: list[ir.Node] = []

    def input(self, name: str, shape: list | None, dtype: ir.DataType | None = None) -> ir.Value:
        """A graph input; ``shape=None``: no declared rank (the layouts feed different ranks)."""
        value = ir.Value(name=name, shape=None if shape is None else ir.Shape(shape),
                         type=ir.TensorType(dtype or self.dtype))
        self.graph.inputs.append(value)
        return value

    def add(self, op, inputs, attributes=(), name=None) -> ir.Value:
        node = ir.Node("", op, inputs, attributes=list(attributes), name=f"lora_rows/{self.site.module}/{name or op}")
        node.metadata_props["lora_onnx.module"] = self.site.module
        node.metadata_props["lora_onnx.role"] = f"mixed.{name or op}"
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        return self.add("Constant", [], [ir.AttrTensor("value", ir.tensor(array))], name)

    def rows(self, branch) -> ir.Value:
        s = self.site
        features, out = int(s.a_shape[1]), int(s.b_shape[0])
        r = f"lora_rows_r.{s.module}"
        a, b = self.input(s.a_name, None), self.input(s.b_name, None)
        mask = self.input(s.mask_name, ["lora_rows_m", 1, r])
        x = branch.lora_x
        want = 2 if s.kind == "embedding" else 3
        reshape = x.shape is None or len(x.shape) != want  # only where x is not known to be [rows, t(, in)]
        if s.kind == "embedding":
            if reshape:
                x = self.add("Reshape", [x, self.const("ids_shape", np.array([0, -1], np.int64))], name="ids_rows")
            if x.dtype != ir.DataType.INT64:
                x = self.add("Cast", [x], [ir.AttrInt64("to", ir.DataType.INT64)], name="ids_int64")
            offset = self.input(s.offset_name, ["lora_rows_o", 1], ir.DataType.INT64)
            after_a = self.add("Gather", [a, self.add("Add", [x, offset], name="ids_offset")], name="lora_A")
        else:
            if reshape:
                x = self.add("Reshape", [x, self.const("x_shape", np.array([0, -1, features], np.int64))], name="x_rows")
            after_a = self.add("MatMul", [x, a], name="lora_A")
        scaled = self.add("Mul", [after_a, mask], name="lora_scale")
        y = self.add("MatMul", [scaled, b], name="lora_B")
        if reshape:
            y = self.add("Reshape", [y, self.add("Shape", [branch.base_input], name="base_shape")], name="branch")
        elif x.shape is not None:
            # A and B have no declared rank, so shape inference stops here: state the shapes (as
            # both layouts give them), else ORT's later fusions (RMSNorm, attention) miss the graph
            rows_t = list(x.shape)[:2]
            for value in (after_a, scaled):
                value.shape, value.type = ir.Shape([*rows_t, r]), ir.TensorType(self.dtype)
            y.shape = ir.Shape([*rows_t, out] if branch.base_input.shape is None else list(branch.base_input.shape))
            y.type = ir.TensorType(self.dtype)
        return y

    def conv(self, branch) -> ir.Value:
        s = self.site
        convs = [n for n in branch.nodes if n.op_type == "Conv"]
        a_conv = next((n for n in convs if n.inputs[0] is branch.lora_x), None)
        b_conv = next((n for n in convs if n is not a_conv), None)
        if a_conv is None or b_conv is None:
            raise AdapterError(f"module {s.module!r}: conv slot branch without its two Conv nodes")
        for node in (a_conv, b_conv):
            if node.attributes.get_int("group", 1) != 1:
                raise AdapterError(f"module {s.module!r}: grouped LoRA conv; mixed batches need group=1")
        a_shape, b_shape = s.a_shape, s.b_shape
        r = f"lora_rows_r.{s.module}"
        spatial = len(a_shape) - 2
        a = self.input(s.a_name, [r, *a_shape[1:]])
        b = self.input(s.b_name, [b_shape[0], r, *b_shape[2:]])
        mask = self.input(s.mask_name, ["lora_rows", r, *[1] * spatial])
        attrs = lambda n: [v for v in n.attributes.values() if v.name != "kernel_shape"]  # noqa: E731
        after_a = self.add("Conv", [branch.lora_x, a], attrs(a_conv), name="lora_A")
        scaled = self.add("Mul", [after_a, mask], name="lora_scale")
        return self.add("Conv", [scaled, b], attrs(b_conv), name="lora_B")
