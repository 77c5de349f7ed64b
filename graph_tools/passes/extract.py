"""Replace every LoRA site by one slot branch per module (the graph of an adapter package).

Before (per module, one branch per adapter, weights baked in)::

    x ─> base ──────────────────────────────> Add ─> Add ─> y
    └──> A_default ─> B_default ─> Mul(s) ─────┘      │
    └──> A_second ─> B_second ─> Mul(s) ──────────────┘

After (one branch per module; A, B and the per-rank scale are slots, see
:mod:`graph_tools.passes.slots`)::

    x ─> base ──────────────────────────────────────────────────────────────────> Add ─> y
    └──> op_A(x, Transpose(A_slot)) ─> Mul(scale_slot) ─> op_B(., Transpose(B_slot)) ┘

The new branch replaces the module's last ``Add`` through ``ir.convenience.replace_nodes_and_values``
(so a site whose ``Add`` is a graph output keeps that output and its name); the old branches,
and LoRA weights that were graph inputs, go with dead-node removal.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graph_tools.errors import AdapterError
from graph_tools.lora import META_MODULE, META_ROLE, find_lora_sites
from graph_tools.passes._base import LoraPass, drop_dead_inputs, used_inputs
from graph_tools.passes.slots import SlotGroup

__all__ = ["ReplaceLoraWithSlotsPass"]

logger = logging.getLogger(__name__)


_SHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def _reshaped_branch(module: str, parts) -> bool:
    """Whether the old branch changes its shape after A (it worked on a 2-D view of the input
    and reshaped back before the ``Add``): the new branch is then reshaped to the base output's
    shape. Detection allows only views (no Transpose) and scale Mul/Div between A, B and the Add."""
    b_input = parts.b.inputs[1 if parts.b.op_type == "Gather" else 0]
    return _shape_changes(module, parts.add.inputs[1 - parts.base_index], parts.b, parts) or _shape_changes(
        module, b_input, parts.a, parts)


def _shape_changes(module: str, value: ir.Value | None, stop: ir.Node, parts) -> bool:
    changed = False
    for _ in range(32):
        node = value.producer() if value is not None else None
        if node is stop:
            return changed
        if node is None or node.op_type == "Transpose" or not node.inputs:
            break
        changed = changed or node.op_type in _SHAPE_OPS
        if node in parts.scales:  # the data operand of a Mul/Div is the one that leads back to ``stop``
            value = next((i for i in node.inputs if _leads_to(i, stop, parts)), None)
        else:
            value = node.inputs[0]
    raise AdapterError(f"module {module!r}: cannot follow its LoRA branch back to {stop.op_type} over views and scales")


def _leads_to(value: ir.Value | None, target: ir.Node, parts, depth: int = 0) -> bool:
    node = value.producer() if value is not None else None
    if node is target:
        return True
    if node is None or depth > 32 or not (node in parts.scales or node.op_type in _SHAPE_OPS | {"Identity", "Cast", "Dropout"}):
        return False
    return any(_leads_to(i, target, parts, depth + 1) for i in node.inputs)


class ReplaceLoraWithSlotsPass(LoraPass):
    """Replace each module's LoRA branches by one branch reading slot values.

    Attributes:
        groups: the plan from :func:`graph_tools.passes.slots.plan_slots` on this model.
        as_inputs: slots become graph inputs with default initializers (``inputs`` mode); else
            plain initializers (``external`` mode, values supplied at session creation).

    Requires: the plan resolves (every site's nodes are in this graph; a chained adapter's
    ``Add`` feeds only the next one of its module); no slot name is taken.
    Ensures: no site of the plan is left, every LoRA site the graph now has reads slots, and
    every slot is a graph input (``as_inputs``) or an initializer.
    """

    def __init__(self, groups: list[SlotGroup], *, as_inputs: bool = True):
        super().__init__()
        self.groups = groups
        self.as_inputs = as_inputs

    def requires(self, model: ir.Model) -> None:
        graph = model.graph
        taken = {v.name for v in graph.inputs} | set(graph.initializers)
        for group in self.groups:
            adds = [site.require_parts(graph).add for site in group.sites]
            for earlier, later in zip(adds, adds[1:]):
                users = {u.node for u in earlier.outputs[0].uses()}
                if users != {later} or earlier.outputs[0].is_graph_output():
                    raise AdapterError(
                        f"module {group.module!r}: the sum after one of its adapters is read outside the chain of "
                        "its LoRA branches; cannot replace the branches one by one"
                    )
            for name in group.slot_names:
                if name in taken:
                    raise AdapterError(f"slot name {name!r} already exists in the graph")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        before = used_inputs(graph)
        for group in self.groups:
            self._rewrite_group(graph, group)
        dropped = drop_dead_inputs(model, before)
        logger.info("replaced %d LoRA modules by slots (%d LoRA graph inputs dropped)", len(self.groups), dropped)
        return ir.passes.PassResult(model, modified=bool(self.groups))

    def ensures(self, model: ir.Model) -> None:
        graph = model.graph
        for group in self.groups:
            for site in group.sites:
                if site.parts.add.graph is graph:
                    raise AdapterError(f"module {site.module!r}, adapter {site.adapter!r}: its LoRA branch is still in the graph")
            for name in group.slot_names:
                value = graph.initializers.get(name)
                if value is None or (self.as_inputs and not value.is_graph_input()):
                    raise AdapterError(f"slot {name!r} is not a graph {'input' if self.as_inputs else 'initializer'}")
        slot_values = {n for g in self.groups for n in g.slot_names}
        for site in find_lora_sites(model):
            if site.lora_a not in slot_values or site.lora_b not in slot_values:
                raise AdapterError(f"module {site.module!r}, adapter {site.adapter!r}: a LoRA branch is left in the graph")

    def _rewrite_group(self, graph: ir.Graph, group: SlotGroup) -> None:
        first, last = group.sites[0].parts, group.sites[-1].parts
        a_node, b_node = first.a, first.b
        x = a_node.inputs[1] if a_node.op_type == "Gather" else a_node.inputs[0]
        base_out = first.base_input
        reshape_back = _reshaped_branch(group.module, first)
        a_slot = self._slot(graph, group.a_name, group.a_shape, group.dtype)
        b_slot = self._slot(graph, group.b_name, group.b_shape, group.dtype)
        s_slot = self._slot(graph, group.scale_name, group.scale_shape, group.dtype)
        tag = group.module
        new_nodes: list[ir.Node] = []

        def add(op, inputs, attributes=None, name=None):
            node = ir.Node("", op, inputs, attributes=attributes or [], name=f"lora_slot/{tag}/{name or op}")
            node.metadata_props[META_MODULE] = group.module
            node.metadata_props[META_ROLE] = name or op
            new_nodes.append(node)
            if op not in ("Constant", "Shape"):  # every branch value carries the slot dtype (later passes rely on types)
                node.outputs[0].type = ir.TensorType(group.dtype)
            return node.outputs[0]

        if group.kind == "conv":
            conv_attrs = [a for a in a_node.attributes.values() if a.name != "kernel_shape"]
            after_a = add("Conv", [x, a_slot], conv_attrs, "lora_A")
            ndim = len(group.a_shape) - 2
            s_shape = add("Constant", [], [ir.AttrTensor("value", ir.tensor(np.array([-1] + [1] * ndim, np.int64)))], "scale_shape")
            scale = add("Reshape", [s_slot, s_shape], name="scale_reshape")
            scaled = add("Mul", [after_a, scale], name="lora_scale")
            b_attrs = [a for a in b_node.attributes.values() if a.name != "kernel_shape"]
            branch = add("Conv", [scaled, b_slot], b_attrs, "lora_B")
        else:
            perm = [ir.AttrInt64s("perm", [1, 0])]
            a_t = add("Transpose", [a_slot], perm, "lora_A_T")
            after_a = add("Gather", [a_t, x], name="lora_A") if group.kind == "embedding" else add("MatMul", [x, a_t], name="lora_A")
            scaled = add("Mul", [after_a, s_slot], name="lora_scale")
            b_t = add("Transpose", [b_slot], perm, "lora_B_T")
            branch = add("MatMul", [scaled, b_t], name="lora_B")
        if reshape_back:  # the old branch worked on a 2-D view of the input and reshaped back
            branch = add("Reshape", [branch, add("Shape", [base_out], name="base_shape")], name="lora_reshape_back")
        if base_out.dtype is not None and base_out.dtype != group.dtype:
            branch = add("Cast", [branch], [ir.AttrInt64("to", base_out.dtype)], "lora_cast_out")
            branch.type = ir.TensorType(base_out.dtype)
        join = ir.Node("", "Add", [base_out, branch], name=f"lora_slot/{tag}/lora_add")
        join.metadata_props[META_MODULE] = group.module
        join.metadata_props[META_ROLE] = "lora_add"
        new_nodes.append(join)
        old_out = last.add.outputs[0]
        # users and graph outputs of the module's last Add read the new join (name, type, shape kept)
        ir.convenience.replace_nodes_and_values(graph, last.add, [last.add], new_nodes, [old_out], join.outputs)
        old_out.name = None

    def _slot(self, graph: ir.Graph, name: str, shape: list[int | str], dtype: ir.DataType) -> ir.Value:
        default_shape = [0 if isinstance(d, str) else d for d in shape]
        # ir.Tensor, not ir.tensor: same tensor, without ir.tensor's protocol checks (462 slots on a 1B model)
        default = ir.Tensor(np.zeros(default_shape, dtype=dtype.numpy()), dtype=dtype, name=name)
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=default)
        if self.as_inputs:
            graph.inputs.append(value)
        graph.register_initializer(value)
        return value
