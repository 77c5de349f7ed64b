"""``merge_adapter``: a package and one of its adapters in, a plain ONNX model out (the adapter
folded into the base weights; the graph work is :mod:`graph_tools.passes.merge`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from graph_tools._io import refuse_overlap, save_model
from graph_tools.adapters.compose import read_slot_weights
from graph_tools.adapters.load import load_package, load_package_model
from graph_tools.passes._base import run_passes
from graph_tools.passes.merge import FoldAdapterPass
from graph_tools.passes.slots import find_slot_branches
from graph_tools.passes.strip import StripSlotsPass

__all__ = ["merge_adapter"]

logger = logging.getLogger(__name__)


def merge_adapter(package_dir: str | os.PathLike, adapter: str, out_path: str | os.PathLike) -> Path:
    """Write ``out_path``: the package's base graph with ``adapter`` folded into the weights.

    Each slot branch is found by structure from its slots (:func:`find_slot_branches`), the
    adapter's ``scale * B @ A`` is added to the weight of the base op the branch joins, and every
    branch is removed. Only the weights of adapted modules are read.
    """
    package = load_package(package_dir)
    refuse_overlap([out_path, f"{out_path}.data"], [package.path])
    spec = package.manifest.adapter(adapter)
    path = package.path / spec.file
    model = load_package_model(package)  # first: a graph that is not the manifest's is refused as such
    weights = read_slot_weights(package.manifest.slots, package.packs, path, expected_modules=set(spec.scale))
    branches = find_slot_branches(model, package.slot_triples())
    run_passes(model, FoldAdapterPass(weights, branches), StripSlotsPass(branches))
    out = save_model(model, out_path, inputs=[package.path])
    logger.info("merged adapter %r (%d modules) into %s", adapter, len(weights), out)
    return out
