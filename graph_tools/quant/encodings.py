"""AIMET encodings files: write, validate and read format versions 1.0.0 (default) and 2.0.0.

An encodings file maps tensor names of a QDQ graph to quantization parameters, for QNN/QAIRT.
This module holds them as :class:`TensorEncoding` records inside an :class:`Encodings` and
converts both ways between them, the JSON formats, and ONNX ``QuantizeLinear`` parameters.

Conventions (as AIMET itself writes them)
-----------------------------------------
* **1.0.0** (``{"version", "activation_encodings": [...], "param_encodings": [...],
  "excluded_layers": [...], "quantizer_args": {...}}``; entries ``name, dtype, enc_type, bw,
  is_sym, scale, offset`` and ``block_size`` for ``PER_BLOCK``): the fields and their meaning are
  AIMET's "Encoding Format Specification", section "Version 1.0.0" (quic/aimet,
  ``Docs/api_docs/quantization_encoding_specification.rst``); ``dtype`` is spelled ``"INT"`` /
  ``"FLOAT"`` as the exporter writes it (``QcQuantizeOp._export_1_0_0_encodings`` in
  ``TrainingExtensions/onnx/src/python/aimet_onnx/qc_quantize_op.py``). A float entry is just
  ``{"name", "dtype": "FLOAT", "enc_type": "PER_TENSOR", "bw": 16}`` (aimet_onnx
  ``FloatEncoding._to_1_0_0``).
* **Offset sign.** 1.0.0 offsets live on the *unsigned* grid ``q_u in [0, 2**bw - 1]`` whatever
  the type: ``x ~= (q_u + offset) * scale`` ("1.0.0 encoding offset assumes uint",
  aimet_onnx ``AffineEncoding._to_1_0_0``). ONNX dequantizes ``(q - zero_point) * scale`` with
  ``q in [qmin, qmax]`` of its type and ``q_u = q - qmin``, hence::

      offset = qmin - zero_point      uint<bw>: offset = -zero_point
                                      int<bw>:  offset = -zero_point - 2**(bw - 1)

  exactly the inverse of the comment in ``QcQuantizeOp._export_2_0_0_encodings``
  (``y_zero_point = -offset`` for uint, ``-offset - 2 ** (bits - 1)`` for int). A symmetric int8
  tensor (zero point 0) thus has offset -128; an offset is always in ``[-(2**bw - 1), 0]``.
* **is_sym** is AIMET's "signed type" flag: ``is_sym`` <=> the ONNX type is ``int<bw>``, else
  ``uint<bw>`` (``AffineEncoding._to_1_0_0`` writes ``is_sym = self.signed``; ``_from_1_0_0``
  reads ``dtype = int<bw> if is_sym else uint<bw>``). A signed type with a non-zero zero point
  keeps ``is_sym=True`` and carries the zero point in the offset.
* **Per-block order (1.0.0).** ``scale``/``offset`` are flat, channel-major: output channel first,
  then its blocks (spec: length = out_channels x in_channels / block_size; AIMET transposes the
  ``(in/B, out)`` scales of a MatMul weight to ``(out, in/B)`` before flattening,
  ``_should_permute_to_1_0_0_blockwise_ordering``). :class:`TensorEncoding` always stores this
  order; per-block is supported for 2-D weights (MatMul/Gemm), the case ONNX blockwise
  ``QuantizeLinear`` defines.
* **2.0.0** (``{"version": "2.0.0", "encodings": [...]}``; entries ``name, output_dtype
  ("int8", "uint4", ...), y_scale, y_zero_point, axis, block_size``): the names and shapes of ONNX
  ``QuantizeLinear``: ``y_zero_point`` is ONNX's zero point (omitted when all zero), ``axis`` is
  the channel axis (per-channel) or the block axis (blockwise), ``y_scale`` is a scalar, a list, or
  nested lists in ONNX's blockwise shape (``_export_2_0_0_encodings``, ``AffineEncoding._to_2_0_0``;
  top level as in Qualcomm fastforward's ``V2SchemaHandler`` and aimet_onnx ``load_encodings``,
  which reads ``encodings["encodings"]``). Float16 tensors have no 2.0.0 entry (``FloatEncoding
  ._to_2_0_0`` returns ``{}``); they are dropped on write. 2.0.0 does not say which entries are
  parameters: :func:`read_encodings` splits them by the model's initializers when given one.
* Not supported (refused with :class:`EncodingsError`): LPBQ entries, non-zero
  ``zero_point_shift``, legacy versions (0.6.1 and older), float types other than 16/32 bits in
  1.0.0 and float encodings other than float16 in 2.0.0.

Files are validated against ``schemas/encodings_<version>.schema.json`` (JSON Schema 2020-12)
and against the rules above, both when read and before being written; writes are atomic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.resources
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

import jsonschema
import numpy as np
import onnx_ir as ir

from graph_tools._io import atomic_file, load_model
from graph_tools.errors import EncodingsError

if TYPE_CHECKING:
    import onnx

__all__ = [
    "VERSIONS",
    "DEFAULT_VERSION",
    "ENC_TYPES",
    "TensorEncoding",
    "Encodings",
    "QuantizeLinearParams",
    "write_encodings",
    "read_encodings",
    "validate_encodings",
    "encodings_to_dict",
    "encodings_from_dict",
    "from_quantize_linear",
    "to_quantize_linear",
    "check_against_graph",
]

logger = logging.getLogger(__name__)

VERSIONS = ("1.0.0", "2.0.0")
DEFAULT_VERSION = "1.0.0"
ENC_TYPES = ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK")
EncType = Literal["PER_TENSOR", "PER_CHANNEL", "PER_BLOCK"]
QType = str | np.dtype | type | ir.DataType

_FLOAT_BITWIDTHS = (16, 32)
#: the ONNX integer types an int encoding maps to (ir.DataType gives their numpy dtypes)
_ONNX_QTYPES = {t.name.lower(): t for t in (ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8,
                                            ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32)}


@dataclasses.dataclass(frozen=True)
class TensorEncoding:
    """The quantization encoding of one tensor, in AIMET 1.0.0 terms (see module docstring).

    Attributes:
        name: tensor (value) name in the QDQ graph.
        bitwidth: ``bw``, 4..32 (16 or 32 for float).
        scale: one scale per tensor, channel, or block (channel-major), > 0.
        offset: AIMET offsets on the unsigned grid, same length as ``scale``.
        is_symmetric: ``is_sym``: the ONNX type is signed (``int<bw>``, else ``uint<bw>``).
        dtype: ``"int"`` or ``"float"`` (float: no scale/offset, per-tensor).
        enc_type: ``PER_TENSOR``, ``PER_CHANNEL`` or ``PER_BLOCK``.
        block_size: block length along ``axis`` (``PER_BLOCK`` only).
        axis: ONNX ``QuantizeLinear`` axis: channel axis (per-channel) or block axis (per-block).
            Written to 2.0.0 only; ``None`` when read from 1.0.0.
        scale_shape: shape of ONNX's blockwise scale tensor, e.g. ``(in // B, out)`` for a
            ``(in, out)`` MatMul weight with ``axis=0`` (``PER_BLOCK`` only; ``None`` from 1.0.0).
    """

    name: str
    bitwidth: int
    scale: tuple[float, ...] = ()
    offset: tuple[int, ...] = ()
    is_symmetric: bool = False
    dtype: Literal["int", "float"] = "int"
    enc_type: EncType = "PER_TENSOR"
    block_size: int | None = None
    axis: int | None = None
    scale_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("scale", tuple(float(s) for s in _dense(self.name, "scale", self.scale, np.float64).reshape(-1)))
        set_("offset", _as_ints(self.name, "offset", self.offset))
        if self.scale_shape is not None:
            set_("scale_shape", _as_ints(self.name, "scale_shape", self.scale_shape))
        _check_tensor(self)


@dataclasses.dataclass
class Encodings:
    """The content of one encodings file.

    Attributes:
        version: format version the encodings were read from (writing chooses its own).
        activation_encodings, param_encodings: tensor name -> encoding.
        excluded_layers, quantizer_args: 1.0.0's optional metadata (not part of 2.0.0).
    """

    version: str = DEFAULT_VERSION
    activation_encodings: dict[str, TensorEncoding] = dataclasses.field(default_factory=dict)
    param_encodings: dict[str, TensorEncoding] = dataclasses.field(default_factory=dict)
    excluded_layers: list[str] = dataclasses.field(default_factory=list)
    quantizer_args: dict[str, Any] | None = None

    def add(self, encoding: TensorEncoding, *, param: bool = False) -> None:
        """Add one encoding; a name may appear once in the whole file."""
        if encoding.name in self.activation_encodings or encoding.name in self.param_encodings:
            raise EncodingsError(f"tensor {encoding.name!r}: encoded twice")
        (self.param_encodings if param else self.activation_encodings)[encoding.name] = encoding

    @property
    def tensors(self) -> dict[str, TensorEncoding]:
        """Every encoding by name, parameters first."""
        return {**self.param_encodings, **self.activation_encodings}


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizeLinearParams:
    """ONNX ``QuantizeLinear``/``DequantizeLinear`` inputs and attributes for one tensor.

    ``scale`` is float32; ``zero_point`` has the quantized type's numpy dtype (``ml_dtypes.int4``
    / ``uint4`` for 4 bits); both are 0-D (per-tensor), 1-D (per-channel) or ONNX's blockwise shape.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None
    block_size: int | None = None

    @property
    def qtype(self) -> str:
        """The quantized type, e.g. ``"int8"`` or ``"uint16"``."""
        return np.dtype(self.zero_point.dtype).name


