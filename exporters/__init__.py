"""PEFT/torch -> ONNX export with LoRA branches kept and PEFT names restored."""

from exporters.end_to_end import PipelineResult, pipeline
from exporters.peft_export import ExportResult, export_peft, lora_layers

__all__ = ["export_peft", "ExportResult", "lora_layers", "pipeline", "PipelineResult"]

