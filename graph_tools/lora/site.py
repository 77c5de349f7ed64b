"""``LoraSite``: one adapted layer found in an ONNX graph, as a frozen, JSON-friendly record.

A site found in a graph also holds the graph objects it was read from (``site.parts``: nodes
and values, never names), so passes find them on graphs whose nodes have no names or share
one. :func:`LoraSite.to_dict` is the JSON view: names only, ``""`` where the graph has none.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

__all__ = ["LoraSite", "SiteParts", "KINDS", "Dim"]

KINDS = ("linear", "conv", "embedding")

#: A dimension: a known size, a symbolic name (graph inputs with dynamic rank), or unknown.
Dim = int | str | None


@dataclasses.dataclass(frozen=True, eq=False)
class SiteParts:
    """The graph objects of one site (compared by identity).

    Attributes:
        base, a, b, add: the base op, the ops applying A and B, and the ``Add`` joining the branch.
        scales: the Mul/Div nodes applying the scale (empty when it is folded into B).
        a_value, b_value: the stored A and B (initializer, Constant output or graph input).
        scale_value: the named value holding the non-constant part of the scale, if any.
        base_index: which ``add`` input carries the base path (for a chained adapter: the
            previous adapter's ``Add`` output); see :attr:`base_input`.
    """

    base: ir.Node
    a: ir.Node
    b: ir.Node
    add: ir.Node
    scales: tuple[ir.Node, ...]
    a_value: ir.Value
    b_value: ir.Value
    scale_value: ir.Value | None = None
    base_index: int = 0

    @property
    def base_input(self) -> ir.Value:
        """The ``add`` input carrying the base path, as the graph is now."""
        return self.add.inputs[self.base_index]

    @property
    def graph(self) -> ir.Graph | None:
        return self.add.graph

    def lora_nodes(self) -> tuple[ir.Node, ...]:
        """The nodes that exist only for this branch (A, scales, B, Add)."""
        return (self.a, *self.scales, self.b, self.add)


@dataclasses.dataclass(frozen=True)
class LoraSite:
    """One LoRA branch ``y = base(x) + scale * B(A(x))`` of one adapter at one layer.

    Attributes:
        module: module path, e.g. ``model.layers.0.self_attn.q_proj`` (PEFT prefix removed).
        adapter: adapter name (``default`` ...), or ``adapter_<k>`` when the graph carries no names.
        kind: ``linear`` (MatMul/Gemm: nn.Linear, transformers Conv1D), ``conv`` or ``embedding``.
        rank: LoRA rank r (int, or the symbolic dim name when A/B are inputs with a dynamic rank).
        in_features, out_features: the layer's input/output features (channels, vocabulary size).
        lora_a, lora_b: names of the values holding A and B (initializer or graph input), as stored.
        lora_a_perm, lora_b_perm: Transpose the graph applies to the stored tensor before use
            (``None``: used as stored).
        scale: the branch's scale as a float when it is a constant, else the name of the value
            holding it (a graph input); 1.0 when it is folded into B.
        scale_factor: constant factor applied besides a named ``scale`` (``Mul(0.5)`` then
            ``Mul(s)``: scale ``"s"``, factor 0.5); the branch's scale is ``scale_factor * scale``.
        scale_value: name of the initializer/input holding the scale, ``None`` if folded/literal.
        base_node, a_node, b_node, add_node, scale_node: node names of the site's parts (labels
            only, ``""`` for unnamed nodes; passes use :attr:`parts`).
        base_weight: name of the base layer's weight value, if it is an initializer.
        labeled_by: ``names`` (PEFT weight names), ``metadata`` (node metadata) or ``structure``.
        parts: the site's nodes and values in the graph it was found in (not part of the JSON
            view, equality or hash).
    """

    module: str
    adapter: str
    kind: str
    rank: Dim
    in_features: Dim
    out_features: Dim
    lora_a: str
    lora_b: str
    scale: float | str
    base_node: str
    add_node: str
    a_node: str
    b_node: str
    scale_node: str | None = None
    scale_value: str | None = None
    lora_a_perm: tuple[int, ...] | None = None
    lora_b_perm: tuple[int, ...] | None = None
    base_weight: str | None = None
    labeled_by: str = "structure"
    scale_factor: float = 1.0
    parts: SiteParts | None = dataclasses.field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "parts"}
        for key in ("lora_a_perm", "lora_b_perm"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data

    @property
    def key(self) -> tuple[str, str]:
        return (self.module, self.adapter)

    def detached(self) -> "LoraSite":
        """This record without :attr:`parts` (does not keep the graph alive)."""
        return dataclasses.replace(self, parts=None)

    def require_parts(self, graph: ir.Graph | None = None) -> SiteParts:
        """:attr:`parts`, checked to belong to ``graph`` (a site of another copy of the model
        cannot be applied to this one)."""
        from graph_tools.errors import AdapterError

        parts = self.parts
        if parts is None:
            raise AdapterError(f"site {self.module!r}/{self.adapter!r} carries no graph nodes; take sites from find_lora_sites on this model")
        if graph is not None and any(n.graph is not graph for n in (parts.base, parts.a, parts.b, parts.add)):
            raise AdapterError(f"site {self.module!r}/{self.adapter!r} belongs to another graph; take sites from find_lora_sites on this model")
        return parts
