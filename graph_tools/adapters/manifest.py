"""The package manifest (``manifest.json``): what a package's graph expects from an adapter.

A manifest lists every slot (graph input an adapter feeds: name, shape, dtype, site, role, layout)
and every adapter (file, rank, alpha, scale, source), plus a :func:`graph_fingerprint` of the
graph it was made for. It is what turns a mismatch into a clear error (:func:`check_adapter_tensors`)
instead of onnxruntime's "Invalid input name".

Example (abridged)::

    {"format_version": 1, "graph_fingerprint": "sha256:3f1c...", "mode": "inputs", "pack": false,
     "max_rank": null, "slot_layout": "peft", "extra": {},
     "slots": [{"name": "base_model.model.q_proj.lora_A.weight", "shape": ["lora_r_q_proj", 64],
                "dtype": "float32", "site": "q_proj", "role": "lora_A", "layout": "peft"}, ...],
     "adapters": [{"name": "french", "file": "adapters/french.onnx_adapter", "format": "onnx_adapter",
                   "rank": 8, "alpha": 16.0, "scale": {"q_proj": 2.0}, "source": "peft:./french"}]}

Reading validates every field against ``schemas/manifest.schema.json`` (JSON Schema 2020-12) and
the rules a schema cannot hold (known dtypes, relative adapter paths, finite numbers, unique
names), and raises :class:`PackageError` with one line naming the file and the field
(``adapters[1].rank``); writing validates the same way first, then writes atomically
(sorted keys, indent 2).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import json
import logging
import math
import os
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: np.dtype("bfloat16"))
import jsonschema
import numpy as np
import onnx_ir as ir

from graph_tools._io import atomic_file, read_json
from graph_tools.errors import AdapterError, PackageError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MODES",
    "SlotSpec",
    "AdapterSpec",
    "Manifest",
    "write_manifest",
    "read_manifest",
    "graph_fingerprint",
    "check_adapter_tensors",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODES = ("inputs", "external")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlotSpec:
    """One graph input an adapter feeds.

    Attributes:
        name: graph input name (PEFT's key for A/B: ``base_model.model.<site>.lora_A.weight``).
        shape: dims; ``int`` for fixed sizes, ``str`` for symbolic ones (each site's rank axis has
            its own name, so sites of different ranks fit one graph).
        dtype: numpy dtype name (``float32``, ``float16``, ``bfloat16``, ``int8`` ...).
        site: module path of the LoRA site (``model.layers.0.self_attn.q_proj``), or the packed
            group's name when ``pack`` is on.
        role: ``lora_A``, ``lora_B``, ``lora_scale``, or another role a pass defines.
        layout: how the tensor is laid out: ``peft`` (as PEFT stores it) or ``transposed``.
    """

    name: str
    shape: list[int | str]
    dtype: str
    site: str
    role: str
    layout: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterSpec:
    """One adapter file of the package.

    Attributes:
        name: adapter name (``default``, ``french`` ...), unique in the package.
        file: path of the file relative to the package folder (``adapters/french.onnx_adapter``).
        rank: LoRA rank, or per-site ranks (``rank_pattern``) as ``{site: r}``.
        alpha: ``lora_alpha``, or per-site alphas as ``{site: alpha}``.
        scale: the scale each site applies, ``{site: scale}``.
        source: where the weights came from (``graph:<model>``, ``peft:<dir>`` ...).
        format: ``onnx_adapter`` or ``safetensors``.
    """

    name: str
    file: str
    rank: int | dict[str, int]
    alpha: float | dict[str, float]
    scale: dict[str, float]
    source: str
    format: str


@dataclasses.dataclass(kw_only=True)
class Manifest:
    """Everything ``manifest.json`` holds (see the module docstring)."""

    format_version: int = FORMAT_VERSION
    graph_fingerprint: str
    mode: str
    pack: bool = False
    max_rank: int | None = None
    slot_layout: str
    slots: list[SlotSpec] = dataclasses.field(default_factory=list)
    adapters: list[AdapterSpec] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "manifest") -> Manifest:
        """Build and validate a manifest; :class:`PackageError` names ``source`` and the field."""
        return _parse_manifest(data, source)

    def slot(self, name: str) -> SlotSpec:
        for slot in self.slots:
            if slot.name == name:
                return slot
        raise PackageError(f"package has no slot {name!r}")

    def adapter(self, name: str) -> AdapterSpec:
        for adapter in self.adapters:
            if adapter.name == name:
                return adapter
        known = ", ".join(a.name for a in self.adapters) or "none"
        raise AdapterError(f"unknown adapter {name!r} (package has: {known})")

    def with_adapter(self, spec: AdapterSpec) -> Manifest:
        """A copy with ``spec`` added, replacing an adapter of the same name."""
        adapters = [a for a in self.adapters if a.name != spec.name] + [spec]
        return dataclasses.replace(self, adapters=adapters)


# ------------------------------------------------------------------------------ read / write


def write_manifest(path: str | os.PathLike, manifest: Manifest) -> Path:
    """Validate ``manifest`` and write it atomically to ``path`` (a file, or a package folder)."""
    path = _manifest_path(path)
    data = manifest.to_dict()
    _parse_manifest(data, str(path))  # never write what read_manifest would refuse
    try:
        text = json.dumps(data, sort_keys=True, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PackageError(f"{path}: manifest is not JSON-serializable ({exc})") from None
    with atomic_file(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    logger.info("wrote manifest %s (%d slots, %d adapters)", path, len(manifest.slots), len(manifest.adapters))
    return path


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate ``path`` (a ``manifest.json`` or a package folder holding one)."""
    path = _manifest_path(path)
    if not path.is_file():
        raise PackageError(f"{path}: no manifest (not an adapter package?)")
    data = read_json(path, PackageError, "manifest", parse_constant=_refuse_constant)
    return _parse_manifest(data, str(path))


def _manifest_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() else path


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# ------------------------------------------------------------------------------- validation


class _Invalid(Exception):
    """A field is wrong; carries the field path and the reason."""


def _parse_manifest(data: Any, source: str) -> Manifest:
    try:
        obj = _mapping(data, "manifest")
        version = obj.get("format_version")
        if version != FORMAT_VERSION:
            if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
                raise _Invalid(
                    f"format_version {version} is newer than this lora-onnx reads ({FORMAT_VERSION}); upgrade lora-onnx"
                )
            raise _Invalid(f"format_version: expected {FORMAT_VERSION}, got {version!r}")
        _schema_check(obj)
        slots = [_parse_slot(item, f"slots[{i}]") for i, item in enumerate(obj["slots"])]
        adapters = [_parse_adapter(item, f"adapters[{i}]") for i, item in enumerate(obj["adapters"])]
        manifest = Manifest(
            format_version=version,
            graph_fingerprint=obj["graph_fingerprint"],
            mode=obj["mode"],
            pack=obj["pack"],
            max_rank=obj["max_rank"],
            slot_layout=obj["slot_layout"],
            slots=slots,
            adapters=adapters,
            extra=dict(obj["extra"]),
        )
        _unique([s.name for s in manifest.slots], "slots", "slot")
        _unique([a.name for a in manifest.adapters], "adapters", "adapter")
        _unique([a.file for a in manifest.adapters], "adapters", "adapter file")
    except _Invalid as exc:
        raise PackageError(f"{source}: {exc}") from None
    return manifest


def _parse_slot(obj: Mapping[str, Any], where: str) -> SlotSpec:
    """A slot the schema accepted; the dtype must be one numpy knows."""
    _numpy_dtype(obj["dtype"], f"{where}.dtype")
    return SlotSpec(name=obj["name"], shape=list(obj["shape"]), dtype=obj["dtype"], site=obj["site"],
                    role=obj["role"], layout=obj["layout"])


def _parse_adapter(obj: Mapping[str, Any], where: str) -> AdapterSpec:
    """An adapter the schema accepted; its file must stay inside the package, its numbers finite."""
    file = obj["file"]
    parts = PurePosixPath(file).parts
    if file.startswith(("/", "\\")) or ":" in file or ".." in parts or "\\" in file:
        raise _Invalid(f"{where}.file: {file!r} must be a relative path inside the package")
    rank, alpha = obj["rank"], obj["alpha"]
    alpha = {k: _finite(v, f"{where}.alpha[{k!r}]") for k, v in alpha.items()} if isinstance(alpha, Mapping) else _finite(alpha, f"{where}.alpha")
    scale = {k: _finite(v, f"{where}.scale[{k!r}]") for k, v in obj["scale"].items()}
    return AdapterSpec(name=obj["name"], file=file, rank=dict(rank) if isinstance(rank, Mapping) else rank,
                       alpha=alpha, scale=scale, source=obj["source"], format=obj["format"])


# JSON Schema (schemas/manifest.schema.json) does the structure; errors become one line naming the
# field (``adapters[1].rank``), worded by the schema's ``x-expected``.
_MAPS = ("rank", "alpha", "scale")  # fields whose keys are site names: shown as ``rank['q_proj']``


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    resource = importlib.resources.files("graph_tools.adapters").joinpath("schemas/manifest.schema.json")
    schema = json.loads(resource.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(_inline_refs(schema, schema.get("$defs", {})))


def _inline_refs(node: Any, defs: Mapping[str, Any], _seen: tuple[str, ...] = ()) -> Any:
    """The schema with every ``{"$ref": "#/$defs/X"}`` replaced by ``X`` itself: the same checks,
    but jsonschema resolves no reference per value (2,800 for a 1.1B model's 462 slots: half
    the validation time). A recursive definition keeps its ``$ref``."""
    if isinstance(node, list):
        return [_inline_refs(item, defs, _seen) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and len(node) == 1 and ref.startswith("#/$defs/"):
        name = ref[len("#/$defs/"):]
        if name in defs and "/" not in name and name not in _seen:
            return _inline_refs(defs[name], defs, _seen + (name,))
        return node
    return {k: (v if k == "$defs" else _inline_refs(v, defs, _seen)) for k, v in node.items()}


def _schema_check(obj: Mapping[str, Any]) -> None:
    error = jsonschema.exceptions.best_match(_validator().iter_errors(obj))
    if error is None:
        return
    while error.parent is not None and error.parent.validator == "anyOf" and not isinstance(error.parent.instance, Mapping):
        error = error.parent  # "a size >= 0 or a dim name", not the branch best_match picked
    if error.validator == "anyOf" and isinstance(error.instance, Mapping):  # a per-site map: its wrong entry
        inner = [e for e in error.context if e.relative_schema_path[0] == len(error.schema["anyOf"]) - 1]
        error = jsonschema.exceptions.best_match(inner) or error
    where = _field_path(error.absolute_path)
    if error.validator == "required":
        missing = next(n for n in error.validator_value if n not in error.instance)
        raise _Invalid(f"{where}: missing field {missing!r}")
    if error.validator == "additionalProperties" and error.schema.get("additionalProperties") is False:
        unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        raise _Invalid(f"{where}: unknown field {unknown[0]!r}")
    if error.validator == "type" and "object" in error.validator_value:
        raise _Invalid(f"{where}: expected an object, got {type(error.instance).__name__}")
    expected = error.schema.get("x-expected") or error.message
    raise _Invalid(f"{where}: expected {expected}, got {error.instance!r}")


def _field_path(path) -> str:
    out, previous = "", None
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif previous in _MAPS:
            out += f"[{part!r}]"
        else:
            out += f".{part}" if out else part
        previous = part
    return out or "manifest"


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _Invalid(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _finite(value: float, where: str) -> float:
    """JSON has no NaN (reading refuses it), but a Manifest built in Python may hold one."""
    if isinstance(value, bool) or not math.isfinite(value):
        raise _Invalid(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _unique(names: list[str], where: str, what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise _Invalid(f"{where}: {what} {name!r} is listed twice")
        seen.add(name)


def _numpy_dtype(name: str, where: str) -> np.dtype:
    try:  # bfloat16 too: ml_dtypes registers it with numpy
        return np.dtype(name)
    except TypeError:
        raise _Invalid(f"{where}: unknown dtype {name!r}") from None


# ------------------------------------------------------------------- adapter tensors vs slots


def check_adapter_tensors(manifest: Manifest, tensors: Mapping[str, np.ndarray], *, source: str = "adapter") -> None:
    """Refuse tensors that do not fill the manifest's slots exactly.

    Every slot must be present with its dtype and shape; no other name is allowed (onnxruntime
    fails the whole run on an unknown adapter parameter). Symbolic dims (``lora_r_q_proj``) must
    take one value across all tensors of the adapter, so a site's A and B agree on the rank.
    """
    slots = {slot.name: slot for slot in manifest.slots}
    extra = sorted(set(tensors) - set(slots))
    if extra:
        raise AdapterError(f"{source}: tensor {extra[0]!r} is not a slot of the package ({len(extra)} unknown)")
    missing = [name for name in slots if name not in tensors]
    if missing:
        raise AdapterError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} slots not filled)")
    bound: dict[str, tuple[int, str]] = {}
    for name, slot in slots.items():
        array = tensors[name]
        try:
            expected = _numpy_dtype(slot.dtype, f"slot {name!r}")
        except _Invalid as exc:
            raise PackageError(f"{source}: {exc}") from None
        if array.dtype != expected:
            raise AdapterError(f"{source}: tensor {name!r} has dtype {array.dtype}, the slot needs {slot.dtype}")
        if len(array.shape) != len(slot.shape):
            raise AdapterError(f"{source}: tensor {name!r} has shape {list(array.shape)}, the slot needs {slot.shape}")
        for axis, (size, dim) in enumerate(zip(array.shape, slot.shape)):
            if isinstance(dim, int):
                if size != dim:
                    raise AdapterError(
                        f"{source}: tensor {name!r} has shape {list(array.shape)}, the slot needs {slot.shape}"
                    )
            elif dim in bound and bound[dim][0] != size:
                other_size, other = bound[dim]
                raise AdapterError(
                    f"{source}: tensor {name!r} has {dim}={size} on axis {axis} but {other!r} has {dim}={other_size}"
                )
            else:
                bound[dim] = (size, name)


# ------------------------------------------------------------------------------ fingerprint


def graph_fingerprint(model: ir.Model) -> str:
    """``sha256:<hex>`` of the model's structure; never reads tensor bytes.

    Hashed: opset imports; graph inputs, outputs and initializers by name with type and shape;
    every node in order (domain, op type, overload, attributes, which value each input is);
    subgraphs and local functions the same way. Intermediate values are identified by producer
    and output index, not by name, and node names, doc strings, metadata and ``ir_version`` are
    left out, so the fingerprint survives save/load and renaming of intermediates. Tensor-valued
    attributes and initializers contribute only dtype and shape: lazy external data stays unread.
    """
    digest = hashlib.sha256()
    for record in _model_records(model):
        digest.update(json.dumps(record, separators=(",", ":"), default=str).encode("utf-8"))
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def _model_records(model: ir.Model) -> Iterator[Any]:
    yield ["opsets", sorted(model.opset_imports.items())]
    yield from _graph_records(model.graph, "graph")
    for identifier in sorted(model.functions, key=lambda key: tuple(str(part) for part in key)):
        function = model.functions[identifier]
        yield ["function", [str(part) for part in identifier], sorted(function.attributes)]
        yield from _graph_records(function, "function", typed=False)


def _graph_records(graph: ir.Graph | ir.Function, kind: str, *, typed: bool = True) -> Iterator[Any]:
    ids: dict[int, Any] = {}
    describe: Callable[[ir.Value], Any] = _value_type if typed else (lambda value: None)
    inputs = []
    for i, value in enumerate(graph.inputs):
        ids[id(value)] = ["in", value.name if typed else i]
        inputs.append([value.name if typed else i, describe(value)])
    yield [kind, "inputs", inputs]
    if isinstance(graph, ir.Graph):
        initializers = []
        for name in sorted(graph.initializers):
            value = graph.initializers[name]
            ids.setdefault(id(value), ["init", name])
            initializers.append([name, _initializer_type(value)])
        yield [kind, "initializers", initializers]
    for index, node in enumerate(graph):
        for k, output in enumerate(node.outputs):
            ids[id(output)] = ["node", index, k]
        refs = [None if value is None else ids.get(id(value), ["outer", value.name]) for value in node.inputs]
        attributes = [[name, _attribute(attr)] for name, attr in sorted(node.attributes.items())]
        yield ["node", node.domain, node.op_type, node.overload, refs, len(node.outputs), attributes]
    outputs = [
        [value.name if typed else i, ids.get(id(value), ["outer", value.name]), describe(value)]
        for i, value in enumerate(graph.outputs)
    ]
    yield [kind, "outputs", outputs]


def _shape(shape: ir.Shape | None) -> list[Any] | None:
    if shape is None:
        return None
    return [dim if isinstance(dim, int) else getattr(dim, "value", None) for dim in shape.dims]


def _value_type(value: ir.Value) -> list[Any]:
    return [None if value.type is None else str(value.type), _shape(value.shape)]


def _initializer_type(value: ir.Value) -> list[Any]:
    tensor = value.const_value
    if tensor is None:
        return _value_type(value)
    return [str(ir.TensorType(tensor.dtype)), _shape(tensor.shape)]  # metadata only: no bytes read


def _attribute(attr: ir.Attr) -> Any:
    if attr.is_ref():
        return ["ref", attr.ref_attr_name]
    kind = attr.type
    value = attr.value
    if kind == ir.AttributeType.TENSOR:
        return ["tensor", str(value.dtype), _shape(value.shape)]
    if kind == ir.AttributeType.TENSORS:
        return ["tensors", [[str(t.dtype), _shape(t.shape)] for t in value]]
    if kind == ir.AttributeType.GRAPH:
        return ["graph", list(_graph_records(value, "subgraph"))]
    if kind == ir.AttributeType.GRAPHS:
        return ["graphs", [list(_graph_records(g, "subgraph")) for g in value]]
    if kind in (ir.AttributeType.SPARSE_TENSOR, ir.AttributeType.SPARSE_TENSORS):
        return [kind.name]
    if kind in (ir.AttributeType.TYPE_PROTO, ir.AttributeType.TYPE_PROTOS):
        return [kind.name, str(value)]
    if kind in (ir.AttributeType.FLOAT, ir.AttributeType.FLOATS):
        return [kind.name, repr(value) if kind == ir.AttributeType.FLOAT else [repr(v) for v in value]]
    return [kind.name, list(value) if isinstance(value, (list, tuple)) else value]
