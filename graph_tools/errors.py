"""The one error hierarchy of lora-onnx.

Every error a user can cause is a :class:`LoraOnnxError`; the CLI prints its message on one line
and exits with code 2. Messages name the file, tensor or node at fault.
"""

from __future__ import annotations

__all__ = [
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
    "first_line",
]


class LoraOnnxError(Exception):
    """Base class of every error lora-onnx raises on bad input."""


class ModelLoadError(LoraOnnxError):
    """A model file is missing, not ONNX, or truncated."""


class ExternalDataError(ModelLoadError):
    """External data of a model is missing, too short, or its path escapes the model's folder."""


class InvalidGraphError(ModelLoadError):
    """A model's graph is not a valid DAG: a cycle, or a value no node, input or initializer makes."""


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


class SharedBaseChangedError(PackageError):
    """A shared-base package's base weights file (outside the package's own bytes) is missing or
    changed since the package was made."""


class QuantizationError(LoraOnnxError):
    """Quantization was asked for with bad settings or calibration data."""


class EncodingsError(LoraOnnxError):
    """An encodings file is malformed or does not match the graph."""


class GenerationError(LoraOnnxError):
    """Text generation was asked for with bad settings (prompt beyond the context, max_new_tokens)."""


class OutputError(LoraOnnxError):
    """An output path cannot be written safely: it is, contains or lies inside an input, or it is
    a folder where a file goes (or a file where a folder goes)."""


class TokenizerError(LoraOnnxError):
    """A tokenizer folder is missing, lacks files a runtime needs, or holds broken files."""


def first_line(exc: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (or of a text), at most ``limit`` chars:
    what goes after "file: " in our one-line errors when a library fails underneath."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__ if isinstance(exc, BaseException) else "no detail"