# -- conversions with ONNX QuantizeLinear --------------------------------------------------------
def from_quantize_linear(
    name: str,
    scale: Any,
    zero_point: Any = None,
    *,
    qtype: QType | None = None,
    axis: int | None = None,
    block_size: int | None = None,
) -> TensorEncoding:
    """The AIMET encoding of ``QuantizeLinear(x, scale, zero_point, axis=, block_size=)``.

    ``qtype`` is the quantized type (``"int8"``, ``np.uint16``, ``ml_dtypes.int4``,
    ``ir.DataType.UINT8`` ...); by default the dtype of ``zero_point`` when it is an array, or
    ONNX's default ``uint8`` without a zero point. A 1-D ``scale`` of several values needs
    ``axis``; blockwise needs a 2-D ``scale``, ``axis`` (the block axis) and ``block_size``.
    """
    if qtype is None:
        qtype = zero_point.dtype if isinstance(zero_point, (np.ndarray, np.generic)) else "uint8"
    signed, bitwidth = _parse_qtype(name, qtype)
    scale_arr = _dense(name, "scale", scale, np.float64)
    zp = np.zeros(scale_arr.shape, np.int64) if zero_point is None else np.asarray(zero_point).astype(np.int64)
    if zp.shape != scale_arr.shape:
        raise EncodingsError(f"tensor {name!r}: zero point shape {zp.shape} differs from scale shape {scale_arr.shape}")
    return _from_onnx_arrays(name, scale_arr, zp, signed, bitwidth, axis=axis, block_size=block_size)


