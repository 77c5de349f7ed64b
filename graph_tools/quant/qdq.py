"""QDQ insertion as onnx-ir passes: quantized weights, activation Q/DQ pairs, quantized LoRA slots.

:func:`graph_tools.quant.quantize` decides what to quantize and how (encodings, bit widths: there
and in :mod:`graph_tools.quant.scope`), then runs the three passes here as one
``ir.passes.Sequential``; each pass records the encodings it wrote (``.encodings``). One site::

    before:  x -> MatMul(W) ---------------------------------------> Add -> y
             x -> MatMul(A slot) -> MatMul(B slot) -> Mul(s slot) ---^
    after:   W = DequantizeLinear(W_quantized, W.scale, 0)            (QuantizeWeightsPass)
             A = DequantizeLinear(A_quantized input, A.scale input)   (QuantizeSlotsPass; B, s alike)
             y -> QuantizeLinear -> DequantizeLinear -> every use of y (ActivationQdqPass; scale and
                  zero point constants when shared, graph inputs fed by each adapter file when not)

Scale/zero-point math: :mod:`graph_tools.quant.scales`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graph_tools.errors import QuantizationError
from graph_tools.passes._base import LoraPass
from graph_tools.quant import encodings as enc
from graph_tools.quant.scales import act_params, quantize_array, quantize_asymmetric, quantize_blockwise

__all__ = ["WeightQ", "ActQdq", "QuantizeWeightsPass", "ActivationQdqPass", "QuantizeSlotsPass"]


class _QdqPass(LoraPass):
    """Shared helpers; ``encodings``: what the last run wrote, in order."""

    def __init__(self):
        super().__init__()
        self.encodings: list[enc.TensorEncoding] = []

    @staticmethod
    def _const(graph: ir.Graph, name: str, array: np.ndarray, *, as_input_shape=None) -> ir.Value:
        shape = array.shape if as_input_shape is None else as_input_shape
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        if as_input_shape is not None:
            graph.inputs.append(value)  # an input with a default: fed per run (adapter files)
        graph.register_initializer(value)
        return value

    @staticmethod
    def _scalar(graph: ir.Graph, tag: str, value: ir.Value) -> tuple[ir.Node, ir.Value]:
        """``Reshape(value [1], [])``: a fed [1] scale or zero point as the scalar Q/DQ expect."""
        shape0 = _QdqPass._const(graph, f"{tag}.scalar_shape", np.array([], np.int64)) \
            if f"{tag}.scalar_shape" not in graph.initializers else graph.initializers[f"{tag}.scalar_shape"]
        node = ir.Node("", "Reshape", [value, shape0], name=f"qdq/{tag}/Reshape_{value.name}")
        return node, node.outputs[0]

    @staticmethod
    def _take_place(old: ir.Value, new: ir.Value, name: str) -> None:
        """Every use of ``old`` reads ``new``, which takes ``old``'s name, type and shape."""
        ir.convenience.replace_all_uses_with(old, new)
        new.shape, new.type = old.shape, old.type
        new.name = name


@dataclasses.dataclass(frozen=True)
class WeightQ:
    """One constant to quantize: symmetric per tensor, per ``axis`` or int4 per ``block`` along
    ``axis``; ``symmetric=False``: asymmetric per tensor over its own range (as an activation)."""

    name: str
    qtype: ir.DataType
    axis: int | None = None
    block: int | None = None
    symmetric: bool = True


class QuantizeWeightsPass(_QdqPass):
    """Float initializers -> ``DequantizeLinear(<name>_quantized, <name>.scale, zero point)`` under their name."""

    def __init__(self, weights: list[WeightQ]):
        super().__init__()
        self.weights = weights

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.encodings = []
        graph = model.graph
        first = next(iter(graph))
        for wq in self.weights:
            name, axis, block = wq.name, wq.axis, wq.block
            value = graph.initializers.get(name)
            if value is None or value.const_value is None:
                raise QuantizationError(f"weight {name!r} is not an initializer of the graph")
            w = value.const_value.numpy()
            attrs = [ir.AttrInt64("axis", axis)] if axis is not None else []
            zp = None
            if block:
                qw, scale = quantize_blockwise(w, block, axis)
                attrs.append(ir.AttrInt64("block_size", block))
            elif not wq.symmetric:
                qw, scale, zp = quantize_asymmetric(w, wq.qtype)
            else:
                qw, scale = quantize_array(w, wq.qtype, axis)
            if zp is None:
                zp = np.zeros(scale.shape, qw.dtype)
            inputs = [self._const(graph, f"{name}_quantized", qw), self._const(graph, f"{name}.scale", scale),
                      self._const(graph, f"{name}.zero_point", zp)]
            dq = ir.Node("", "DequantizeLinear", inputs, attributes=attrs, name=f"qdq/{name}/DQ")
            graph.insert_before(first, dq)
            del graph.initializers[name]
            self._take_place(value, dq.outputs[0], name)
            self.encodings.append(enc.from_quantize_linear(name, scale, zp, axis=axis, block_size=block))
        return ir.passes.PassResult(model, modified=bool(self.weights))


@dataclasses.dataclass(frozen=True)
class ActQdq:
    """One activation Q/DQ: tensor, range, type; ``as_inputs``: scale and zero point are graph
    inputs ``<name>.act_scale`` / ``<name>.act_zero_point`` (defaults: this range) fed per adapter."""

    name: str
    lo: float
    hi: float
    qtype: ir.DataType
    as_inputs: bool = False


