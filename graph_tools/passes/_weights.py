"""Read the value of a weight operand: follow Transpose/Cast/Reshape/DequantizeLinear back to its
initializer and apply them with numpy. Only the bytes of that one tensor are read."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_tools.errors import AdapterError

__all__ = ["eval_constant_subgraph", "to_peft_layout"]


def eval_constant_subgraph(value: ir.Value | None, _depth: int = 0) -> np.ndarray:
    """The numpy array a constant-only subgraph computes for ``value``."""
    if value is None or _depth > 16:
        raise AdapterError("weight operand is not a constant expression")
    if value.const_value is not None and not (value.is_graph_input() and not value.is_initializer()):
        return value.const_value.numpy()
    node = value.producer()
    if node is None:
        raise AdapterError(f"weight {value.name!r} is a graph input without a value")
    op = node.op_type
    if op == "Constant":
        return node.attributes["value"].as_tensor().numpy()
    src = eval_constant_subgraph(node.inputs[0], _depth + 1)
    if op == "Identity":
        return src
    if op == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        return np.transpose(src, perm)
    if op == "Cast":
        to = ir.DataType(node.attributes.get_int("to"))
        return src.astype(to.numpy())
    if op == "Reshape":
        shape = [int(d) for d in eval_constant_subgraph(node.inputs[1], _depth + 1).reshape(-1)]
        shape = [src.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return src.reshape(shape)
    if op == "DequantizeLinear":
        scale = eval_constant_subgraph(node.inputs[1], _depth + 1)
        zp = eval_constant_subgraph(node.inputs[2], _depth + 1) if len(node.inputs) > 2 and node.inputs[2] is not None else 0
        axis = node.attributes.get_int("axis", 1)
        if np.ndim(scale) == 1 and src.ndim > 1:
            shape = [1] * src.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
            zp = np.reshape(zp, shape) if np.ndim(zp) == 1 else zp
        return ((src.astype(np.float32) - np.asarray(zp, np.float32)) * scale).astype(scale.dtype)
    raise AdapterError(f"weight {value.name!r} is computed by {op}, which extraction cannot evaluate")


def to_peft_layout(kind: str, role: str, effective: np.ndarray) -> np.ndarray:
    """Effective operand (as the op consumes it) -> PEFT's parameter layout.

    linear: A [in, r] -> [r, in], B [r, out] -> [out, r]; embedding: A [num, r] -> [r, num],
    B [r, out] -> [out, r]; conv: unchanged ([r, in/g, *k] and [out, r, *1]).
    """
    if kind == "conv":
        return np.ascontiguousarray(effective)
    return np.ascontiguousarray(effective.T)
