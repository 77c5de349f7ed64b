"""Which activation encodings are shared by every adapter, and which activations need 16 bits.

Pure decisions on calibrated ranges (no graph changes): :func:`share_activations` splits the
activations into shared ones (one encoding, constants in the graph, identical in every encodings
file) and per-adapter ones (fed from each adapter file); :func:`norm_tensors` and
:func:`wide_by_error` pick the activations that stay at 16 bits in an 8-bit package.

Sharing criterion (``activation_scope="auto"``): a shared encoding covers the union of every run's
calibrated range (base, each adapter, each declared concurrency), so nobody clips. It is kept
only where that costs no run more than ``tolerance`` of its resolution: for every run whose
tensor is not identically zero, ``union width <= (1 + tolerance) * its own width`` (the
quantization step grows by at most that factor). Runs where the tensor is identically zero (the
LoRA branch of the base model) are exact under any encoding and do not count.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Mapping

import numpy as np
import onnx_ir as ir

__all__ = ["Sharing", "own_range", "share_activations", "norm_tensors", "wide_by_error", "WIDER"]

logger = logging.getLogger(__name__)

#: the 16-bit type an 8-bit activation type widens to in mixed precision
WIDER = {ir.DataType.UINT8: ir.DataType.UINT16, ir.DataType.INT8: ir.DataType.INT16}

_NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "SkipLayerNormalization",
             "SkipSimplifiedLayerNormalization"}


@dataclasses.dataclass(frozen=True)
class Sharing:
    """Outcome of the sharing decision.

    Attributes:
        shared: tensor -> (lo, hi) of its one shared encoding.
        per_adapter: tensors whose encoding each run feeds (the graph default is the base's range).
        reasons: per-adapter tensor -> why: ``"<run>: shared step 1.80x its own"`` (the run whose
            resolution a shared encoding would cost most), ``"scope=all"`` or ``"LoRA branch (scope=lora)"``.
    """

    shared: dict[str, tuple[float, float]]
    per_adapter: list[str]
    reasons: dict[str, str]

    def summary(self) -> str:
        """``"12 shared, 30 per adapter (too coarse for base 18, too coarse for topic 12)"``."""
        counts: dict[str, int] = {}
        for reason in self.reasons.values():
            key = f"too coarse for {reason.split(':')[0]}" if ": shared step" in reason else reason
            counts[key] = counts.get(key, 0) + 1
        why = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        return f"{len(self.shared)} shared, {len(self.per_adapter)} per adapter" + (f" ({why})" if why else "")


def own_range(ranges, name: str) -> tuple[float, float]:
    """A run's calibrated range of ``name``, widened to include 0 (zero must be exact)."""
    lo, hi = ranges.get(name)
    return min(lo, 0.0), max(hi, 0.0)


def share_activations(names: Iterable[str], ranges: Mapping[str | None, object], *, scope: str,
                      tolerance: float, lora: set[str]) -> Sharing:
    """Decide shared vs per-adapter per activation (``ranges``: run -> calibrate.Ranges; ``None``
    is the base). ``scope``: ``auto`` (the criterion in the module docstring), ``lora`` (LoRA
    branches and site outputs per adapter, the rest frozen at the base's range) or ``all``."""
    shared: dict[str, tuple[float, float]] = {}
    per: list[str] = []
    reasons: dict[str, str] = {}
    for name in names:
        base = own_range(ranges[None], name)
        if scope == "all":
            per.append(name)
            reasons[name] = "scope=all"
            continue
        if scope == "lora":
            if name in lora:
                per.append(name)
                reasons[name] = "LoRA branch (scope=lora)"
            else:
                shared[name] = base
            continue
        own = {run: own_range(r, name) for run, r in ranges.items()}
        lo, hi = min(r[0] for r in own.values()), max(r[1] for r in own.values())
        worst, ratio = None, 1.0
        for run, (rlo, rhi) in own.items():
            width = rhi - rlo
            if width <= 0:
                continue  # identically zero in this run: exact under any encoding
            r = (hi - lo) / width
            if r > ratio:
                worst, ratio = run, r
        if ratio <= 1.0 + tolerance:
            shared[name] = (lo, hi)
        else:
            per.append(name)
            reasons[name] = f"{worst or 'base'}: shared step {ratio:.2f}x its own"
    logger.info("activation encodings: %d shared, %d per adapter", len(shared), len(per))
    return Sharing(shared, per, reasons)


def norm_tensors(model: ir.Model) -> set[str]:
    """Inputs and outputs of every normalization: LayerNorm-family ops, and decomposed RMSNorm
    (``x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2)) + eps))`` [* weight]): the residual stream."""
    names: set[str] = set()
    for node in model.graph:
        if node.op_type in _NORM_OPS:
            if node.inputs and node.inputs[0] is not None:
                names.add(node.inputs[0].name)
            names.add(node.outputs[0].name)
        elif node.op_type == "Pow" and any(u.node.op_type == "ReduceMean" for u in node.outputs[0].uses()):
            x = node.inputs[0]
            names.add(x.name)
            for use in x.uses():
                if use.node.op_type == "Mul":  # x * rsqrt(...): the normalized value
                    out = use.node.outputs[0]
                    users = list(out.uses())
                    if len(users) == 1 and users[0].node.op_type == "Mul" and any(
                            v is not None and v.const_value is not None for v in users[0].node.inputs):
                        out = users[0].node.outputs[0]  # ... * weight
                    names.add(out.name)
    return names


def wide_by_error(errors: Mapping[str, float], threshold: float) -> set[str]:
    """Tensors whose relative 8-bit error (``||x - qdq(x)|| / ||x||``) exceeds ``threshold``."""
    return {name for name, err in errors.items() if np.isfinite(err) and err > threshold}
