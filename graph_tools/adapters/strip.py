"""``strip_adapters``: a LoRA model or package in, the base model out (every LoRA branch removed;
the graph work is :mod:`graph_tools.passes.strip`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import onnx_ir as ir

from graph_tools._io import model_files, refuse_overlap, save_model, working_copy
from graph_tools.adapters.load import load_package_model, package_of
from graph_tools.errors import AdapterError, NoLoraError
from graph_tools.lora import find_lora_sites
from graph_tools.passes._base import run_passes
from graph_tools.passes.slots import find_slot_branches, infer_slot_specs
from graph_tools.passes.strip import StripLoraPass, StripSlotsPass

if TYPE_CHECKING:
    import onnx

__all__ = ["strip_adapters"]


def strip_adapters(model_path: str | os.PathLike | ir.Model | onnx.ModelProto, out_path: str | os.PathLike) -> Path:
    """Write the base model (every LoRA branch removed) to ``out_path`` (+ ``.data``).

    ``model_path``: an exported LoRA model, an extracted package's ``model.onnx``, a package
    folder, an ``ir.Model`` or an ``onnx.ModelProto`` (never changed).
    """
    package = package_of(model_path) if isinstance(model_path, (str, os.PathLike)) else None
    if package is not None:
        model = load_package_model(package)
        triples = package.slot_triples()
        inputs = [package.path]
    else:
        model = working_copy(model_path)
        triples = infer_slot_specs(model)
        inputs = model_files(model_path if isinstance(model_path, (str, os.PathLike)) else None, model)
    refuse_overlap([out_path, f"{out_path}.data"], inputs)
    branches = find_slot_branches(model, triples)
    if branches:
        run_passes(model, StripSlotsPass(branches))
    sites = find_lora_sites(model)  # on the slot-free graph: what an exporter left
    if not sites and not branches:
        raise NoLoraError(f"{_label(model_path)}: no LoRA sites found; nothing to strip")
    if sites:
        run_passes(model, StripLoraPass(sites))
    left = find_lora_sites(model)
    if left:
        raise AdapterError(f"{_label(model_path)}: LoRA site {left[0].module!r}/{left[0].adapter!r} is left after strip")
    return save_model(model, out_path, inputs=inputs)


def _label(model) -> str:
    return str(model) if isinstance(model, (str, os.PathLike)) else f"<{type(model).__name__}>"
