"""``LoraSite``: one adapted layer found in an ONNX graph, as a frozen, JSON-friendly record."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["LoraSite", "KINDS", "Dim"]

KINDS = ("linear", "conv", "embedding")

#: A dimension: a known size, a symbolic name (graph inputs with dynamic rank), or unknown.
Dim = int | str | None


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
        scale_value: name of the initializer/input holding the scale, ``None`` if folded/literal.
        base_node, a_node, b_node, add_node, scale_node: node names of the site's parts.
        base_weight: name of the base layer's weight value, if it is an initializer.
        labeled_by: ``names`` (PEFT weight names), ``metadata`` (node metadata) or ``structure``.
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

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("lora_a_perm", "lora_b_perm"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data

    @property
    def key(self) -> tuple[str, str]:
        return (self.module, self.adapter)
