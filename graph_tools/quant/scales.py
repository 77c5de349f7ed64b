"""Scale/zero-point math of the QDQ passes: ``onnxruntime.quantization.quant_utils``
(``compute_scale_zp``, ``compute_scale_zp_blocked``, ``quantize_nparray``), with its rounding; int4
blockwise keeps its own grid (see :func:`quantize_blockwise`). tests/test_calibrate.py checks both.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["act_params", "quantize_array", "quantize_asymmetric", "quantize_per_tensor", "quantize_blockwise"]


def _qu():
    """``onnxruntime.quantization.quant_utils``, imported on first use: importing it costs ~35 ms
    that every process importing graph_tools (e.g. ``lora-onnx extract``) paid without quantizing."""
    from onnxruntime.quantization import quant_utils

    return quant_utils


def act_params(lo: float, hi: float, qtype: ir.DataType, symmetric: bool = False) -> tuple[float, int]:
    """Scale and zero point of range [lo, hi] (widened to include 0); signed types are symmetric."""
    sym = symmetric or qtype.is_signed()
    qu = _qu()
    qmin, qmax = qu.get_qmin_qmax_for_qType(int(qtype), symmetric=sym)
    zp, scale = qu.compute_scale_zp(np.array(lo, np.float32), np.array(hi, np.float32), qmin, qmax, symmetric=sym)
    return float(scale), int(zp)


def quantize_array(x: np.ndarray, qtype: ir.DataType, axis: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization (zero point 0), per tensor or one scale per index of ``axis``:
    ``(quantized, float32 scale)`` (scale shape ``[]`` or ``[x.shape[axis]]``)."""
    qu = _qu()
    x = np.asarray(x, np.float32)
    rows = x.reshape(1, -1) if axis is None else np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    if rows.shape[1] == 0:
        scale = np.ones(rows.shape[0], np.float32)
    else:  # per row, one block spanning the row
        scale = qu.compute_scale_zp_blocked(rows, int(qtype), 1, rows.shape[1], symmetric=True)[1].reshape(-1)
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = -1
    q = qu.quantize_nparray(int(qtype), x, scale.reshape(shape), 0).astype(qtype.numpy())
    return q, (scale.reshape(()) if axis is None else scale).astype(np.float32)


def quantize_asymmetric(x: np.ndarray, qtype: ir.DataType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric per tensor over the tensor's own range (a constant quantized as an activation):
    ``(quantized, float32 scale, zero point)``, scale and zero point of shape ``[]``."""
    x = np.asarray(x, np.float32)
    scale, zp = act_params(float(x.min(initial=0.0)), float(x.max(initial=0.0)), qtype)
    q = _qu().quantize_nparray(int(qtype), x, np.float32(scale), zp).astype(qtype.numpy())
    return q, np.array(scale, np.float32), np.array(zp, qtype.numpy())


def quantize_per_tensor(x: np.ndarray, qtype: ir.DataType) -> tuple[np.ndarray, float]:
    """Per-tensor quantization with zero point 0: ``(quantized, scale)`` (LoRA slot values).
    Signed types are symmetric; unsigned ones cover [0, max] (for values >= 0 only)."""
    if qtype.is_signed():
        q, scale = quantize_array(x, qtype, None)
        return q, float(scale)
    scale, zp = act_params(0.0, float(np.max(x, initial=0.0)), qtype)
    return _qu().quantize_nparray(int(qtype), np.asarray(x, np.float32), np.float32(scale), zp).astype(qtype.numpy()), scale


def quantize_blockwise(w: np.ndarray, block: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """int4 symmetric, one scale per ``block`` entries along ``axis`` of a 2-D weight, per other index.

    Our own: quant_utils' symmetric int4 grid is [-8, 7] with scale 2*amax/15, which clips +amax;
    here scale = amax/7 (+amax exact, -8 unused but valid)."""
    import ml_dtypes

    moved = np.moveaxis(w.astype(np.float32), axis, 0)  # [in, out]
    blocks = moved.reshape(moved.shape[0] // block, block, moved.shape[1])
    amax = np.abs(blocks).max(axis=1)  # [in/B, out]
    scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
    q = np.clip(np.round(blocks / scale[:, None, :]), -8, 7).reshape(moved.shape)
    return np.moveaxis(q, 0, axis).astype(ml_dtypes.int4), np.moveaxis(scale, 0, axis)
