"""QDQ graph building: quantized weights, activation Q/DQ pairs, quantized LoRA slots.

Used by :func:`graph_tools.quant.quantize`; the decisions (which encodings, which bit widths)
are made there and in :mod:`graph_tools.quant.scope`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_tools.errors import QuantizationError
from graph_tools.quant import encodings as enc

__all__ = ["QdqBuilder", "quantize_per_tensor"]


def quantize_per_tensor(x: np.ndarray, qtype) -> tuple[np.ndarray, float]:
    """Symmetric per-tensor quantization (zero point 0): ``(quantized, scale)``."""
    qmax = np.iinfo(qtype).max
    amax = float(np.max(np.abs(x))) if x.size else 0.0
    scale = amax / qmax if amax > 0 else 1.0
    return np.clip(np.round(x / scale), -qmax, qmax).astype(qtype), scale



class QdqBuilder:
    """Adds QuantizeLinear/DequantizeLinear pairs and quantized weights to one graph, in place.

    Activations get ``value -> Q -> DQ`` (every consumer reads the DQ output); their scale and
    zero point are constants (a shared encoding) or graph inputs with defaults (an encoding each
    adapter file feeds). Weights become ``DequantizeLinear(quantized initializer)`` under their
    own name; LoRA slots become quantized graph inputs plus a scale input.
    """

    def __init__(self, model: ir.Model, symmetric: bool):
        self.model = model
        self.graph = model.graph
        self.symmetric = symmetric
        self._counter = 0
        self._pending: list[ir.Node] = []
        self._values = {v.name: v for v in model.graph.inputs}
        for node in model.graph:
            for v in node.outputs:
                self._values.setdefault(v.name, v)

    def _const(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def _input(self, name: str, array: np.ndarray, shape) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        self.graph.inputs.append(value)
        self.graph.register_initializer(value)
        return value

    def act_params(self, lo: float, hi: float, qtype) -> tuple[float, int]:
        """Scale and zero point of range [lo, hi] (widened to include 0) in ``qtype``."""
        info = np.iinfo(qtype)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if self.symmetric or info.min < 0:
            amax = max(abs(lo), abs(hi))
            scale = amax / info.max if amax > 0 else 1.0
            zp = 0 if info.min < 0 else (info.max + 1) // 2
            return float(scale), int(zp)
        scale = (hi - lo) / (info.max - info.min) if hi > lo else 1.0
        zp = int(np.clip(round(info.min - lo / scale), info.min, info.max))
        return float(scale), zp

    def insert_act_qdq(self, name: str, lo: float, hi: float, qtype, *, as_inputs: bool):
        """Q -> DQ on activation ``name`` with range [lo, hi]; ``as_inputs``: scale and zero point
        are graph inputs (defaults: this range) named ``<name>.act_scale`` / ``.act_zero_point``."""
        self._pending = []
        value = self._find_value(name)
        scale, zp = self.act_params(lo, hi, qtype)
        if as_inputs:
            s_in = self._input(f"{name}.act_scale", np.array([scale], np.float32), [1])
            z_in = self._input(f"{name}.act_zero_point", np.array([zp], qtype), [1])
            shape0 = self._const(f"{name}.act_scalar_shape", np.array([], np.int64))
            s = self._node("Reshape", [s_in, shape0], name)
            z = self._node("Reshape", [z_in, shape0], name)
        else:
            s = self._const(f"{name}.act_scale", np.array(scale, np.float32))
            z = self._const(f"{name}.act_zero_point", np.array(zp, qtype))
        self._wrap(value, s, z)
        e = enc.from_quantize_linear(name, np.float32(scale), np.array(zp, qtype))
        return (s_in.name, z_in.name, e) if as_inputs else e

    def _node(self, op, inputs, tag, attributes=None):
        self._counter += 1
        node = ir.Node("", op, inputs, attributes=attributes or [], name=f"qdq/{tag}/{op}_{self._counter}")
        self._pending.append(node)
        return node.outputs[0]

    def _find_value(self, name: str) -> ir.Value:
        value = self._values.get(name)
        if value is not None:
            return value
        raise QuantizationError(f"tensor {name!r} not found in the graph")

    def _wrap(self, value: ir.Value, scale: ir.Value, zp: ir.Value) -> None:
        """value -> Q -> DQ; every consumer (and graph output) reads the DQ output, named as value."""
        uses = list(value.uses())
        pending = self._pending
        self._pending = []
        qn = ir.Node("", "QuantizeLinear", [value, scale, zp], name=f"qdq/{value.name}/Q")
        dq = ir.Node("", "DequantizeLinear", [qn.outputs[0], scale, zp], name=f"qdq/{value.name}/DQ")
        producer = value.producer()
        new_nodes = pending + [qn, dq]
        if producer is None:
            self.graph.insert_before(next(iter(self.graph)), new_nodes)
        else:
            self.graph.insert_after(producer, new_nodes)
        for use in uses:
            use.node.replace_input_with(use.idx, dq.outputs[0])
        original = value.name
        qn.outputs[0].name = f"{original}_quantized"
        dq.outputs[0].shape, dq.outputs[0].type = value.shape, value.type
        if value.is_graph_output():
            for i, o in enumerate(self.graph.outputs):
                if o is value:
                    self.graph.outputs[i] = dq.outputs[0]
            value.name = f"{original}_prequant"
            dq.outputs[0].name = original
        else:
            dq.outputs[0].name = f"{original}_dequant"

    def quantize_weight(self, value: ir.Value, qtype, axis: int | None):
        self._pending = []
        w = value.const_value.numpy().astype(np.float32)
        qmax = np.iinfo(qtype).max
        if axis is None:
            amax = np.array(np.max(np.abs(w)))
        else:
            amax = np.max(np.abs(w), axis=tuple(i for i in range(w.ndim) if i != axis))
        scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
        shape = [1] * w.ndim
        if axis is not None:
            shape[axis] = -1
        qw = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(qtype)
        attrs = [ir.AttrInt64("axis", axis)] if axis is not None else []
        self._dequantized_weight(value, qw, scale, attrs)
        return enc.from_quantize_linear(value.name, scale, np.zeros(scale.shape, qtype), axis=axis)

    def _dequantized_weight(self, value: ir.Value, quantized: np.ndarray, scale: np.ndarray, attrs) -> None:
        """Replace float initializer ``value`` by DequantizeLinear(quantized, scale, 0) under its name."""
        name = value.name
        qv = self._const(f"{name}_quantized", quantized)
        s = self._const(f"{name}.scale", scale)
        z = self._const(f"{name}.zero_point", np.zeros(scale.shape, quantized.dtype))
        dq = ir.Node("", "DequantizeLinear", [qv, s, z], attributes=attrs, name=f"qdq/{name}/DQ")
        self.graph.insert_before(next(iter(self.graph)), dq)
        ir.convenience.replace_all_uses_with(value, dq.outputs[0])
        del self.graph.initializers[name]
        dq.outputs[0].name = name
        dq.outputs[0].shape, dq.outputs[0].type = value.shape, value.type

    def quantize_weight_blockwise(self, value: ir.Value, block: int, channel_axis: int | None):
        """int4 symmetric, one scale per ``block`` inputs per output channel (2-D MatMul/Gemm weights).

        Other weights (conv kernels, embedding tables) or an input size not divisible by the
        block fall back to int8 per-channel.
        """
        import ml_dtypes

        w = value.const_value.numpy().astype(np.float32)
        if w.ndim != 2 or channel_axis not in (0, 1):
            return self.quantize_weight(value, np.int8, channel_axis)
        axis = 1 - channel_axis  # the input (reduction) axis carries the blocks
        if w.shape[axis] % block:
            return self.quantize_weight(value, np.int8, channel_axis)
        self._pending = []
        moved = np.moveaxis(w, axis, 0)  # [in, out]
        blocks = moved.reshape(moved.shape[0] // block, block, moved.shape[1])
        amax = np.abs(blocks).max(axis=1)  # [in/B, out]
        scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
        q = np.clip(np.round(blocks / scale[:, None, :]), -8, 7).reshape(moved.shape)
        q = np.moveaxis(q, 0, axis)
        scale = np.moveaxis(scale, 0, axis)  # blocks along `axis`
        attrs = [ir.AttrInt64("axis", axis), ir.AttrInt64("block_size", block)]
        self._dequantized_weight(value, q.astype(ml_dtypes.int4), scale, attrs)
        return enc.from_quantize_linear(value.name, scale, np.zeros(scale.shape, ml_dtypes.int4), axis=axis, block_size=block)

    def quantize_slot(self, slot, qtype) -> dict[str, str]:
        """Float slot input -> quantized input + scale input -> DequantizeLinear -> old uses."""
        self._pending = []
        old = self._find_value(slot.name)
        shape = [d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else d) for d in old.shape]
        # default: rank 1 of zeros, not rank 0 -- ORT's fused quantized kernels (e.g. QLinearMatMul
        # for 8-bit QDQ) do not zero-fill an empty inner dimension; a zero row is exact in any type.
        zero_shape = [1 if isinstance(d, str) else d for d in shape]
        q_in = self._input(f"{slot.name}_quantized", np.zeros(zero_shape, qtype), shape)
        s_in = self._input(f"{slot.name}.scale", np.ones([1], np.float32), [1])
        shape0 = self._const(f"{slot.name}.scalar_shape", np.array([], np.int64))
        zp = self._const(f"{slot.name}.zero_point", np.zeros((), qtype))
        s = self._node("Reshape", [s_in, shape0], slot.name)
        dq = ir.Node("", "DequantizeLinear", [q_in, s, zp], name=f"qdq/{slot.name}/DQ")
        self.graph.insert_before(next(iter(self.graph)), self._pending + [dq])
        self._pending = []
        ir.convenience.replace_all_uses_with(old, dq.outputs[0])
        self.graph.inputs.remove(old)
        del self.graph.initializers[slot.name]
        old.name = f"{slot.name}_float_slot"
        dq.outputs[0].name = slot.name
        dq.outputs[0].shape, dq.outputs[0].type = old.shape, old.type
        return {"q": q_in.name, "scale": s_in.name}

    def default_lora_param_encodings(self, slots, qtype):
        return [enc.from_quantize_linear(s.name, np.float32(1.0), np.zeros((), qtype)) for s in slots]
