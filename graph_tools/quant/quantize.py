"""Adapter-aware QDQ quantization of an adapter package.

* Base weights (MatMul/Gemm/Conv/Gather operands): int8 per-channel symmetric (or per-tensor),
  stored quantized with a DequantizeLinear in the graph.
* Activations: QuantizeLinear -> DequantizeLinear on every float op output, ranges calibrated on
  the base model (adapters off) and frozen as constants -- except the adapter-dependent ones:
  inside each LoRA branch (after A, after the scale, after B) and the site's Add output
  (``activation_scope="lora"``) or every activation (``"all"``). Their scale/zero-point are graph
  inputs ("encoding slots") fed from the adapter file.
* LoRA slots: A, B and the per-rank scale vector become quantized inputs (int16 per-tensor by
  default) plus a scale input each; each adapter file holds its own quantized values and scales.

The same ORT session then dequantizes each adapter with its own parameters. Encodings files
(AIMET JSON) are written for the base and for every adapter; base entries are identical in all.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx_ir as ir

from graph_tools._io import atomic_output
from graph_tools.adapters import files, manifest as mf
from graph_tools.adapters.compose import compose
from graph_tools.adapters.load import DATA_FILE, MODEL_FILE, AdapterPackage, load_package
from graph_tools.errors import QuantizationError
from graph_tools.lora import find_lora_sites
from graph_tools.quant import encodings as enc
from graph_tools.quant.calibrate import collect_ranges, iter_calibration

__all__ = ["quantize"]

logger = logging.getLogger(__name__)

_QTYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16}
_WEIGHT_OPS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Gather": 0}
_SKIP_ACT_OPS = {"Shape", "Size", "Constant", "ConstantOfShape", "QuantizeLinear", "DequantizeLinear", "Range"}


def quantize(
    package_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    calibration,
    *,
    weights: str = "int8",
    activations: str = "uint16",
    lora_weights: str = "int16",
    per_channel: bool = True,
    activation_scope: str = "lora",
    symmetric_activations: bool = False,
    calibration_method: str = "minmax",
    encodings_version: str = "1.0.0",
    adapters: Iterable[str] | None = None,
    block_size: int = 32,
) -> AdapterPackage:
    """Quantize a float adapter package into a QDQ adapter package (see module docstring)."""
    _check_types(weights, activations, lora_weights, activation_scope, encodings_version)
    package = load_package(package_dir)
    man = package.manifest
    if man.mode != "inputs" or man.pack:
        raise QuantizationError("quantize needs an unpacked 'inputs' package (extract with mode='inputs', pack=False)")
    if (man.extra or {}).get("quantization"):
        raise QuantizationError(f"{package.path}: package is already quantized")
    chosen = list(adapters) if adapters is not None else package.adapters
    if not chosen:
        raise QuantizationError(f"{package.path}: package has no adapters to quantize")
    for name in chosen:
        package.adapter_path(name)
    feeds = iter_calibration(calibration)

    from graph_tools.adapters.compose import weights_from_slot_tensors

    adapter_weights = {}
    for name in chosen:
        path = package.adapter_path(name)
        adapter_weights[name] = weights_from_slot_tensors(man.slots, files.read_adapter(path), path)
    slot_feeds = {name: compose(man.slots, [(w, 1.0)]) for name, w in adapter_weights.items()}

    model = ir.load(package.model_path)
    slot_names = {s.name for s in man.slots}
    sites = find_lora_sites(model)
    lora_acts = _lora_activations(model, sites)
    _fill_missing_dtypes(model, package.model_path)
    acts = _activations(model, slot_names)
    ranges = collect_ranges(package.model_path, acts, {None: None, **slot_feeds}, feeds, method=calibration_method)
    # tensors holding attention-mask sentinels (-inf / finfo.min) cannot share a scale with real
    # values: one code step would swallow every score. They stay float (listed in the manifest).
    unquantizable = sorted(a for a in acts if any(not _sane(*r.get(a)) for r in ranges.values()))
    acts = [a for a in acts if a not in set(unquantizable)]
    per_adapter_acts = set(acts) if activation_scope == "all" else (lora_acts & set(acts))

    act_q = _QTYPES[activations]
    q = _Quantizer(model, act_q, symmetric_activations)
    base_enc = enc.Encodings()
    # base weights
    if weights == "int4" and (not isinstance(block_size, int) or block_size < 2 or block_size % 2):
        raise QuantizationError(f"block_size must be an even integer >= 2, not {block_size!r}")
    for value, axis in _base_weights(model, slot_names):
        if weights == "int4":
            e = q.quantize_weight_blockwise(value, block_size, axis)
        else:
            e = q.quantize_weight(value, _QTYPES[weights], axis if per_channel else None)
        base_enc.add(e, param=True)
    # activations
    act_slots: list[tuple[str, str, str]] = []  # (tensor, scale input, zero-point input)
    for name in acts:
        lo, hi = ranges[None].get(name)
        if name in per_adapter_acts:
            scale_in, zp_in, e = q.insert_act_qdq(name, lo, hi, as_inputs=True)
            act_slots.append((name, scale_in, zp_in))
        else:
            e = q.insert_act_qdq(name, lo, hi, as_inputs=False)
        base_enc.add(e)
    # LoRA slots
    lora_q = _QTYPES[lora_weights]
    quant_slots = [q.quantize_slot(s, lora_q) for s in man.slots]

    opset = model.opset_imports.get("", 17)
    if (weights == "int4" or any(t in (np.int16, np.uint16) for t in (act_q, lora_q))) and opset < 21:
        _raise_opset(model, 21)

    # adapter tensors + encodings
    adapter_files = {}
    adapter_encs = {}
    for name in chosen:
        tensors: dict[str, np.ndarray] = {}
        a_enc = enc.Encodings()
        for e in base_enc.param_encodings.values():
            a_enc.add(e, param=True)
        for slot, qs in zip(man.slots, quant_slots):
            value = slot_feeds[name][slot.name]
            qv, scale = _quantize_per_tensor(value, lora_q)
            tensors[qs["q"]] = qv
            tensors[qs["scale"]] = np.array([scale], np.float32)
            a_enc.add(enc.from_quantize_linear(slot.name, np.float32(scale), np.zeros((), lora_q)), param=True)
        for tensor_name in acts:
            if any(tensor_name == t for t, _, _ in act_slots):
                continue
            a_enc.add(base_enc.activation_encodings[tensor_name])
        for tensor_name, scale_in, zp_in in act_slots:
            lo, hi = ranges[name].get(tensor_name)
            scale, zp = q.act_params(lo, hi)
            tensors[scale_in] = np.array([scale], np.float32)
            tensors[zp_in] = np.array([zp], act_q)
            a_enc.add(enc.from_quantize_linear(tensor_name, np.float32(scale), np.array(zp, act_q)))
        adapter_files[name] = tensors
        adapter_encs[name] = a_enc
    for e in q.default_lora_param_encodings(man.slots, lora_q):
        base_enc.add(e, param=True)

    new_slots = []
    for slot, qs in zip(man.slots, quant_slots):
        new_slots.append(mf.SlotSpec(name=qs["q"], shape=list(slot.shape), dtype=np.dtype(lora_q).name, site=slot.site, role=f"{slot.role}.quantized", layout=slot.layout))
        new_slots.append(mf.SlotSpec(name=qs["scale"], shape=[1], dtype="float32", site=slot.site, role=f"{slot.role}.scale", layout="scalar"))
    for tensor_name, scale_in, zp_in in act_slots:
        new_slots.append(mf.SlotSpec(name=scale_in, shape=[1], dtype="float32", site=tensor_name, role="activation.scale", layout="scalar"))
        new_slots.append(mf.SlotSpec(name=zp_in, shape=[1], dtype=np.dtype(act_q).name, site=tensor_name, role="activation.zero_point", layout="scalar"))

    fmt = man.adapters[0].format if man.adapters else "onnx_adapter"
    with atomic_output(out_dir) as tmp:
        ir.save(model, tmp / MODEL_FILE, external_data=DATA_FILE)
        (tmp / "adapters").mkdir()
        (tmp / "encodings").mkdir()
        enc.write_encodings(tmp / "encodings" / "base.encodings", base_enc, version=encodings_version)
        specs = []
        for name in chosen:
            rel = f"adapters/{name}{files.ADAPTER_SUFFIX[fmt]}"
            files.write_adapter(tmp / rel, adapter_files[name], format=fmt, metadata={"adapter": name})
            enc.write_encodings(tmp / "encodings" / f"{name}.encodings", adapter_encs[name], version=encodings_version)
            old = man.adapter(name)
            specs.append(dataclasses.replace(old, file=rel))
        lora_list = sorted({s.name for s in man.slots})
        (tmp / "lora_weight_list.txt").write_text("\n".join(lora_list) + "\n")
        quant_info = {
            "weights": weights, "activations": activations, "lora_weights": lora_weights,
            "per_channel": per_channel, "activation_scope": activation_scope,
            "encodings_version": encodings_version, "calibration_method": calibration_method,
            "adapter_dependent_activations": sorted(per_adapter_acts),
            "float_activations": unquantizable,
            "float_slots": [dataclasses.asdict(s) for s in man.slots],
        }
        new_manifest = dataclasses.replace(
            man, graph_fingerprint=mf.graph_fingerprint(model), slots=new_slots, adapters=specs,
            extra={**(man.extra or {}), "quantization": quant_info},
        )
        mf.write_manifest(tmp / "manifest.json", new_manifest)
    logger.info("quantized package: %d base weights, %d activations (%d per adapter), %d adapters",
                len(base_enc.param_encodings), len(acts), len(per_adapter_acts), len(chosen))
    return AdapterPackage(Path(out_dir).resolve(), new_manifest)


def _sane(lo: float, hi: float) -> bool:
    return bool(np.isfinite(lo) and np.isfinite(hi) and max(abs(lo), abs(hi)) < 1e30)


def _check_types(weights, activations, lora_weights, scope, version) -> None:
    if weights not in ("int8", "int4"):
        raise QuantizationError(f"weights={weights!r} is not supported; supported: int8, int4 (blockwise)")
    if activations not in ("uint8", "uint16", "int8", "int16"):
        raise QuantizationError(f"activations={activations!r} is not supported; supported: uint8, uint16, int8, int16")
    if lora_weights not in ("int8", "int16"):
        raise QuantizationError(f"lora_weights={lora_weights!r} is not supported; supported: int8, int16")
    if scope not in ("lora", "all"):
        raise QuantizationError(f"activation_scope must be 'lora' or 'all', not {scope!r}")
    if version not in ("1.0.0", "2.0.0"):
        raise QuantizationError(f"encodings_version must be 1.0.0 or 2.0.0, not {version!r}")


def _lora_activations(model: ir.Model, sites) -> set[str]:
    names = set()
    for site in sites:
        for node in site.require_parts(model.graph).lora_nodes():
            if node.outputs[0].name:
                names.add(node.outputs[0].name)
    return names


def _fill_missing_dtypes(model: ir.Model, model_path: Path) -> None:
    """Give values the exporter/extractor left untyped (e.g. the LoRA branch after slot
    replacement) their element type from ONNX type inference, so they are not mistaken for
    non-float tensors and silently left unquantized."""
    if all(v.dtype is not None for node in model.graph for v in node.outputs):
        return
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=False)
    except Exception as exc:  # noqa: BLE001 - inference is best effort; untyped values stay float-unknown
        logger.warning("type inference failed (%s); untyped tensors stay unquantized", str(exc).splitlines()[0])
        return
    types = {vi.name: vi.type.tensor_type.elem_type for vi in proto.graph.value_info if vi.type.HasField("tensor_type")}
    for node in model.graph:
        for value in node.outputs:
            if value.dtype is None and types.get(value.name):
                value.dtype = ir.DataType(types[value.name])


def _activations(model: ir.Model, slot_names: set[str]) -> list[str]:
    """Float tensors computed at run time that get an activation QDQ."""
    out = []
    weightish = set(slot_names)
    for node in model.graph:
        if node.op_type == "Transpose" and node.inputs[0] is not None and node.inputs[0].name in weightish:
            weightish.add(node.outputs[0].name)  # a transposed slot is a weight, not an activation
    for value in model.graph.inputs:
        if value.name not in slot_names and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            out.append(value.name)
    for node in model.graph:
        if node.op_type in _SKIP_ACT_OPS:
            continue
        if all(v is None or v.const_value is not None for v in node.inputs):
            continue  # constant-foldable
        for value in node.outputs:
            if value.name in weightish or value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                continue
            if not value.uses() and not value.is_graph_output():
                continue
            out.append(value.name)
    return out


def _base_weights(model: ir.Model, slot_names: set[str]):
    seen = set()
    for node in model.graph:
        idx = _WEIGHT_OPS.get(node.op_type)
        if idx is None or len(node.inputs) <= idx:
            continue
        value = node.inputs[idx]
        if value is None or not value.is_initializer() or value.is_graph_input() or value.name in seen or value.name in slot_names:
            continue
        if value.dtype != ir.DataType.FLOAT or value.shape is None or len(value.shape) < 2:
            continue
        seen.add(value.name)
        if node.op_type == "MatMul":
            axis = len(value.shape) - 1
        elif node.op_type == "Gemm":
            axis = 0 if node.attributes.get_int("transB", 0) else 1
        elif node.op_type == "Conv":
            axis = 0
        else:
            axis = 0  # embedding tables: one scale per row (token)
        yield value, axis


def _quantize_per_tensor(x: np.ndarray, qtype) -> tuple[np.ndarray, float]:
    qmax = np.iinfo(qtype).max
    amax = float(np.max(np.abs(x))) if x.size else 0.0
    scale = amax / qmax if amax > 0 else 1.0
    return np.clip(np.round(x / scale), -qmax, qmax).astype(qtype), scale


def _raise_opset(model: ir.Model, target: int) -> None:
    current = model.opset_imports.get("", 17)
    if current >= 20:
        model.opset_imports[""] = target  # 20 -> 21 only widens types; semantics unchanged
        return
    from onnxscript import version_converter

    version_converter.convert_version(model, target)


class _Quantizer:
    def __init__(self, model: ir.Model, act_q, symmetric: bool):
        self.model = model
        self.graph = model.graph
        self.act_q = act_q
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

    def act_params(self, lo: float, hi: float) -> tuple[float, int]:
        info = np.iinfo(self.act_q)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if self.symmetric or info.min < 0:
            amax = max(abs(lo), abs(hi))
            scale = amax / info.max if amax > 0 else 1.0
            zp = 0 if info.min < 0 else (info.max + 1) // 2
            return float(scale), int(zp)
        scale = (hi - lo) / (info.max - info.min) if hi > lo else 1.0
        zp = int(np.clip(round(info.min - lo / scale), info.min, info.max))
        return float(scale), zp

    def insert_act_qdq(self, name: str, lo: float, hi: float, *, as_inputs: bool):
        self._pending = []
        value = self._find_value(name)
        scale, zp = self.act_params(lo, hi)
        if as_inputs:
            s_in = self._input(f"{name}.act_scale", np.array([scale], np.float32), [1])
            z_in = self._input(f"{name}.act_zero_point", np.array([zp], self.act_q), [1])
            shape0 = self._const(f"{name}.act_scalar_shape", np.array([], np.int64))
            s = self._node("Reshape", [s_in, shape0], name)
            z = self._node("Reshape", [z_in, shape0], name)
        else:
            s = self._const(f"{name}.act_scale", np.array(scale, np.float32))
            z = self._const(f"{name}.act_zero_point", np.array(zp, self.act_q))
        self._wrap(value, s, z)
        e = enc.from_quantize_linear(name, np.float32(scale), np.array(zp, self.act_q))
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
