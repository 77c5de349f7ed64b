"""lora-onnx graph tools: detect LoRA sites, build adapter packages, quantize, serve."""

from graph_tools.errors import (
    AdapterError,
    EncodingsError,
    ExportError,
    ExternalDataError,
    LoraOnnxError,
    ModelLoadError,
    NoLoraError,
    PackageError,
    QuantizationError,
    UnsupportedAdapterError,
)
from graph_tools.lora import LoraSite, find_lora_sites

__all__ = [
    "find_lora_sites",
    "LoraSite",
    "LoraOnnxError",
    "ModelLoadError",
    "ExternalDataError",
    "UnsupportedAdapterError",
    "NoLoraError",
    "ExportError",
    "AdapterError",
    "PackageError",
    "QuantizationError",
    "EncodingsError",
]


def __getattr__(name: str):
    """``graph_tools.pipeline`` is ``exporters.pipeline`` (one function, two homes)."""
    if name == "pipeline":
        from exporters.end_to_end import pipeline

        return pipeline
    if name in ("quantize", "read_encodings"):
        from graph_tools import quant

        return getattr(quant, name)
    if name == "AdapterSession":
        from graph_tools.runtime.session import AdapterSession

        return AdapterSession
    if name in ("extract_adapters",):
        from graph_tools.adapters.package import extract_adapters

        return extract_adapters
    if name == "convert_peft_adapter":
        from graph_tools.adapters.convert import convert_peft_adapter

        return convert_peft_adapter
    if name in ("merge_adapter",):
        from graph_tools.passes.merge import merge_adapter

        return merge_adapter
    if name in ("strip_adapters",):
        from graph_tools.passes.strip import strip_adapters

        return strip_adapters
    raise AttributeError(f"module 'graph_tools' has no attribute {name!r}")
