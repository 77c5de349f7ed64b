"""What every lora-onnx pass shares: typed errors through onnx-ir's pass machinery, and rewiring.

* :class:`LoraPass`: an ``ir.passes.InPlacePass`` whose ``requires``/``ensures`` raise our typed
  errors (:class:`~graph_tools.errors.LoraOnnxError`); onnx-ir wraps them in
  ``PreconditionError``/``PostconditionError`` (and ``Sequential`` in ``PassError``), so
  :meth:`LoraPass.__call__` and :func:`run_passes` hand the typed error back to the caller.
* :func:`bypass`: make a node's output read another value, graph outputs included (onnx-ir's
  ``replace_nodes_and_values`` / ``replace_all_uses_with(..., replace_graph_outputs=True)``).
* :func:`drop_dead_inputs`: graph inputs a pass left without a use leave the signature.
"""

from __future__ import annotations

import logging
from typing import Iterable

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from graph_tools.errors import LoraOnnxError

__all__ = ["LoraPass", "run_passes", "bypass", "drop_dead_inputs", "used_inputs"]

logger = logging.getLogger(__name__)


def _typed_cause(exc: BaseException) -> LoraOnnxError | None:
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, LoraOnnxError):
            return exc
        exc, seen = exc.__cause__, seen + 1
    return None


class LoraPass(ir.passes.InPlacePass):
    """An in-place pass whose invariant failures reach the caller as our typed errors."""

    def __call__(self, model_or_result, /) -> ir.passes.PassResult:
        try:
            return super().__call__(model_or_result)
        except (ir.passes.InvariantError, ir.passes.PassError) as exc:
            typed = _typed_cause(exc)
            if typed is None:
                raise
            raise typed from None


def run_passes(model: ir.Model, *passes: ir.passes.PassBase) -> ir.passes.PassResult:
    """``ir.passes.Sequential(*passes)(model)``, with a typed error of any pass re-raised as is."""
    try:
        return ir.passes.Sequential(*passes)(model)
    except (ir.passes.InvariantError, ir.passes.PassError) as exc:
        typed = _typed_cause(exc)
        if typed is None:
            raise
        raise typed from None


def bypass(graph: ir.Graph, node: ir.Node, value: ir.Value) -> None:
    """Every user of ``node``'s (single) output reads ``value`` instead.

    Where that output is a graph output, ``node`` is replaced by ``Identity(value)`` carrying the
    output's name, type and shape (ONNX needs a graph output to be produced by a node, and a
    value can be a graph output only once); the node itself is left for dead-node removal.
    """
    out = node.outputs[0]
    if not out.is_graph_output():
        ir.convenience.replace_all_uses_with(out, value)
        return
    ident = ir.node("Identity", [value], name=f"{node.name}/bypass" if node.name else None)
    ir.convenience.replace_nodes_and_values(graph, node, [node], [ident], [out], ident.outputs)
    out.name = None  # the node is gone; its old output keeps no name a saved graph could clash on


def used_inputs(graph: ir.Graph) -> set[ir.Value]:
    return {v for v in graph.inputs if v.uses()}


def drop_dead_inputs(model: ir.Model, before: set[ir.Value], extra: Iterable[ir.Value] = ()) -> int:
    """Remove dead nodes, then the graph inputs in ``before`` (inputs that had users) or ``extra``
    that have none left: they fed only what the pass removed. Returns how many inputs went."""
    RemoveUnusedNodesPass()(model)
    graph = model.graph
    candidates = set(before) | set(extra)
    dropped = 0
    for value in list(graph.inputs):
        if value in candidates and not value.uses() and not value.is_graph_output():
            graph.inputs.remove(value)
            if value.name in graph.initializers and graph.initializers[value.name] is value:
                del graph.initializers[value.name]
            dropped += 1
    return dropped
