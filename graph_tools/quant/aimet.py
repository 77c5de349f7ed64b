"""The aimet-onnx quantsim config file under which our encodings load into AIMET as written.

``aimet_onnx.quantsim.load_encodings_to_sim(sim, "encodings/<name>.encodings")`` needs a
``QuantizationSimModel`` of the same fp32 graph whose quantizers have the same names. AIMET's
default config fuses ``MatMul -> Add(bias)`` into one Gemm (``supergroup_pass_list:
["MatmulAdd"]``), so the MatMul outputs we encode (36 on MiniLM) are no tensors of its graph and
the load is refused. The config written here (``encodings/aimet_config.json``) says what lora-onnx
quantizes: no fusions and no supergroups (every op output keeps its own quantizer, as in our QDQ
graph), symmetric per-channel weights, quantized model inputs. With it the files load with
``strict=False`` and every entry applied, provided the embedding tables are per-tensor
(``quantize(..., per_row_embeddings=False)``): AIMET has no per-channel quantizer for a Gather's
table. ``strict=True`` still reports settings AIMET's own rules decide per op (see
benchmarks/README.md, "AIMET load check").

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

__all__ = ["AIMET_CONFIG_FILE", "aimet_config", "write_aimet_config", "validate_aimet_config"]

AIMET_CONFIG_FILE = "aimet_config.json"


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
        "op_type": {},
        "supergroup_pass_list": [],
        "supergroups": [],
        "model_input": {"is_input_quantized": "True"},
        "model_output": {},
    }
    validate_aimet_config(config)
    return config


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
