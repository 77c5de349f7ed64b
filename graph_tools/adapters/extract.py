"""Extraction: ``extract_adapters`` turns a LoRA ONNX model into an adapter package

    out_dir/model.onnx (+ model.onnx.data)   the graph with slots, no adapter bytes
    out_dir/adapters/<adapter>.<ext>         one file per adapter, exactly the slot names
    out_dir/manifest.json                    slots, adapters, mode, graph fingerprint

Everything is written into a temp folder beside ``out_dir`` and renamed into place at the end.
Base weights stay lazy (onnx-ir external tensors); only LoRA tensors are read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:
    import onnx

from graph_tools._io import atomic_output, gc_paused, model_files, refuse_overlap, working_copy
from graph_tools.adapters import files, manifest as mf, shared
from graph_tools.adapters.compose import pack_tensors, slot_tensors
from graph_tools.adapters.load import DATA_FILE, EXTERNAL_SLOT_FILE, MODEL_FILE, MODES, AdapterPackage
from graph_tools.errors import AdapterError, NoLoraError, PackageError
from graph_tools.lora import find_lora_sites
from graph_tools.passes.extract import ReplaceLoraWithSlotsPass
from graph_tools.passes._base import run_passes
from graph_tools.passes.mixed import DESIGN as MIXED_DESIGN
from graph_tools.passes.pack import PackSlotsPass, plan_packs
from graph_tools.passes.slots import SLOT_LAYOUT, plan_slots, read_adapter_weights

__all__ = ["extract_adapters"]

logger = logging.getLogger(__name__)


def extract_adapters(
    model_path: str | os.PathLike | ir.Model | onnx.ModelProto,
    out_dir: str | os.PathLike,
    *,
    mode: str = "inputs",
    format: str = "onnx_adapter",
    pack: bool = False,
    max_rank: int | None = None,
    share_base: bool | None = None,
) -> AdapterPackage:
    """Extract every adapter of a LoRA ONNX model (a path, an ``ir.Model`` or an
    ``onnx.ModelProto``; never changed) into an adapter package (see module doc).

    ``share_base``: the package graph references the source's external-data file in place
    instead of a copy (:mod:`graph_tools.adapters.shared`); needs ``out_dir`` to be the folder
    holding the source. ``None`` (default): share exactly then, else copy."""
    with gc_paused():
        return _extract_adapters(model_path, out_dir, mode=mode, format=format, pack=pack, max_rank=max_rank,
                                 share_base=share_base)


def _extract_adapters(model_path, out_dir, *, mode, format, pack, max_rank, share_base) -> AdapterPackage:
    if mode not in MODES:
        raise PackageError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if format not in files.ADAPTER_SUFFIX:
        raise PackageError(f"format must be one of {', '.join(files.ADAPTER_SUFFIX)}, not {format!r}")
    if pack and mode != "inputs":
        raise PackageError("pack=True needs mode='inputs'")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank <= 0):
        raise PackageError(f"max_rank must be a positive integer, not {max_rank!r}")
    model = working_copy(model_path)
    source = str(model_path) if isinstance(model_path, (str, os.PathLike)) else f"<{type(model_path).__name__}>"
    base_files = shared.external_files(model)
    share = _share_base(share_base, model_path, out_dir, base_files)
    if not share:  # a shared-base package is written beside its source on purpose, keeping it
        refuse_overlap(out_dir, model_files(model_path if isinstance(model_path, (str, os.PathLike)) else None, model))
    sites = find_lora_sites(model)
    if not sites:
        raise NoLoraError(f"{source}: no LoRA sites found; nothing to extract")
    out = Path(out_dir).resolve()
    if share:
        graph_path = Path(model_path).resolve()
        staging = shared.shared_folder(out, [MODEL_FILE, "adapters", mf.MANIFEST_NAME],
                                       source_graph=graph_path / MODEL_FILE if graph_path.is_dir() else graph_path)
    else:
        staging = atomic_output(out_dir)
    with staging as tmp:
        copier = None
        src = None if share else _source_dir(model_path, base_files)
        if src is not None:  # copy the data files whole by the kernel while the graph is rewritten
            copier = shared.FileCopy({path: tmp / path.relative_to(src) for path in base_files})
        try:
            package = _extract_into(tmp, out, model, sites, source, base_files, share, copier,
                                    mode=mode, format=format, pack=pack, max_rank=max_rank)
        finally:
            if copier is not None:
                copier.cancel()
    logger.info("extracted %d adapters over %d modules into %s", len(package.manifest.adapters),
                len(package.manifest.slots) // 3, out)
    return package


def _extract_into(tmp: Path, out: Path, model: ir.Model, sites, source: str, base_files, share: bool,
                  copier: shared.FileCopy | None, *, mode: str, format: str, pack: bool, max_rank) -> AdapterPackage:
    """The package parts of :func:`extract_adapters`, written into ``tmp`` (then moved to ``out``)."""
    groups = plan_slots(model, sites)
    weights = read_adapter_weights(model, groups)
    ranks = {a: {m: int(w[0].shape[0]) for m, w in mods.items()} for a, mods in weights.items()}
    fixed = _fixed_ranks(groups, ranks, mode, pack, max_rank)
    if fixed is not None:
        groups = plan_slots(model, sites, fixed_ranks=fixed)
    slots = [
        mf.SlotSpec(name=n, shape=list(shape), dtype=g.dtype.numpy().name if g.dtype != ir.DataType.BFLOAT16 else "bfloat16",
                    site=g.module, role=role, layout=SLOT_LAYOUT)
        for g in groups
        for n, shape, role in ((g.a_name, g.a_shape, "lora_A"), (g.b_name, g.b_shape, "lora_B"), (g.scale_name, g.scale_shape, "lora_scale"))
    ]
    packs = plan_packs(slots) if pack else []
    passes = [ReplaceLoraWithSlotsPass(groups, as_inputs=(mode == "inputs"))] + ([PackSlotsPass(packs)] if packs else [])
    run_passes(model, *passes)
    adapters = []
    ext = files.ADAPTER_SUFFIX[format]
    data = None if share else DATA_FILE
    kept = shared.external_files(model)  # what the package graph still references
    if copier is not None:
        if kept:  # the whole copies keep the tensors' offsets: the graph is saved as it is
            data = None
        else:  # nothing external left (or a big tensor in memory): the ordinary save
            copier.cancel()
            for dst in copier.pairs.values():
                dst.unlink(missing_ok=True)
            copier = None
    _save_model(model, tmp, slots if mode == "external" else None, data=data)
    (tmp / "adapters").mkdir()
    for name, mods in sorted(weights.items()):
        tensors = slot_tensors(slots, mods)
        if packs:
            tensors = pack_tensors(packs, tensors)
        rel = f"adapters/{name}{ext}"
        files.write_adapter(tmp / rel, tensors, format=format, metadata={"adapter": name, "source": source})
        adapters.append(mf.AdapterSpec(
            name=name, file=rel, rank=ranks[name], alpha={},
            scale={m: w[2] for m, w in mods.items()}, source=source, format=format,
        ))
    manifest = mf.Manifest(
        format_version=mf.FORMAT_VERSION,
        # the fingerprint survives save/load; external mode re-saved the slots: read back
        graph_fingerprint=mf.graph_fingerprint(model if mode == "inputs" else ir.load(tmp / MODEL_FILE)),
        mode=mode,
        pack=bool(packs),
        max_rank=max_rank,
        slot_layout=SLOT_LAYOUT,
        slots=slots,
        adapters=adapters,
        extra={"packs": packs, "external_slot_file": EXTERNAL_SLOT_FILE if mode == "external" else None,
               "mixed_batches": MIXED_DESIGN,
               **({"shared_base": [shared.file_record(out, p) for p in sorted(kept or base_files)]} if share else {})},
    )
    if copier is not None:  # the copy ran meanwhile; keep only the ranges the graph references
        cleared = copier.finish(kept)
        logger.info("copied %s, cleared %d unreferenced bytes", ", ".join(p.name for p in kept), cleared)
    mf.write_manifest(tmp / mf.MANIFEST_NAME, manifest)
    return AdapterPackage(out, manifest)


def _fixed_ranks(groups, ranks, mode, pack, max_rank) -> dict[str, int] | None:
    if max_rank is not None:
        for adapter, mods in ranks.items():
            for module, r in mods.items():
                if r > max_rank:
                    raise AdapterError(f"adapter {adapter!r}, module {module!r}: rank {r} exceeds max_rank {max_rank}")
        return {g.module: max_rank for g in groups}
    # default fixed rank: room for every adapter of the package at once (concurrency)
    total = {g.module: max(1, sum(mods.get(g.module, 0) for mods in ranks.values())) for g in groups}
    if pack:
        top = max(total.values())
        return {g.module: top for g in groups}
    if mode == "external":
        return total
    return None


def _share_base(share_base, model_path, out_dir, base_files) -> bool:
    """Share when asked, or by default when ``out_dir`` is the folder of the source's data."""
    if share_base not in (None, True, False):
        raise PackageError(f"share_base must be True, False or None, not {share_base!r}")
    out = Path(out_dir).resolve()
    src = _source_dir(model_path, base_files) if base_files else None
    if share_base is False:
        if isinstance(model_path, (str, os.PathLike)) and out in (Path(model_path).resolve(), Path(model_path).resolve().parent):
            raise PackageError(f"{out}: out_dir holds the source model; share_base=False would overwrite it")
        return False
    if src != out:
        if share_base:
            why = "the source keeps no base weights in external-data files" if src is None else f"it must be {src}"
            raise PackageError(f"share_base=True: out_dir {out} is not the folder of the source's external data ({why})")
        return False
    for name in (MODEL_FILE, "adapters"):
        target = out / name
        source_graph = Path(model_path).resolve()
        if target.exists() and target != source_graph and not (out / mf.MANIFEST_NAME).is_file():
            raise PackageError(f"{target}: exists and is not part of a package; refusing to replace it")
    return True


