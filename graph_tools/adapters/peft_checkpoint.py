"""Read a PEFT LoRA ``save_pretrained`` folder without pickle.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``,
read with ``torch.load(weights_only=True)``). Saved keys carry PEFT's ``base_model.model.`` prefix
and no adapter name::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight    (r, in)        Linear
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight    (out, r)
    base_model.model.conv.lora_A.weight / lora_B.weight               (r, in, k..) / (out, r, 1..)
    base_model.model.model.embed_tokens.lora_embedding_A              (r, vocab)     Embedding
    base_model.model.model.embed_tokens.lora_embedding_B              (dim, r)

:meth:`PeftAdapter.sites` pairs them per module (prefix stripped: ``model.layers.0.self_attn.q_proj``)
with PEFT's own scale: ``lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``), where ``r`` and
``lora_alpha`` come from ``rank_pattern`` / ``alpha_pattern`` resolved with PEFT's
``get_pattern_key`` (first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)`` wins).

Embedding layers that PEFT saves next to the LoRA weights (``save_embedding_layers``, e.g.
``...embed_tokens.base_layer.weight``) are base weights, not adapter weights: they are kept in
:attr:`PeftAdapter.base_weights` and not used. Anything else that is not a LoRA weight (DoRA
magnitudes, LoRA biases, ``modules_to_save``, trainable tokens) is refused, as are configs whose
forward is not ``base(x) + scale * B(A(x))`` on the exported base weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np

from graph_tools._io import read_json
from graph_tools.errors import AdapterError, first_line as _one_line
from graph_tools.lora.naming import PEFT_PREFIX

__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "PeftSiteWeights",
    "PeftAdapter",
    "read_peft_adapter",
    "peft_scale",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<part>lora_A|lora_B)\.weight|(?P<emb>lora_embedding_A|lora_embedding_B))$"
)
_BASE_KEY = re.compile(r"^(?P<module>.+?)(?:\.base_layer)?\.weight$")

#: Config options whose non-default value changes the forward or needs weights we do not carry.
#: Each maps to a predicate "is this value unsupported?".
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "use_dora": bool,
    "lora_bias": bool,
    "use_qalora": bool,
    "bias": lambda value: value not in (None, "none"),
    "modules_to_save": bool,
    "trainable_token_indices": bool,
    "target_parameters": bool,
    "layer_replication": bool,
}
#: Fallback for PEFT's ``is_lora_variant`` field metadata (used when peft is not importable).
_VARIANT_FIELDS = (
    "use_dora",
    "velora_config",
    "alora_invocation_tokens",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
)
#: init_lora_weights values after which the adapter belongs to a modified base model (LoftQ, which
#: replaces the base weights by quantized ones, is refused on its own with its own message).
_BASE_MODIFYING_INIT = re.compile(r"^(pissa.*|olora|corda)$")


@dataclasses.dataclass(frozen=True)
class PeftSiteWeights:
    """One module's LoRA weights as PEFT stores them.

    Attributes:
        lora_A, lora_B: the arrays, PEFT layout (Linear ``(r, in)`` / ``(out, r)``; Conv
            ``(r, in, k..)`` / ``(out, r, 1..)``; Embedding ``(r, vocab)`` / ``(dim, r)``).
        rank: ``r`` (from ``rank_pattern`` or ``r``); equals the tensors' rank axis.
        alpha: ``lora_alpha`` (from ``alpha_pattern`` or ``lora_alpha``).
        scale: PEFT's ``scaling``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.
        kind: ``linear``, ``conv`` or ``embedding``.
        a_key, b_key: the tensors' keys in the checkpoint.
    """

    lora_A: np.ndarray
    lora_B: np.ndarray
    rank: int
    alpha: float
    scale: float
    kind: str
    a_key: str
    b_key: str


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
    """A PEFT LoRA checkpoint folder, read and validated.

    Attributes:
        path: the folder.
        config: ``adapter_config.json`` as a dict.
        tensors: every tensor of the weights file, by its saved key.
        weights_file: the file the tensors came from.
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    weights_file: Path
    _sites: dict[str, PeftSiteWeights] = dataclasses.field(repr=False, compare=False)
    _base_weights: dict[str, np.ndarray] = dataclasses.field(repr=False, compare=False)

    def sites(self) -> dict[str, PeftSiteWeights]:
        """``{module_path: PeftSiteWeights}``, module paths without PEFT's ``base_model.model.``."""
        return dict(self._sites)

    @property
    def base_weights(self) -> dict[str, np.ndarray]:
        """Embedding base weights PEFT saved alongside (``save_embedding_layers``), by saved key."""
        return dict(self._base_weights)

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    def rank_of(self, module: str) -> int:
        """``r`` for ``module`` as PEFT resolves it (``rank_pattern``, else ``r``)."""
        return _resolve(self.config, "rank_pattern", "r", module)

    def alpha_of(self, module: str) -> float:
        """``lora_alpha`` for ``module`` as PEFT resolves it (``alpha_pattern``, else ``lora_alpha``)."""
        return _resolve(self.config, "alpha_pattern", "lora_alpha", module)


