"""PEFT/torch -> ONNX export with LoRA branches kept and PEFT names restored."""

from exporters.peft_export import ExportResult, export_peft, lora_layers

__all__ = ["export_peft", "ExportResult", "lora_layers"]


def __getattr__(name: str):
    if name == "pipeline":
        from exporters.pipeline import pipeline

        return pipeline
    raise AttributeError(f"module 'exporters' has no attribute {name!r}")
