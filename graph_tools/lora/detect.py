"""Find LoRA sites in any ONNX graph by structure.

A site is matched from its ``Add`` backwards::

    x ──> base op (MatMul | Gemm | Conv | Gather | MatMulNBits) [──> Add(bias)] ──┐
    │                                                                           Add ──> y
    └──> A op (MatMul | Gemm | Conv | Gather) ──> B op (MatMul | Gemm | Conv) ──┘
                     [Mul(scale) before or after B, or folded into B]

Between the parts we step over ops that do not change what a tensor means (Identity, Cast,
Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Dropout). Weights may be initializers, Constant
nodes or graph inputs, possibly behind Transpose/Cast/DequantizeLinear. The A op and the base op
must read the same input ``x``, A and B must agree on the rank, and the rank must be at most the
layer's in/out features: a factorized layer without an Add to a base path is not a site.

Names only label a site: PEFT weight names first, then node metadata (ours or torch.onnx's
name scopes), then the base weight's name, then TorchScript-style node names (``/m/q_proj/default/
MatMul``, aligned with state-dict names to recover skipped wrapper levels). Module paths lose
whatever wraps the PEFT model (``m.base_model.model.`` -> ``""``). With no names at all, sites
are labeled by position: module ``site_<k>``, adapter ``adapter_<i>`` (i-th branch on the layer).
An adapter the graph does not name (PEFT's embedding LoRA weights are parameters whose transposes
exporters fold into anonymous constants) takes the graph's only named adapter, if there is one.
Several adapters on one layer are chained Adds; each becomes its own site sharing ``base_node``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Iterable

import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:
    import onnx

from graph_tools._io import load_model
from graph_tools.lora import naming
from graph_tools.lora.site import Dim, LoraSite, SiteParts

__all__ = ["find_lora_sites", "META_MODULE", "META_ADAPTER", "META_ROLE"]

logger = logging.getLogger(__name__)

META_MODULE = "lora_onnx.module"
META_ADAPTER = "lora_onnx.adapter"
META_ROLE = "lora_onnx.role"

_PASSTHROUGH = frozenset({"Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Dropout"})
_WEIGHT_PASSTHROUGH = frozenset({"Identity", "Cast", "Transpose", "DequantizeLinear", "Reshape"})
_BASE_OPS = frozenset({"MatMul", "Gemm", "Conv", "Gather", "MatMulNBits"})
_A_OPS = frozenset({"MatMul", "Gemm", "Conv", "Gather"})
_B_OPS = frozenset({"MatMul", "Gemm", "Conv"})
_MAX_STEPS = 16
_UNNAMED = "adapter_"


@dataclasses.dataclass
class _Weight:
    source: ir.Value
    perm: tuple[int, ...] | None
    shape: tuple[Dim, ...] | None  # shape as the consuming op sees it


def find_lora_sites(model: ir.Model | onnx.ModelProto | str | os.PathLike) -> list[LoraSite]:
    """Return every LoRA site of a model (an ``ir.Model``, an ``onnx.ModelProto`` or a path), in
    graph order. Each site's :attr:`~LoraSite.parts` are nodes of the graph read: of ``model``
    itself when it is an ``ir.Model``."""
    return _Detector(load_model(model).graph).run()


class _Detector:
    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.site_of_add: dict[ir.Value, tuple[ir.Node, int]] = {}  # add output -> (base node, branches)
        self._anonymous: dict[ir.Node, str] = {}
        self._unnamed: set[int] = set()  # ids of sites whose adapter the graph does not name
        self._scope_map: dict[tuple[str, ...], tuple[str, ...]] | None = None

    def run(self) -> list[LoraSite]:
        sites: list[LoraSite] = []
        for node in self.graph:
            if node.op_type not in ("Add", "Sum") or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
                continue
            site = self._match_add(node)
            if site is not None:
                sites.append(site)
        sites = _name_unlabeled(sites, [id(s) in self._unnamed for s in sites])
        logger.info("found %d LoRA sites", len(sites))
        return sites

    # -- labels -----------------------------------------------------------------------------
    def _label(self, a_node, a_w, b_w, base_node) -> tuple[str | None, str | None, str]:
        """``(module, adapter, labeled_by)``; ``None`` where the graph does not tell."""
        for name in (a_w.source.name, b_w.source.name):
            parsed = naming.parse_lora_weight_name(name or "")
            if parsed is not None:
                # ``<module>.lora_A.weight`` (PEFT checkpoint keys, our slots) names no adapter
                adapter = parsed[1] if parsed[1] != "weight" else None
                return _module_label(parsed[0]), adapter, "names"
        meta = a_node.metadata_props
        if META_MODULE in meta and META_ADAPTER in meta:
            return meta[META_MODULE], meta[META_ADAPTER], "metadata"
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        if scopes:
            for scope in _parse_scope_list(scopes):
                parsed = naming.parse_scope(scope)
                if parsed is not None:
                    return _module_label(parsed[0]), parsed[1], "metadata"
        module = None
        base_w = _base_weight_name(base_node)
        if base_w:
            module = naming.module_from_base_weight(base_w)
        if module:
            return _module_label(module), self._scope_adapter(a_node, base_node), "names"
        scoped = self._scope_label(a_node, base_node)
        if scoped is not None:
            return scoped[0], scoped[1], "names"
        return None, None, "structure"

    def _anonymous_module(self, base_node: ir.Node) -> str:
        if base_node not in self._anonymous:
            self._anonymous[base_node] = f"site_{len(self._anonymous)}"
        return self._anonymous[base_node]

    def _scope_adapter(self, a_node: ir.Node, base_node: ir.Node) -> str | None:
        split = _split_scopes(a_node, base_node)
        return split[1] if split is not None else None

    def _scope_label(self, a_node: ir.Node, base_node: ir.Node) -> tuple[str, str | None] | None:
        """Label from TorchScript-style node names ``/m/model/layers.0/q_proj/default/MatMul``.

        Such scopes list the *called* modules, which may skip wrappers (PEFT's ``LoraModel``);
        the skipped levels are recovered by aligning node scopes with the state-dict names of
        the initializers those nodes read (``_scope_prefixes``).
        """
        split = _split_scopes(a_node, base_node)
        if split is None:
            return None
        module_scope, adapter = split
        comps = tuple(c for part in module_scope for c in part.split("."))
        if self._scope_map is None:
            self._scope_map = _scope_prefixes(self.graph)
        for n in range(len(comps), -1, -1):
            if comps[:n] in self._scope_map:
                comps = self._scope_map[comps[:n]] + comps[n:]
                break
        if not comps:
            return None
        return _module_label(".".join(comps)), adapter

    # -- matching ---------------------------------------------------------------------------
    def _match_add(self, add: ir.Node) -> LoraSite | None:
        p, q = add.inputs
        if p is None or q is None:
            return None
        for base_index, (base_side, branch_side) in enumerate(((p, q), (q, p))):
            branch = self._match_branch(branch_side)
            if branch is None:
                continue
            base = self._match_base(base_side)
            if base is None:
                continue
            base_node, prior = base
            a_node, a_w, b_node, b_w, scale, x_root = branch
            if _strip(_data_input(base_node)) is not x_root:
                continue
            shapes = _site_shapes(a_node, a_w, b_node, b_w)
            if shapes is None:
                continue
            kind, rank, in_f, out_f, fan_in = shapes
            if not _plausible(rank, fan_in, out_f, base_node):
                continue
            self.site_of_add[add.outputs[0]] = (base_node, prior + 1)
            module, adapter, labeled_by = self._label(a_node, a_w, b_w, base_node)
            if module is None:
                module = base_node.name or self._anonymous_module(base_node)
            parts = SiteParts(base=base_node, a=a_node, b=b_node, add=add, scales=scale.nodes,
                              a_value=a_w.source, b_value=b_w.source, scale_value=scale.named,
                              base_index=base_index)
            site = LoraSite(
                module=module,
                adapter=adapter or f"{_UNNAMED}{prior}",
                kind=kind,
                rank=rank,
                in_features=in_f,
                out_features=out_f,
                lora_a=a_w.source.name or "",
                lora_b=b_w.source.name or "",
                lora_a_perm=a_w.perm,
                lora_b_perm=b_w.perm,
                scale=scale.named.name if scale.named is not None else scale.factor,
                scale_factor=scale.factor if scale.named is not None else 1.0,
                scale_value=scale.value_name,
                scale_node=scale.nodes[0].name if scale.nodes else None,
                base_node=base_node.name or "",
                add_node=add.name or "",
                a_node=a_node.name or "",
                b_node=b_node.name or "",
                base_weight=_base_weight_name(base_node),
                labeled_by=labeled_by,
                parts=parts,
            )
            if adapter is None and labeled_by != "structure":
                self._unnamed.add(id(site))
            return site
        return None

    def _match_branch(self, value: ir.Value):
        """``(a_node, a_w, b_node, b_w, scale, x)`` of a branch ending in ``value``, else None."""
        value, after_b = _strip_scales(value)
        b_node = value.producer() if value is not None else None
        if b_node is None or b_node.op_type not in _B_OPS or b_node.domain not in ("", "ai.onnx"):
            return None
        b_w = _weight_of(b_node)
        if b_w is None:
            return None
        inner, before_b = _strip_scales(_data_input(b_node))
        scale = _Scale.of(after_b + before_b)
        if scale is None:
            return None
        a_node = inner.producer() if inner is not None else None
        if a_node is None or a_node.op_type not in _A_OPS or a_node.domain not in ("", "ai.onnx"):
            return None
        a_w = _weight_of(a_node)
        if a_w is None:
            return None
        x_root = _strip(_data_input(a_node))
        return a_node, a_w, b_node, b_w, scale, x_root

    def _match_base(self, value: ir.Value) -> tuple[ir.Node, int] | None:
        for _ in range(_MAX_STEPS):
            if value in self.site_of_add:
                return self.site_of_add[value]
            node = value.producer()
            if node is None:
                return None
            if node.op_type in _BASE_OPS and _weight_of(node) is not None:
                return node, 0
            if node.op_type in _PASSTHROUGH and node.inputs and node.inputs[0] is not None:
                value = node.inputs[0]
                continue
            if node.op_type == "Add" and len(node.inputs) == 2:  # bias
                a, b = node.inputs
                if b is not None and _weight_source(b) is not None:
                    value = a
                    continue
                if a is not None and _weight_source(a) is not None:
                    value = b
                    continue
            return None
        return None


# -- helpers -----------------------------------------------------------------------------------
def _data_input(node: ir.Node) -> ir.Value | None:
    if node.op_type == "Gather":
        return node.inputs[1]
    return node.inputs[0]


def _weight_input(node: ir.Node) -> ir.Value | None:
    if node.op_type == "Gather":
        return node.inputs[0]
    return node.inputs[1] if len(node.inputs) > 1 else None


def _strip(value: ir.Value | None) -> ir.Value | None:
    for _ in range(_MAX_STEPS):
        if value is None:
            return None
        node = value.producer()
        if node is None or node.op_type not in _PASSTHROUGH or not node.inputs:
            return value
        value = node.inputs[0]
    return value


def _weight_source(value: ir.Value | None) -> _Weight | None:
    """Follow a weight operand back to an initializer, Constant or graph input."""
    perm: list[int] | None = None
    for _ in range(_MAX_STEPS):
        if value is None:
            return None
        if value.is_initializer() or value.is_graph_input() or value.const_value is not None:
            shape = _dims(value)
            if perm is not None and shape is not None and len(perm) == len(shape):
                shape = tuple(shape[i] for i in perm)
            return _Weight(value, tuple(perm) if perm is not None else None, shape)
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Constant":
            value = node.outputs[0]
            if value.const_value is None:
                attr = node.attributes.get("value")
                if attr is None:
                    return None
                value.const_value = attr.as_tensor()
            continue
        if node.op_type not in _WEIGHT_PASSTHROUGH or not node.inputs:
            return None
        if node.op_type == "Transpose":
            p = node.attributes.get_ints("perm", None)
            if p is None:
                return None
            p = list(p)
            # composing: out = transpose(in, p); accumulated perm maps source dims to final dims
            perm = p if perm is None else [p[i] for i in perm]
        elif node.op_type == "Reshape":
            return None if _dims(node.outputs[0]) is None else _reshape_weight(node, perm)
        value = node.inputs[0]
    return None


def _reshape_weight(node: ir.Node, perm) -> _Weight | None:
    src = _weight_source(node.inputs[0])
    if src is None or perm is not None:
        return None
    return _Weight(src.source, src.perm, _dims(node.outputs[0]))


def _weight_of(node: ir.Node) -> _Weight | None:
    w = _weight_source(_weight_input(node))
    if w is None:
        return None
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) and w.shape is not None and len(w.shape) == 2:
        w = _Weight(w.source, w.perm, (w.shape[1], w.shape[0]))
    return w


def _dims(value: ir.Value) -> tuple[Dim, ...] | None:
    shape = value.shape
    if shape is None and value.const_value is not None:
        shape = value.const_value.shape
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None) for d in shape)


def _scalar(value: ir.Value) -> float | str | None:
    """A scale operand: a float for size-1 constants, the name for graph inputs that are scalars
    or per-rank vectors (lora-onnx slots: ``<module>.lora_scale`` [r], possibly reshaped/quantized)."""
    w = _weight_source(value)
    if w is None:
        return None
    src = w.source
    shape = _dims(src)
    if shape is not None and any(d not in (1,) for d in shape):
        if src.is_graph_input() and len(shape) == 1:
            return src.name  # per-rank scale vector slot
        return None
    if src.const_value is not None and not src.is_graph_input():
        arr = src.const_value.numpy()
        if arr.size != 1 or not np.issubdtype(arr.dtype, np.floating):
            return None
        return float(arr.reshape(()))
    if shape is None:
        return None
    return src.name


def _strip_scales(value: ir.Value | None):
    """Step back over passthrough ops and Mul/Div by scalars; return (value, [(factor, node, factor value)])."""
    found: list[tuple[float | str, ir.Node, ir.Value]] = []
    for _ in range(_MAX_STEPS):
        node = value.producer() if value is not None else None
        if node is None:
            return value, found
        if node.op_type in _PASSTHROUGH and node.op_type != "Transpose" and node.inputs:
            value = node.inputs[0]
            continue
        matched = _match_scale_node(node) if node.op_type in ("Mul", "Div") else None
        if matched is None:
            return value, found
        value, factor, factor_value = matched
        found.append((factor, node, factor_value))
    return value, found


def _match_scale_node(node: ir.Node):
    if len(node.inputs) != 2 or None in node.inputs:
        return None
    a, b = node.inputs
    orders = ((a, b), (b, a)) if node.op_type == "Mul" else ((a, b),)
    for data, factor_value in orders:
        s = _scalar(factor_value)
        if s is None:
            continue
        if node.op_type == "Div":
            if isinstance(s, str) or s == 0:
                return None
            s = 1.0 / s
        return data, s, factor_value
    return None


def _is_named_scale(value: ir.Value) -> bool:
    w = _weight_source(value)
    return w is not None and (w.source.is_initializer() or w.source.is_graph_input())


@dataclasses.dataclass(frozen=True)
class _Scale:
    """A branch's scale: ``factor`` (product of the constant factors) times ``named`` (the one
    value that is not a constant: a graph input, or ``None``)."""

    factor: float
    named: ir.Value | None
    nodes: tuple[ir.Node, ...]
    value_name: str | None  # first factor held by an initializer/input (what strip may drop)

    @staticmethod
    def of(found) -> "_Scale | None":
        """Combine the factors found around B; None when two or more are not constants (their
        product is not one value a slot can hold, so this is not a site we can prove)."""
        factor, named, value_name = 1.0, None, None
        for f, _node, f_value in found:
            if value_name is None and _is_named_scale(f_value):
                value_name = f_value.name
            if isinstance(f, str):
                if named is not None:
                    logger.debug("branch scaled by two non-constant values (%s, %s): not a site", named.name, f)
                    return None
                named = _weight_source(f_value).source
            else:
                factor *= f
        return _Scale(float(factor), named, tuple(n for _, n, _ in found), value_name)


def _site_shapes(a_node, a_w: _Weight, b_node, b_w: _Weight):
    a_shape, b_shape = a_w.shape, b_w.shape
    if a_shape is None or b_shape is None:
        return None
    op = a_node.op_type
    if op == "Gather":
        if len(a_shape) != 2 or b_node.op_type not in ("MatMul", "Gemm") or len(b_shape) != 2:
            return None
        kind, in_f, rank_a = "embedding", a_shape[0], a_shape[1]
        rank_b, out_f = b_shape
        fan_in = in_f
    elif op == "Conv":
        if b_node.op_type != "Conv" or len(a_shape) < 3 or len(b_shape) < 3:
            return None
        groups = a_node.attributes.get_int("group", 1)
        kind, rank_a = "conv", a_shape[0]
        in_f = a_shape[1] * groups if isinstance(a_shape[1], int) else a_shape[1]
        out_f, rank_b = b_shape[0], b_shape[1]
        # A sees C_in * kernel area numbers per output: a stem conv on RGB takes r up to 27 (3x3)
        kernel = a_shape[2:]
        fan_in = in_f * int(np.prod(kernel)) if isinstance(in_f, int) and all(isinstance(k, int) for k in kernel) else None
    else:
        if b_node.op_type not in ("MatMul", "Gemm") or len(a_shape) != 2 or len(b_shape) != 2:
            return None
        kind, (in_f, rank_a), (rank_b, out_f) = "linear", a_shape, b_shape
        fan_in = in_f
    if isinstance(rank_a, int) and isinstance(rank_b, int) and rank_a != rank_b:
        return None
    rank = rank_a if rank_a is not None else rank_b
    if rank == 0:
        rank = rank_b
    return kind, rank, in_f, out_f, fan_in


def _plausible(rank: Dim, fan_in: Dim, out_f: Dim, base_node: ir.Node) -> bool:
    """The rank is at most what A reads (in features; for convs C_in * kernel area) and what B
    writes, and the branch's output features are the base op's."""
    if isinstance(rank, int):
        for feat in (fan_in, out_f):
            if isinstance(feat, int) and rank > feat:
                return False
    base_out = _dims(base_node.outputs[0])
    if base_out and isinstance(out_f, int) and base_node.op_type != "Conv":
        last = base_out[-1]
        if isinstance(last, int) and last != out_f:
            return False
    return True


def _base_weight_name(node: ir.Node) -> str | None:
    w = _weight_of(node)
    return w.source.name if w is not None else None


def _parse_scope_list(text: str) -> Iterable[str]:
    import ast

    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return reversed([s for s in scopes if isinstance(s, str)])


def _module_label(module: str) -> str:
    """Drop whatever wraps the PEFT model: ``m.base_model.model.x.q_proj`` -> ``x.q_proj``."""
    module = naming.strip_peft_prefix(module)
    idx = module.find("." + naming.PEFT_PREFIX)
    if idx >= 0:
        module = naming.strip_peft_prefix(module[idx + 1 :])
    return module


def _node_scope(node: ir.Node) -> list[str] | None:
    """``/m/model/q_proj/default/MatMul`` -> ``["m", "model", "q_proj", "default"]``."""
    name = node.name or ""
    if not name.startswith("/") or name.count("/") < 2:
        return None
    return name.split("/")[1:-1]


def _split_scopes(a_node: ir.Node, base_node: ir.Node) -> tuple[list[str], str | None] | None:
    """Module scope (common to base and A) and the adapter (A's extra scope level, if one)."""
    a_scope, base_scope = _node_scope(a_node), _node_scope(base_node)
    if not a_scope or not base_scope:
        return None
    common = 0
    while common < min(len(a_scope), len(base_scope)) and a_scope[common] == base_scope[common]:
        common += 1
    if common == 0:
        return None
    rest = a_scope[common:]
    if rest and rest[0] in ("lora_A", "lora_embedding_A"):
        rest = rest[1:]
    adapter = rest[0] if len(rest) == 1 else None
    return a_scope[:common], adapter


def _scope_prefixes(graph: ir.Graph) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Map scope prefixes to state-dict prefixes, learned from nodes reading named initializers.

    A node ``/m/model/layers.0/norm/Mul`` reading ``m.base_model.model.layers.0.norm.weight``
    aligns from the end (``norm``, ``0``, ``layers``, ``model``) and teaches ``(m,)`` ->
    ``(m, base_model)``. The most frequent mapping wins per prefix.
    """
    votes: dict[tuple[str, ...], dict[tuple[str, ...], int]] = {}
    for node in graph:
        scope = _node_scope(node)
        if not scope:
            continue
        s_comps = [c for part in scope for c in part.split(".")]
        for value in node.inputs:
            if value is None or not value.is_initializer() or "." not in (value.name or ""):
                continue
            n_comps = value.name.split(".")[:-1]
            i, j = len(s_comps), len(n_comps)
            while i > 0 and j > 0 and s_comps[i - 1] == n_comps[j - 1]:
                i, j = i - 1, j - 1
            if i == len(s_comps) or (i == 0 and j == 0):
                continue  # nothing in common, or nothing to map
            counts = votes.setdefault(tuple(s_comps[:i]), {})
            counts[tuple(n_comps[:j])] = counts.get(tuple(n_comps[:j]), 0) + 1
    return {k: max(v.items(), key=lambda kv: kv[1])[0] for k, v in votes.items()}


def _name_unlabeled(sites: list[LoraSite], unnamed: list[bool]) -> list[LoraSite]:
    """Name the adapter of sites the graph left unnamed when the graph has exactly one adapter.

    E.g. PEFT's embedding LoRA weights are parameters, not modules, and exporters fold their
    transposes into anonymous constants: the site's module is known, its adapter is not. If
    every named site uses one adapter and the unnamed site is alone on its layer, it is that one.
    """
    named = {s.adapter for s, u in zip(sites, unnamed) if s.labeled_by != "structure" and not u}
    if len(named) != 1 or not any(unnamed):
        return sites
    (adapter,) = named
    per_module: dict[str, int] = {}
    for s in sites:
        per_module[s.module] = per_module.get(s.module, 0) + 1
    return [
        dataclasses.replace(s, adapter=adapter) if u and per_module[s.module] == 1 else s
        for s, u in zip(sites, unnamed)
    ]
