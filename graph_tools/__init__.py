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
