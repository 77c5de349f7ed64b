"""The exporter's graph edits as onnx-ir passes, run by :func:`export_passes` with
``ir.passes.Sequential`` on the graph ``torch.onnx.export(dynamo=True, optimize=False)`` returns.

Order (each pass's docstring sketches its before/after)::

    RestoreNamesPass           peft_model.base_model.model.q.lora_A.default.weight -> base_model.model.q.lora_A.default.weight
    FoldWeightTransposesPass   Transpose(W) -> W' (lazy, W's name); LoRA weights keep their Transpose
    optimizer_passes()         onnxscript's optimize_ir list, minus what would merge LoRA weights/scales
    AnnotateLoraSitesPass      lora_onnx.module / adapter / role metadata on every LoRA node
    DropStackTracesPass        no pkg.torch.onnx.stack_trace (machine paths) on any node

Graph work only (onnx-ir, onnxscript, graph_tools); no torch.
"""

from __future__ import annotations

import logging
from typing import Collection

import numpy as np
import onnx_ir as ir

from graph_tools.errors import ExportError
from graph_tools.lora import META_ADAPTER, META_MODULE, META_ROLE, LoraSite, find_lora_sites, naming
from graph_tools.passes._base import LoraPass

__all__ = [
    "RestoreNamesPass",
    "FoldWeightTransposesPass",
    "AnnotateLoraSitesPass",
    "DropStackTracesPass",
    "optimizer_passes",
    "export_passes",
    "is_lora_weight",
]

logger = logging.getLogger(__name__)

STACK_TRACE = "pkg.torch.onnx.stack_trace"


def is_lora_weight(value: ir.Value | None) -> bool:
    """A LoRA A/B weight or per-site scale, by its PEFT name (after :class:`RestoreNamesPass`)."""
    return value is not None and naming.parse_lora_weight_name(value.name or "") is not None


class RestoreNamesPass(LoraPass):
    """Drop the export wrapper's prefix so initializers carry the model's state-dict names.

    Before: ``peft_model.base_model.model.q_proj.base_layer.weight`` (torch.export names
    parameters by their path from the wrapper module). After: ``base_model.model.q_proj.base_layer.weight``.
    """

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        renamed = 0
        for value in list(graph.initializers.values()):
            name = value.name or ""
            if name.startswith(self.prefix):
                graph.initializers.pop(name)
                value.name = name[len(self.prefix) :]
                graph.register_initializer(value)
                renamed += 1
        return ir.passes.PassResult(model, modified=bool(renamed))

    def ensures(self, model: ir.Model) -> None:
        left = [n for n in model.graph.initializers if n.startswith(self.prefix)]
        if left:
            raise ExportError(f"initializer {left[0]!r} still carries the export wrapper's prefix")


class FoldWeightTransposesPass(LoraPass):
    """Fold the Transpose torch.export puts on a base weight into the weight itself.

    Before: ``W [out, in] -> Transpose(perm=[1, 0]) -> MatMul``.
    After:  ``W' [in, out] -> MatMul`` where ``W'`` keeps ``W``'s name, is transposed lazily (at
    save time, ``ir.LazyTensor``) and records the perm in ``lora_onnx.transposed`` metadata.
    LoRA weights (:func:`is_lora_weight`) keep PEFT's layout behind their Transpose (cheap at rank
    r) so a PEFT checkpoint maps onto them by name; a weight read by several nodes is left as is.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded = 0
        for node in list(graph):
            if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
                continue
            src = node.inputs[0]
            if src is None or not src.is_initializer() or is_lora_weight(src) or src.is_graph_input():
                continue
            if len(src.uses()) != 1 or src.const_value is None:
                continue
            perm = tuple(node.attributes.get_ints("perm", None) or reversed(range(len(src.shape))))
            tensor = src.const_value
            shape = ir.Shape([tensor.shape[i] for i in perm])
            lazy = ir.LazyTensor(_transposer(tensor, perm), dtype=tensor.dtype, shape=shape, name=src.name)
            name = src.name
            graph.initializers.pop(name)
            weight = ir.Value(name=name, shape=shape, type=ir.TensorType(tensor.dtype), const_value=lazy)
            weight.metadata_props["lora_onnx.transposed"] = ",".join(map(str, perm))
            ir.convenience.replace_all_uses_with(node.outputs[0], weight)
            graph.remove(node, safe=True)
            graph.register_initializer(weight)
            folded += 1
        logger.debug("folded %d weight transposes", folded)
        return ir.passes.PassResult(model, modified=bool(folded))


def _transposer(tensor: ir.TensorProtocol, perm: tuple[int, ...]):
    def make():
        return ir.Tensor(np.ascontiguousarray(np.transpose(tensor.numpy(), perm)), dtype=tensor.dtype)

    return make


def optimizer_passes() -> ir.passes.Sequential:
    """onnxscript's ``optimize_ir`` pass list, minus initializer deduplication (it would share one
    scale initializer between LoRA sites) and subgraph-initializer lifting (exported LoRA graphs
    have none); constant folding never folds a LoRA weight or scale into its consumer.
    tests/test_drift.py fails when onnxscript's list changes."""
    from onnx_ir.passes import common as common_passes
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    def should_fold(node: ir.Node) -> bool | None:
        return False if any(is_lora_weight(v) for v in node.inputs) else None

    return ir.passes.Sequential(
        common_passes.InlinePass(),
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True,
                    input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                    output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                    should_fold=should_fold,
                ),
                rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES),
                common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedFunctionsPass(),
                common_passes.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1024),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )


