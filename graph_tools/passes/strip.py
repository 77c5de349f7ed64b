"""Remove every LoRA branch: the base model.

Before: ``Add(base(x), B(A(x)) * s)``  ->  After: ``base(x)`` (branch nodes, LoRA weights and
slot inputs removed).

Works on exported LoRA graphs (sites from :func:`find_lora_sites`) and on extracted package graphs
(slot branches from :func:`graph_tools.passes.slots.find_slot_branches`; the package manifest
names the slots, or the slot naming does when the model sits outside its package).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx_ir as ir

from graph_tools._io import load_model
from graph_tools.errors import NoLoraError
from graph_tools.lora import LoraSite, find_lora_sites

__all__ = ["StripLoraPass", "StripSlotsPass", "strip_adapters", "save_model_to"]

logger = logging.getLogger(__name__)


class StripLoraPass(ir.passes.InPlacePass):
    """Bypass each site's Add with its base input; dead branch nodes and LoRA inputs go.

    Attributes:
        sites: sites to remove (from :func:`find_lora_sites` on the same model).
    """

    def __init__(self, sites: list[LoraSite]):
        super().__init__()
        self.sites = sites

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {n.name: n for n in graph}
        lora_inputs = set()
        for site in reversed(self.sites):  # last Add of a chain first
            add = nodes[site.add_node]
            b_node = nodes[site.b_node]
            for n in (nodes[site.a_node], b_node):
                lora_inputs.update(v for v in n.inputs if v is not None and v.is_graph_input())
            if site.scale_value:
                lora_inputs.update(v for v in graph.inputs if v.name == site.scale_value)
            _bypass(graph, add, _base_input(add, b_node))
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
        for value in list(graph.inputs):
            if value in lora_inputs and not value.uses():
                graph.inputs.remove(value)
                graph.initializers.pop(value.name, None)
        for value in list(graph.inputs):  # packed slot inputs
            if (value.name or "").startswith("lora_pack.") and not value.uses():
                graph.inputs.remove(value)
                graph.initializers.pop(value.name, None)
        RemoveUnusedNodesPass()(model)
        logger.info("stripped %d LoRA sites", len(self.sites))
        return ir.passes.PassResult(model, modified=bool(self.sites))


class StripSlotsPass(ir.passes.InPlacePass):
    """Bypass each slot branch's join ``Add`` with its base input; slot inputs and packed inputs go.

    Attributes:
        branches: from :func:`graph_tools.passes.slots.find_slot_branches` on the same model.
    """

    def __init__(self, branches):
        super().__init__()
        self.branches = branches

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        slot_names = set()
        for branch in self.branches:
            slot_names.update((branch.a_name, branch.b_name, branch.scale_name))
            _bypass(graph, branch.add, branch.base_input)
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
        for value in list(graph.inputs):
            name = value.name or ""
            if (name in slot_names or name.startswith("lora_pack.")) and not value.uses():
                graph.inputs.remove(value)
                graph.initializers.pop(name, None)
        RemoveUnusedNodesPass()(model)
        logger.info("stripped %d slot branches", len(self.branches))
        return ir.passes.PassResult(model, modified=bool(self.branches))


def _bypass(graph: ir.Graph, add: ir.Node, base: ir.Value) -> None:
    """Make every user of ``add``'s output read ``base`` instead (graph outputs keep their name)."""
    out = add.outputs[0]
    if out.is_graph_output():
        ident = ir.Node("", "Identity", [base], name=f"{add.name}/strip")
        graph.insert_after(add, ident)
        ir.convenience.replace_all_uses_with(out, ident.outputs[0])
        for i, o in enumerate(graph.outputs):
            if o is out:
                graph.outputs[i] = ident.outputs[0]
        name = out.name
        out.name = None
        ident.outputs[0].name = name
        ident.outputs[0].shape, ident.outputs[0].type = out.shape, out.type
    else:
        ir.convenience.replace_all_uses_with(out, base)


def _base_input(add: ir.Node, b_node: ir.Node) -> ir.Value:
    from graph_tools.passes.slots import _reaches

    p, q = add.inputs
    return q if _reaches(p, b_node) else p


def strip_adapters(model_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write the base model (every LoRA branch removed) to ``out_path`` (+ ``.data``).

    ``model_path``: an exported LoRA model, an extracted package's ``model.onnx``, or a package
    folder.
    """
    from graph_tools.adapters.package import load_package_model, package_of
    from graph_tools.passes.slots import find_slot_branches, infer_slot_specs

    package = package_of(model_path)
    if package is not None:
        model = load_package_model(package)
        triples = package.slot_triples()
    else:
        model = load_model(model_path)
        triples = infer_slot_specs(model)
    branches = find_slot_branches(model, triples)
    if branches:
        StripSlotsPass(branches)(model)
    sites = find_lora_sites(model)
    if not sites and not branches:
        raise NoLoraError(f"{model_path}: no LoRA sites found; nothing to strip")
    if sites:
        StripLoraPass(sites)(model)
    return save_model_to(model, out_path)


def save_model_to(model: ir.Model, out_path: str | os.PathLike) -> Path:
    """Save ``model`` to ``out_path`` with weights in ``<name>.data``, atomically."""
    from graph_tools._io import save_model

    return save_model(model, out_path)
