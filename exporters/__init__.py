"""PEFT/torch -> ONNX export with LoRA branches kept and PEFT names restored, and the end-to-end
pipeline (export -> extract -> quantize -> verify). Needs the ``[export]`` extra (torch, peft)."""

from exporters.peft_export import ExportResult, export_peft, lora_layers
from exporters.pipelines import PipelineResult, pipeline

__all__ = ["export_peft", "ExportResult", "lora_layers", "pipeline", "PipelineResult"]
