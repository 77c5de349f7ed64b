"""Slot tensors for one adapter, several at once (rank concatenation), fixed-rank padding and
packing. The one place that knows how adapter weights map onto slot values."""

from __future__ import annotations

from typing import Iterable, Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: np.dtype("bfloat16"))
import numpy as np

from graph_tools.errors import AdapterError

__all__ = [
    "SiteWeights",
    "slot_tensors",
    "compose",
    "pack_tensors",
    "unpack_tensors",
    "weights_from_slot_tensors",
    "read_slot_weights",
    "fill_empty_ranks",
]

#: per module: (A [r, ...] in PEFT layout, B [out, r, ...], scale)
SiteWeights = Mapping[str, tuple[np.ndarray, np.ndarray, float]]


def slot_tensors(slots: Iterable, weights: SiteWeights, *, weight: float = 1.0) -> dict[str, np.ndarray]:
    """Slot values for one adapter (see :func:`compose`)."""
    return compose(slots, [(weights, weight)])


def compose(slots: Iterable, adapters: list[tuple[SiteWeights, float]]) -> dict[str, np.ndarray]:
    """Feed values for every slot from several adapters active at once.

    ``slots``: manifest ``SlotSpec``s (name, shape, dtype, site, role). A's are concatenated along
    rank, B's likewise, the per-rank scale vector holds ``scale * weight`` of each adapter. Modules
    an adapter does not touch contribute rank 0; a module no adapter touches is fed rank-1 zeros
    (never an empty inner dimension). Fixed-rank slots are zero-padded; a combined rank above the
    fixed rank is an error.
    """
    by_module: dict[str, dict[str, object]] = {}
    for slot in slots:
        by_module.setdefault(slot.site, {})[slot.role] = slot
    feed: dict[str, np.ndarray] = {}
    for module, roles in by_module.items():
        a_spec, b_spec, s_spec = roles["lora_A"], roles["lora_B"], roles["lora_scale"]
        dtype = np.dtype(_np_dtype(a_spec.dtype))
        a_parts, b_parts, s_parts = [], [], []
        for weights, factor in adapters:
            if module not in weights:
                continue
            a, b, scale = weights[module]
            rank = a.shape[0]
            if b.shape[1] != rank:
                raise AdapterError(f"{module}: lora_A has rank {rank} but lora_B has rank {b.shape[1]}")
            a_parts.append(np.asarray(a, dtype))
            b_parts.append(np.asarray(b, dtype))
            s_parts.append(np.full((rank,), scale * factor, dtype))
        fixed = a_spec.shape[0] if isinstance(a_spec.shape[0], int) else None
        a_tail = [int(d) for d in a_spec.shape[1:]]
        b_out, b_tail = int(b_spec.shape[0]), [int(d) for d in b_spec.shape[2:]]
        # a module no adapter touches gets rank-1 zeros (scale 0), never an empty rank: ORT's fused
        # quantized kernels (QLinearMatMul from 8-bit QDQ) return garbage on an empty inner dim
        a = np.concatenate(a_parts, 0) if a_parts else np.zeros([1, *a_tail], dtype)
        b = np.concatenate(b_parts, 1) if b_parts else np.zeros([b_out, 1, *b_tail], dtype)
        s = np.concatenate(s_parts, 0) if s_parts else np.zeros([1], dtype)
        if list(a.shape[1:]) != a_tail:
            raise AdapterError(f"{a_spec.name}: expected shape [r, {', '.join(map(str, a_tail))}], got {list(a.shape)}")
        if b.shape[0] != b_out or list(b.shape[2:]) != b_tail:
            raise AdapterError(f"{b_spec.name}: expected shape [{b_out}, r, {', '.join(map(str, b_tail))}], got {list(b.shape)}".replace(", ]", "]"))
        if fixed is not None:
            rank = a.shape[0]
            if rank > fixed:
                raise AdapterError(f"{module}: rank {rank} exceeds the package's fixed rank {fixed}")
            a = np.concatenate([a, np.zeros([fixed - rank, *a_tail], dtype)], 0)
            b = np.concatenate([b, np.zeros([b_out, fixed - rank, *b_tail], dtype)], 1)
            s = np.concatenate([s, np.zeros([fixed - rank], dtype)], 0)
        feed[a_spec.name] = np.ascontiguousarray(a)
        feed[b_spec.name] = np.ascontiguousarray(b)
        feed[s_spec.name] = np.ascontiguousarray(s)
    return feed


