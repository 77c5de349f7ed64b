"""aimet-onnx compatibility: the quantsim config written with every package, and the placement rules
``quantize(..., aimet_placement=True)`` follows so the encodings load with ``strict=True``.

``aimet_onnx.quantsim.load_encodings_to_sim(sim, "encodings/<name>.encodings")`` needs a
``QuantizationSimModel`` of the same fp32 graph whose quantizers have the same names and settings.

* The config (``encodings/aimet_config.json``, :func:`aimet_config`): no fusions and no supergroups
  (AIMET's default fuses ``MatMul -> Add(bias)`` into Gemm, so the MatMul outputs we encode would be
  no tensors of its graph), symmetric per-channel weights, quantized model inputs, and normalization
  scales/biases left float (as in our QDQ graph).
* Always (every package): outputs of data-movement ops (:data:`UNQUANTIZED_OUTPUT_OPS`, aimet-onnx's
  own list, not settable in its config) get no Q/DQ; they are their input, moved.
* ``aimet_placement=True`` adds what aimet-onnx decides per op and no config key changes: constant
  inputs of other ops (Add biases, embedding tables) are 16/8-bit asymmetric activations, a
  MatMul's second input when it is not a weight (K, V) is symmetric (signed type), ``lora_scale``
  is an unsigned activation-typed constant, and Constant-node outputs are quantized too. The fp32
  graph to give AIMET keeps the LoRA slots as plain graph inputs (no initializer defaults), as in a
  QNN LoRA flow: AIMET then treats A/B as inputs (16-bit symmetric per tensor, as we write them).
  What then remains for ``strict=True`` are the tensors holding the attention-mask sentinel
  (manifest ``float_activations``), which we keep float and AIMET quantizes; a config file cannot
  name tensors, so disable those quantizers in the sim before loading (see benchmarks/README.md,
  "AIMET load check").

The config is validated against ``schemas/aimet_quantsim_config.schema.json`` (the subset of
AIMET's config format we write) before it is written.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
from pathlib import Path
from typing import Any

import jsonschema

from graph_tools._io import atomic_file
from graph_tools.errors import EncodingsError

__all__ = ["AIMET_CONFIG_FILE", "UNQUANTIZED_OUTPUT_OPS", "NORM_OPS", "aimet_config", "write_aimet_config",
           "validate_aimet_config", "dynamic_weights"]

AIMET_CONFIG_FILE = "aimet_config.json"
#: ops whose outputs aimet-onnx never quantizes (``aimet_onnx.quantsim.op_outputs_to_ignore``)
UNQUANTIZED_OUTPUT_OPS = frozenset({"Flatten", "Gather", "Reshape", "Shape", "Unsqueeze", "Squeeze", "Split",
                                    "Compress", "Tile", "Transpose", "Identity"})
#: normalizations whose scale/bias inputs aimet-onnx treats as parameters (left float by our config)
NORM_OPS = frozenset({"LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization",
                      "BatchNormalization"})
_WEIGHT_INPUT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


def _flag(value: bool) -> str:
    return "True" if value else "False"  # AIMET's config spells booleans as strings


def aimet_config(*, per_channel: bool = True, symmetric_activations: bool = False) -> dict[str, Any]:
    """The quantsim config matching a package quantized with these options (see module docstring)."""
    config = {
        "defaults": {
            "ops": {"is_output_quantized": "True", "is_symmetric": _flag(symmetric_activations)},
            "params": {"is_quantized": "True", "is_symmetric": "True"},
            "strict_symmetric": "False",
            "unsigned_symmetric": "False",
            "per_channel_quantization": _flag(per_channel),
        },
        "params": {"bias": {"is_quantized": "False"}},
        "op_type": {op: {"params": {"weight": {"is_quantized": "False"}, "bias": {"is_quantized": "False"}}}
                    for op in sorted(NORM_OPS)},
        "supergroup_pass_list": [],
        "supergroups": [],
        "model_input": {"is_input_quantized": "True"},
        "model_output": {},
    }
    validate_aimet_config(config)
    return config


def _through_moves(value):
    """The tensor whose values ``value`` moves (back through :data:`UNQUANTIZED_OUTPUT_OPS`)."""
    while value is not None and value.producer() is not None and value.producer().op_type in UNQUANTIZED_OUTPUT_OPS:
        value = value.producer().inputs[0]
    return value


def dynamic_weights(model, activations) -> set[str]:
    """Activations that reach a MatMul/Gemm/Conv as its second input (a weight that is not a
    constant, e.g. attention K and V): aimet-onnx quantizes them symmetric."""
    acts, out = set(activations), set()
    for node in model.graph:
        if node.op_type in _WEIGHT_INPUT_OPS and len(node.inputs) > 1:
            value = _through_moves(node.inputs[1])
            if value is not None and value.name in acts:
                out.add(value.name)
    return out


def validate_aimet_config(config: Any) -> None:
    """Raise :class:`EncodingsError` unless ``config`` matches the schema of the configs we write."""
    error = jsonschema.exceptions.best_match(_validator().iter_errors(config))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "top level"
        raise EncodingsError(f"AIMET config, {where}: {' '.join(error.message.split())[:200]}")


def write_aimet_config(path: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Validate, then atomically write ``config`` as JSON; return the path."""
    validate_aimet_config(config)
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


@functools.lru_cache(maxsize=None)
def _validator() -> jsonschema.protocols.Validator:
    resource = importlib.resources.files("graph_tools.quant").joinpath("schemas/aimet_quantsim_config.schema.json")
    return jsonschema.Draft202012Validator(json.loads(resource.read_text(encoding="utf-8")))
