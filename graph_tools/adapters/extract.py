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

from graph_tools._io import atomic_output, working_copy
from graph_tools.adapters import files, manifest as mf
from graph_tools.adapters.compose import pack_tensors, slot_tensors
from graph_tools.adapters.load import DATA_FILE, EXTERNAL_SLOT_FILE, MODEL_FILE, MODES, AdapterPackage
from graph_tools.errors import AdapterError, NoLoraError, PackageError
from graph_tools.lora import find_lora_sites
from graph_tools.passes.extract import ReplaceLoraWithSlotsPass
from graph_tools.passes._base import run_passes
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
) -> AdapterPackage:
    """Extract every adapter of a LoRA ONNX model (a path, an ``ir.Model`` or an
    ``onnx.ModelProto``; never changed) into an adapter package (see module doc)."""
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
    sites = find_lora_sites(model)
    if not sites:
        raise NoLoraError(f"{source}: no LoRA sites found; nothing to extract")
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
    with atomic_output(out_dir) as tmp:
        _save_model(model, tmp, slots if mode == "external" else None)
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
            graph_fingerprint=mf.graph_fingerprint(ir.load(tmp / MODEL_FILE)),  # as saved
            mode=mode,
            pack=bool(packs),
            max_rank=max_rank,
            slot_layout=SLOT_LAYOUT,
            slots=slots,
            adapters=adapters,
            extra={"packs": packs, "external_slot_file": EXTERNAL_SLOT_FILE if mode == "external" else None},
        )
        mf.write_manifest(tmp / mf.MANIFEST_NAME, manifest)
    out = Path(out_dir).resolve()
    logger.info("extracted %d adapters over %d modules into %s", len(adapters), len(groups), out)
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


def _save_model(model: ir.Model, folder: Path, external_slots) -> None:
    """Save graph + base weights; in external mode the slots then point to a file not shipped."""
    if external_slots is None:
        ir.save(model, folder / MODEL_FILE, external_data=DATA_FILE)
        return
    for slot in external_slots:  # placeholders so no slot bytes land in the base data file
        value = model.graph.initializers[slot.name]
        value.const_value = ir.tensor(np.zeros([0], value.const_value.dtype.numpy()), dtype=value.const_value.dtype, name=slot.name)
    ir.save(model, folder / MODEL_FILE, external_data=DATA_FILE)
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