def fill_empty_ranks(slots: Iterable, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``tensors`` with every empty rank axis (a symbolic slot dimension fed with size 0) widened to
    one row of zeros: exact (zero scale, zero weights, zero point 0) and safe for ORT's fused
    8-bit kernels. For adapter files written before rank-1 zeros were the rule."""
    specs = {s.name: s for s in slots}
    out = dict(tensors)
    for name, value in tensors.items():
        spec = specs.get(name)
        if spec is None or value.size:
            continue
        shape = [1 if (n == 0 and not isinstance(d, int)) else n for d, n in zip(spec.shape, value.shape)]
        if 0 not in shape:
            out[name] = np.zeros(shape, value.dtype)
    return out


def pack_tensors(packs: list[dict], feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stack slot values into packed inputs (``packs``: manifest entries with name and members)."""
    out = dict(feed)
    for pack in packs:
        members = pack["members"]
        out[pack["name"]] = np.stack([feed[m] for m in members], 0)
        for m in members:
            out.pop(m, None)
    return out


def unpack_tensors(packs: list[dict], feed: Mapping[str, np.ndarray], *, source: object = "adapter") -> dict[str, np.ndarray]:
    """Packed inputs -> member slot values. Every pack must be present with its full shape (an
    adapter of a packed package always fills every pack); ``source`` names the file in errors."""
    out = dict(feed)
    for pack in packs:
        if pack["name"] not in out:
            raise AdapterError(f"{source}: missing tensor {pack['name']!r} (a packed input of the package)")
        stacked = np.asarray(out.pop(pack["name"]))
        if list(stacked.shape) != [int(d) for d in pack["shape"]]:
            raise AdapterError(f"{source}: tensor {pack['name']!r} has shape {list(stacked.shape)}, the package needs {pack['shape']}")
        for i, m in enumerate(pack["members"]):
            out[m] = stacked[i]
    return out


def read_slot_weights(slots, packs: list[dict], path, *, expected_modules=None) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Read one adapter file of a package: ``{module: (A, B, scale)}`` with padding removed.

    Refuses names that are not slots (or packs) of the package, shapes that do not fit, partial
    sites and, when ``expected_modules`` is given (the modules the manifest says the adapter
    adapts), a module whose tensors are missing.
    """
    from graph_tools.adapters import files

    raw = files.read_adapter(path)
    known = {s.name for s in slots} | {p["name"] for p in packs}
    extra = sorted(set(raw) - known)
    if extra:
        raise AdapterError(f"{path}: tensor {extra[0]!r} is not a slot of this package")
    tensors = unpack_tensors(packs, raw, source=path)
    weights = weights_from_slot_tensors(slots, tensors, path)
    for module in sorted(expected_modules or ()):
        if module not in weights:
            names = [s.name for s in slots if s.site == module and s.role == "lora_A"]
            missing = names[0] if names else module
            if names and names[0] in tensors:  # present but all-zero scale: nothing is applied
                raise AdapterError(f"{path}: module {module!r} has an all-zero lora_scale; the manifest lists it as adapted")
            raise AdapterError(f"{path}: missing tensor {missing!r} (the manifest lists module {module!r} for this adapter)")
    return weights


def _np_dtype(name: str) -> np.dtype:
    """The numpy dtype of a manifest dtype name (``bfloat16``: ml_dtypes', registered with numpy)."""
    return np.dtype(name)


def weights_from_slot_tensors(slots, tensors: Mapping[str, np.ndarray], path) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Slot tensors of one adapter -> {module: (A, B, scale)} with zero padding removed."""
    by_module: dict[str, dict[str, object]] = {}
    for slot in slots:
        by_module.setdefault(slot.site, {})[slot.role] = slot
    out = {}
    for module, roles in by_module.items():
        names = [roles[r].name for r in ("lora_A", "lora_B", "lora_scale")]
        present = [n in tensors for n in names]
        if not any(present):
            continue
        if not all(present):
            missing = names[present.index(False)]
            raise AdapterError(f"{path}: missing tensor {missing!r} (its A/B/scale partners are present)")
        a, b, s = (np.asarray(tensors[n]) for n in names)
        _check_shape(roles["lora_A"], a, path)
        _check_shape(roles["lora_B"], b, path)
        _check_shape(roles["lora_scale"], s, path)
        if not (a.shape[0] == b.shape[1] == s.shape[0]):
            raise AdapterError(f"{path}: module {module!r}: rank differs between {names[0]!r} ({a.shape[0]}), "
                               f"{names[1]!r} ({b.shape[1]}) and {names[2]!r} ({s.shape[0]})")
        for n, t in zip(names, (a, b, s)):
            if np.issubdtype(t.dtype, np.floating) and not np.all(np.isfinite(t)):
                raise AdapterError(f"{path}: tensor {n!r} holds NaN or Inf")
        rank = int(np.count_nonzero(s))
        if rank == 0:
            continue
        if np.any(s[rank:]) or not np.allclose(s[:rank], s[0]):
            raise AdapterError(f"{path}: scale {names[2]!r} is not one value over the leading rank rows")
        out[module] = (a[:rank], b[:, :rank], float(s[0]))
    return out


def _check_shape(spec, array: np.ndarray, path) -> None:
    if array.dtype != np.dtype(_np_dtype(spec.dtype)):
        raise AdapterError(f"{path}: tensor {spec.name!r} has dtype {array.dtype}, slot expects {spec.dtype}")
    if len(spec.shape) != array.ndim or any(isinstance(d, int) and d != n for d, n in zip(spec.shape, array.shape)):
        raise AdapterError(f"{path}: tensor {spec.name!r} has shape {list(array.shape)}, slot expects {list(spec.shape)}")
