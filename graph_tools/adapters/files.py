"""Adapter files: the tensors one adapter feeds into a package's slots.

Two formats, picked by suffix (:data:`ADAPTER_SUFFIX`):

* ``.onnx_adapter``: onnxruntime's ``AdapterFormat`` (a flatbuffer), loadable with
  ``onnxruntime.LoraAdapter().Load(path)`` and activated per run with
  ``RunOptions.add_active_adapter(adapter)``. Written by :func:`_write_onnx_adapter` to
  onnxruntime's schema, read with onnxruntime's ``AdapterFormat.read_adapter``.
* ``.safetensors``: written with ``safetensors.numpy``; ``metadata`` lands in the header.

Writes are atomic (temp file beside the destination, renamed on success); every way a file can be
broken is an :class:`AdapterError` naming the file, never a raw onnxruntime/safetensors traceback.

How onnxruntime 1.32 matches ``.onnx_adapter`` parameters to a graph (checked in
``tests/test_adapter_files.py``):

* Each parameter is fed as if it were an input feed of the same name. A parameter must therefore
  be a **graph input**. Our slots are graph inputs *with a default initializer*: they work with
  ``InferenceSession.run`` and fall back to the default when no adapter is active.
* A **pure graph input** (no initializer) is filled by the adapter inside ORT's C++ core, but the
  Python ``InferenceSession.run`` wrapper checks the feed dict first and raises ``Required inputs
  ([...]) are missing from input feed`` before adapters are applied: slots need defaults.
* An **initializer that is not a graph input** cannot be set: ``Invalid input name: <name>``.
* A parameter name the graph does not have is fatal for the whole run (``Invalid input name``):
  an adapter file must hold only slot names. A missing parameter leaves that slot at its default
  (zero rank), which then mismatches the other slots of the site: an adapter must be complete.
* dtypes must match the graph input exactly (``Unexpected input data type``); no casting.
* Active adapters' parameters are appended to the feeds without a duplicate check: ORT does not
  sum or concatenate adapters, so running several at once needs rank-concatenated tensors in one
  adapter. Which duplicate wins is unspecified (1.32: an adapter over a feed, the first adapter
  added over later ones); do not rely on it.
* ``RunOptions.add_active_adapter`` stores a raw pointer and keeps **no reference** to the
  ``LoraAdapter``: the caller must keep the adapter object alive as long as the run options are
  used (a collected adapter is a use-after-free; in 1.32 it silently stops applying).

dtypes: the numeric ONNX tensor types ``OrtValue`` can be built from numpy (what
``AdapterFormat.export_adapter`` could write): float32/16/64, int8/16/32/64, uint8/16/32/64, and
bfloat16 (stored as its bits; ``OrtValue.numpy()`` cannot return bfloat16, so it is read back
from the raw buffer). bool, float8 and int4 are refused, as are 0-d tensors in ``.onnx_adapter`` (ORT writes them
but cannot read them back: "dims is missing or empty"; use shape ``(1,)``). ``.onnx_adapter`` has no
free-form metadata: only ``adapter_version`` / ``model_version`` integers, taken from ``metadata``
keys of those names; other keys are not stored (the package manifest carries them).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import struct
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx_ir as ir

from graph_tools._io import atomic_file
from graph_tools.errors import AdapterError, first_line

__all__ = [
    "ADAPTER_SUFFIX",
    "ADAPTER_FORMATS",
    "SUPPORTED_DTYPES",
    "write_adapter",
    "read_adapter",
    "read_adapter_metadata",
    "adapter_format_of",
]

logger = logging.getLogger(__name__)

ADAPTER_SUFFIX: dict[str, str] = {"onnx_adapter": ".onnx_adapter", "safetensors": ".safetensors"}
ADAPTER_FORMATS = tuple(ADAPTER_SUFFIX)

#: the element types both formats store (ours: bool, float8 and int4 do not fit both); the numpy
#: <-> ONNX mapping itself is onnx-ir's ``ir.DataType``
_STORED = tuple(ir.DataType[n] for n in (
    "FLOAT", "UINT8", "INT8", "UINT16", "INT16", "INT32", "INT64", "FLOAT16", "DOUBLE", "UINT32", "UINT64", "BFLOAT16"))
_ONNX_TYPE: dict[np.dtype, ir.DataType] = {np.dtype(t.numpy()): t for t in _STORED}
SUPPORTED_DTYPES: tuple[str, ...] = tuple(dtype.name for dtype in _ONNX_TYPE)
_BFLOAT16 = np.dtype(ir.DataType.BFLOAT16.numpy())
_VERSION_KEYS = ("adapter_version", "model_version")
_ORT_LOCATION = re.compile(r"^\S+\.(?:cc|h):\d+ [^(]*\([^)]*\)\s*")


def adapter_format_of(path: str | os.PathLike) -> str:
    """Return ``"onnx_adapter"`` or ``"safetensors"`` from the file's suffix."""
    suffix = Path(path).suffix
    for fmt, fmt_suffix in ADAPTER_SUFFIX.items():
        if suffix == fmt_suffix:
            return fmt
    known = ", ".join(ADAPTER_SUFFIX.values())
    raise AdapterError(f"{path}: unknown adapter file suffix {suffix!r} (expected one of {known})")


