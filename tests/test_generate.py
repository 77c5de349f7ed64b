"""AdapterSession.generate / generate_stream on KV-cache packages == PEFT ``model.generate``.

Greedy ids must be identical to Hugging Face for the base model (``disable_adapter()``), each
adapter and a weighted combination (PEFT ``add_weighted_adapter(combination_type="cat")``, the
same rank concatenation the session does), for one prompt and for a left-padded batch, on every
decoder family. Sampling is checked for reproducibility and against greedy at top-k 1 / tiny top-p.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import pytest
import torch

import decoder_models
from graph_tools import AdapterError, LoraOnnxError
from graph_tools.errors import GenerationError, PackageError
from graph_tools.runtime.decoder import read_decoder_info
from graph_tools.runtime.session import AdapterSession
from graph_builder import FIXTURES

FAMILIES = decoder_models.FAMILIES
COMBO = {"default": 0.7, "second": 0.5}
CHOICES = {"base": None, "default": "default", "second": "second", "combo": COMBO}
NEW = 10

PROMPT = torch.tensor([[5, 9, 11, 40, 17]])
BATCH = torch.tensor([[0, 0, 0, 5, 9, 11, 40], [7, 8, 9, 10, 11, 12, 13], [0, 33, 21, 60, 4, 4, 90]])
BATCH_MASK = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]])

_REFERENCE: dict[str, torch.nn.Module] = {}
_SESSIONS: dict[tuple[str, str], AdapterSession] = {}


def _reference_model(decoders, family):
    """A copy of the exported model with the ``combo`` (cat) adapter added (the export stays as is)."""
    if family not in _REFERENCE:
        model = copy.deepcopy(decoders(family)[0])
        model.add_weighted_adapter(list(COMBO), list(COMBO.values()), "combo", combination_type="cat")
        _REFERENCE[family] = model
    return _REFERENCE[family]


def _session(decoder_packages, family, mode="inputs"):
    if (family, mode) not in _SESSIONS:
        _SESSIONS[family, mode] = AdapterSession(decoder_packages(family, mode))
    return _SESSIONS[family, mode]


def hf_generate(model, choice, ids, mask=None, **kwargs):
    kwargs = dict(max_new_tokens=NEW, do_sample=False, **kwargs)
    mask = torch.ones_like(ids) if mask is None else mask
    if choice is None:
        with model.disable_adapter(), torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, **kwargs).numpy()
    model.set_adapter(choice if isinstance(choice, str) else "combo")
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **kwargs).numpy()


@pytest.mark.parametrize("choice", list(CHOICES))
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_ids_equal_peft(family, choice, decoders, decoder_packages):
    model = _reference_model(decoders, family)
    session = _session(decoder_packages, family)
    adapter = CHOICES[choice]
    single = session.generate(PROMPT.numpy(), adapter=adapter, max_new_tokens=NEW)
    assert single.dtype == np.int64
    np.testing.assert_array_equal(single, hf_generate(model, adapter, PROMPT))
    batch = session.generate(BATCH.numpy(), attention_mask=BATCH_MASK.numpy(), adapter=adapter, max_new_tokens=NEW)
    np.testing.assert_array_equal(batch, hf_generate(model, adapter, BATCH, BATCH_MASK))


def test_adapters_change_the_continuation(decoder_packages):
    session = _session(decoder_packages, "llama")
    outs = {name: session.generate(PROMPT.numpy(), adapter=choice)[0].tolist() for name, choice in CHOICES.items()}
    assert len({tuple(v) for v in outs.values()}) == len(CHOICES)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rows_stop_at_eos_like_peft(family, decoders, decoder_packages):
    """eos = a token greedy decoding produces mid-way: that row stops, others go on, padding after."""
    model = _reference_model(decoders, family)
    session = _session(decoder_packages, family)
    free = session.generate(BATCH.numpy(), attention_mask=BATCH_MASK.numpy(), adapter="default", eos_token_id=[],
                            max_new_tokens=NEW)
    eos = int(free[0, BATCH.shape[1] + 2])
    got = session.generate(BATCH.numpy(), attention_mask=BATCH_MASK.numpy(), adapter="default", eos_token_id=eos,
                           max_new_tokens=NEW)
    want = hf_generate(model, "default", BATCH, BATCH_MASK, eos_token_id=eos)
    np.testing.assert_array_equal(got, want)
    assert got.shape[1] <= free.shape[1] and (got[0, BATCH.shape[1] + 3:] == 0).all()  # pad_token_id 0


def test_stream_yields_the_generated_tokens_step_by_step(decoder_packages):
    session = _session(decoder_packages, "qwen2")
    full = session.generate(BATCH.numpy(), attention_mask=BATCH_MASK.numpy(), adapter=COMBO, max_new_tokens=6)
    stream = session.generate_stream(BATCH.numpy(), attention_mask=BATCH_MASK.numpy(), adapter=COMBO, max_new_tokens=6)
    first = next(stream)
    assert first.shape == (3,) and first.dtype == np.int64
    steps = [first, *stream]
    np.testing.assert_array_equal(np.stack(steps, 1), full[:, BATCH.shape[1]:])


def test_sampling_is_reproducible_with_a_seed(decoder_packages):
    session = _session(decoder_packages, "phi3")
    kwargs = dict(adapter="second", max_new_tokens=12, do_sample=True, temperature=1.5)
    a = session.generate(BATCH.numpy(), attention_mask=BATCH_MASK.numpy(), seed=7, **kwargs)
    b = session.generate(BATCH.numpy(), attention_mask=BATCH_MASK.numpy(), seed=7, **kwargs)
    c = session.generate(BATCH.numpy(), attention_mask=BATCH_MASK.numpy(), seed=8, **kwargs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = session.generate(BATCH.numpy(), attention_mask=BATCH_MASK.numpy(), adapter="second", max_new_tokens=12)
    for narrow in (dict(top_k=1), dict(top_p=1e-6)):
        np.testing.assert_array_equal(
            session.generate(BATCH.numpy(), attention_mask=BATCH_MASK.numpy(), seed=3, **{**kwargs, **narrow}), greedy)


def test_external_mode_package_generates_like_peft(decoders, decoder_packages):
    model = _reference_model(decoders, "mistral")
    session = _session(decoder_packages, "mistral", "external")
    for choice in (None, "second"):
        got = session.generate(PROMPT.numpy(), adapter=choice, max_new_tokens=NEW)
        np.testing.assert_array_equal(got, hf_generate(model, choice, PROMPT))


def test_package_keeps_the_decoder_description(decoder_packages):
    info = read_decoder_info(ir.load(decoder_packages("llama") / "model.onnx"))
    assert (info.model_type, info.num_hidden_layers, info.num_key_value_heads, info.head_dim) == ("llama", 2, 2, 8)
    assert (info.context_length, info.eos_token_id, info.pad_token_id) == (48, [2], 0)


def test_bad_generation_arguments(decoder_packages):
    session = _session(decoder_packages, "llama")
    with pytest.raises(GenerationError, match="longer than the context of 48"):
        session.generate(np.ones((1, 49), np.int64))
    with pytest.raises(GenerationError, match="exceeds the context of 48"):
        session.generate(np.ones((1, 40), np.int64), max_new_tokens=9)
    for bad in (0, -3, 2.5):
        with pytest.raises(GenerationError, match="max_new_tokens"):
            session.generate(PROMPT.numpy(), max_new_tokens=bad)
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        session.generate(PROMPT.numpy(), adapter="nope")
    with pytest.raises(GenerationError, match="vocabulary"):
        session.generate(np.array([[5, 500]]))
    with pytest.raises(GenerationError, match="attention_mask shape"):
        session.generate(PROMPT.numpy(), attention_mask=np.ones((1, 2), np.int64))
    with pytest.raises(GenerationError, match="top_p"):
        session.generate(PROMPT.numpy(), do_sample=True, top_p=1.5)
    with pytest.raises(GenerationError, match="input_ids"):
        session.generate(np.zeros((1, 0), np.int64))


def test_generate_on_a_package_without_past(tmp_path):
    from graph_tools import extract_adapters

    pkg = extract_adapters(FIXTURES / "ours_llama.onnx", tmp_path / "pkg").path
    with pytest.raises(PackageError, match="not exported with past"):
        AdapterSession(pkg).generate(np.array([[1, 2, 3]]))
    assert issubclass(PackageError, LoraOnnxError)


# ------------------------------------------------------------------ quantized decoder packages

def _calibration(model, rows=6, length=10, seed=11):
    """Prefill feeds, and chunked steps whose past is a real cache (computed by PyTorch) of the
    base model, each adapter and the concurrency: the quantizer runs every adapter on every feed,
    and the past inputs need a range (an empty past gives none) wide enough for every choice's cache."""
    g = torch.Generator().manual_seed(seed)
    feeds, steps = [], []
    empty = np.zeros((1, 2, 0, 8), np.float32)
    for _ in range(rows):
        ids = torch.randint(3, decoder_models.VOCAB, (1, length), generator=g)
        feeds.append({"input_ids": ids.numpy(), "attention_mask": np.ones((1, length), np.int64),
                      "position_ids": np.arange(length)[None],
                      **{f"past_key_values.{i}.{kv}": empty for i in range(2) for kv in ("key", "value")}})
        steps.append(ids)
    half = length // 2
    for choice in (None, ["default"], ["second"], ["default", "second"]):  # base, each adapter, the concurrency
        for ids in steps:
            mask = torch.ones_like(ids[:, :half])
            if choice is None:
                with model.disable_adapter():
                    _, past = decoder_models.reference_step(model, ids[:, :half], mask)
            else:
                model.base_model.set_adapter(choice, inference_mode=True)
                _, past = decoder_models.reference_step(model, ids[:, :half], mask)
            step = {"input_ids": ids[:, half:].numpy(), "attention_mask": np.ones((1, length), np.int64),
                    "position_ids": np.arange(half, length)[None]}
            for i, (k, v) in enumerate(past):
                step[f"past_key_values.{i}.key"], step[f"past_key_values.{i}.value"] = k.numpy(), v.numpy()
            feeds.append(step)
    model.set_adapter("default")
    return feeds


