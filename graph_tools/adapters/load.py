"""Adapter package on disk: the ``AdapterPackage`` record and loading (manifest + graph).

A package folder holds ``model.onnx`` (+ ``model.onnx.data``), ``adapters/<name>.<ext>`` and
``manifest.json`` (written by :func:`graph_tools.adapters.extract.extract_adapters`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graph_tools._io import check_external_data, check_topology, load_graph_file
from graph_tools.adapters import manifest as mf, shared
from graph_tools.errors import AdapterError, ModelLoadError, PackageError

__all__ = [
    "AdapterPackage",
    "load_package",
    "load_package_model",
    "package_of",
    "MODEL_FILE",
    "DATA_FILE",
    "EXTERNAL_SLOT_FILE",
    "MODES",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
#: external mode: slot initializers point here; the file is NOT part of the package, values
#: come from an adapter file through SessionOptions.add_external_initializers.
EXTERNAL_SLOT_FILE = "adapter_slots.data"
MODES = ("inputs", "external")


@dataclasses.dataclass(frozen=True)
class AdapterPackage:
    path: Path
    manifest: mf.Manifest

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def adapters(self) -> list[str]:
        return [a.name for a in self.manifest.adapters]

    def adapter_path(self, name: str) -> Path:
        for a in self.manifest.adapters:
            if a.name == name:
                return self.path / a.file
        raise AdapterError(f"unknown adapter {name!r}; package has: {', '.join(self.adapters) or 'none'}")

    @property
    def packs(self) -> list[dict]:
        return list((self.manifest.extra or {}).get("packs") or [])

    def slot_triples(self) -> list[tuple[str, str, str, str]]:
        """``(module, a_name, b_name, scale_name)`` per adapted module, from the manifest."""
        by_site: dict[str, dict[str, str]] = {}
        for slot in self.manifest.slots:
            by_site.setdefault(slot.site, {})[slot.role] = slot.name
        return [(site, r["lora_A"], r["lora_B"], r["lora_scale"]) for site, r in by_site.items()
                if {"lora_A", "lora_B", "lora_scale"} <= set(r)]


def load_package(package_dir: str | os.PathLike) -> AdapterPackage:
    path = Path(package_dir)
    if not path.is_dir():
        raise PackageError(f"{path}: not a package folder")
    if not (path / MODEL_FILE).is_file():
        raise PackageError(f"{path}: no {MODEL_FILE}; not an adapter package")
    package = AdapterPackage(path, mf.read_manifest(path / mf.MANIFEST_NAME))
    records = (package.manifest.extra or {}).get("shared_base")
    if records:
        shared.check_shared(path, records)
    return package


def package_of(model_path: str | os.PathLike) -> AdapterPackage | None:
    """The package ``model_path`` (a package folder, or its ``model.onnx``) belongs to, else None."""
    path = Path(model_path)
    folder = path if path.is_dir() else path.parent
    if not (folder / mf.MANIFEST_NAME).is_file():
        return None
    if not path.is_dir() and path.name != MODEL_FILE:
        return None
    return load_package(folder)


def load_package_model(package: AdapterPackage, *, verify: bool = True) -> ir.Model:
    """The package graph (base weights lazy). External-mode slots, whose data is not part of the
    package, read as zeros. ``verify``: refuse a graph whose fingerprint is not the manifest's."""
    path = package.model_path
    model = load_graph_file(path)
    check_topology(model, str(path))
    slot_file = (package.manifest.extra or {}).get("external_slot_file")
    if package.manifest.mode == "external" and slot_file:
        for slot in package.manifest.slots:
            value = model.graph.initializers.get(slot.name)
            tensor = value.const_value if value is not None else None
            if isinstance(tensor, ir.ExternalTensor) and tensor.location == slot_file:
                zeros = np.broadcast_to(np.zeros((), tensor.dtype.numpy()), tuple(tensor.shape.numpy()))
                value.const_value = ir.Tensor(zeros, dtype=tensor.dtype, name=slot.name)
    check_external_data(model, package.path)
    if verify and mf.graph_fingerprint(model) != package.manifest.graph_fingerprint:
        raise PackageError(
            f"{package.path}: {MODEL_FILE} does not match {mf.MANIFEST_NAME} (graph fingerprint differs); "
            "the manifest belongs to another graph"
        )
    return model
