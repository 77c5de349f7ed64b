"""LoRA site detection: ``find_lora_sites`` and the ``LoraSite`` record."""

from graph_tools.lora.detect import META_ADAPTER, META_MODULE, META_ROLE, find_lora_sites
from graph_tools.lora.site import KINDS, LoraSite

__all__ = ["find_lora_sites", "LoraSite", "KINDS", "META_MODULE", "META_ADAPTER", "META_ROLE"]