@pytest.fixture(scope="module")
def quantized_llama(decoders, decoder_packages, tmp_path_factory):
    from graph_tools.quant import quantize

    model, _ = decoders("llama")
    package = decoder_packages("llama")
    q = quantize(package, tmp_path_factory.mktemp("qdecoder") / "w8a16", _calibration(model),
                 weights="int8", activations="uint16", lora_weights="int16", concurrencies=[["default", "second"]])
    return AdapterSession(package), AdapterSession(q.path)


def _cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


QUANT_CHOICES = {"base": None, "default": "default", "second": "second", "both": {"default": 1.0, "second": 1.0}}


@pytest.mark.parametrize("choice", list(QUANT_CHOICES))
def test_generate_on_a_quantized_package(quantized_llama, choice):
    """W8A16 package: generate runs per adapter (and a declared concurrency); the prefill and a
    decode step with past give logits close to the fp32 package's; the first greedy tokens agree."""
    fp32, qdq = quantized_llama
    adapter = QUANT_CHOICES[choice]
    prompt = PROMPT.numpy()
    want = fp32.generate(prompt, adapter=adapter, max_new_tokens=NEW, eos_token_id=[])
    got = qdq.generate(prompt, adapter=adapter, max_new_tokens=NEW, eos_token_id=[])
    assert got.dtype == np.int64 and got.shape == want.shape
    np.testing.assert_array_equal(got[:, : prompt.shape[1]], prompt)
    # logits of the prefill, then of one decode step on the fp32 cache (the same past for both)
    empty = np.zeros((1, 2, 0, 8), np.float32)
    feeds = {"input_ids": prompt, "attention_mask": np.ones_like(prompt), "position_ids": np.arange(prompt.shape[1])[None],
             **{f"past_key_values.{i}.{kv}": empty for i in range(2) for kv in ("key", "value")}}
    names = ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    f_out = dict(zip(names, fp32.run(names, feeds, adapter=adapter)))
    q_logits = qdq.run(["logits"], feeds, adapter=adapter)[0]
    # the declared concurrency is quantized less closely (cosine ~0.97 on this model, single adapters
    # >= 0.9995, though the calibration has its caches too): reported to the quantizer's owner
    close = 0.95 if choice == "both" else 0.999
    assert _cosine(f_out["logits"], q_logits) > close
    n = prompt.shape[1]
    step = {"input_ids": want[:, n : n + 1], "attention_mask": np.ones((1, n + 1), np.int64), "position_ids": np.array([[n]]),
            **{f"past_key_values.{i}.{kv}": f_out[f"present.{i}.{kv}"] for i in range(2) for kv in ("key", "value")}}
    assert _cosine(fp32.run(["logits"], step, adapter=adapter)[0], qdq.run(["logits"], step, adapter=adapter)[0]) > close
    if choice != "both":  # (the concurrency's first token already differs on this model)
        np.testing.assert_array_equal(got[:, : n + 3], want[:, : n + 3])


def test_quantized_package_refuses_an_uncalibrated_combination(quantized_llama):
    _, qdq = quantized_llama
    with pytest.raises(AdapterError, match="calibrated per adapter"):
        qdq.generate(PROMPT.numpy(), adapter=COMBO, max_new_tokens=2)
