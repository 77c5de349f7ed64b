"""Adapter-independent *slots*: the plan (:func:`plan_slots`, :func:`read_adapter_weights`) that
:class:`graph_tools.passes.extract.ReplaceLoraWithSlotsPass` applies, and reading slot branches
back from a package graph (:func:`find_slot_branches`).

Slots hold PEFT's parameter layout (``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r]; conv
kernels as-is; embeddings ``lora_embedding_A`` [r, num], ``lora_embedding_B`` [dim, r]) and are
named as PEFT names them in ``adapter_model.safetensors``; the scale slot is ``<module>.lora_scale``
with one entry per rank row, so several adapters run at once by concatenating along rank. Each
slot gets a default initializer of rank 0 (or zeros at a fixed rank), so the graph runs as the
base model when nothing is fed. Every site's rank axis has its own dimension name.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from graph_tools.errors import AdapterError, NoLoraError
from graph_tools.lora import LoraSite
from graph_tools.lora.naming import PEFT_PREFIX
from graph_tools.passes._weights import SharedMapping, eval_constant_subgraph, to_peft_layout

__all__ = ["SlotGroup", "plan_slots", "read_adapter_weights", "slot_names", "SlotBranch", "find_slot_branches", "infer_slot_specs"]

logger = logging.getLogger(__name__)

SLOT_LAYOUT = "peft"


@dataclasses.dataclass
class SlotGroup:
    """One adapted module and the slots it gets."""

    module: str
    kind: str
    in_features: int
    out_features: int
    sites: list[LoraSite]
    dtype: ir.DataType
    a_name: str
    b_name: str
    scale_name: str
    a_shape: list[int | str]  # PEFT layout with the rank axis as an int (fixed) or a dim name
    b_shape: list[int | str]
    scale_shape: list[int | str]
    rank_axis_a: int
    rank_axis_b: int
    rank: int | str  # fixed rank, or the dim name of a dynamic rank

    @property
    def slot_names(self) -> tuple[str, str, str]:
        return self.a_name, self.b_name, self.scale_name


def slot_names(module: str, kind: str) -> tuple[str, str, str]:
    prefix = f"{PEFT_PREFIX}{module}"
    if kind == "embedding":
        return f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B", f"{prefix}.lora_scale"
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight", f"{prefix}.lora_scale"


def plan_slots(model: ir.Model, sites: list[LoraSite], *, fixed_ranks: dict[str, int] | None = None) -> list[SlotGroup]:
    """Group sites by module and decide each slot's name, shape and dtype.

    ``sites`` come from :func:`find_lora_sites` on ``model`` (the plan refers to their nodes).
    ``fixed_ranks`` maps module -> rank for fixed-shape slots; modules absent get a dynamic rank.
    """
    if not sites:
        raise NoLoraError("the model has no LoRA sites")
    by_module: dict[str, list[LoraSite]] = {}
    for site in sites:
        site.require_parts(model.graph)
        by_module.setdefault(site.module, []).append(site)
    groups = []
    for module, module_sites in by_module.items():
        first = module_sites[0]
        if not isinstance(first.in_features, int) or not isinstance(first.out_features, int):
            raise AdapterError(f"module {module!r}: in/out features are not static ({first.in_features}, {first.out_features})")
        kinds = {s.kind for s in module_sites}
        if len(kinds) != 1:
            raise AdapterError(f"module {module!r}: its LoRA branches are of different kinds ({', '.join(sorted(kinds))})")
        a_node, b_node = first.parts.a, first.parts.b
        weight = _weight_operand(a_node)
        dtype = _operand_dtype(weight)
        rank: int | str = (fixed_ranks or {}).get(module, f"lora_r.{module}")
        if first.kind == "conv":
            a_kernel = list(_effective_shape(a_node, weight))[1:]
            b_kernel = list(_effective_shape(b_node, _weight_operand(b_node)))[2:]
            a_shape = [rank, *a_kernel]
            b_shape = [first.out_features, rank, *b_kernel]
        else:
            a_shape = [rank, first.in_features]
            b_shape = [first.out_features, rank]
        a_name, b_name, s_name = slot_names(module, first.kind)
        groups.append(
            SlotGroup(module, first.kind, first.in_features, first.out_features, module_sites, dtype,
                      a_name, b_name, s_name, a_shape, b_shape, [rank], 0, 1, rank)
        )
    return groups


def _weight_operand(node: ir.Node) -> ir.Value | None:
    return node.inputs[0] if node.op_type == "Gather" else node.inputs[1]


def _operand_dtype(value: ir.Value | None) -> ir.DataType:
    """The element type an op consumes, also on graphs without value types: follow
    Transpose/Identity/Reshape back to the stored tensor (a Cast decides by its ``to``)."""
    for _ in range(16):
        if value is None:
            break
        if value.dtype is not None:
            return value.dtype
        if value.const_value is not None:
            return value.const_value.dtype
        node = value.producer()
        if node is None:
            break
        if node.op_type == "Cast":
            return ir.DataType(node.attributes.get_int("to"))
        if node.op_type not in ("Transpose", "Identity", "Reshape", "Squeeze", "Unsqueeze") or not node.inputs:
            break
        value = node.inputs[0]
    return ir.DataType.FLOAT


def _effective_shape(node: ir.Node, weight: ir.Value | None) -> tuple:
    shape = None if weight is None else weight.shape
    if shape is None and weight is not None and weight.const_value is not None:
        shape = weight.const_value.shape
    if shape is None:
        raise AdapterError(f"node {node.name or node.op_type!r}: weight shape unknown")
    return tuple(shape)


def read_adapter_weights(model: ir.Model, groups: list[SlotGroup]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]]:
    """``{adapter: {module: (A, B, scale)}}`` in PEFT layout, read from the graph (LoRA bytes only).

    A scale held by a graph input is read from its default initializer (times the site's
    constant ``scale_factor``); a LoRA weight or scale without a value in the graph is refused."""
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]] = {}
    mapping = SharedMapping()
    for group in groups:
        for site in group.sites:
            parts = site.require_parts(model.graph)
            where = f"module {site.module!r}, adapter {site.adapter!r}"
            a = _effective_weight(parts.a, where, "lora_A", mapping)
            b = _effective_weight(parts.b, where, "lora_B", mapping)
            scale = site.scale
            if isinstance(scale, str):
                value = parts.scale_value
                tensor = value.const_value if value is not None else None
                if tensor is None:
                    raise AdapterError(f"{where}: scale {scale!r} is a graph input without a default value; nothing to extract")
                array = tensor.numpy().reshape(-1)
                if array.size != 1 and not np.all(array == array[0]):
                    raise AdapterError(f"{where}: scale {scale!r} differs between rank rows; cannot store one scale per adapter")
                scale = site.scale_factor * float(array[0])
            out.setdefault(site.adapter, {})[group.module] = (
                to_peft_layout(group.kind, "A", a), to_peft_layout(group.kind, "B", b), float(scale)
            )
    return out


def _effective_weight(node: ir.Node, where: str, role: str, mapping: SharedMapping | None = None) -> np.ndarray:
    try:
        array = eval_constant_subgraph(_weight_operand(node), mapping=mapping)
    except AdapterError as exc:
        raise AdapterError(f"{where}: {role}: {exc}; nothing to extract") from None
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        array = array.T
    return array


# -------------------------------------------------------------------------- slot graphs: reading


@dataclasses.dataclass
class SlotBranch:
    """One module's slot branch in an extracted graph (see :func:`find_slot_branches`).

    Attributes:
        module: module path (the manifest slot's ``site``).
        a_name, b_name, scale_name: the slot names.
        add: the ``Add`` joining the base path and the branch.
        base_input: the ``Add`` input carrying the base path.
        lora_x: the input the branch reads (the base op's data input).
        nodes: every node of the branch (between the slots and ``add``).
    """

    module: str
    a_name: str
    b_name: str
    scale_name: str
    add: ir.Node
    base_input: ir.Value
    lora_x: ir.Value | None
    nodes: list[ir.Node]

    def base_node(self) -> ir.Node | None:
        """The MatMul/Gemm/Conv/Gather computing the base output, read off the graph structure:
        back from ``base_input`` over bias Adds and shape-only ops to an op reading ``lora_x``."""
        value = self.base_input
        target = _strip_passthrough(self.lora_x)
        for _ in range(16):
            node = value.producer() if value is not None else None
            if node is None:
                return None
            if node.op_type in ("MatMul", "Gemm", "Conv", "Gather"):
                data = node.inputs[1] if node.op_type == "Gather" else node.inputs[0]
                return node if target is None or _strip_passthrough(data) is target else None
            if node.op_type in _PASSTHROUGH and node.inputs:
                value = node.inputs[0]
            elif node.op_type == "Add" and len(node.inputs) == 2:  # bias: one side is constant
                p, q = node.inputs
                value = p if _is_constant(q) else q if _is_constant(p) else None
            else:
                return None
        return None


_PASSTHROUGH = frozenset({"Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Dropout"})


def _strip_passthrough(value: ir.Value | None) -> ir.Value | None:
    for _ in range(16):
        node = value.producer() if value is not None else None
        if node is None or node.op_type not in _PASSTHROUGH or not node.inputs:
            return value
        value = node.inputs[0]
    return value


def _is_constant(value: ir.Value | None, _depth: int = 0) -> bool:
    """A value computed from initializers/Constants only (e.g. a bias behind an Identity that an
    exporter inserted to share equal initializers)."""
    if value is None:
        return False
    if value.const_value is not None or value.is_initializer():
        return not value.is_graph_input()  # an input with a default can be overridden
    node = value.producer()
    if node is None or _depth > 8:
        return False
    if node.op_type == "Constant":
        return True
    if node.op_type in _PASSTHROUGH | {"Transpose", "DequantizeLinear"}:
        return all(i is None or _is_constant(i, _depth + 1) for i in node.inputs)
    return False


def infer_slot_specs(model: ir.Model) -> list[tuple[str, str, str, str]]:
    """``(module, a_name, b_name, scale_name)`` of every slot triple the graph holds, by the slot
    naming :func:`slot_names` defines (for a package graph without its manifest)."""
    names = set(_values_by_name(model.graph))
    found = []
    for name in sorted(names):
        for a_suffix, b_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if not name.endswith(a_suffix):
                continue
            prefix = name[: -len(a_suffix)]
            b, s = prefix + b_suffix, prefix + ".lora_scale"
            if b in names and s in names:
                module = prefix[len(PEFT_PREFIX):] if prefix.startswith(PEFT_PREFIX) else prefix
                found.append((module, name, b, s))
    return found


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    index: dict[str, ir.Value] = {}
    for node in graph:
        for out in node.outputs:
            if out.name:
                index[out.name] = out
    index.update(graph.initializers)
    index.update({v.name: v for v in graph.inputs if v.name})
    return index


def find_slot_branches(model: ir.Model, triples: list[tuple[str, str, str, str]]) -> list[SlotBranch]:
    """Find each slot triple's branch by structure: every node reachable from the slot values
    (graph inputs, initializers, or the outputs of pack Gathers) up to the first ``Add`` whose
    other input does not depend on the slots. Triples whose slots the graph lacks are skipped."""
    index = _values_by_name(model.graph)
    branches = []
    for module, a_name, b_name, s_name in triples:
        starts = [index[n] for n in (a_name, b_name, s_name) if n in index]
        if len(starts) != 3:
            continue
        inside: set[ir.Value] = set(starts)
        nodes: list[ir.Node] = []
        joins: list[ir.Node] = []
        seen: set[int] = set()
        frontier = list(starts)
        while frontier:
            value = frontier.pop()
            for use in value.uses():
                node = use.node
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if node.op_type in ("Add", "Sum") and len(node.inputs) == 2:
                    joins.append(node)  # decided below, once the whole branch is known
                    continue
                nodes.append(node)
                for out in node.outputs:
                    inside.add(out)
                    frontier.append(out)
        # an Add inside the branch has both inputs inside it; the join has exactly one
        for join in [j for j in joins if all(i in inside for i in j.inputs)]:
            raise AdapterError(f"module {module!r}: unexpected Add {join.name!r} inside its LoRA branch")
        if len(joins) != 1:
            raise AdapterError(f"module {module!r}: cannot find where its LoRA branch joins the base path ({len(joins)} candidates)")
        add = joins[0]
        base_input = next(i for i in add.inputs if i not in inside)
        a_value = index[a_name]
        lora_x = None
        for node in nodes:  # the op applying A reads x besides the (transposed) A slot
            if node.op_type in ("MatMul", "Gemm", "Conv", "Gather") and any(i in inside for i in node.inputs):
                outside = [i for i in node.inputs if i is not None and i not in inside and not _is_constant(i)]
                if outside and _depends_on(node, a_value, inside):
                    lora_x = outside[0]
                    break
        branches.append(SlotBranch(module, a_name, b_name, s_name, add, base_input, lora_x, nodes))
    return branches


def _depends_on(node: ir.Node, value: ir.Value, inside: set[ir.Value], depth: int = 0) -> bool:
    for i in node.inputs:
        if i is value:
            return True
        if i is not None and i in inside and i.producer() is not None and depth < 8:
            if _depends_on(i.producer(), value, inside, depth + 1):
                return True
    return False