class ActivationQdqPass(_QdqPass):
    """``value -> QuantizeLinear -> DequantizeLinear``; every consumer (and graph output) reads the DQ.

    ``inputs``: tensor -> (scale input, zero-point input) for the ``as_inputs`` activations.
    """

    def __init__(self, activations: list[ActQdq], symmetric: bool = False):
        super().__init__()
        self.activations = activations
        self.symmetric = symmetric
        self.inputs: dict[str, tuple[str, str]] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.encodings, self.inputs = [], {}
        graph = model.graph
        values = {v.name: v for v in graph.inputs}
        values.update({v.name: v for node in graph for v in node.outputs if v.name not in values})
        for a in self.activations:
            value = values.get(a.name)
            if value is None:
                raise QuantizationError(f"tensor {a.name!r} not found in the graph")
            scale, zp = act_params(a.lo, a.hi, a.qtype, self.symmetric)
            zp_np = np.array(zp, a.qtype.numpy())
            pre: list[ir.Node] = []
            if a.as_inputs:
                s_in = self._const(graph, f"{a.name}.act_scale", np.array([scale], np.float32), as_input_shape=[1])
                z_in = self._const(graph, f"{a.name}.act_zero_point", zp_np.reshape(1), as_input_shape=[1])
                (sn, s), (zn, z) = self._scalar(graph, a.name, s_in), self._scalar(graph, a.name, z_in)
                pre = [sn, zn]
                self.inputs[a.name] = (s_in.name, z_in.name)
            else:
                s = self._const(graph, f"{a.name}.act_scale", np.array(scale, np.float32))
                z = self._const(graph, f"{a.name}.act_zero_point", zp_np)
            self._wrap(graph, value, s, z, pre)
            self.encodings.append(enc.from_quantize_linear(a.name, np.float32(scale), zp_np))
        return ir.passes.PassResult(model, modified=bool(self.activations))

    @staticmethod
    def _wrap(graph: ir.Graph, value: ir.Value, scale: ir.Value, zp: ir.Value, pre: list[ir.Node]) -> None:
        uses = list(value.uses())
        qn = ir.Node("", "QuantizeLinear", [value, scale, zp], name=f"qdq/{value.name}/Q")
        dq = ir.Node("", "DequantizeLinear", [qn.outputs[0], scale, zp], name=f"qdq/{value.name}/DQ")
        producer = value.producer()
        if producer is None:
            graph.insert_before(next(iter(graph)), [*pre, qn, dq])
        else:
            graph.insert_after(producer, [*pre, qn, dq])
        for use in uses:
            use.node.replace_input_with(use.idx, dq.outputs[0])
        original = value.name
        qn.outputs[0].name = f"{original}_quantized"
        dq.outputs[0].shape, dq.outputs[0].type = value.shape, value.type
        if value.is_graph_output():
            for i, o in enumerate(graph.outputs):
                if o is value:
                    graph.outputs[i] = dq.outputs[0]
            value.name = f"{original}_prequant"
            dq.outputs[0].name = original
        else:
            dq.outputs[0].name = f"{original}_dequant"


class QuantizeSlotsPass(_QdqPass):
    """Float slot inputs -> ``<slot>_quantized`` + ``<slot>.scale`` inputs -> DequantizeLinear -> old uses.

    Defaults are rank-1 zeros, not rank 0: ORT's fused 8-bit kernels (QLinearMatMul) do not
    zero-fill an empty inner dimension; a zero row is exact in any type. ``inputs``: per slot,
    ``{"q": quantized input, "scale": scale input}``; ``encodings``: the defaults' (scale 1).
    """

    def __init__(self, slots, qtypes: dict[str, ir.DataType]):
        super().__init__()
        self.slots = list(slots)
        self.qtypes = qtypes
        self.inputs: list[dict[str, str]] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.encodings, self.inputs = [], []
        graph = model.graph
        first = next(iter(graph))
        by_name = {v.name: v for v in graph.inputs}
        for slot in self.slots:
            npq = self.qtypes[slot.name].numpy()
            old = by_name.get(slot.name)
            if old is None:
                raise QuantizationError(f"slot {slot.name!r} is not a graph input")
            shape = [d if isinstance(d, int) else getattr(d, "value", d) for d in old.shape]
            zero_shape = [1 if isinstance(d, str) else d for d in shape]
            q_in = self._const(graph, f"{slot.name}_quantized", np.zeros(zero_shape, npq), as_input_shape=shape)
            s_in = self._const(graph, f"{slot.name}.scale", np.ones([1], np.float32), as_input_shape=[1])
            zp = self._const(graph, f"{slot.name}.zero_point", np.zeros((), npq))
            sn, s = self._scalar(graph, slot.name, s_in)
            dq = ir.Node("", "DequantizeLinear", [q_in, s, zp], name=f"qdq/{slot.name}/DQ")
            graph.insert_before(first, [sn, dq])
            graph.inputs.remove(old)
            del graph.initializers[slot.name]
            self._take_place(old, dq.outputs[0], slot.name)
            old.name = f"{slot.name}_float_slot"
            self.inputs.append({"q": q_in.name, "scale": s_in.name})
            self.encodings.append(enc.from_quantize_linear(slot.name, np.float32(1.0), np.zeros((), npq)))
        return ir.passes.PassResult(model, modified=bool(self.slots))
