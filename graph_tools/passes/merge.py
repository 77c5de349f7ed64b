"""Fold one adapter into the base weights: a plain ONNX model, fastest for one-adapter serving.

Before: ``Add(base(x, W), scale * B(A(x)))`` with A, B fed from slots.
After:  ``base(x, W + scale * B @ A)`` (in the base op's layout); all branches removed.

:class:`FoldAdapterPass` rewrites the base weights, :class:`~graph_tools.passes.strip.StripSlotsPass`
then removes the branches; :func:`graph_tools.adapters.merge.merge_adapter` runs both as one ``ir.passes.Sequential``.
Works for every package mode (inputs, packed, fixed rank, external).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graph_tools.errors import AdapterError
from graph_tools.passes._base import LoraPass
from graph_tools.passes._weights import eval_constant_subgraph
from graph_tools.passes.slots import SlotBranch

__all__ = ["FoldAdapterPass", "delta_weight"]

logger = logging.getLogger(__name__)

_MERGED = ".merged"
_KIND = {"Gather": "embedding", "Conv": "conv", "MatMul": "linear", "Gemm": "linear"}


def delta_weight(kind: str, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """``scale * B @ A`` in PEFT's weight layout ([out, in], conv [out, in, *k], embedding [num, dim])."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    if kind == "conv":
        r = a32.shape[0]
        delta = np.einsum("or,r...->o...", b32.reshape(b32.shape[0], r), a32)
    elif kind == "embedding":
        delta = (b32 @ a32).T  # [num, dim]
    else:
        delta = b32 @ a32  # [out, in]
    return delta * np.float32(scale)


class FoldAdapterPass(LoraPass):
    """Add one adapter's ``scale * B @ A`` to the weight of the base op each slot branch joins.

    Attributes:
        weights: ``{module: (A, B, scale)}`` in PEFT layout (one adapter, padding removed).
        branches: the package graph's slot branches (:func:`find_slot_branches` on this model).

    Requires: every module of ``weights`` has a branch whose base op (MatMul, Gemm, Conv or
    Gather with a constant weight) is found, and the delta has that weight's shape.
    Ensures: each of those base ops reads its merged weight. The branches stay (strip them next).
    """

    def __init__(self, weights: dict[str, tuple[np.ndarray, np.ndarray, float]], branches: list[SlotBranch]):
        super().__init__()
        self.weights = weights
        self.branches = {b.module: b for b in branches}

    def _base(self, module: str) -> ir.Node:
        branch = self.branches.get(module)
        base = branch.base_node() if branch is not None else None
        if base is None:
            raise AdapterError(f"cannot find the base op of module {module!r} in the package graph")
        if base.op_type not in _KIND:
            raise AdapterError(f"module {module!r}: cannot merge into a {base.op_type} base op")
        return base

    def requires(self, model: ir.Model) -> None:
        for module in self.weights:
            if self._base(module).graph is not model.graph:
                raise AdapterError(f"module {module!r}: its slot branch belongs to another graph")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        used_names: set[str] = set(model.graph.initializers)
        for module, (a, b, scale) in self.weights.items():
            base = self._base(module)
            _fold(model.graph, base, delta_weight(_KIND[base.op_type], a, b, scale), module, used_names)
        logger.info("folded %d modules into their base weights", len(self.weights))
        return ir.passes.PassResult(model, modified=bool(self.weights))

    def ensures(self, model: ir.Model) -> None:
        for module in self.weights:
            base = self._base(module)
            weight = base.inputs[0 if base.op_type == "Gather" else 1]
            if weight is None or not weight.is_initializer() or _MERGED not in (weight.name or ""):
                raise AdapterError(f"module {module!r}: its base op does not read the merged weight")


def _fold(graph: ir.Graph, base: ir.Node, delta: np.ndarray, module: str, used_names: set[str]) -> None:
    index = 0 if base.op_type == "Gather" else 1
    value = base.inputs[index]
    weight = eval_constant_subgraph(value)
    if base.op_type == "MatMul":
        delta = delta.T  # [in, out]
    elif base.op_type == "Gemm" and not base.attributes.get_int("transB", 0):
        delta = delta.T
    if weight.shape != delta.shape:
        raise AdapterError(f"module {module!r}: base weight {list(weight.shape)} vs delta {list(delta.shape)}")
    merged = (weight.astype(np.float32) + delta).astype(weight.dtype)
    stem = f"{value.name if value.is_initializer() else module + '.weight'}{_MERGED}"
    name, i = stem, 1
    while name in used_names:  # a weight shared by several adapted modules gets one copy each
        name, i = f"{stem}.{i}", i + 1
    used_names.add(name)
    new = ir.Value(name=name, shape=ir.Shape(merged.shape), type=ir.TensorType(ir.DataType.from_numpy(merged.dtype)),
                   const_value=ir.tensor(merged, name=name))
    graph.register_initializer(new)
    base.replace_input_with(index, new)
