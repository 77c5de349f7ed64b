"""Mixed-adapter batches for :class:`~graph_tools.runtime.session.AdapterSession`.

``session.run(names, feeds, adapter=[choice_row0, choice_row1, ...])``: one choice per batch row
(``None``, a name, or ``{name: weight}``), all rows in ONE onnxruntime run. The package graph is
not touched (single-adapter runs keep their graph and speed); a second session serves the mixed
form that :class:`~graph_tools.passes.mixed.MakeMixedBatchPass` derives (the package's
``model.mixed.onnx`` when it ships one, else built in memory on first use, reading the base
weights from the package's data file). A batch whose rows all make the same choice takes the
ordinary single-adapter path.

Feed values for a batch composition and layout (:func:`choose_layout`, per run) are computed
once and cached (decode steps reuse them)::

    "rows":   A[b] = concat_k(A_k * scale_k * weight_k)^T   [in, r_b] zero-padded to the batch's max rank
              B[b] = concat_k(B_k)^T                         [r_b, out];  mask = 1
    "concat": A = concat_a(A_a)^T [in, R], B = concat_a(B_a)^T [R, out] over the batch's adapters a;
              mask[b] = scale_a * weight_a of row b on adapter a's rank block   (conv: always)

Plain onnxruntime: :func:`write_mixed_model` saves the mixed form as the package's
``model.mixed.onnx`` (it reads the package's data file, nothing is copied) and
:func:`mixed_feeds_for` gives the ``lora_rows.*`` values to feed with the model inputs.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graph_tools.adapters.compose import _np_dtype
from graph_tools.adapters.load import AdapterPackage, load_package_model
from graph_tools.errors import AdapterError, PackageError
from graph_tools.passes.mixed import LAYOUTS, MakeMixedBatchPass, MixedSite, mixed_sites

__all__ = ["MixedBatches", "mixed_model", "mixed_feeds", "mixed_feeds_for", "write_mixed_model", "choose_layout", "MIXED_FILE"]

logger = logging.getLogger(__name__)

MIXED_FILE = "model.mixed.onnx"
_MAX_COMPOSITIONS = 16
#: runs with at most this many tokens per row take the "concat" layout (see :func:`choose_layout`);
#: 0: measured on the Llama-shaped benchmark (benchmarks/README.md), "rows" wins at decode too
CONCAT_MAX_TOKENS = 0

#: one row's choice, resolved: ((adapter weights {module: (A, B, scale)}, factor), ...)
RowChoice = Sequence[tuple[Mapping[str, tuple[np.ndarray, np.ndarray, float]], float]]


def mixed_model(package: AdapterPackage) -> ir.Model:
    """The package graph in its mixed form (base weights stay lazy, in the package's data file)."""
    model = load_package_model(package)
    MakeMixedBatchPass(mixed_sites(package.manifest.slots))(model)
    return model


def write_mixed_model(package_dir) -> Path:
    """Save the mixed form beside the package graph: ``<package>/model.mixed.onnx``, whose base
    weights stay references to the package's own data file."""
    from graph_tools._io import atomic_file
    from graph_tools.adapters.load import load_package

    package = load_package(package_dir)
    model = mixed_model(package)
    target = package.path / MIXED_FILE
    with atomic_file(target) as tmp:
        ir.save(model, tmp)  # external tensors keep their locations (same folder)
    return target


def mixed_feeds_for(package_dir, choices: Sequence, layout: str = "rows") -> dict[str, np.ndarray]:
    """``lora_rows.*`` arrays for ``choices`` (one per row: None, an adapter name of the package,
    or ``{name: weight}``), for plain onnxruntime serving of ``model.mixed.onnx``: ``layout``
    ``"rows"`` (per-row stacked) or ``"concat"`` (cheaper when the batch has few distinct adapters)."""
    from graph_tools.adapters.compose import read_slot_weights
    from graph_tools.adapters.load import load_package

    package = load_package(package_dir)
    loaded: dict[str, dict] = {}

    def weights(name):
        if name not in loaded:
            loaded[name] = read_slot_weights(package.manifest.slots, package.packs, package.adapter_path(name))
        return loaded[name]

    rows = []
    for choice in choices:
        chosen = {} if choice is None else {choice: 1.0} if isinstance(choice, str) else dict(choice)
        rows.append([(weights(a), float(w)) for a, w in sorted(chosen.items())])
    return mixed_feeds(mixed_sites(package.manifest.slots), rows, layout)


def mixed_feeds(sites: list[MixedSite], rows: Sequence[RowChoice], layout: str = "rows") -> dict[str, np.ndarray]:
    """``lora_rows.*`` values for a batch: ``rows[b]`` = row b's adapters with their weights;
    ``layout`` ``"rows"`` (per-row stacked) or ``"concat"`` (rank concat + row mask), see
    :mod:`graph_tools.passes.mixed`. Conv sites take the concat values in both layouts."""
    if layout not in LAYOUTS:
        raise AdapterError(f"mixed layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    feed: dict[str, np.ndarray] = {}
    for site in sites:
        dtype = np.dtype(_np_dtype(site.dtype))
        parts = [[(w[site.module], f) for w, f in row if site.module in w] for row in rows]
        if site.kind == "conv" or layout == "concat":
            feed.update(_concat_values(site, parts, dtype))
        else:
            feed.update(_rows_values(site, parts, dtype))
    return feed


def _rows_values(site: MixedSite, parts, dtype) -> dict[str, np.ndarray]:
    a_rows, b_rows = [], []
    for members in parts:
        a_rows.append([np.asarray(a, np.float64) * (s * f) for (a, _, s), f in members])
        b_rows.append([np.asarray(b) for (_, b, _), _f in members])
    rank = max([sum(a.shape[0] for a in row) for row in a_rows] + [1])
    features, out = int(site.a_shape[1]), int(site.b_shape[0])  # embedding: features = num
    count = len(parts)
    a = np.zeros((count, features, rank), dtype)
    b = np.zeros((count, rank, out), dtype)
    for i, (ar, br) in enumerate(zip(a_rows, b_rows)):
        if ar:
            cat_a, cat_b = np.concatenate(ar, 0), np.concatenate(br, 1)
            a[i, :, : cat_a.shape[0]] = cat_a.T
            b[i, : cat_b.shape[1], :] = cat_b.T
    feed = {site.b_name: b, site.mask_name: np.ones((1, 1, 1), dtype)}
    if site.kind == "embedding":
        feed[site.a_name] = a.reshape(count * features, rank)
        feed[site.offset_name] = (np.arange(count, dtype=np.int64) * features)[:, None]
    else:
        feed[site.a_name] = a
    return feed


def _concat_values(site: MixedSite, parts, dtype) -> dict[str, np.ndarray]:
    """Every distinct adapter of the batch once along rank; each row's scale * weight on its blocks."""
    blocks: dict[int, int] = {}  # id(A) -> rank offset
    a_parts, b_parts, width = [], [], 0
    for members in parts:
        for (a, b, _), _f in members:
            if id(a) not in blocks:
                blocks[id(a)] = width
                a_parts.append(np.asarray(a, dtype))
                b_parts.append(np.asarray(b, dtype))
                width += a.shape[0]
    if not a_parts:  # no row adapts this module: one zero rank row
        a_parts = [np.zeros((1, *map(int, site.a_shape[1:])), dtype)]
        b_parts = [np.zeros((int(site.b_shape[0]), 1, *map(int, site.b_shape[2:])), dtype)]
        width = 1
    mask = np.zeros((len(parts), width), np.float64)
    for i, members in enumerate(parts):
        for (a, _, s), f in members:
            offset = blocks[id(a)]
            mask[i, offset: offset + a.shape[0]] += s * f
    a, b = np.concatenate(a_parts, 0), np.concatenate(b_parts, 1)
    if site.kind == "conv":
        spatial = len(site.a_shape) - 2
        return {site.a_name: a, site.b_name: b, site.mask_name: mask.reshape(*mask.shape, *[1] * spatial).astype(dtype)}
    feed = {site.a_name: np.ascontiguousarray(a.T), site.b_name: np.ascontiguousarray(b.T),
            site.mask_name: mask[:, None, :].astype(dtype)}
    if site.kind == "embedding":
        feed[site.offset_name] = np.zeros((1, 1), np.int64)
    return feed


class MixedBatches:
    """The mixed-form session of one :class:`AdapterSession` and its per-composition feeds."""

    def __init__(self, owner):
        self._owner = owner
        package: AdapterPackage = owner.package
        refuse_quantized(owner)
        self.sites = mixed_sites(package.manifest.slots)
        self._feeds: collections.OrderedDict[tuple, dict[str, ort.OrtValue]] = collections.OrderedDict()
        options = owner._session_options()
        # derived from the verified package graph every time (a model.mixed.onnx could be stale)
        source = ir.serde.serialize_model(mixed_model(package)).SerializeToString()
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(package.path))
        try:
            self.session = ort.InferenceSession(source, options, providers=owner._providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises several pybind error types
            raise PackageError(f"{package.path}: onnxruntime cannot load the mixed-batch graph: {str(exc).splitlines()[0][:200]}") from None
        logger.info("mixed-batch session for %s (%d modules)", package.path, len(self.sites))

    def feed_for(self, keys: tuple, layout: str) -> dict[str, ort.OrtValue]:
        """The ``lora_rows.*`` OrtValues for row choices ``keys`` in ``layout`` (made once, cached)."""
        feed = self._feeds.get((keys, layout))
        if feed is None:
            weights = self._owner._weights
            rows = [[(weights[a], w) for a, w in key] if key else [] for key in keys]
            feed = {n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in mixed_feeds(self.sites, rows, layout).items()}
            self._feeds[(keys, layout)] = feed
            while len(self._feeds) > _MAX_COMPOSITIONS:
                self._feeds.popitem(last=False)
        return feed

    def forget(self, name: str) -> None:
        """Drop cached compositions mentioning adapter ``name`` (it was reloaded)."""
        for cached in [c for c in self._feeds if any(key and any(a == name for a, _ in key) for key in c[0])]:
            del self._feeds[cached]


def refuse_quantized(owner) -> None:
    """Mixed batches on a QDQ package are refused (design decision, see the message)."""
    if owner.quantized:
        raise AdapterError(
            f"{owner.package.path}: a quantized package takes one adapter choice per run, not one per row "
            "(adapter=[...]): each adapter feeds its own quantized LoRA values, their scales and its own "
            "activation encodings into the QDQ graph, and one run holds one encoding per tensor; run each "
            "adapter's rows as a batch of their own (adapter=name), or serve mixed batches from the float package")


def choose_layout(keys: tuple, tokens: int) -> str:
    """``"concat"`` when the batch has no more distinct adapters than one row uses (concat then
    costs no more rank than per-row stacking, and one GEMM serves all rows) or for runs of at most
    :data:`CONCAT_MAX_TOKENS` tokens per row; else ``"rows"`` (each row pays only its own rank)."""
    if tokens <= CONCAT_MAX_TOKENS:
        return "concat"
    distinct = {a for key in keys if key for a, _ in key}
    return "concat" if len(distinct) <= max(len(key or ()) for key in keys) else "rows"


def tokens_per_row(feeds: Mapping[str, np.ndarray], first_input: str | None) -> int:
    """Tokens each row carries in a run: ``input_ids`` / ``inputs_embeds`` axis 1, else the
    elements per row of the first model input."""
    for name in ("input_ids", "inputs_embeds"):
        if name in feeds and np.ndim(feeds[name]) >= 2:
            return int(np.shape(feeds[name])[1])
    value = feeds.get(first_input) if first_input is not None else None
    if value is None or np.ndim(value) < 2:
        return 1
    return int(np.prod(np.shape(value)[1:]))


def check_rows(feeds: Mapping[str, np.ndarray], count: int) -> None:
    """The batch (axis 0 of the model inputs) must have one row per choice."""
    sizes = {int(np.shape(v)[0]) for v in feeds.values() if np.ndim(v) >= 1}
    if count not in sizes:
        raise AdapterError(f"adapter= lists {count} row choices but the feeds' batch size is "
                           f"{max(sizes) if sizes else 'unknown'} (axis 0)")
