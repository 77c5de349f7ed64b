"""lora-onnx graph tools: detect LoRA sites, build adapter packages, quantize, serve.

Graph work only: nothing here imports torch or :mod:`exporters` (export is ``exporters.export_peft``).
"""

from graph_tools import _deferred

_deferred.defer()  # before onnx-ir is imported: sympy on first use (see graph_tools/_deferred.py)

from graph_tools.adapters.convert import convert_peft_adapter
from graph_tools.adapters.extract import extract_adapters
from graph_tools.adapters.load import AdapterPackage, load_package
from graph_tools.adapters.merge import merge_adapter
from graph_tools.adapters.strip import strip_adapters
from graph_tools.errors import (
    AdapterError,
    EncodingsError,
    ExportError,
    ExternalDataError,
    GenerationError,
    InvalidGraphError,
    LoraOnnxError,
    ModelLoadError,
    NoLoraError,
    OutputError,
    PackageError,
    QuantizationError,
    SharedBaseChangedError,
    TokenizerError,
    UnsupportedAdapterError,
)
from graph_tools.lora import LoraSite, find_lora_sites
from graph_tools.quant import quantize, read_encodings
from graph_tools.runtime.genai import write_genai_folder
from graph_tools.runtime.mixed import mixed_feeds_for, write_mixed_model
from graph_tools.runtime.session import AdapterSession

__all__ = [
    "find_lora_sites",
    "LoraSite",
    "extract_adapters",
    "convert_peft_adapter",
    "AdapterPackage",
    "load_package",
    "AdapterSession",
    "write_mixed_model",
    "mixed_feeds_for",
    "merge_adapter",
    "strip_adapters",
    "quantize",
    "read_encodings",
    "LoraOnnxError",
    "ModelLoadError",
    "ExternalDataError",
    "InvalidGraphError",
    "UnsupportedAdapterError",
    "NoLoraError",
    "ExportError",
    "AdapterError",
    "PackageError",
    "SharedBaseChangedError",
    "QuantizationError",
    "EncodingsError",
    "GenerationError",
    "OutputError",
    "TokenizerError",
    "write_genai_folder",
]
