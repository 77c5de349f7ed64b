"""Adapter-aware QDQ quantization of an adapter package.

* Base weights (MatMul/Gemm/Conv/Gather operands): int8 per-channel symmetric (or per-tensor, or
  int4 blockwise), stored quantized with a DequantizeLinear in the graph.
* Activations: QuantizeLinear -> DequantizeLinear on every float op output but data movement
  (Reshape, Transpose, Gather, ...: :data:`graph_tools.quant.aimet.UNQUANTIZED_OUTPUT_OPS`). The base model and
  every adapter (and every declared concurrency) are calibrated; ``activation_scope`` decides per
  activation whether one encoding is shared by all (constants in the graph) or each adapter
  feeds its own (scale/zero-point graph inputs, "encoding slots", fed from the adapter file):
  ``"auto"`` (default) shares where one encoding fits every run (see
  :mod:`graph_tools.quant.scope`), ``"lora"`` makes only the LoRA branches and site outputs
  per adapter (the rest frozen at the base's ranges), ``"all"`` makes every activation per adapter.
* Mixed precision (8-bit activations only): ``mixed_precision="layernorm"`` keeps every
  normalization's inputs and outputs (the residual stream) at 16 bits, ``"auto"`` keeps the
  activations whose measured 8-bit error exceeds ``mixed_error`` at 16 bits.
* LoRA slots: A, B and the per-rank scale vector become quantized inputs (int16 per-tensor by
  default) plus a scale input each; each adapter file holds its own quantized values and scales.
* Declared concurrencies (``concurrencies=[("a", "b")]``): that combination (rank-concatenated,
  weight 1.0 each) is calibrated and written as an adapter file of its own, ``adapters/a+b.<ext>``
  with ``encodings/a+b.encodings``; ``AdapterSession`` serves ``{"a": 1, "b": 1}`` from it.

* The graph is rewritten by the passes of :mod:`graph_tools.quant.qdq` (weights, activations,
  slots) run as one ``ir.passes.Sequential``.

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

from graph_tools._io import atomic_output, refuse_overlap
from graph_tools.adapters import files, manifest as mf
from graph_tools.adapters.compose import compose, weights_from_slot_tensors
from graph_tools.adapters.load import DATA_FILE, MODEL_FILE, AdapterPackage, load_package, load_package_model
from graph_tools.errors import QuantizationError
from graph_tools.lora import find_lora_sites
from graph_tools.quant import aimet, encodings as enc
from graph_tools.quant import scope as sc
from graph_tools.quant.calibrate import collect_errors, collect_ranges, iter_calibration
from graph_tools.passes._base import run_passes
from graph_tools.quant.qdq import ActivationQdqPass, ActQdq, QuantizeSlotsPass, QuantizeWeightsPass, WeightQ
from graph_tools.quant.scales import act_params, quantize_per_tensor

__all__ = ["quantize", "CONCURRENCY_SEPARATOR"]

logger = logging.getLogger(__name__)

_QTYPES = {"int8": ir.DataType.INT8, "uint8": ir.DataType.UINT8, "int16": ir.DataType.INT16, "uint16": ir.DataType.UINT16}
_SIGNED = {ir.DataType.UINT8: ir.DataType.INT8, ir.DataType.UINT16: ir.DataType.INT16}
_UNSIGNED = {ir.DataType.INT8: ir.DataType.UINT8, ir.DataType.INT16: ir.DataType.UINT16}
_WEIGHT_OPS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Gather": 0}
_SKIP_ACT_OPS = {"Shape", "Size", "Constant", "ConstantOfShape", "QuantizeLinear", "DequantizeLinear", "Range"}
#: a declared concurrency's file name: adapter names joined, in sorted order ("a+b")
CONCURRENCY_SEPARATOR = "+"


def quantize(
    package_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    calibration,
    *,
    weights: str = "int8",
    activations: str = "uint16",
    lora_weights: str = "int16",
    per_channel: bool = True,
    activation_scope: str = "auto",
    share_tolerance: float = 0.25,
    mixed_precision: str | None = None,
    mixed_error: float = 0.02,
    symmetric_activations: bool = False,
    calibration_method: str = "minmax",
    encodings_version: str = "1.0.0",
    adapters: Iterable[str] | None = None,
    concurrencies: Iterable[Iterable[str]] | None = None,
    block_size: int = 32,
    per_row_embeddings: bool = True,
    aimet_placement: bool = False,
) -> AdapterPackage:
    """Quantize a float adapter package into a QDQ adapter package (see module docstring).

    ``share_tolerance``: how much coarser (fraction of its own step) a shared encoding may make
    any run's quantization step under ``activation_scope="auto"``. ``mixed_error``: the relative
    8-bit error (``||x - qdq(x)|| / ||x||``) above which ``mixed_precision="auto"`` keeps an
    activation at 16 bits. The decisions are recorded in the manifest (``extra.quantization``:
    ``shared_activations``, ``adapter_dependent_activations`` with ``per_adapter_reasons``,
    ``activations_16bit``, ``concurrencies``). ``per_row_embeddings=False`` quantizes embedding
    tables (Gather) per tensor, as aimet-onnx can load them (:mod:`graph_tools.quant.aimet`).
    ``aimet_placement=True`` quantizes what aimet-onnx's ``QuantizationSimModel`` quantizes, as it
    does, so the files load with ``strict=True`` (see :mod:`graph_tools.quant.aimet`; implies
    per-tensor embedding tables).
    """
    _check_types(weights, activations, lora_weights, activation_scope, encodings_version, mixed_precision)
    _check_number("share_tolerance", share_tolerance)
    _check_number("mixed_error", mixed_error)
    package = load_package(package_dir)
    refuse_overlap(out_dir, [package.path])
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
    combos = _check_concurrencies(concurrencies, chosen)
    act_q = _QTYPES[activations]
    if aimet_placement:
        per_row_embeddings = False
    if mixed_precision not in (None, "none") and act_q not in sc.WIDER:
        raise QuantizationError(f"mixed_precision={mixed_precision!r} needs 8-bit activations, not {activations}")
    feeds = iter_calibration(calibration)

    adapter_weights = {}
    for name in chosen:
        path = package.adapter_path(name)
        adapter_weights[name] = weights_from_slot_tensors(man.slots, files.read_adapter(path), path)
    # one run per adapter and per declared concurrency: slot feeds, then calibrated ranges
    slot_feeds = {name: compose(man.slots, [(w, 1.0)]) for name, w in adapter_weights.items()}
    for combo in combos:
        slot_feeds[_combo_name(combo)] = compose(man.slots, [(adapter_weights[a], 1.0) for a in combo])

    model = load_package_model(package)
    slot_names = {s.name for s in man.slots}
    sites = find_lora_sites(model)
    lora_acts = _lora_activations(model, sites)
    _fill_missing_dtypes(model)
    acts = _activations(model, slot_names)
    base_weights = list(_base_weights(model, slot_names, per_row_embeddings))
    constants = _constant_inputs(model, slot_names, {v.name for v, _ in base_weights}) if aimet_placement else []
    runs = {None: None, **slot_feeds}
    ranges = collect_ranges(package.model_path, acts, runs, feeds, method=calibration_method)
    # tensors holding attention-mask sentinels (-inf / finfo.min) cannot share a scale with real
    # values: one code step would swallow every score. They stay float (listed in the manifest).
    unquantizable = sorted(a for a in acts if any(not _sane(*r.get(a)) for r in ranges.values()))
    # A tensor empty in every calibration run (a past KV input fed no cache) has no range: it stays
    # float too, with a warning, instead of a made-up scale that clips every later value.
    never_seen = [a for a in acts if not any(r.seen(a) for r in ranges.values())]
    if never_seen:
        logger.warning("%d activations were empty in every calibration feed and stay float (%s%s); calibrate "
                       "with decode steps that carry a cache to quantize them", len(never_seen),
                       ", ".join(never_seen[:3]), ", ..." if len(never_seen) > 3 else "")
        unquantizable = sorted({*unquantizable, *never_seen})
    acts = [a for a in acts if a not in set(unquantizable)]
    constant_outputs = {}  # aimet_placement: Constant-node outputs, quantized over their own value
    if aimet_placement:
        for name, (lo, hi) in _constant_outputs(model).items():
            if _sane(lo, hi):
                constant_outputs[name] = (lo, hi)
            else:
                unquantizable.append(name)
    sharing = sc.share_activations(acts, ranges, scope=activation_scope, tolerance=share_tolerance, lora=lora_acts)
    per_adapter = set(sharing.per_adapter)

    sym = symmetric_activations
    wide = _wide_activations(mixed_precision, mixed_error, model, acts, sharing, ranges, runs, feeds, package, sym, act_q)
    act_types = {name: (sc.WIDER[act_q] if name in wide else act_q) for name in acts}
    if aimet_placement:  # aimet-onnx: a MatMul's second input (a dynamic weight) is symmetric
        act_types.update({name: _SIGNED.get(act_types[name], act_types[name]) for name in aimet.dynamic_weights(model, acts)})

    base_enc = enc.Encodings()
    # base weights
    if weights == "int4" and (not isinstance(block_size, int) or block_size < 2 or block_size % 2):
        raise QuantizationError(f"block_size must be an even integer >= 2, not {block_size!r}")
    plan = [_weight_plan(value, axis, weights, per_channel, block_size) for value, axis in base_weights]
    if aimet_placement:  # embedding tables and constant inputs are activations to aimet-onnx
        tables = {v.name for v, axis in base_weights if axis is None}
        plan = [WeightQ(w.name, act_q, symmetric=False) if w.name in tables else w for w in plan]
        plan += [WeightQ(name, act_q, symmetric=False) for name in constants]
    weight_pass = QuantizeWeightsPass(plan)
    # activations: shared ones are constants; per-adapter ones are inputs defaulting to the base range
    act_pass = ActivationQdqPass([ActQdq(name, *ranges[None].get(name), act_types[name], as_inputs=True) if name in per_adapter
                                  else ActQdq(name, *sharing.shared[name], act_types[name]) for name in acts]
                                 + [ActQdq(name, lo, hi, act_q) for name, (lo, hi) in constant_outputs.items()], symmetric=sym)
    lora_q = _QTYPES[lora_weights]
    slot_types = {s.name: lora_q for s in man.slots}
    if aimet_placement:  # lora_scale: an activation-typed constant to aimet-onnx (unsigned; scales are >= 0)
        slot_types.update({s.name: _UNSIGNED[lora_q] for s in man.slots if s.role == "lora_scale"
                           and all(np.min(f[s.name], initial=0.0) >= 0 for f in slot_feeds.values())})
    slot_pass = QuantizeSlotsPass(man.slots, slot_types)
    run_passes(model, weight_pass, act_pass, slot_pass)
    for e in weight_pass.encodings:
        base_enc.add(e, param=True)
    for e in act_pass.encodings:
        base_enc.add(e)
    act_slots = [(name, *act_pass.inputs[name]) for name in acts if name in per_adapter]  # (tensor, scale in, zp in)
    quant_slots = slot_pass.inputs

    opset = model.opset_imports.get("", 17)
    sixteen = any(t.bitwidth == 16 for t in (*act_types.values(), lora_q))
    if (weights == "int4" or sixteen) and opset < 21:
        _raise_opset(model, 21)

    # adapter (and concurrency) tensors + encodings
    run_files: dict[str, dict[str, np.ndarray]] = {}
    run_encs: dict[str, enc.Encodings] = {}
    for run in slot_feeds:
        tensors: dict[str, np.ndarray] = {}
        a_enc = enc.Encodings()
        for e in base_enc.param_encodings.values():
            a_enc.add(e, param=True)
        for slot, qs in zip(man.slots, quant_slots):
            value = slot_feeds[run][slot.name]
            qv, scale = quantize_per_tensor(value, slot_types[slot.name])
            tensors[qs["q"]] = qv
            tensors[qs["scale"]] = np.array([scale], np.float32)
            a_enc.add(enc.from_quantize_linear(slot.name, np.float32(scale), np.zeros((), slot_types[slot.name].numpy())), param=True)
        for tensor_name in [*acts, *constant_outputs]:
            if tensor_name not in per_adapter:
                a_enc.add(base_enc.activation_encodings[tensor_name])
        for tensor_name, scale_in, zp_in in act_slots:
            qtype = act_types[tensor_name]
            scale, zp = act_params(*ranges[run].get(tensor_name), qtype, sym)
            tensors[scale_in] = np.array([scale], np.float32)
            tensors[zp_in] = np.array([zp], qtype.numpy())
            a_enc.add(enc.from_quantize_linear(tensor_name, np.float32(scale), np.array(zp, qtype.numpy())))
        run_files[run] = tensors
        run_encs[run] = a_enc
    for e in slot_pass.encodings:  # the graph defaults' (scale 1)
        base_enc.add(e, param=True)

    new_slots = []
    for slot, qs in zip(man.slots, quant_slots):
        new_slots.append(mf.SlotSpec(name=qs["q"], shape=list(slot.shape), dtype=np.dtype(slot_types[slot.name].numpy()).name, site=slot.site, role=f"{slot.role}.quantized", layout=slot.layout))
        new_slots.append(mf.SlotSpec(name=qs["scale"], shape=[1], dtype="float32", site=slot.site, role=f"{slot.role}.scale", layout="scalar"))
    for tensor_name, scale_in, zp_in in act_slots:
        new_slots.append(mf.SlotSpec(name=scale_in, shape=[1], dtype="float32", site=tensor_name, role="activation.scale", layout="scalar"))
        new_slots.append(mf.SlotSpec(name=zp_in, shape=[1], dtype=np.dtype(act_types[tensor_name].numpy()).name, site=tensor_name, role="activation.zero_point", layout="scalar"))

    fmt = man.adapters[0].format if man.adapters else "onnx_adapter"
    with atomic_output(out_dir) as tmp:
        ir.save(model, tmp / MODEL_FILE, external_data=DATA_FILE)
        (tmp / "adapters").mkdir()
        (tmp / "encodings").mkdir()
        enc.write_encodings(tmp / "encodings" / "base.encodings", base_enc, version=encodings_version)
        aimet.write_aimet_config(tmp / "encodings" / aimet.AIMET_CONFIG_FILE,
                                 aimet.aimet_config(per_channel=per_channel, symmetric_activations=symmetric_activations))
        specs, combo_info = [], []
        for run in slot_feeds:
            rel = f"adapters/{run}{files.ADAPTER_SUFFIX[fmt]}"
            files.write_adapter(tmp / rel, run_files[run], format=fmt, metadata={"adapter": run})
            enc.write_encodings(tmp / "encodings" / f"{run}.encodings", run_encs[run], version=encodings_version)
            if run in adapter_weights:
                specs.append(dataclasses.replace(man.adapter(run), file=rel))
            else:
                combo_info.append({"name": run, "adapters": run.split(CONCURRENCY_SEPARATOR), "file": rel,
                                   "encodings": f"encodings/{run}.encodings"})
        lora_list = sorted({s.name for s in man.slots})
        (tmp / "lora_weight_list.txt").write_text("\n".join(lora_list) + "\n")
        quant_info = {
            "weights": weights, "activations": activations, "lora_weights": lora_weights,
            "per_channel": per_channel, "per_row_embeddings": per_row_embeddings, "aimet_placement": aimet_placement, "activation_scope": activation_scope, "share_tolerance": share_tolerance,
            "encodings_version": encodings_version, "calibration_method": calibration_method,
            "shared_activations": sorted(sharing.shared),
            "adapter_dependent_activations": sorted(per_adapter),
            "per_adapter_reasons": dict(sorted(sharing.reasons.items())),
            "activation_summary": sharing.summary(),
            "mixed_precision": mixed_precision if mixed_precision not in (None, "none") else None,
            "mixed_error": mixed_error,
            "activations_16bit": sorted(wide),
            "float_activations": unquantizable,
            "concurrencies": combo_info,
            "float_slots": [dataclasses.asdict(s) for s in man.slots],
        }
        new_manifest = dataclasses.replace(
            man, graph_fingerprint=mf.graph_fingerprint(model), slots=new_slots, adapters=specs,
            extra={**(man.extra or {}), "quantization": quant_info},
        )
        mf.write_manifest(tmp / "manifest.json", new_manifest)
    logger.info("quantized package: %d base weights, %d activations (%s; %d at 16 bits), %d adapters, %d concurrencies",
                len(base_enc.param_encodings), len(acts), sharing.summary(), len(wide), len(chosen), len(combos))
    return AdapterPackage(Path(out_dir).resolve(), new_manifest)


def _combo_name(combo: tuple[str, ...]) -> str:
    return CONCURRENCY_SEPARATOR.join(combo)


def _check_concurrencies(concurrencies, chosen: list[str]) -> list[tuple[str, ...]]:
    """Declared concurrencies as sorted name tuples; each names >= 2 distinct quantized adapters."""
    if concurrencies is None:
        return []
    if isinstance(concurrencies, (str, bytes)):
        raise QuantizationError(f"concurrencies must be a list of adapter-name tuples, not {concurrencies!r}")
    out: list[tuple[str, ...]] = []
    for combo in concurrencies:
        names = [combo] if isinstance(combo, str) else list(combo)
        if len(names) < 2 or len(set(names)) != len(names):
            raise QuantizationError(f"concurrency {names!r} must name two or more different adapters")
        for n in names:
            if n not in chosen:
                raise QuantizationError(f"concurrency {names!r}: {n!r} is not an adapter being quantized ({', '.join(chosen)})")
        key = tuple(sorted(names))
        if _combo_name(key) in chosen:
            raise QuantizationError(f"concurrency {names!r}: its file name {_combo_name(key)!r} is an adapter's name")
        if key not in out:
            out.append(key)
    return out


def _weight_plan(value: ir.Value, axis: int | None, weights: str, per_channel: bool, block: int) -> WeightQ:
    """int4 blockwise for 2-D weights whose input size the block divides (else int8 per channel),
    int8 per tensor where ``axis`` is None."""
    if axis is None:
        return WeightQ(value.name, ir.DataType.INT8)
    if weights == "int4":
        if len(value.shape) == 2 and axis in (0, 1) and value.shape[1 - axis] % block == 0:
            return WeightQ(value.name, ir.DataType.INT4, 1 - axis, block)  # blocks along the input (reduction) axis
        return WeightQ(value.name, ir.DataType.INT8, axis)
    return WeightQ(value.name, _QTYPES[weights], axis if per_channel else None)


def _constant_outputs(model: ir.Model) -> dict[str, tuple[float, float]]:
    """Float outputs of Constant nodes that something reads -> their value range."""
    out = {}
    for node in model.graph:
        value = node.outputs[0] if node.op_type == "Constant" else None
        attr = node.attributes.get("value") if value is not None else None
        if attr is None or not value.uses() or attr.value.dtype != ir.DataType.FLOAT:
            continue
        x = attr.value.numpy()
        if x.size:
            out[value.name] = (float(x.min()), float(x.max()))
    return out


def _constant_inputs(model: ir.Model, slot_names: set[str], weights: set[str]) -> list[str]:
    """Float initializers read where aimet-onnx quantizes them as activations: any input that is
    not a base weight, a slot, a Conv/Gemm bias or a normalization's scale/bias (the AIMET config
    leaves those float), and holds no mask sentinel."""
    out = []
    for node in model.graph:
        if node.op_type in _SKIP_ACT_OPS or node.op_type in aimet.UNQUANTIZED_OUTPUT_OPS:
            continue
        for i, value in enumerate(node.inputs):
            if value is None or not value.is_initializer() or value.is_graph_input() or value.const_value is None:
                continue
            if value.name in weights or value.name in slot_names or value.name in out or value.dtype != ir.DataType.FLOAT:
                continue
            if (node.op_type in aimet.NORM_OPS and i > 0) or (node.op_type in ("Conv", "Gemm") and i == 2):
                continue
            x = value.const_value.numpy()
            if x.size and _sane(float(x.min()), float(x.max())):
                out.append(value.name)
    return out


def _wide_activations(mode, threshold, model, acts, sharing, ranges, runs, feeds, package, sym, act_q) -> set[str]:
    """Activations kept at 16 bits in an 8-bit package (see module docstring)."""
    if mode in (None, "none"):
        return set()
    if mode == "layernorm":
        return sc.norm_tensors(model) & set(acts)
    info = np.iinfo(act_q.numpy())
    candidates = {}
    for name in acts:
        params = {}
        for run, r in ranges.items():
            lo, hi = sharing.shared.get(name) or r.get(name)
            scale, zp = act_params(lo, hi, act_q, sym)
            params[run] = (scale, zp, int(info.min), int(info.max))
        candidates[name] = params
    errors = collect_errors(package.model_path, candidates, runs, feeds)
    wide = sc.wide_by_error(errors, threshold)
    logger.info("mixed precision: %d of %d activations above %.3g relative 8-bit error", len(wide), len(acts), threshold)
    return wide


def _sane(lo: float, hi: float) -> bool:
    return bool(np.isfinite(lo) and np.isfinite(hi) and max(abs(lo), abs(hi)) < 1e30)


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise QuantizationError(f"{name} must be a non-negative number, not {value!r}")


def _check_types(weights, activations, lora_weights, scope, version, mixed) -> None:
    if weights not in ("int8", "int4"):
        raise QuantizationError(f"weights={weights!r} is not supported; supported: int8, int4 (blockwise)")
    if activations not in ("uint8", "uint16", "int8", "int16"):
        raise QuantizationError(f"activations={activations!r} is not supported; supported: uint8, uint16, int8, int16")
    if lora_weights not in ("int8", "int16"):
        raise QuantizationError(f"lora_weights={lora_weights!r} is not supported; supported: int8, int16")
    if scope not in ("auto", "lora", "all"):
        raise QuantizationError(f"activation_scope must be 'auto', 'lora' or 'all', not {scope!r}")
    if mixed not in (None, "none", "layernorm", "auto"):
        raise QuantizationError(f"mixed_precision must be None, 'layernorm' or 'auto', not {mixed!r}")
    if version not in ("1.0.0", "2.0.0"):
        raise QuantizationError(f"encodings_version must be 1.0.0 or 2.0.0, not {version!r}")


def _lora_activations(model: ir.Model, sites) -> set[str]:
    names = set()
    for site in sites:
        for node in site.require_parts(model.graph).lora_nodes():
            if node.outputs[0].name:
                names.add(node.outputs[0].name)
    return names


def _fill_missing_dtypes(model: ir.Model) -> None:
    """Give values the exporter/extractor left untyped (e.g. the LoRA branch after slot
    replacement) their element type from ONNX type inference (onnx-ir's ``ShapeInferencePass``,
    initializers left out), so they are not mistaken for non-float tensors and silently left
    unquantized. Only missing types are filled; shapes stay as they are."""
    if all(v.dtype is not None for node in model.graph for v in node.outputs):
        return
    from onnx_ir.passes.common import ShapeInferencePass

    shapes = {v: v.shape for node in model.graph for v in node.outputs}
    untyped = [v for v in shapes if v.dtype is None]
    inferred = ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(model).modified
    for value, shape in shapes.items():
        value.shape = shape  # the pass also merges shapes: keep ours
    if not inferred or any(v.dtype is None for v in untyped):
        logger.warning("type inference left %d tensors untyped; they stay unquantized", sum(v.dtype is None for v in untyped))


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
        if node.op_type in _SKIP_ACT_OPS or node.op_type in aimet.UNQUANTIZED_OUTPUT_OPS:
            continue  # data movement: its output is its (already quantized) input, moved, as in aimet-onnx
        if all(v is None or v.const_value is not None for v in node.inputs):
            continue  # constant-foldable
        for value in node.outputs:
            if value.name in weightish or value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                continue
            if not value.uses() and not value.is_graph_output():
                continue
            out.append(value.name)
    return out


def _base_weights(model: ir.Model, slot_names: set[str], per_row_embeddings: bool = True):
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
            axis = 0 if per_row_embeddings else None  # embedding tables: one scale per row (token)
        yield value, axis


def _raise_opset(model: ir.Model, target: int) -> None:
    current = model.opset_imports.get("", 17)
    if current >= 20:
        model.opset_imports[""] = target  # 20 -> 21 only widens types; semantics unchanged
        return
    from onnxscript import version_converter

    version_converter.convert_version(model, target)
