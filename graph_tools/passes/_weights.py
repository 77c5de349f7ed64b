"""Read the value of a weight operand: follow Transpose/Cast/Reshape/DequantizeLinear back to its
initializer and apply them with numpy. Only the bytes of that one tensor are read."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_tools.errors import AdapterError

__all__ = ["eval_constant_subgraph", "to_peft_layout", "SharedMapping"]


#: types onnx-ir reads with a plain ``frombuffer`` (no sub-byte unpacking)
_WHOLE_BYTES = frozenset(d for d in ir.DataType if d not in (ir.DataType.UNDEFINED, ir.DataType.STRING) and d.bitwidth % 8 == 0)


class SharedMapping:
    """Reads external tensors through one memory map per data file.

    ``ExternalTensor.numpy()`` checks the path (containment, symlinks, hard links) and maps the
    whole file again for every tensor: 616 LoRA tensors of a 2 GiB file spent more time there than
    in reading. Here the first tensor of each file goes through ``numpy()`` (all of onnx-ir's
    checks, its map); the file's other tensors are views of that same map at their offsets, read
    as onnx-ir reads them (little-endian ``frombuffer``). Same path, same checks: they depend on
    the base folder and location only. Sub-byte types, empty and invalidated tensors: ``numpy()``."""

    def __init__(self) -> None:
        self._maps: dict[tuple[str, str], object] = {}

    def array(self, tensor: ir.TensorProtocol) -> np.ndarray:
        if (not isinstance(tensor, ir.ExternalTensor) or not tensor.valid() or tensor.size == 0
                or tensor.dtype not in _WHOLE_BYTES):
            return tensor.numpy()
        key = (str(tensor.base_dir), tensor.location)
        raw = self._maps.get(key)
        if raw is None:
            array = tensor.numpy()
            if tensor.raw is not None:
                self._maps[key] = tensor.raw
            return array
        dtype = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
        return np.frombuffer(raw, dtype=dtype, offset=tensor.offset or 0, count=tensor.size).reshape(tensor.shape.numpy())


def eval_constant_subgraph(value: ir.Value | None, _depth: int = 0, *, mapping: SharedMapping | None = None) -> np.ndarray:
    """The numpy array a constant-only subgraph computes for ``value`` (external tensors read
    through ``mapping`` when given)."""
    if value is None or _depth > 16:
        raise AdapterError("weight operand is not a constant expression")
    if value.const_value is not None and not (value.is_graph_input() and not value.is_initializer()):
        return mapping.array(value.const_value) if mapping is not None else value.const_value.numpy()
    node = value.producer()
    if node is None:
        raise AdapterError(f"weight {value.name!r} is a graph input without a value")
    op = node.op_type
    if op == "Constant":
        return node.attributes["value"].as_tensor().numpy()
    src = eval_constant_subgraph(node.inputs[0], _depth + 1, mapping=mapping)
    if op == "Identity":
        return src
    if op == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        return np.transpose(src, perm)
    if op == "Cast":
        to = ir.DataType(node.attributes.get_int("to"))
        return src.astype(to.numpy())
    if op == "Reshape":
        shape = [int(d) for d in eval_constant_subgraph(node.inputs[1], _depth + 1, mapping=mapping).reshape(-1)]
        shape = [src.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return src.reshape(shape)
    if op == "DequantizeLinear":
        scale = eval_constant_subgraph(node.inputs[1], _depth + 1, mapping=mapping)
        zp = eval_constant_subgraph(node.inputs[2], _depth + 1, mapping=mapping) if len(node.inputs) > 2 and node.inputs[2] is not None else 0
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
