"""Pack slots of the same role, shape and dtype into one input, split inside the graph.

Before: ``q_proj.lora_A.weight [R, 64]``, ``k_proj.lora_A.weight [R, 64]``, ... (one input each)
After:  ``lora_pack.lora_A.0 [n, R, 64]`` -> Gather(idx=0) -> (old q_proj slot uses), Gather(1) ...

An adapter is then a handful of tensors instead of hundreds. Needs fixed-shape slots.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graph_tools.errors import AdapterError
from graph_tools.passes._base import LoraPass

__all__ = ["PackSlotsPass", "plan_packs"]

logger = logging.getLogger(__name__)


def plan_packs(slots) -> list[dict]:
    """Group manifest slot specs by (role, shape, dtype); each group becomes one packed input."""
    groups: dict[tuple, list] = {}
    for slot in slots:
        if not all(isinstance(d, int) for d in slot.shape):
            raise AdapterError(f"slot {slot.name!r} has a dynamic shape; packing needs fixed ranks (max_rank)")
        groups.setdefault((slot.role, tuple(slot.shape), slot.dtype), []).append(slot)
    packs = []
    counters: dict[str, int] = {}
    for (role, shape, dtype), members in groups.items():
        idx = counters.get(role, 0)
        counters[role] = idx + 1
        packs.append({"name": f"lora_pack.{role}.{idx}", "role": role, "shape": [len(members), *shape],
                      "dtype": dtype, "members": [m.name for m in members]})
    return packs


class PackSlotsPass(LoraPass):
    """Replace member slot inputs by Gathers from one packed input per pack.

    Attributes:
        packs: the plan from :func:`plan_packs`.

    Requires: every member is a graph input with a default, of the pack's member shape.
    Ensures: no member is a graph input any more; every pack is one.
    """

    def requires(self, model: ir.Model) -> None:
        inputs = {v.name: v for v in model.graph.inputs}
        for pack in self.packs:
            for member in pack["members"]:
                value = inputs.get(member)
                if value is None or model.graph.initializers.get(member) is not value:
                    raise AdapterError(f"slot {member!r} is not a graph input with a default; cannot pack it")
                if value.shape is None or list(value.shape) != list(pack["shape"][1:]):
                    raise AdapterError(f"slot {member!r}: shape {value.shape} is not the pack's {pack['shape'][1:]}")

    def ensures(self, model: ir.Model) -> None:
        inputs = {v.name for v in model.graph.inputs}
        for pack in self.packs:
            if pack["name"] not in inputs or inputs & set(pack["members"]):
                raise AdapterError(f"pack {pack['name']!r}: its members are not all replaced by the packed input")

    def __init__(self, packs: list[dict]):
        super().__init__()
        self.packs = packs

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        for pack in self.packs:
            dtype = ir.DataType.from_numpy(np.dtype(pack["dtype"]))  # "bfloat16" too: onnx_ir registers ml_dtypes
            default = ir.tensor(np.zeros(pack["shape"], dtype=dtype.numpy()), dtype=dtype, name=pack["name"])
            packed = ir.Value(name=pack["name"], shape=ir.Shape(pack["shape"]), type=ir.TensorType(dtype), const_value=default)
            graph.inputs.append(packed)
            graph.register_initializer(packed)
            for i, member in enumerate(pack["members"]):
                old = inputs[member]
                index = ir.Value(name=f"{member}.pack_index", const_value=ir.tensor(np.array(i, np.int64), name=f"{member}.pack_index"))
                graph.register_initializer(index)
                node = ir.Node("", "Gather", [packed, index], attributes=[ir.AttrInt64("axis", 0)], name=f"lora_pack/{member}")
                node.metadata_props["lora_onnx.role"] = "unpack"
                graph.insert_before(next(iter(graph)), node)  # inputs only: valid at the front
                ir.convenience.replace_all_uses_with(old, node.outputs[0])
                graph.inputs.remove(old)
                del graph.initializers[member]
                node.outputs[0].name = member
                node.outputs[0].shape = old.shape
                node.outputs[0].type = old.type
                old.name = f"{member}.unpacked_input"
        logger.info("packed slots into %d inputs", len(self.packs))
        return ir.passes.PassResult(model, modified=bool(self.packs))