class AnnotateLoraSitesPass(LoraPass):
    """Find the LoRA sites and label their nodes; every branch PEFT has must be one.

    Before: ``MatMul -> MatMul -> Mul -> Add`` (a LoRA branch, unlabeled).
    After:  the same nodes with ``lora_onnx.module`` / ``lora_onnx.adapter`` / ``lora_onnx.role``
    (``lora_A``, ``lora_B``, ``lora_scale``, ``lora_add``; the base op: ``base``).
    :attr:`sites` holds what was found. ``expected``: the ``(module, adapter)`` pairs the PEFT
    model has; one missing is an :class:`ExportError` (the exporter folded a branch away).
    """

    def __init__(self, expected: Collection[tuple[str, str]] = ()):
        super().__init__()
        self.expected = set(expected)
        self.sites: list[LoraSite] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.sites = find_lora_sites(model)
        missing = sorted(self.expected - {s.key for s in self.sites})
        if missing:
            raise ExportError(
                f"{len(missing)} LoRA branches were not kept as branches in the exported graph "
                f"(first: module {missing[0][0]!r}, adapter {missing[0][1]!r}); was lora_B all zeros "
                "(folded away by the exporter)?"
            )
        annotate_sites(model, self.sites)
        return ir.passes.PassResult(model, modified=bool(self.sites))


def annotate_sites(model: ir.Model, sites: list[LoraSite]) -> None:
    """Write module/adapter/role metadata on every node of every site."""
    for site in sites:
        parts = site.require_parts(model.graph)
        roles = [("lora_A", parts.a), ("lora_B", parts.b), *(("lora_scale", n) for n in parts.scales), ("lora_add", parts.add)]
        for role, node in roles:
            node.metadata_props[META_MODULE] = site.module
            node.metadata_props[META_ADAPTER] = site.adapter
            node.metadata_props[META_ROLE] = role
        parts.base.metadata_props[META_MODULE] = site.module
        parts.base.metadata_props[META_ROLE] = "base"


class DropStackTracesPass(LoraPass):
    """Remove torch.onnx's stack-trace metadata (it holds the exporting machine's paths).

    Before: ``node.metadata_props = {"pkg.torch.onnx.stack_trace": "File /home/...", ...}``.
    After:  the same without that key.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        dropped = 0
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            dropped += node.metadata_props.pop(STACK_TRACE, None) is not None
        return ir.passes.PassResult(model, modified=bool(dropped))


def export_passes(prefix: str, expected: Collection[tuple[str, str]]) -> tuple[ir.passes.Sequential, AnnotateLoraSitesPass]:
    """The exporter's passes in order (see the module docstring) and the annotation pass whose
    ``sites`` the caller reads afterwards."""
    annotate = AnnotateLoraSitesPass(expected)
    passes = ir.passes.Sequential(
        RestoreNamesPass(prefix), FoldWeightTransposesPass(), optimizer_passes(), annotate, DropStackTracesPass()
    )
    return passes, annotate
