"""KV-cache decoder export for PEFT causal LMs (``export_peft(..., with_past=True)``).

transformers 5.x passes the cache as a ``DynamicCache``, which torch.onnx's dynamo export does not
take as an input. :class:`DecoderWrapper` takes flat tensors instead and builds the cache inside
``forward``; its outputs are the logits and the cache after the step, flattened again::

    input_ids       [batch, sequence]                      int64
    attention_mask  [batch, total_sequence]                int64   (past + this step)
    position_ids    [batch, sequence]                      int64   (every supported family)
    past_key_values.{i}.key / .value  [batch, kv_heads, past_sequence, head_dim]
      -> logits     [batch, sequence, vocab]
         present.{i}.key / .value     [batch, kv_heads, total_sequence, head_dim]

A zero-length past is a prefill. The cache layers are plain ``DynamicLayer``s (a Concat in the
graph); the LoRA branches stay unmerged like every other ``export_peft`` graph. The attention mask
is built inside the traced ``forward``, so a Mistral ``sliding_window`` is part of the graph (the
cache keeps every position; the mask hides those outside the window; tested past the window). What generation
needs is written to the model's metadata (see :mod:`graph_tools.runtime.decoder` for the keys).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from graph_tools.errors import ExportError
from graph_tools.runtime.decoder import DecoderInfo

__all__ = ["DecoderWrapper", "SUPPORTED_FAMILIES", "decoder_info", "decoder_example", "io_names", "model_dtype", "EXAMPLE_PAST"]

#: tested families; other transformers decoders with the same config fields are tried as well
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "phi3", "gpt2")
#: past length of the traced example (not 0 or 1: torch.export would specialize those)
EXAMPLE_PAST = 3


def _config(model: torch.nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ExportError(f"{type(model).__name__}: with_past=True needs a transformers causal LM (no .config)")
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _first(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def decoder_info(model: torch.nn.Module) -> DecoderInfo:
    """Model family, dimensions, context and special tokens, read off the transformers config."""
    config = _config(model)
    family = getattr(config, "model_type", None) or type(model).__name__
    layers = _first(config, "num_hidden_layers", "n_layer")
    heads = _first(config, "num_attention_heads", "n_head")
    hidden = _first(config, "hidden_size", "n_embd")
    if not (layers and heads and hidden):
        raise ExportError(f"{family}: config has no layer/head/hidden sizes; with_past=True needs a decoder config")
    kv_heads = _first(config, "num_key_value_heads", default=heads)
    head_dim = _first(config, "head_dim", default=hidden // heads)
    generation = getattr(model, "generation_config", None)
    eos = _token_ids(_first(generation, "eos_token_id") if generation is not None else None) or _token_ids(
        getattr(config, "eos_token_id", None))
    pad = _first(generation, "pad_token_id") if generation is not None else None
    pad = pad if pad is not None else getattr(config, "pad_token_id", None)
    bos = _first(generation, "bos_token_id") if generation is not None else None
    bos = bos if bos is not None else getattr(config, "bos_token_id", None)
    return DecoderInfo(
        model_type=str(family),
        num_hidden_layers=int(layers),
        num_attention_heads=int(heads),
        num_key_value_heads=int(kv_heads),
        head_dim=int(head_dim),
        hidden_size=int(hidden),
        vocab_size=int(_first(config, "vocab_size")),
        context_length=int(_first(config, "max_position_embeddings", "n_positions", "n_ctx", default=0)),
        bos_token_id=None if bos is None else int(_token_ids(bos)[0]),
        eos_token_id=eos,
        pad_token_id=None if pad is None else int(_token_ids(pad)[0]),
        position_ids=True,
    )


class DecoderWrapper(torch.nn.Module):
    """Flat tensors in (ids, mask, positions, past k/v per layer), flat tensors out."""

    def __init__(self, model: torch.nn.Module, attribute: str, num_layers: int):
        super().__init__()
        setattr(self, attribute, model)
        self._attribute = attribute
        self._layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self._layers)])
        out = getattr(self, self._attribute)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True,
        )
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def decoder_example(info: DecoderInfo, example_inputs: Mapping[str, Any], dtype: torch.dtype):
    """Traced example ``(args, dynamic_shapes)`` from the user's ``{input_ids, attention_mask}``."""
    from torch.export import Dim

    if not isinstance(example_inputs, Mapping) or "input_ids" not in example_inputs:
        raise ExportError("with_past=True: example_inputs must be a dict with 'input_ids' (and 'attention_mask')")
    unknown = sorted(set(example_inputs) - {"input_ids", "attention_mask"})
    if unknown:
        raise ExportError(f"with_past=True: example input {unknown[0]!r} is not taken (only input_ids, attention_mask)")
    ids = example_inputs["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ExportError("with_past=True: example input_ids must be a [batch, sequence] tensor")
    mask = example_inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        raise ExportError(f"with_past=True: example attention_mask must have input_ids' shape {tuple(ids.shape)}")
    # at least 2 x 2 (torch.export specializes sizes 0 and 1) and past != sequence
    while ids.shape[0] < 2:
        ids, mask = torch.cat([ids, ids]), torch.cat([mask, mask])
    while ids.shape[1] < 2 or ids.shape[1] == EXAMPLE_PAST:
        ids, mask = torch.cat([ids, ids[:, -1:]], 1), torch.cat([mask, mask[:, -1:]], 1)
    batch = ids.shape[0]
    full = torch.cat([torch.ones(batch, EXAMPLE_PAST, dtype=torch.int64), mask.to(torch.int64)], 1)
    positions = (full.cumsum(-1) - 1).masked_fill(full == 0, 0)[:, EXAMPLE_PAST:]
    g = torch.Generator().manual_seed(0)
    shape = (batch, info.num_key_value_heads, EXAMPLE_PAST, info.head_dim)
    past = [torch.randn(shape, generator=g).to(dtype) for _ in range(2 * info.num_hidden_layers)]
    b, s, p, t = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    shapes = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in past))
    return [ids.to(torch.int64), full, positions, *past], shapes


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.dtype.is_floating_point:
            return param.dtype
    return torch.float32


def io_names(info: DecoderInfo) -> tuple[list[str], list[str]]:
    """Graph input and output names, in the wrapper's order."""
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(info.num_hidden_layers):
        inputs += [info.past_key % i, info.past_value % i]
        outputs += [info.present_key % i, info.present_value % i]
    return inputs, outputs


def name_graph_io(model, inputs: list[str], outputs: list[str]) -> None:
    """Give the exported graph's inputs/outputs their decoder names and dimension names."""
    import onnx_ir as ir

    graph = model.graph
    if len(graph.inputs) != len(inputs) or len(graph.outputs) != len(outputs):
        raise ExportError(f"decoder export made {len(graph.inputs)} inputs / {len(graph.outputs)} outputs, "
                          f"expected {len(inputs)} / {len(outputs)}")
    for value, name in zip(graph.inputs, inputs):
        value.name = name
    for value, name in zip(graph.outputs, outputs):
        if value.producer() is None or value.is_graph_input():  # an input passed through: copy it
            raise ExportError(f"decoder output {name!r} is not computed by the graph")
        value.name = name
        if name != "logits" and value.shape is not None and len(value.shape) == 4:
            dims = list(value.shape)
            dims[2] = ir.SymbolicDim("total_sequence")
            value.shape = ir.Shape(dims)
