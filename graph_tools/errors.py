"""The one error hierarchy of lora-onnx.

Every error a user can cause is a :class:`LoraOnnxError`; the CLI prints its message on one line
and exits with code 2. Messages name the file, tensor or node at fault.
"""

from __future__ import annotations

__all__ = [
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


class LoraOnnxError(Exception):
    """Base class of every error lora-onnx raises on bad input."""


class ModelLoadError(LoraOnnxError):
    """A model file is missing, not ONNX, or truncated."""


class ExternalDataError(ModelLoadError):
    """External data of a model is missing, too short, or its path escapes the model's folder."""


class UnsupportedAdapterError(LoraOnnxError):
    """The PEFT model uses a tuner, variant or layer kind lora-onnx does not support."""


class NoLoraError(LoraOnnxError):
    """A model was expected to contain LoRA layers or sites but has none."""


class ExportError(LoraOnnxError):
    """torch.onnx could not export the model."""


class AdapterError(LoraOnnxError):
    """An adapter file or PEFT checkpoint does not fit the package (name, shape, rank, values)."""


class PackageError(LoraOnnxError):
    """An adapter package folder is missing parts or does not match its manifest."""


class QuantizationError(LoraOnnxError):
    """Quantization was asked for with bad settings or calibration data."""


class EncodingsError(LoraOnnxError):
    """An encodings file is malformed or does not match the graph."""
