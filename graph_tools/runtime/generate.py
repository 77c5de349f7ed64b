"""Token-by-token generation on a KV-cache package (``AdapterSession.generate`` / ``generate_stream``).

The loop runs over one ``IOBinding``: the adapter's slot values (``OrtValue``s prepared once per
adapter choice by the session) are bound once per call, and each step's ``present.{i}.*`` outputs
are bound, as they are, as the next step's ``past_key_values.{i}.*`` inputs; only the last
position's logits come back to numpy to choose the next token. Inputs and positions follow Hugging
Face ``generate``: ``attention_mask`` grows by one column per step, ``position_ids`` are
``cumsum(mask) - 1`` (0 on padding), finished rows (eos seen) get ``pad_token_id`` (eos when the
model has none). Sampling: temperature, then top-k, then top-p (HF's order), drawn from
``numpy.random.default_rng(seed)``. The package's graph must carry the decoder description written
by ``export_peft(..., with_past=True)`` (:mod:`graph_tools.runtime.decoder`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from graph_tools.errors import GenerationError, LoraOnnxError, PackageError, first_line
from graph_tools.runtime.decoder import METADATA_KEY, DecoderInfo

if TYPE_CHECKING:
    from graph_tools.runtime.session import AdapterSession

__all__ = ["GenerationConfig", "generate", "generate_stream", "decoder_info_of", "load_tokenizer", "stream_text"]

logger = logging.getLogger(__name__)

_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_token_id: int | Sequence[int] | None = None

    def check(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)) \
                or self.max_new_tokens <= 0:
            raise GenerationError(f"max_new_tokens must be a positive integer, not {self.max_new_tokens!r}")
        if self.do_sample:
            if not self.temperature > 0:
                raise GenerationError(f"temperature must be > 0, not {self.temperature!r}")
            if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
                raise GenerationError(f"top_k must be a positive integer, not {self.top_k!r}")
            if self.top_p is not None and not 0 < self.top_p <= 1:
                raise GenerationError(f"top_p must be in (0, 1], not {self.top_p!r}")


def decoder_info_of(session: ort.InferenceSession, source) -> DecoderInfo:
    """The decoder description stored in the session's model; a typed error when it has none."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise PackageError(f"{source}: the package's graph was not exported with past (no KV cache): "
                           "export it with export_peft(..., with_past=True)")
    return DecoderInfo.from_json(text, str(source))


def generate(owner: "AdapterSession", input_ids, *, attention_mask=None, adapter=None,
             config: GenerationConfig = GenerationConfig()) -> np.ndarray:
    """``[batch, prompt + new]`` int64 ids; see the module docstring."""
    ids, mask = _prompt(input_ids, attention_mask)
    new = list(generate_stream(owner, ids, attention_mask=mask, adapter=adapter, config=config))
    return np.concatenate([ids, np.stack(new, axis=1)], axis=1) if new else ids


def generate_stream(owner: "AdapterSession", input_ids, *, attention_mask=None, adapter=None,
                    config: GenerationConfig = GenerationConfig()) -> Iterator[np.ndarray]:
    """Yield the next token of every row (``[batch]`` int64) per step, until all rows hit eos or
    ``max_new_tokens`` is reached. Arguments are checked before the first step runs."""
    config.check()
    ids, mask = _prompt(input_ids, attention_mask)
    if isinstance(adapter, (list, tuple)):  # one choice per row: the mixed form (graph_tools.runtime.mixed)
        session, slot_values, step_values = owner._mixed_generation_session(adapter, *ids.shape)
    else:
        session, slot_values = owner._generation_session(owner._key(adapter))
        step_values = None
    info = decoder_info_of(session, owner.package.path)
    total = ids.shape[1] + config.max_new_tokens
    if info.context_length and ids.shape[1] > info.context_length:
        raise GenerationError(f"prompt of {ids.shape[1]} tokens is longer than the context of "
                              f"{info.context_length} tokens")
    if info.context_length and total > info.context_length:
        raise GenerationError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds "
                              f"the context of {info.context_length} tokens")
    if ids.size and (ids.min() < 0 or ids.max() >= info.vocab_size):
        raise GenerationError(f"input_ids must be in [0, {info.vocab_size}) (vocabulary size)")
    eos = _eos(config.eos_token_id, info)
    return _loop(session, slot_values, info, ids, mask, config, eos, owner.package.path, step_values)


