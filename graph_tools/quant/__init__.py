"""Quantization: adapter-aware QDQ insertion, calibration, AIMET encodings files."""

from graph_tools.quant.encodings import Encodings, TensorEncoding, read_encodings, write_encodings
from graph_tools.quant.quantize import quantize

__all__ = ["quantize", "read_encodings", "write_encodings", "Encodings", "TensorEncoding"]
