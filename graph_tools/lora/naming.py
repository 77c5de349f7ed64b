"""PEFT naming: parse module/adapter out of weight names, build slot names."""

from __future__ import annotations

import re

__all__ = ["PEFT_PREFIX", "parse_lora_weight_name", "strip_peft_prefix", "module_from_base_weight"]

PEFT_PREFIX = "base_model.model."

_LORA_WEIGHT = re.compile(
    r"^(?:(?P<module>.*)\.)?(?P<role>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_scale)"
    r"\.(?P<adapter>[^.]+)(?:\.weight)?$"
)
_SCOPE = re.compile(r"^(?P<module>.*)\.(?:lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.(?P<adapter>[^.]+)$")


def strip_peft_prefix(name: str) -> str:
    """``base_model.model.model.layers.0.q_proj`` -> ``model.layers.0.q_proj``."""
    while name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    return name


def parse_lora_weight_name(name: str) -> tuple[str, str, str] | None:
    """Return ``(module, adapter, role)`` for a PEFT LoRA weight name, else ``None``.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` ->
    ``("model.layers.0.self_attn.q_proj", "default", "lora_A")``.
    """
    match = _LORA_WEIGHT.match(name)
    if not match or not match.group("module"):
        return None
    return strip_peft_prefix(match.group("module")), match.group("adapter"), match.group("role")


def parse_scope(scope: str) -> tuple[str, str] | None:
    """Parse a torch.onnx name scope such as ``m.base_model.model.x.q_proj.lora_A.default``."""
    match = _SCOPE.match(scope)
    if not match:
        return None
    module = match.group("module")
    idx = module.find(PEFT_PREFIX)
    if idx >= 0:
        module = module[idx:]
    return strip_peft_prefix(module), match.group("adapter")


def module_from_base_weight(name: str) -> str | None:
    """``...q_proj.base_layer.weight`` -> ``...q_proj``; plain ``...weight`` names too."""
    for suffix in (".base_layer.weight", ".weight"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return strip_peft_prefix(name[: -len(suffix)])
    return None