def _loop(session, slot_values, info: DecoderInfo, ids, mask, config: GenerationConfig, eos, source, step_values=None):
    """``step_values``: adapter values for the decode steps when they differ from the prompt's
    (a mixed batch: per-row stacked for the prompt, rank concat + row mask per token)."""
    batch = ids.shape[0]
    pad = info.pad_token_id if info.pad_token_id is not None else (eos[0] if eos else 0)
    rng = np.random.default_rng(config.seed)
    inputs = {i.name: i for i in session.get_inputs()}
    layers = range(info.num_hidden_layers)
    past_names = [(info.past_key % i, info.past_value % i) for i in layers]
    present_names = [(info.present_key % i, info.present_value % i) for i in layers]
    dtype = _ORT_FLOAT.get(inputs[past_names[0][0]].type, np.float32) if past_names else np.float32
    binding = session.io_binding()
    for name, value in slot_values.items():  # the adapter: bound once for the whole generation
        binding.bind_ortvalue_input(name, value)
    empty = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, info.num_key_value_heads, 0, info.head_dim), dtype))
    for names in past_names:
        for name in names:
            binding.bind_ortvalue_input(name, empty)
    outputs = ["logits"] + [n for names in present_names for n in names]
    unfinished = np.ones(batch, dtype=bool)
    step_ids = ids
    step_positions = (np.cumsum(mask, -1) - 1) * (mask != 0)
    for _ in range(config.max_new_tokens):
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(step_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        if "position_ids" in inputs:
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(step_positions, dtype=np.int64))
        binding.clear_binding_outputs()
        for name in outputs:
            binding.bind_output(name, "cpu")
        try:
            session.run_with_iobinding(binding)
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.Fail) as exc:
            raise LoraOnnxError(f"{source}: onnxruntime refused the generation step: {first_line(exc)}") from None
        values = binding.get_outputs()
        logits = values[0].numpy()[:, -1, :].astype(np.float32)
        token = _choose(logits, config, rng)
        token = np.where(unfinished, token, pad).astype(np.int64)
        yield token
        if eos:
            unfinished &= ~np.isin(token, eos)
            if not unfinished.any():
                return
        for (k_name, v_name), k_value, v_value in zip(past_names, values[1::2], values[2::2]):
            binding.bind_ortvalue_input(k_name, k_value)  # this step's presents are the next past
            binding.bind_ortvalue_input(v_name, v_value)
        if step_values is not None:
            for name, value in step_values.items():  # bound once, after the prompt step
                binding.bind_ortvalue_input(name, value)
            step_values = None
        step_ids = token[:, None]
        step_positions = step_positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((batch, 1), mask.dtype)], axis=1)


def _prompt(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    try:
        ids = np.asarray(input_ids)
    except (TypeError, ValueError):
        raise GenerationError(f"input_ids must be integer ids, not {type(input_ids).__name__}") from None
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise GenerationError(f"input_ids must be a non-empty [batch, sequence] integer array, got shape "
                              f"{tuple(ids.shape)} of {ids.dtype}")
    if attention_mask is None:
        mask = np.ones_like(ids, dtype=np.int64)
    else:
        mask = np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None, :]
        if mask.shape != ids.shape:
            raise GenerationError(f"attention_mask shape {tuple(mask.shape)} is not input_ids' {tuple(ids.shape)}")
        mask = mask.astype(np.int64)
        if not mask.any(axis=1).all():
            raise GenerationError("attention_mask has a row with no token")
    return ids.astype(np.int64), mask


def _eos(value, info: DecoderInfo) -> list[int]:
    if value is None:
        return list(info.eos_token_id)
    values = [value] if isinstance(value, (int, np.integer)) else list(value)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < info.vocab_size:
            raise GenerationError(f"eos_token_id {v!r} is not a token id of the vocabulary ({info.vocab_size})")
    return [int(v) for v in values]


def _choose(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    if not config.do_sample:
        return logits.argmax(-1)
    scores = logits / float(config.temperature)
    if config.top_k is not None and config.top_k < scores.shape[-1]:
        kth = np.sort(scores, axis=-1)[:, -config.top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if config.top_p is not None and config.top_p < 1.0:
        order = np.argsort(scores, axis=-1)  # ascending, like HF's TopPLogitsWarper
        sorted_scores = np.take_along_axis(scores, order, -1)
        probs = _softmax(sorted_scores)
        remove = np.cumsum(probs, -1) <= 1 - config.top_p
        remove[:, -1] = False  # keep at least the most likely token
        drop = np.zeros_like(remove)
        np.put_along_axis(drop, order, remove, -1)
        scores = np.where(drop, -np.inf, scores)
    probs = _softmax(scores)
    draws = rng.random((probs.shape[0], 1))
    return np.minimum((np.cumsum(probs, -1) < draws).sum(-1), probs.shape[-1] - 1)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def load_tokenizer(folder):
    """A ``tokenizers.Tokenizer`` from a Hugging Face tokenizer folder (its ``tokenizer.json``)."""
    from pathlib import Path

    folder = Path(folder)
    if not folder.is_dir():
        raise GenerationError(f"{folder}: tokenizer folder does not exist")
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise GenerationError(f"{folder}: tokenizer folder has no tokenizer.json (save it with a fast tokenizer's "
                              "save_pretrained)")
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - a core dependency (pyproject.toml)
        raise GenerationError("--prompt needs the 'tokenizers' package, a lora-onnx dependency: "
                              "pip install 'tokenizers==0.23.3'") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises bare Exceptions on malformed files
        raise GenerationError(f"{path}: not a tokenizer file: {first_line(exc)}") from None


def stream_text(tokenizer, steps: Iterator[np.ndarray]) -> Iterator[str]:
    """Text pieces of row 0 as tokens arrive (decoded as a whole, so multi-token characters work)."""
    ids: list[int] = []
    shown = ""
    for step in steps:
        ids.append(int(step[0]))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown):]
            shown = text
