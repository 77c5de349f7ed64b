"""Model feeds checked before onnxruntime sees them: one typed error naming the input, instead of
ORT's "Unexpected input data type", a Gather's "indices element out of data bounds" or a
Reshape failure deep inside the graph.

* :func:`read_npz` reads a ``.npz`` of arrays (run feeds, calibration data): missing file, a bare
  ``.npy``, pickled/object arrays, a damaged member, no arrays -> the caller's error type.
* :func:`input_specs` takes a graph's model inputs (dtype, dims, and the size of the table an
  integer input indexes when it feeds a ``Gather`` over an initializer, e.g. the vocabulary);
  :func:`check_feeds` checks a feed dict against them: every value a numeric array of the input's
  dtype and rank, static dims equal, a symbolic dim one size across inputs, indices in range.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx_ir as ir

from graph_tools.errors import LoraOnnxError, first_line

__all__ = ["InputSpec", "input_specs", "check_feeds", "read_npz", "split_rows"]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One model input: numpy dtype (``None``: unknown), dims (int, dim name, or ``None``), and
    ``bound``: the indexed table's size when the input holds indices (``Gather`` over a weight)."""

    name: str
    dtype: np.dtype | None
    dims: tuple[int | str | None, ...] | None
    bound: tuple[int, str] | None = None


def input_specs(graph: ir.Graph, skip: set[str] = frozenset()) -> dict[str, InputSpec]:
    """Specs of the graph inputs that are not initializers and not in ``skip`` (adapter slots)."""
    specs = {}
    for value in graph.inputs:
        if value.name in skip or value.name in graph.initializers:
            continue
        dtype = None
        if value.dtype is not None:
            try:
                dtype = np.dtype(value.dtype.numpy())
            except (TypeError, ValueError):  # a type numpy cannot hold (float8, int4 ...)
                dtype = None
        dims = None
        if value.shape is not None:
            dims = tuple(d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None)
                         for d in value.shape)
        specs[value.name] = InputSpec(value.name, dtype, dims, _index_bound(value))
    return specs


def _index_bound(value: ir.Value) -> tuple[int, str] | None:
    """The smallest table size among the Gathers that read ``value`` as indices over a constant."""
    best = None
    for node, index in value.uses():
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or index != 1:
            continue
        data = node.inputs[0]
        if data is None or data.const_value is None or data.shape is None:
            continue
        axis = node.attributes.get_int("axis", 0)
        shape = data.shape
        if not -len(shape) <= axis < len(shape) or not isinstance(shape[axis], int):
            continue
        size = int(shape[axis])
        if best is None or size < best[0]:
            best = (size, data.name or node.name or "Gather")
    return best


def check_feeds(feeds: object, specs: Mapping[str, InputSpec], *, error: type[LoraOnnxError] = LoraOnnxError,
                where: str = "") -> None:
    """Refuse feeds ORT would fail on (see module docstring); ``where`` prefixes messages."""
    prefix = f"{where}: " if where else ""
    if not isinstance(feeds, Mapping):
        raise error(f"{prefix}feeds must be a dict of input name -> numpy array, not {type(feeds).__name__}")
    sizes: dict[str, tuple[int, str]] = {}
    for name, value in feeds.items():
        spec = specs.get(name)
        if spec is None:
            continue  # unknown names: the caller says which inputs exist
        if not isinstance(value, (np.ndarray, np.generic)):
            raise error(f"{prefix}feed {name!r} is a {type(value).__name__}, not a numpy array")
        if value.dtype.kind in "OUSV":
            raise error(f"{prefix}feed {name!r} has dtype {value.dtype}; the model takes numeric {spec.dtype or 'tensors'}")
        if spec.dtype is not None and value.dtype != spec.dtype:
            raise error(f"{prefix}feed {name!r} has dtype {value.dtype}, the model expects {spec.dtype}")
        if spec.dims is not None:
            if value.ndim != len(spec.dims):
                raise error(f"{prefix}feed {name!r} has shape {list(value.shape)}, the model expects {_dims(spec.dims)}")
            for axis, (dim, size) in enumerate(zip(spec.dims, value.shape)):
                if isinstance(dim, int) and dim != size:
                    raise error(f"{prefix}feed {name!r} has shape {list(value.shape)}, the model expects {_dims(spec.dims)}")
                if isinstance(dim, str):
                    seen = sizes.setdefault(dim, (size, name))
                    if seen[0] != size:
                        raise error(
                            f"{prefix}feed {name!r} has {dim}={size} (axis {axis}) but feed {seen[1]!r} has {dim}={seen[0]}"
                        )
        if spec.bound is not None and value.size and value.dtype.kind in "iu":
            n, table = spec.bound
            lo, hi = int(value.min()), int(value.max())
            if lo < -n or hi >= n:
                bad = hi if hi >= n else lo
                raise error(f"{prefix}feed {name!r} holds index {bad}, outside [0, {n}) of {table!r}")


def _dims(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def read_npz(path: str | os.PathLike, error: type[LoraOnnxError], what: str) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` file (never unpickled); every failure is one ``error`` line."""
    path = Path(path)
    expected = f"{what}: a .npz with one array per model input expected"
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # missing, not numpy, pickled objects ...
        raise error(f"{path}: cannot read {expected} ({first_line(exc)})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy
        raise error(f"{path}: cannot read {expected}, got a single array (.npy)")
    with data:
        arrays = {}
        for key in data.files:
            try:
                arrays[key] = data[key]
            except (OSError, ValueError, EOFError, KeyError) as exc:  # object arrays, a damaged member
                raise error(f"{path}: cannot read array {key!r} ({first_line(exc)})") from None
    if not arrays:
        raise error(f"{path}: no arrays ({expected})")
    return arrays


def split_rows(arrays: Mapping[str, np.ndarray], error: type[LoraOnnxError], source: object) -> list[dict[str, np.ndarray]]:
    """One feed dict per row of the first axis (each ``a[i:i+1]``); every array needs the same
    number of rows."""
    counts = {k: (len(a) if np.ndim(a) else None) for k, a in arrays.items()}
    for key, count in counts.items():
        if count is None:
            raise error(f"{source}: array {key!r} is 0-d; one row per calibration batch expected")
    first = next(iter(counts))
    for key, count in counts.items():
        if count != counts[first]:
            raise error(f"{source}: array {key!r} has {count} rows but {first!r} has {counts[first]}")
    return [{k: a[i : i + 1] for k, a in arrays.items()} for i in range(counts[first])]