def peft_scale(alpha: float, rank: int, *, use_rslora: bool) -> float:
    """PEFT's ``scaling``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (the one copy of it)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def read_peft_adapter(path: str | os.PathLike) -> PeftAdapter:
    """Read and validate a PEFT ``save_pretrained`` folder (see the module docstring)."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such PEFT adapter folder")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        subdirs = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file())
        hint = f"; adapters found in subfolders: {', '.join(subdirs)}" if subdirs else ""
        raise AdapterError(f"{folder}: no {CONFIG_NAME}, not a PEFT adapter folder{hint}")
    config = _read_config(config_path)
    weights_file, tensors = _read_weights(folder)
    for key, array in tensors.items():
        _check_finite(weights_file, key, array)
    sites, base_weights = _pair_sites(config, tensors, weights_file)
    if not sites:
        raise AdapterError(f"{weights_file}: no LoRA weights (no lora_A/lora_B or lora_embedding_A/B tensors)")
    logger.info("read PEFT adapter %s: %d sites, %d tensors", folder, len(sites), len(tensors))
    return PeftAdapter(folder, config, tensors, weights_file, sites, base_weights)


# ------------------------------------------------------------------------------------- config


def _read_config(path: Path) -> dict[str, Any]:
    config = read_json(path, AdapterError, CONFIG_NAME)
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type {peft_type!r} is not supported; only LORA adapters convert")
    for option, unsupported in {**_UNSUPPORTED, **{f: bool for f in _variant_fields()}}.items():
        value = config.get(option)
        if value is not None and unsupported(value):
            raise AdapterError(f"{path}: {option}={value!r} is not supported (only plain LoRA converts)")
    init = config.get("init_lora_weights")
    refusal = _init_refusal(init)
    if refusal:
        raise AdapterError(f"{path}: init_lora_weights={init!r} {refusal}")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not _positive(value):
            raise AdapterError(f"{path}: {key} must be a positive number, got {value!r}")
    if not isinstance(config["r"], int):
        raise AdapterError(f"{path}: r must be an integer, got {config['r']!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(_positive(v) for v in pattern.values()):
            raise AdapterError(f"{path}: {key} must map patterns to positive numbers, got {pattern!r}")
    return config


def _init_refusal(init: Any) -> str | None:
    """Why an adapter with this ``init_lora_weights`` cannot be converted onto an unmodified base, or None."""
    if init == "loftq":
        return ("adapters fit PEFT's LoftQ-quantized copy of the base weights, not the package's base; "
                "export that PEFT model with export_peft instead of converting")
    if isinstance(init, str) and _BASE_MODIFYING_INIT.match(init):
        return ("adapters belong to a modified base model; re-save with PEFT's "
                "path_initial_model_for_weight_conversion to get a plain LoRA adapter")
    return None


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@cache
def _variant_fields() -> tuple[str, ...]:
    """LoraConfig fields PEFT itself tags as forward-changing variants (``is_lora_variant``)."""
    if "peft" not in sys.modules:  # importing peft (torch, transformers) costs seconds: use the copy
        return _VARIANT_FIELDS
    try:
        from peft import LoraConfig
    except ImportError:  # pragma: no cover - peft is a dependency; keep working without it
        return _VARIANT_FIELDS
    return tuple(f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant"))


@cache
def _get_pattern_key() -> Callable[[Iterable[str], str], str]:
    """PEFT's own ``get_pattern_key`` when peft is loaded; else (peft costs seconds to import,
    ``convert`` must be fast) an exact copy of it."""
    try:
        if "peft" not in sys.modules:
            raise ImportError("peft not loaded")
        from peft.utils.other import get_pattern_key
    except ImportError:

        def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
            for key in pattern_keys:
                if re.match(rf"(.*\.)?({key})$", key_to_match):
                    return key
            return key_to_match

    return get_pattern_key


def _resolve(config: dict[str, Any], pattern_name: str, default_name: str, module: str) -> Any:
    """What ``LoraModel._create_and_replace`` does: ``pattern.get(get_pattern_key(...), default)``."""
    pattern = config.get(pattern_name) or {}
    key = _get_pattern_key()(pattern.keys(), module)
    return pattern.get(key, config[default_name])


# ------------------------------------------------------------------------------------ weights


def _read_weights(folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    safetensors_path = folder / SAFETENSORS_WEIGHTS_NAME
    bin_path = folder / WEIGHTS_NAME
    if safetensors_path.is_file():  # PEFT prefers safetensors too
        return safetensors_path, _read_safetensors(safetensors_path)
    if bin_path.is_file():
        return bin_path, _read_bin(bin_path)
    raise AdapterError(f"{folder}: no {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, ...: all mean "not a readable file"
        raise AdapterError(f"{path}: not a valid safetensors file ({_one_line(exc)})") from None


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise AdapterError(f"{path}: reading a .bin checkpoint needs torch (pip install lora-onnx[export]); "
                           "or save the adapter as adapter_model.safetensors") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (refused globals), RuntimeError (truncated zip), EOFError ...
        reason = f"{type(exc).__name__}: {_one_line(exc)}"
        raise AdapterError(f"{path}: not a readable tensor checkpoint ({reason})") from None
    if not isinstance(state, dict):
        raise AdapterError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    arrays = {}
    for key, tensor in state.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise AdapterError(f"{path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            arrays[key] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        else:
            try:
                arrays[key] = tensor.numpy().copy()
            except TypeError:
                raise AdapterError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, not convertible") from None
    return arrays


def _check_finite(path: Path, key: str, array: np.ndarray) -> None:
    if array.dtype.kind == "f" or array.dtype == np.dtype(ml_dtypes.bfloat16):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise AdapterError(f"{path}: tensor {key!r} has {bad} non-finite values (NaN/Inf)")


# -------------------------------------------------------------------------------------- sites


def _strip_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def _embedding_layer_names() -> tuple[str, ...]:
    if "peft" not in sys.modules:
        return ("embed_tokens", "lm_head")
    try:
        from peft.utils.constants import EMBEDDING_LAYER_NAMES
    except ImportError:  # pragma: no cover
        return ("embed_tokens", "lm_head")
    return tuple(EMBEDDING_LAYER_NAMES)


def _pair_sites(
    config: dict[str, Any], tensors: dict[str, np.ndarray], path: Path
) -> tuple[dict[str, PeftSiteWeights], dict[str, np.ndarray]]:
    parts: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    base_weights: dict[str, np.ndarray] = {}
    embedding_names = _embedding_layer_names()
    for key in tensors:
        match = _LORA_KEY.match(key)
        if match:
            module = _strip_prefix(match.group("module"))
            part = match.group("part") or match.group("emb")
            role = "A" if part.endswith("A") else "B"
            kind = "embedding" if match.group("emb") else "linear"
            if kinds.setdefault(module, kind) != kind:
                raise AdapterError(f"{path}: module {module!r} has both lora_A/B and lora_embedding_A/B tensors")
            parts.setdefault(module, {})[role] = key
            continue
        base = _BASE_KEY.match(key)
        if base and base.group("module").rsplit(".", 1)[-1] in embedding_names:
            base_weights[key] = tensors[key]  # save_embedding_layers: base weights, not ours
            logger.debug("%s: ignoring saved base embedding weight %s", path, key)
            continue
        raise AdapterError(
            f"{path}: tensor {key!r} is not a LoRA weight (DoRA, LoRA bias, modules_to_save and "
            "trainable tokens are not supported)"
        )

    use_rslora = bool(config.get("use_rslora", False))
    sites: dict[str, PeftSiteWeights] = {}
    for module in sorted(parts):
        keys = parts[module]
        for role in ("A", "B"):
            if role not in keys:
                other = next(iter(keys.values()))
                raise AdapterError(f"{path}: tensor {other!r} has no matching lora_{role} tensor")
        a, b = tensors[keys["A"]], tensors[keys["B"]]
        for key, array in ((keys["A"], a), (keys["B"], b)):
            if array.dtype.kind != "f" and array.dtype != ml_dtypes.bfloat16:
                raise AdapterError(f"{path}: tensor {key!r} has dtype {array.dtype}; LoRA weights are floating point")
        kind = kinds[module]
        if kind == "linear" and a.ndim > 2:
            kind = "conv"
        if a.ndim < 2 or b.ndim != a.ndim or (kind == "embedding" and a.ndim != 2):
            raise AdapterError(
                f"{path}: tensors {keys['A']!r} {list(a.shape)} and {keys['B']!r} {list(b.shape)} are not a LoRA pair"
            )
        rank = _resolve(config, "rank_pattern", "r", module)
        alpha = _resolve(config, "alpha_pattern", "lora_alpha", module)
        if a.shape[0] != rank:
            raise AdapterError(
                f"{path}: tensor {keys['A']!r} has rank {a.shape[0]} but the config gives r={rank} for {module!r}"
            )
        if b.shape[1] != rank:
            grouped = kind == "conv" and rank % b.shape[1] == 0
            reason = " (grouped convolutions are not supported)" if grouped else ""
            raise AdapterError(
                f"{path}: tensor {keys['B']!r} has rank {b.shape[1]} but {keys['A']!r} has rank {rank}{reason}"
            )
        sites[module] = PeftSiteWeights(
            lora_A=a,
            lora_B=b,
            rank=int(rank),
            alpha=float(alpha),
            scale=peft_scale(alpha, rank, use_rslora=use_rslora),
            kind=kind,
            a_key=keys["A"],
            b_key=keys["B"],
        )
    return sites, base_weights
