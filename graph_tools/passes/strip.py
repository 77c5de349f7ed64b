"""Remove every LoRA branch: the base model.

Before: ``Add(base(x), B(A(x)) * s)``  ->  After: ``base(x)`` (branch nodes, LoRA weights and
slot inputs removed; a site ``Add`` that was a graph output becomes ``Identity(base(x))`` with
the output's name).

Works on exported LoRA graphs (sites from :func:`find_lora_sites`) and on extracted package graphs
(slot branches from :func:`graph_tools.passes.slots.find_slot_branches`; the package manifest
names the slots, or the slot naming does when the model sits outside its package).
File in, file out: :func:`graph_tools.adapters.strip.strip_adapters`.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from graph_tools.errors import AdapterError
from graph_tools.lora import LoraSite
from graph_tools.passes._base import LoraPass, bypass, drop_dead_inputs, used_inputs

__all__ = ["StripLoraPass", "StripSlotsPass"]

logger = logging.getLogger(__name__)


def _packed_inputs(graph: ir.Graph) -> list[ir.Value]:
    return [v for v in graph.inputs if (v.name or "").startswith("lora_pack.")]


class StripLoraPass(LoraPass):
    """Bypass each site's Add with its base input; dead branch nodes and LoRA inputs go.

    Attributes:
        sites: sites to remove (from :func:`find_lora_sites` on the same model).

    Requires: every site's nodes are in this graph. Ensures: none of them is left, and the
    graph has no LoRA site at all when ``sites`` were all of them.
    """

    def __init__(self, sites: list[LoraSite]):
        super().__init__()
        self.sites = sites

    def requires(self, model: ir.Model) -> None:
        for site in self.sites:
            site.require_parts(model.graph)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        before = used_inputs(graph)
        for site in reversed(self.sites):  # last Add of a chain first: its base input is the earlier Add
            bypass(graph, site.parts.add, site.parts.base_input)
        drop_dead_inputs(model, before, _packed_inputs(graph))
        logger.info("stripped %d LoRA sites", len(self.sites))
        return ir.passes.PassResult(model, modified=bool(self.sites))

    def ensures(self, model: ir.Model) -> None:
        left = [s for s in self.sites if s.parts.add.graph is model.graph]
        if left:
            raise AdapterError(f"module {left[0].module!r}, adapter {left[0].adapter!r}: its LoRA branch is still in the graph")


class StripSlotsPass(LoraPass):
    """Bypass each slot branch's join ``Add`` with its base input; slot inputs and packed inputs go.

    Attributes:
        branches: from :func:`graph_tools.passes.slots.find_slot_branches` on the same model.

    Ensures: no slot (or packed slot) is left among the graph's inputs and initializers.
    """

    def __init__(self, branches):
        super().__init__()
        self.branches = branches

    def requires(self, model: ir.Model) -> None:
        for branch in self.branches:
            if branch.add.graph is not model.graph:
                raise AdapterError(f"module {branch.module!r}: its slot branch belongs to another graph")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        before = used_inputs(graph)
        for branch in self.branches:
            bypass(graph, branch.add, branch.base_input)
        drop_dead_inputs(model, before, _packed_inputs(graph))
        logger.info("stripped %d slot branches", len(self.branches))
        return ir.passes.PassResult(model, modified=bool(self.branches))

    def ensures(self, model: ir.Model) -> None:
        graph = model.graph
        names = {v.name for v in graph.inputs} | set(graph.initializers)
        for branch in self.branches:
            for name in (branch.a_name, branch.b_name, branch.scale_name):
                if name in names:
                    raise AdapterError(f"module {branch.module!r}: slot {name!r} is still in the graph after strip")
