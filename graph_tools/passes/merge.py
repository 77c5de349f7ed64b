"""Fold one adapter into the base weights: a plain ONNX model, fastest for one-adapter serving.

Before: ``Add(base(x, W), scale * B(A(x)))`` with A, B fed from slots.
After:  ``base(x, W + scale * B @ A)`` (in the base op's layout); all branches removed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graph_tools.adapters import files
from graph_tools.adapters.compose import unpack_tensors, weights_from_slot_tensors
from graph_tools.adapters.package import load_package
from graph_tools.errors import AdapterError
from graph_tools.lora import find_lora_sites
from graph_tools.passes._weights import materialize
from graph_tools.passes.strip import StripLoraPass, save_model_to

__all__ = ["merge_adapter", "delta_weight"]

logger = logging.getLogger(__name__)


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


def merge_adapter(package_dir: str | os.PathLike, adapter: str, out_path: str | os.PathLike) -> Path:
    """Write ``out_path``: the package's base graph with ``adapter`` folded into the weights."""
    package = load_package(package_dir)
    path = package.adapter_path(adapter)
    packs = list((package.manifest.extra or {}).get("packs") or [])
    tensors = unpack_tensors(packs, files.read_adapter(path))
    weights = weights_from_slot_tensors(package.manifest.slots, tensors, path)
    model = ir.load(package.model_path)
    sites = find_lora_sites(model)
    by_module = {s.module: s for s in sites}
    nodes = {n.name: n for n in model.graph}
    for module, (a, b, scale) in weights.items():
        site = by_module.get(module)
        if site is None:
            raise AdapterError(f"adapter {adapter!r}: module {module!r} has no LoRA site in the package graph")
        _fold(model.graph, nodes[site.base_node], site.kind, delta_weight(site.kind, a, b, scale), module)
    StripLoraPass(sites)(model)
    out = save_model_to(model, out_path)
    logger.info("merged adapter %r (%d modules) into %s", adapter, len(weights), out)
    return out


def _fold(graph: ir.Graph, base: ir.Node, kind: str, delta: np.ndarray, module: str) -> None:
    index = 0 if base.op_type == "Gather" else 1
    value = base.inputs[index]
    if base.op_type not in ("MatMul", "Gemm", "Conv", "Gather"):
        raise AdapterError(f"module {module!r}: cannot merge into a {base.op_type} base op")
    weight = materialize(value)
    if base.op_type == "MatMul":
        delta = delta.T  # [in, out]
    elif base.op_type == "Gemm" and not base.attributes.get_int("transB", 0):
        delta = delta.T
    if weight.shape != delta.shape:
        raise AdapterError(f"module {module!r}: base weight {list(weight.shape)} vs delta {list(delta.shape)}")
    merged = (weight.astype(np.float32) + delta).astype(weight.dtype)
    name = value.name if value.is_initializer() else f"{module}.merged_weight"
    new = ir.Value(name=f"{name}.merged", shape=ir.Shape(merged.shape), type=ir.TensorType(ir.DataType.from_numpy(merged.dtype)),
                   const_value=ir.tensor(merged, name=f"{name}.merged"))
    graph.register_initializer(new)
    base.replace_input_with(index, new)