def write_adapter(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    *,
    format: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` as one adapter file atomically and return its path.

    Args:
        path: destination; its suffix must match ``format`` (see :data:`ADAPTER_SUFFIX`).
        tensors: slot name -> array; dtypes from :data:`SUPPORTED_DTYPES`, finite values only.
        format: ``"onnx_adapter"`` or ``"safetensors"``; inferred from the suffix when ``None``.
        metadata: string key/values (safetensors header; see the module docstring for onnx_adapter).
    """
    path = Path(path)
    if format is None:
        format = adapter_format_of(path)
    elif format not in ADAPTER_SUFFIX:
        raise AdapterError(f"{path}: unknown adapter format {format!r} (expected one of {', '.join(ADAPTER_FORMATS)})")
    elif path.suffix != ADAPTER_SUFFIX[format]:
        raise AdapterError(f"{path}: a {format} adapter file must end in {ADAPTER_SUFFIX[format]!r}")
    metadata = _check_metadata(path, metadata)
    arrays = {name: _check_tensor(path, name, value, format) for name, value in tensors.items()}
    versions = _onnx_adapter_versions(path, metadata) if format == "onnx_adapter" else {}
    try:
        with atomic_file(path) as tmp:
            if format == "onnx_adapter":
                _write_onnx_adapter(tmp, arrays, versions)
            else:
                _write_safetensors(tmp, arrays, metadata)
    except (RuntimeError, ValueError, OSError) as exc:  # ORT/safetensors writer failures, full disk
        raise AdapterError(f"{path}: could not write {format} adapter ({_first_line(exc)})") from None
    logger.info("wrote %s adapter %s (%d tensors)", format, path, len(arrays))
    return path


def read_adapter(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an adapter file (format from the suffix) into fresh numpy arrays; values must be finite."""
    path = Path(path)
    fmt = adapter_format_of(path)
    _check_readable(path)
    arrays = _read_onnx_adapter(path) if fmt == "onnx_adapter" else _read_safetensors(path)
    for name, array in arrays.items():
        _check_finite(path, name, array)
    logger.debug("read %s adapter %s (%d tensors)", fmt, path, len(arrays))
    return arrays


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's metadata: the safetensors header, or onnx_adapter's version integers as strings."""
    path = Path(path)
    fmt = adapter_format_of(path)
    _check_readable(path)
    if fmt == "onnx_adapter":
        adapter = _load_adapter_format(path)
        return {
            "adapter_version": str(adapter.get_adapter_version()),
            "model_version": str(adapter.get_model_version()),
        }
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # SafetensorError, OSError, ...: all mean "not a readable file"
        raise AdapterError(f"{path}: not a valid safetensors adapter file ({_first_line(exc)})") from None


# --------------------------------------------------------------------------------------- checks


def _check_metadata(path: Path, metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise AdapterError(f"{path}: metadata must map str to str, got {key!r}: {type(value).__name__}")
    return dict(metadata)


def _check_tensor(path: Path, name: object, value: object, format: str) -> np.ndarray:
    if not isinstance(name, str) or not name:
        raise AdapterError(f"{path}: tensor names must be non-empty strings, got {name!r}")
    if not isinstance(value, (np.ndarray, np.generic)):
        raise AdapterError(f"{path}: tensor {name!r} is a {type(value).__name__}, not a numpy array")
    array = np.asarray(value, order="C")  # not ascontiguousarray: it turns 0-d into 1-d
    if array.dtype not in _ONNX_TYPE:
        raise AdapterError(
            f"{path}: tensor {name!r} has dtype {array.dtype}, adapter files hold {', '.join(SUPPORTED_DTYPES)}"
        )
    if format == "onnx_adapter" and array.ndim == 0:
        raise AdapterError(
            f"{path}: tensor {name!r} is 0-d; onnxruntime cannot read 0-d adapter parameters, use shape (1,)"
        )
    _check_finite(path, name, array)
    return array


#: IEEE floats: a value is non-finite exactly when all its exponent bits are set
_EXPONENT = {np.dtype(np.float16): (np.uint16, 0x7C00), _BFLOAT16: (np.uint16, 0x7F80),
             np.dtype(np.float32): (np.uint32, 0x7F800000), np.dtype(np.float64): (np.uint64, 0x7FF0000000000000)}


def _check_finite(path: Path, name: str, array: np.ndarray) -> None:
    if array.dtype.kind == "f" or array.dtype == _BFLOAT16:
        fast = _EXPONENT.get(array.dtype)  # native byte order only
        if fast is not None and array.size:  # one integer pass, 4x faster than isfinite on float16
            bits, mask = fast
            if np.bitwise_and(array.view(bits), bits(mask)).max() != mask:
                return
        finite = np.isfinite(array)
        if not finite.all():
            bad = array.reshape(-1)[int(np.argmin(finite.reshape(-1)))]
            count = int(finite.size - np.count_nonzero(finite))
            raise AdapterError(f"{path}: tensor {name!r} has {count} non-finite values (first: {float(bad)})")


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise AdapterError(f"{path}: no such adapter file")
    if not path.is_file():
        raise AdapterError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise AdapterError(f"{path}: empty file, not an adapter")


def _first_line(exc: BaseException) -> str:
    text = first_line(exc, limit=1000)
    # onnxruntime prefixes messages with its source location and C++ signature: keep the reason.
    text = _ORT_LOCATION.sub("", text)
    if " was false. " in text:
        text = text.split(" was false. ", 1)[1]
    return text[:200]


# ------------------------------------------------------------------------------- onnx_adapter


def _onnx_adapter_versions(path: Path, metadata: dict[str, str]) -> dict[str, int]:
    versions = {}
    for key in _VERSION_KEYS:
        text = metadata.get(key, "1")
        try:
            versions[key] = int(text)
        except ValueError:
            raise AdapterError(f"{path}: metadata {key!r} must be an integer string, got {text!r}") from None
    dropped = sorted(set(metadata) - set(_VERSION_KEYS))
    if dropped:
        logger.debug("%s: onnx_adapter has no free-form metadata; not stored: %s", path, ", ".join(dropped))
    return versions


#: ``Adapter.format_version`` onnxruntime writes and reads (``kAdapterFormatVersion``)
_ADAPTER_FORMAT_VERSION = 1
#: the vtable both tables share: 4 fields of 4 bytes at table offsets 4, 8, 12, 16
#: (Adapter: format_version, adapter_version, model_version, parameters;
#: Parameter: name, dims, data_type, raw_data)
_VTABLE = struct.pack("<6H", 12, 20, 4, 8, 12, 16)
_VT, _ROOT, _PARAMS = 8, 20, 40  # where the vtable, the Adapter table and its parameter vector sit
_MAX_FLATBUFFER = 2**31 - 1


def _write_onnx_adapter(tmp: Path, arrays: dict[str, np.ndarray], versions: dict[str, int]) -> None:
    """The flatbuffer of onnxruntime's ``adapter_schema.fbs`` (root ``Adapter``, identifier
    ``TORT``), written front to back: the tensors' bytes go from the arrays to the file, no copy.
    ``AdapterFormat.export_adapter`` builds the whole buffer in memory first: 2-5x slower for a
    24 MiB adapter. tests/test_adapter_files.py checks that onnxruntime reads these files as it
    reads its own (every stored dtype, versions, empty tensors) and runs them."""
    tables, pos = [], _PARAMS + 4 + 4 * len(arrays)
    for name, array in arrays.items():
        encoded = name.encode("utf-8")
        table = pos  # soffset, name, dims, data_type, raw_data: 20 bytes, 4-aligned
        text = table + 20  # length, bytes, NUL
        dims = text + 4 + len(encoded) + 1
        dims += -(dims + 4) % 8  # int64 dims 8-aligned
        raw = dims + 4 + 8 * array.ndim
        raw += -(raw + 4) % 16  # tensor bytes 16-aligned
        end = raw + 4 + array.nbytes
        pos = end + -end % 4
        tables.append((table, text, dims, raw, encoded, array))
    if pos > _MAX_FLATBUFFER:
        raise ValueError(f"{pos} bytes exceed the 2 GiB a flatbuffer can address")
    head = bytearray(_PARAMS + 4 + 4 * len(arrays))
    struct.pack_into("<I4s", head, 0, _ROOT, b"TORT")
    head[_VT:_VT + len(_VTABLE)] = _VTABLE
    struct.pack_into("<iiiiI", head, _ROOT, _ROOT - _VT, _ADAPTER_FORMAT_VERSION, versions["adapter_version"],
                     versions["model_version"], _PARAMS - (_ROOT + 16))
    struct.pack_into("<I", head, _PARAMS, len(arrays))
    for i, (table, *_) in enumerate(tables):
        slot = _PARAMS + 4 + 4 * i
        struct.pack_into("<I", head, slot, table - slot)  # offsets count from where they are stored
    with open(tmp, "wb") as f:
        f.write(head)
        for table, text, dims, raw, encoded, array in tables:
            meta = bytearray(raw + 4 - table)
            struct.pack_into("<iIIiI", meta, 0, table - _VT, text - (table + 4), dims - (table + 8),
                             _ONNX_TYPE[array.dtype].value, raw - (table + 16))
            struct.pack_into(f"<I{len(encoded)}s", meta, text - table, len(encoded), encoded)
            struct.pack_into(f"<I{array.ndim}q", meta, dims - table, array.ndim, *array.shape)
            struct.pack_into("<I", meta, raw - table, array.nbytes)
            f.write(meta)
            f.write(np.ascontiguousarray(array, array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8))
            f.write(bytes(-(raw + 4 + array.nbytes) % 4))


def _load_adapter_format(path: Path):
    import onnxruntime as ort

    try:
        return ort.AdapterFormat.read_adapter(str(path))
    except Exception as exc:  # ORT raises RuntimeError with a C++ location for every broken file
        raise AdapterError(f"{path}: not a valid onnx_adapter file ({_first_line(exc)})") from None


def _read_onnx_adapter(path: Path) -> dict[str, np.ndarray]:
    adapter = _load_adapter_format(path)
    by_onnx_type = {t.value: dtype for dtype, t in _ONNX_TYPE.items()}
    arrays: dict[str, np.ndarray] = {}
    try:
        params = adapter.get_parameters()
    except Exception as exc:
        raise AdapterError(f"{path}: not a valid onnx_adapter file ({_first_line(exc)})") from None
    for name, value in params.items():
        dtype = by_onnx_type.get(value.element_type())
        if dtype is None:
            raise AdapterError(
                f"{path}: tensor {name!r} has {value.data_type()}, not one of {', '.join(SUPPORTED_DTYPES)}"
            )
        shape = tuple(value.shape())
        if dtype == _BFLOAT16:  # OrtValue.numpy() has no bfloat16: copy the raw buffer
            size = value.tensor_size_in_bytes()
            raw = ctypes.string_at(value.data_ptr(), size) if size else b""
            arrays[name] = np.frombuffer(raw, dtype=np.uint16).view(_BFLOAT16).reshape(shape).copy()
        else:  # read values are zero-copy views of the mapped file: copy so nothing keeps it open
            arrays[name] = np.array(value.numpy(), dtype=dtype, copy=True).reshape(shape)
    return arrays


# -------------------------------------------------------------------------------- safetensors


def _write_safetensors(tmp: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    save_file(arrays, str(tmp), metadata=metadata or None)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, ValueError ...: all mean "not a readable file"
        raise AdapterError(f"{path}: not a valid safetensors adapter file ({_first_line(exc)})") from None
    for name, array in arrays.items():
        if array.dtype not in _ONNX_TYPE:
            raise AdapterError(
                f"{path}: tensor {name!r} has dtype {array.dtype}, not one of {', '.join(SUPPORTED_DTYPES)}"
            )
    return arrays
