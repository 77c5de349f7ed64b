"""``convert_peft_adapter``: a PEFT ``save_pretrained`` folder -> an adapter file of an existing
package, without re-exporting. PEFT names map onto slot names (slots hold PEFT's layout), the
scale follows PEFT's rule (alpha/r, rsLoRA alpha/sqrt(r), rank/alpha patterns), ranks are padded
for fixed-rank packages and every shape is checked against the manifest."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from graph_tools._io import package_lock, refuse_overlap
from graph_tools.adapters import files, manifest as mf
from graph_tools.adapters.compose import pack_tensors, slot_tensors
from graph_tools.adapters.load import load_package
from graph_tools.adapters.peft_checkpoint import read_peft_adapter
from graph_tools.errors import AdapterError, PackageError

__all__ = ["convert_peft_adapter"]

logger = logging.getLogger(__name__)


def convert_peft_adapter(peft_adapter_dir: str | os.PathLike, package_dir: str | os.PathLike, *, name: str | None = None) -> Path:
    """Write ``<package>/adapters/<name>.<ext>`` from a PEFT adapter folder; returns its path.

    The package is locked (:func:`graph_tools._io.package_lock`) from reading its manifest to
    writing it back, so concurrent conversions into one package all end up listed; the adapter
    file is written before the manifest that lists it, each atomically.
    """
    package = load_package(package_dir)
    source = Path(peft_adapter_dir)
    name = name or source.resolve().name
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise AdapterError(f"invalid adapter name {name!r}")
    _check_float_package(package)
    checkpoint = read_peft_adapter(source)
    with package_lock(package.path):
        package = load_package(package.path)  # the manifest as it is now, under the lock
        _check_float_package(package)
        fmt = package.manifest.adapters[0].format if package.manifest.adapters else (package.manifest.extra or {}).get("format", "onnx_adapter")
        rel = f"adapters/{name}{files.ADAPTER_SUFFIX[fmt]}"
        target = package.path / rel
        refuse_overlap([target, package.path / mf.MANIFEST_NAME], [source])
        weights = _site_weights(checkpoint, package)
        tensors = slot_tensors(package.manifest.slots, weights)
        packs = list((package.manifest.extra or {}).get("packs") or [])
        if packs:
            tensors = pack_tensors(packs, tensors)
        spec = mf.AdapterSpec(
            name=name, file=rel, rank={m: int(w[0].shape[0]) for m, w in weights.items()},
            alpha=checkpoint.config.get("lora_alpha"), scale={m: w[2] for m, w in weights.items()},
            source=str(source), format=fmt,
        )
        manifest = package.manifest.with_adapter(spec)
        mf.Manifest.from_dict(manifest.to_dict(), source=str(package.path / mf.MANIFEST_NAME))  # refuse before writing
        existed = target.exists()
        path = files.write_adapter(target, tensors, format=fmt, metadata={"adapter": name, "source": str(source)})
        try:
            mf.write_manifest(package.path / mf.MANIFEST_NAME, manifest)
        except BaseException:
            if not existed:  # nothing half-done: no adapter file the manifest does not list
                Path(path).unlink(missing_ok=True)
            raise
    logger.info("converted %s -> %s (%d modules)", source, path, len(weights))
    return Path(path)


def _check_float_package(package) -> None:
    if (package.manifest.extra or {}).get("quantization") or not any(s.role == "lora_A" for s in package.manifest.slots):
        raise PackageError(f"{package.path}: not a float adapter package; convert into the float package, then quantize it")


def _site_weights(checkpoint, package) -> dict:
    slot_modules = {s.site for s in package.manifest.slots}
    weights = {}
    for module, site in checkpoint.sites().items():
        if module not in slot_modules:
            raise AdapterError(
                f"{checkpoint.weights_file}: tensor {site.a_key!r} has no slot in the package "
                f"(the package was extracted from a model without LoRA on {module!r})"
            )
        weights[module] = (site.lora_A, site.lora_B, float(site.scale))
    if not weights:
        raise AdapterError(f"{checkpoint.path}: no LoRA weights found")
    return weights