def to_quantize_linear(
    encoding: TensorEncoding, *, axis: int | None = None, weight_shape: Sequence[int] | None = None
) -> QuantizeLinearParams:
    """The ONNX ``QuantizeLinear`` parameters of an int encoding (inverse of :func:`from_quantize_linear`).

    ``axis`` overrides ``encoding.axis`` and ``weight_shape`` gives the blockwise scale shape:
    both are needed for encodings read from 1.0.0, which stores neither.
    """
    scale, zp, signed, axis, block_size = _onnx_arrays(encoding, axis=axis, weight_shape=weight_shape)
    qtype = f"{'' if signed else 'u'}int{encoding.bitwidth}"
    if qtype not in _ONNX_QTYPES:
        raise EncodingsError(f"tensor {encoding.name!r}: no ONNX type for {qtype}")
    return QuantizeLinearParams(scale.astype(np.float32), zp.astype(_ONNX_QTYPES[qtype].numpy()), axis, block_size)


def _from_onnx_arrays(
    name: str,
    scale: np.ndarray,
    zp: np.ndarray,
    signed: bool,
    bitwidth: int,
    *,
    axis: int | None,
    block_size: int | None,
) -> TensorEncoding:
    qmin, qmax = _qrange(signed, bitwidth)
    if zp.size and (zp.min() < qmin or zp.max() > qmax):
        raise EncodingsError(f"tensor {name!r}: zero point outside [{qmin}, {qmax}] of its type")
    offset = qmin - zp  # the ONNX -> AIMET rule (module docstring)
    common = dict(name=name, bitwidth=bitwidth, is_symmetric=signed)
    if block_size is not None:
        if scale.ndim != 2 or axis is None or not -2 <= axis < 2:
            raise EncodingsError(
                f"tensor {name!r}: blockwise needs a 2-D scale and axis 0 or 1, got shape {scale.shape} and axis {axis}"
            )
        axis %= 2
        channel = 1 - axis
        return TensorEncoding(
            **common,
            scale=np.moveaxis(scale, channel, 0).reshape(-1),
            offset=np.moveaxis(offset, channel, 0).reshape(-1),
            enc_type="PER_BLOCK",
            block_size=block_size,
            axis=axis,
            scale_shape=scale.shape,
        )
    if scale.size == 1 and (axis is None or scale.ndim == 0):
        return TensorEncoding(**common, scale=scale.reshape(-1), offset=offset.reshape(-1))
    if scale.ndim != 1 or axis is None:
        raise EncodingsError(
            f"tensor {name!r}: per-channel scale must be 1-D with an axis, got shape {scale.shape} and axis {axis}"
        )
    return TensorEncoding(**common, scale=scale, offset=offset, enc_type="PER_CHANNEL", axis=axis)