def _source_dir(model_path, base_files) -> Path | None:
    """The source model's folder when every external-data file it uses lies inside it."""
    if not isinstance(model_path, (str, os.PathLike)) or not base_files:
        return None
    path = Path(model_path).resolve()
    folder = path if path.is_dir() else path.parent
    return folder if all(f.is_relative_to(folder) and f.is_file() for f in base_files) else None


def _save_model(model: ir.Model, folder: Path, external_slots, *, data: str | None = DATA_FILE) -> None:
    """Save graph + base weights (into ``data``; ``None``: external tensors keep their files); in
    external mode the slots then point to a file not shipped."""
    if external_slots is None:
        ir.save(model, folder / MODEL_FILE, external_data=data)
        return
    for slot in external_slots:  # placeholders so no slot bytes land in the base data file
        value = model.graph.initializers[slot.name]
        value.const_value = ir.tensor(np.zeros([0], value.const_value.dtype.numpy()), dtype=value.const_value.dtype, name=slot.name)
    ir.save(model, folder / MODEL_FILE, external_data=data)
    saved = ir.load(folder / MODEL_FILE)
    offset = 0
    for slot in external_slots:
        value = saved.graph.initializers[slot.name]
        dtype = value.dtype
        nbytes = int(np.prod(slot.shape) * dtype.itemsize)
        value.const_value = ir.ExternalTensor(
            EXTERNAL_SLOT_FILE, offset=offset, length=nbytes, dtype=dtype,
            shape=ir.Shape(slot.shape), name=slot.name, base_dir=folder,
        )
        offset += (nbytes + 4095) // 4096 * 4096
    ir.save(saved, folder / MODEL_FILE)
