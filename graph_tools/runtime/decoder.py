"""What a KV-cache decoder graph tells its runners: one JSON metadata entry on the ONNX model.

``export_peft(..., with_past=True)`` writes the model-level ``metadata_props`` key
``lora_onnx.decoder`` (:data:`METADATA_KEY`) holding a JSON object; extraction, quantization and
conversion keep model metadata, so a package's ``model.onnx`` carries it too. Keys:

===================== =========================================================================
``model_type``        transformers family: ``llama``, ``mistral``, ``qwen2``, ``phi3``, ``gpt2``
``num_hidden_layers`` decoder layers (= number of past/present pairs)
``num_attention_heads`` query heads
``num_key_value_heads`` KV heads (GQA; = heads without it)
``head_dim``          size per head; past/present are ``[batch, kv_heads, seq, head_dim]``
``hidden_size``       model width
``vocab_size``        logits' last axis
``context_length``    ``max_position_embeddings`` (GPT-2: ``n_positions``); 0 if unknown
``bos_token_id``      int or null
``eos_token_id``      list of ints (generation stops at any of them), may be empty
``pad_token_id``      int or null (generate pads finished rows with it, else with eos[0])
``position_ids``      true when the graph has a ``position_ids`` input
``past_key`` ...      I/O name templates: ``past_key_values.%d.key``, ``past_key_values.%d.value``,
                      ``present.%d.key``, ``present.%d.value``
===================== =========================================================================

Dimension names of the graph: ``batch``, ``sequence``, ``past_sequence``, ``total_sequence``
(``attention_mask`` and presents are ``total_sequence`` = past + sequence long). The KV graph
concatenates past and new keys (no shared buffer: ORT GenAI needs ``past_present_share_buffer``
false). Position ids follow Hugging Face ``generate``: ``cumsum(attention_mask) - 1``, 0 on padding.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import onnx_ir as ir

from graph_tools.errors import PackageError

__all__ = ["DecoderInfo", "METADATA_KEY", "read_decoder_info", "write_decoder_info"]

METADATA_KEY = "lora_onnx.decoder"


@dataclasses.dataclass(frozen=True)
class DecoderInfo:
    model_type: str
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int
    bos_token_id: int | None
    eos_token_id: list[int]
    pad_token_id: int | None
    position_ids: bool = True
    past_key: str = "past_key_values.%d.key"
    past_value: str = "past_key_values.%d.value"
    present_key: str = "present.%d.key"
    present_value: str = "present.%d.value"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> "DecoderInfo":
        try:
            data: Any = json.loads(text)
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in names})
        except (ValueError, TypeError, AttributeError) as exc:
            raise PackageError(f"{source}: metadata {METADATA_KEY!r} is not a decoder description: {exc}") from None


def write_decoder_info(model: ir.Model, info: DecoderInfo) -> None:
    model.metadata_props[METADATA_KEY] = info.to_json()


def read_decoder_info(model: ir.Model, source: str = "model") -> DecoderInfo | None:
    """The decoder description of ``model``, or ``None`` for a graph exported without past."""
    text = model.metadata_props.get(METADATA_KEY)
    return None if text is None else DecoderInfo.from_json(text, source)