def _onnx_arrays(
    enc: TensorEncoding, *, axis: int | None = None, weight_shape: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, bool, int | None, int | None]:
    """``(scale float64, zero_point int64, signed, axis, block_size)`` in ONNX layout."""
    if enc.dtype != "int":
        raise EncodingsError(f"tensor {enc.name!r}: a float encoding has no QuantizeLinear parameters")
    qmin, _ = _qrange(enc.is_symmetric, enc.bitwidth)
    scale = np.asarray(enc.scale, dtype=np.float64)
    zp = qmin - np.asarray(enc.offset, dtype=np.int64)
    axis = enc.axis if axis is None else axis
    if enc.enc_type == "PER_TENSOR":
        return scale.reshape(()), zp.reshape(()), enc.is_symmetric, None, None
    if axis is None:
        raise EncodingsError(f"tensor {enc.name!r}: {enc.enc_type} encoding has no axis (1.0.0 does not store it)")
    if enc.enc_type == "PER_CHANNEL":
        return scale, zp, enc.is_symmetric, axis, None
    shape = enc.scale_shape
    if shape is None and weight_shape is not None:
        if len(weight_shape) != 2 or not -2 <= axis < 2:
            raise EncodingsError(f"tensor {enc.name!r}: per-block needs a 2-D weight, got shape {tuple(weight_shape)}")
        shape = tuple(-(-d // enc.block_size) if i == axis % 2 else d for i, d in enumerate(weight_shape))
    if shape is None:
        raise EncodingsError(f"tensor {enc.name!r}: per-block encoding has no scale shape (1.0.0 does not store it)")
    axis %= 2
    channel = 1 - axis
    if shape[channel] * shape[axis] != scale.size:
        raise EncodingsError(f"tensor {enc.name!r}: {scale.size} block scales do not fill shape {shape}")

    def to_onnx(flat: np.ndarray) -> np.ndarray:
        return np.moveaxis(flat.reshape(shape[channel], shape[axis]), 0, channel)

    return to_onnx(scale), to_onnx(zp), enc.is_symmetric, axis, enc.block_size


# -- JSON <-> Encodings --------------------------------------------------------------------------
def encodings_to_dict(encodings: Encodings, version: str = DEFAULT_VERSION) -> dict[str, Any]:
    """The JSON object of ``encodings`` in format ``version``, validated against its schema."""
    _check_version(version)
    _check_encodings(encodings)
    if version == "1.0.0":
        obj: dict[str, Any] = {
            "version": version,
            "activation_encodings": [_to_v1(e) for e in encodings.activation_encodings.values()],
            "param_encodings": [_to_v1(e) for e in encodings.param_encodings.values()],
            "excluded_layers": list(encodings.excluded_layers),
        }
        if encodings.quantizer_args is not None:
            obj["quantizer_args"] = dict(encodings.quantizer_args)
    else:
        entries = [_to_v2(e) for e in encodings.tensors.values()]
        dropped = entries.count(None)
        if dropped:
            logger.info("encodings 2.0.0: %d float16 tensors have no entry", dropped)
        if encodings.excluded_layers or encodings.quantizer_args:
            logger.info("encodings 2.0.0: excluded_layers and quantizer_args are not part of the format, dropped")
        obj = {"version": version, "encodings": [e for e in entries if e is not None]}
    validate_encodings(obj, version)
    return obj


def encodings_from_dict(obj: Any, *, model: ir.Model | None = None) -> Encodings:
    """Validate a JSON object of either version and return its :class:`Encodings`.

    2.0.0 entries whose name is an initializer of ``model`` become parameter encodings; without
    a model every 2.0.0 entry is an activation encoding.
    """
    version = _detect_version(obj)
    _schema_check(obj, version)
    result = Encodings(version=version)
    if version == "1.0.0":
        for key, param in (("param_encodings", True), ("activation_encodings", False)):
            for index, entry in enumerate(obj[key]):
                with _at(f"{key}[{index}]"):
                    result.add(_from_v1(entry), param=param)
        result.excluded_layers = list(obj.get("excluded_layers", []))
        result.quantizer_args = obj.get("quantizer_args")
    else:
        params = set(model.graph.initializers) if model is not None else set()
        for index, entry in enumerate(obj["encodings"]):
            with _at(f"encodings[{index}]"):
                result.add(_from_v2(entry), param=entry["name"] in params)
    return result


def validate_encodings(obj: Any, version: str | None = None) -> str:
    """Check a JSON object against the schema and rules of its version; return the version."""
    found = _detect_version(obj)
    if version is not None and found != _check_version(version):
        raise EncodingsError(f"encodings are version {found}, expected {version}")
    encodings_from_dict(obj)
    return found


def write_encodings(path: str | os.PathLike, encodings: Encodings, version: str = DEFAULT_VERSION) -> Path:
    """Validate, then atomically write ``encodings`` as JSON in format ``version``; return the path."""
    path = Path(path)
    with _about(path):
        text = json.dumps(encodings_to_dict(encodings, version), indent=2, allow_nan=False) + "\n"
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    logger.info(
        "wrote %s (version %s): %d param and %d activation encodings",
        path, version, len(encodings.param_encodings), len(encodings.activation_encodings),
    )  # fmt: skip
    return path


def read_encodings(path: str | os.PathLike, *, model: ir.Model | onnx.ModelProto | str | os.PathLike | None = None) -> Encodings:
    """Read and validate an encodings file of either version (see :func:`encodings_from_dict`);
    with ``model`` (an ``ir.Model``, ``onnx.ModelProto`` or path), every encoded tensor must also
    be a value of that graph."""
    path = Path(path)
    if model is not None:
        model = load_model(model)
    if not path.is_file():
        raise EncodingsError(f"{path}: no such file")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EncodingsError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise EncodingsError(f"{path}: not a text file") from None
    except RecursionError:
        raise EncodingsError(f"{path}: encodings file is nested too deeply to be read") from None
    with _about(path):
        encodings = encodings_from_dict(obj, model=model)
        if model is not None:  # an encodings file must describe this graph's tensors
            values = _graph_values(model.graph)
            missing = [name for name in encodings.tensors if name not in values]
            if missing:
                more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
                raise EncodingsError(f"tensor {missing[0]!r} has an encoding but is not a value of the graph{more}")
        return encodings


def check_against_graph(encodings: Encodings, model: ir.Model) -> None:
    """Raise :class:`EncodingsError` unless every encoded tensor is a value of ``model``'s graph.

    Where the value's shape is static, per-channel scale counts and block shapes are checked too.
    """
    values = _graph_values(model.graph)
    missing = [name for name in encodings.tensors if name not in values]
    if missing:
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise EncodingsError(f"tensor {missing[0]!r} has an encoding but is not a value of the graph{more}")
    for enc in encodings.tensors.values():
        _check_shape(enc, values[enc.name].shape)


# -- 1.0.0 / 2.0.0 entries -----------------------------------------------------------------------
def _to_v1(enc: TensorEncoding) -> dict[str, Any]:
    if enc.dtype == "float":
        return {"name": enc.name, "dtype": "FLOAT", "enc_type": "PER_TENSOR", "bw": enc.bitwidth}
    entry = {
        "name": enc.name,
        "dtype": "INT",
        "enc_type": enc.enc_type,
        "bw": enc.bitwidth,
        "is_sym": enc.is_symmetric,
        "scale": list(enc.scale),
        "offset": list(enc.offset),
    }
    if enc.block_size is not None:
        entry["block_size"] = enc.block_size
    return entry


def _from_v1(entry: dict[str, Any]) -> TensorEncoding:
    name = entry["name"]
    if entry["enc_type"] == "LPBQ":
        raise EncodingsError(f"tensor {name!r}: enc_type LPBQ is not supported")
    if any(entry.get("zero_point_shift", ())):
        raise EncodingsError(f"tensor {name!r}: a non-zero zero_point_shift is not supported")
    if entry["dtype"] == "FLOAT":
        return TensorEncoding(name=name, bitwidth=entry["bw"], dtype="float")
    return TensorEncoding(
        name=name,
        bitwidth=entry["bw"],
        scale=entry["scale"],
        offset=entry["offset"],
        is_symmetric=entry["is_sym"],
        enc_type=entry["enc_type"],
        block_size=entry.get("block_size"),
    )


def _to_v2(enc: TensorEncoding) -> dict[str, Any] | None:
    if enc.dtype == "float":
        if enc.bitwidth == 16:
            return None
        raise EncodingsError(f"tensor {enc.name!r}: float{enc.bitwidth} has no 2.0.0 encoding")
    scale, zp, signed, axis, block_size = _onnx_arrays(enc)
    entry: dict[str, Any] = {
        "name": enc.name,
        "output_dtype": f"{'' if signed else 'u'}int{enc.bitwidth}",
        "y_scale": scale.tolist(),
    }
    if np.any(zp):
        entry["y_zero_point"] = zp.tolist()
    if axis is not None:
        entry["axis"] = axis
    if block_size is not None:
        entry["block_size"] = block_size
    return entry


def _from_v2(entry: dict[str, Any]) -> TensorEncoding:
    name = entry["name"]
    if "per_block_int_scale" in entry:
        raise EncodingsError(f"tensor {name!r}: LPBQ encodings are not supported")
    signed, bitwidth = _parse_qtype(name, entry["output_dtype"])
    scale = _dense(name, "y_scale", entry["y_scale"], np.float64)
    zp = _dense(name, "y_zero_point", entry.get("y_zero_point", 0), np.int64)
    if zp.shape != scale.shape:
        if zp.ndim:
            raise EncodingsError(
                f"tensor {name!r}: y_zero_point shape {zp.shape} differs from y_scale shape {scale.shape}"
            )
        zp = np.full(scale.shape, zp, np.int64)
    return _from_onnx_arrays(
        name, scale, zp, signed, bitwidth, axis=entry.get("axis"), block_size=entry.get("block_size")
    )


# -- checks --------------------------------------------------------------------------------------
def _check_tensor(enc: TensorEncoding) -> None:
    """The rules the schemas cannot express, on one encoding (messages name the tensor)."""

    def fail(problem: str) -> None:
        raise EncodingsError(f"tensor {enc.name!r}: {problem}")

    if not isinstance(enc.name, str) or not enc.name:
        raise EncodingsError(f"encoding name must be a non-empty string, got {enc.name!r}")
    if enc.dtype not in ("int", "float"):
        fail(f"dtype must be 'int' or 'float', got {enc.dtype!r}")
    if not isinstance(enc.is_symmetric, bool):
        fail(f"is_symmetric must be a bool, got {enc.is_symmetric!r}")
    if enc.enc_type not in ENC_TYPES:
        fail(f"enc_type must be one of {', '.join(ENC_TYPES)}, got {enc.enc_type!r}")
    if not (_is_int(enc.bitwidth) and 4 <= enc.bitwidth <= 32):
        fail(f"bitwidth must be an integer in [4, 32], got {enc.bitwidth!r}")
    if enc.dtype == "float":
        if enc.bitwidth not in _FLOAT_BITWIDTHS or enc.scale or enc.offset or enc.is_symmetric:
            fail("a float encoding is float16/float32 without scale, offset or is_sym")
        if enc.enc_type != "PER_TENSOR" or enc.block_size or enc.axis is not None or enc.scale_shape:
            fail("a float encoding is per-tensor")
        return
    if not enc.scale or len(enc.scale) != len(enc.offset):
        fail(f"needs as many offsets as scales (>= 1), got {len(enc.scale)} scales and {len(enc.offset)} offsets")
    bad_scales = [s for s in enc.scale if not (math.isfinite(s) and s > 0)]
    if bad_scales:
        fail(f"scales must be finite and > 0, got {bad_scales[0]}")
    low = -(2**enc.bitwidth - 1)
    bad = [o for o in enc.offset if not low <= o <= 0]
    if bad:
        fail(f"offset {bad[0]} outside [{low}, 0] for bw {enc.bitwidth} (AIMET offsets are qmin - zero_point)")
    if enc.enc_type == "PER_TENSOR" and (len(enc.scale) != 1 or enc.axis is not None):
        fail(f"a per-tensor encoding has one scale and no axis, got {len(enc.scale)} scales")
    if (enc.enc_type == "PER_BLOCK") != (enc.block_size is not None):
        fail("block_size goes with enc_type PER_BLOCK (and only with it)")
    if enc.enc_type == "PER_BLOCK" and not (_is_int(enc.block_size) and enc.block_size >= 1):
        fail(f"block_size must be a positive integer, got {enc.block_size!r}")
    if enc.scale_shape is not None and (
        enc.enc_type != "PER_BLOCK" or len(enc.scale_shape) != 2 or math.prod(enc.scale_shape) != len(enc.scale)
    ):
        fail(f"scale_shape {enc.scale_shape} must be the 2-D shape of the {len(enc.scale)} block scales")
    if enc.axis is not None and not _is_int(enc.axis):
        fail(f"axis must be an integer, got {enc.axis!r}")


def _check_encodings(encodings: Encodings) -> None:
    for kind, mapping in (("param", encodings.param_encodings), ("activation", encodings.activation_encodings)):
        for key, enc in mapping.items():
            if not isinstance(enc, TensorEncoding):
                raise EncodingsError(f"{kind} encoding {key!r} is a {type(enc).__name__}, not a TensorEncoding")
            if key != enc.name:
                raise EncodingsError(f"{kind} encoding stored under {key!r} is named {enc.name!r}")
    both = encodings.param_encodings.keys() & encodings.activation_encodings.keys()
    if both:
        raise EncodingsError(f"tensor {sorted(both)[0]!r}: both a param and an activation encoding")
    if not all(isinstance(layer, str) for layer in encodings.excluded_layers):
        raise EncodingsError("excluded_layers must be layer names (strings)")


def _check_shape(enc: TensorEncoding, shape: ir.Shape | None) -> None:
    if shape is None or enc.axis is None or enc.enc_type == "PER_TENSOR":
        return
    dims = list(shape)
    if not -len(dims) <= enc.axis < len(dims):
        raise EncodingsError(f"tensor {enc.name!r}: axis {enc.axis} out of range for rank {len(dims)}")
    if enc.enc_type == "PER_CHANNEL":
        size = dims[enc.axis]
        if isinstance(size, int) and size != len(enc.scale):
            raise EncodingsError(
                f"tensor {enc.name!r}: {len(enc.scale)} per-channel scales, axis {enc.axis} has {size}"
            )
        return
    if enc.scale_shape is None or len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return
    expected = tuple(-(-d // enc.block_size) if i == enc.axis % 2 else d for i, d in enumerate(dims))
    if expected != enc.scale_shape:
        raise EncodingsError(
            f"tensor {enc.name!r}: block scales of shape {enc.scale_shape}, shape {tuple(dims)} "
            f"with block_size {enc.block_size} needs {expected}"
        )


def _schema_check(obj: dict[str, Any], version: str) -> None:
    error = jsonschema.exceptions.best_match(_validator(version).iter_errors(obj))
    if error is None:
        return
    path = list(error.absolute_path)
    where = "top level"
    if path:
        where = str(path[0])
        if len(path) > 1 and isinstance(path[1], int):
            entry = obj[path[0]][path[1]]
            name = entry.get("name") if isinstance(entry, dict) else None
            where += f"[{path[1]}]" + (f" {name!r}" if isinstance(name, str) else "")
            path = path[2:]
        else:
            path = path[1:]
        if path:
            where += ", field " + str(path[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path[1:])
    message = " ".join(error.message.split())
    raise EncodingsError(f"{where}: {message[:200] + ' ...' if len(message) > 200 else message}")


@functools.lru_cache(maxsize=None)
def _validator(version: str) -> jsonschema.protocols.Validator:
    resource = importlib.resources.files("graph_tools.quant").joinpath(f"schemas/encodings_{version}.schema.json")
    schema = json.loads(resource.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def _detect_version(obj: Any) -> str:
    if not isinstance(obj, dict):
        raise EncodingsError(f"top level must be a JSON object, got {type(obj).__name__}")
    if "version" not in obj:
        raise EncodingsError("no 'version' key (legacy 0.6.1 files are not supported; use 1.0.0 or 2.0.0)")
    return _check_version(obj["version"])


def _check_version(version: Any) -> str:
    if version not in VERSIONS:
        raise EncodingsError(f"unsupported encodings version {version!r} (supported: {', '.join(VERSIONS)})")
    return version


# -- small helpers -------------------------------------------------------------------------------
def _parse_qtype(name: str, qtype: QType) -> tuple[bool, int]:
    """``(signed, bitwidth)`` of ``"int8"``, ``np.uint16``, ``ml_dtypes.int4``, ``ir.DataType.INT8`` ..."""
    if isinstance(qtype, ir.DataType):
        text = qtype.name.lower()
    elif isinstance(qtype, str):
        text = qtype
    else:
        try:
            text = np.dtype(qtype).name
        except TypeError:
            text = repr(qtype)
    match = re.fullmatch(r"(u?)int(\d+)", text)
    if not match or not 4 <= int(match.group(2)) <= 32:
        raise EncodingsError(f"tensor {name!r}: {text!r} is not an integer quantization type of 4 to 32 bits")
    return not match.group(1), int(match.group(2))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _qrange(signed: bool, bitwidth: int) -> tuple[int, int]:
    return (-(2 ** (bitwidth - 1)), 2 ** (bitwidth - 1) - 1) if signed else (0, 2**bitwidth - 1)


def _as_ints(name: str, field: str, values: Any) -> tuple[int, ...]:
    arr = _dense(name, field, values, np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
        raise EncodingsError(f"tensor {name!r}: {field} values must be integers")
    return tuple(int(v) for v in arr)


def _dense(name: str, field: str, value: Any, dtype: type) -> np.ndarray:
    """``value`` as an array of ``dtype``; ragged or non-numeric input is an :class:`EncodingsError`."""
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        raise EncodingsError(f"tensor {name!r}: {field} must be numbers (a rectangular nested list)") from None


def _graph_values(graph: ir.Graph) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    values.update((name, v) for name, v in graph.initializers.items() if name)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in (*node.inputs, *node.outputs):
            if value is not None and value.name:
                values.setdefault(value.name, value)
    return values


@contextlib.contextmanager
def _at(where: str) -> Iterator[None]:
    """Prefix an error raised inside with the entry's position in the file."""
    try:
        yield
    except EncodingsError as exc:
        raise EncodingsError(f"{where}: {exc}") from None


@contextlib.contextmanager
def _about(path: Path) -> Iterator[None]:
    """Prefix an error raised inside with the file it is about."""
    try:
        yield
    except EncodingsError as exc:
        raise EncodingsError(f"{path}: {exc}") from None
