"""export_peft(with_past=True): KV-cache decoders of every family == PyTorch PEFT.

Each family's tiny model (two adapters, both active in the raw export) is exported once per run
(``decoders.exported``; the other decoder tests read the committed ``fixtures/kv_<family>.onnx``,
and ``test_committed_kv_fixture_is_todays_export`` keeps those equal to this export);
ORT logits and presents are compared with PyTorch for a prefill (zero-length past), a one-token
decode fed ORT's own presents, a chunked prefill (several tokens with past) and a left-padded
batch, each against PyTorch on the same positions and mask.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import decoder_models
import models
from exporters import export_peft
from graph_tools import ExportError
from graph_tools.runtime.decoder import METADATA_KEY, read_decoder_info

FAMILIES = decoder_models.FAMILIES
TOL = 1e-4


class _Runner:
    def __init__(self, path, layers: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.layers = layers
        self.outputs = [o.name for o in self.session.get_outputs()]

    def step(self, ids, mask, past=None):
        batch = ids.shape[0]
        if past is None:
            past = [(np.zeros((batch, *self.kv_shape), np.float32),) * 2 for _ in range(self.layers)]
        past_len = past[0][0].shape[2]
        positions = (np.cumsum(mask, -1) - 1) * (mask != 0)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions[:, past_len:].astype(np.int64)}
        for i, (k, v) in enumerate(past):
            feeds[f"past_key_values.{i}.key"] = k
            feeds[f"past_key_values.{i}.value"] = v
        out = dict(zip(self.outputs, self.session.run(None, feeds)))
        presents = [(out[f"present.{i}.key"], out[f"present.{i}.value"]) for i in range(self.layers)]
        return out["logits"], presents


def _runner(decoders, family):
    model, path = decoders.exported(family)
    info = read_decoder_info(ir.load(path))
    runner = _Runner(path, info.num_hidden_layers)
    runner.kv_shape = (info.num_key_value_heads, 0, info.head_dim)
    models.activate_all_adapters(model)
    return model, runner


def _err(got_logits, got_presents, want_logits, want_presents, rows=slice(None)) -> float:
    errors = [np.abs(got_logits[rows] - want_logits.numpy()[rows]).max()]
    for (gk, gv), (wk, wv) in zip(got_presents, want_presents, strict=True):
        errors += [np.abs(gk[rows] - wk.numpy()[rows]).max(), np.abs(gv[rows] - wv.numpy()[rows]).max()]
    return float(max(errors))


def _ids(batch, seq, seed):
    return torch.randint(3, decoder_models.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_matches_pytorch(family, decoders):
    model, runner = _runner(decoders, family)
    ids = _ids(3, 6, 1)
    mask = torch.ones_like(ids)
    got = runner.step(ids.numpy(), mask.numpy())
    assert got[0].shape == (3, 6, decoder_models.VOCAB)
    assert got[1][0][0].shape[2] == 6
    assert _err(*got, *decoder_models.reference_step(model, ids, mask)) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_and_chunked_prefill_with_past_match_full_sequence(family, decoders):
    """ORT's presents fed back as past: one token, then a chunk of 3, equal PyTorch on the whole."""
    model, runner = _runner(decoders, family)
    ids = _ids(2, 9, 2)
    mask = torch.ones_like(ids)
    _, past = runner.step(ids[:, :5].numpy(), mask[:, :5].numpy())
    logits, past = runner.step(ids[:, 5:6].numpy(), mask[:, :6].numpy(), past)  # one-token decode
    want_logits, want_presents = decoder_models.reference_step(model, ids[:, :6], mask[:, :6])
    assert _err(logits, past, want_logits[:, 5:], want_presents) <= TOL
    logits, past = runner.step(ids[:, 6:].numpy(), mask.numpy(), past)  # chunked prefill: 3 tokens, past 6
    want_logits, want_presents = decoder_models.reference_step(model, ids, mask)
    assert past[0][0].shape[2] == 9
    assert _err(logits, past, want_logits[:, 6:], want_presents) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_pytorch(family, decoders):
    model, runner = _runner(decoders, family)
    ids = _ids(3, 7, 3)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    logits, past = runner.step(ids.numpy(), mask.numpy())
    want_logits, want_presents = decoder_models.reference_step(model, ids, mask)
    for row in range(3):
        valid = mask[row].bool().numpy()
        assert np.abs(logits[row][valid] - want_logits[row][valid].numpy()).max() <= TOL
    next_ids = _ids(3, 1, 4)
    full = torch.cat([mask, torch.ones(3, 1, dtype=torch.int64)], 1)
    logits, past = runner.step(next_ids.numpy(), full.numpy(), past)
    _, want_past = decoder_models.reference_step(model, ids, mask)
    want_logits, want_presents = decoder_models.reference_step(model, next_ids, full, want_past)
    assert _err(logits, past, want_logits, want_presents) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_io_names_axes_and_metadata(family, decoders):
    model, path = decoders.exported(family)
    graph_model = ir.load(path)
    info = read_decoder_info(graph_model)
    layers = model.config.num_hidden_layers
    assert info.model_type == family and info.num_hidden_layers == layers
    assert info.context_length == 48 and info.eos_token_id == [2] and info.bos_token_id == 1
    inputs = [v.name for v in graph_model.graph.inputs]
    assert inputs == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert [v.name for v in graph_model.graph.outputs] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    past = graph_model.graph.inputs[3].shape
    assert [str(d) for d in past] == ["batch", str(info.num_key_value_heads), "past_sequence", str(info.head_dim)]
    assert [str(d) for d in graph_model.graph.outputs[1].shape][2] == "total_sequence"
    assert json.loads(graph_model.metadata_props[METADATA_KEY])["present_key"] == "present.%d.key"


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_branches_unmerged_with_peft_names(family, decoders):
    model, path = decoders.exported(family)
    result = decoders.result(family)
    assert result.adapters == ["default", "second"]
    assert {s.key for s in result.sites} == set(models.expected_sites(model))
    graph = ir.load(path).graph
    lora = [k for k in model.state_dict() if ".lora_" in k]
    assert lora and all(k in graph.initializers for k in lora)


@pytest.mark.parametrize("family", FAMILIES)
def test_committed_kv_fixture_is_todays_export(family, decoders):
    """The generation, genai and mixed-batch tests run on fixtures/kv_<family>.onnx: it must be what
    the exporter writes today (same nodes, names, weights, inputs, outputs and metadata).
    Regenerate with ``python fixtures/make_fixtures.py kv_<family>`` when this fails on purpose."""
    fresh, committed = ir.load(decoders.exported(family)[1]), ir.load(decoders(family)[1])
    ir.external_data.load_to_model(fresh)
    assert dict(fresh.metadata_props) == dict(committed.metadata_props)
    for got, want in ((committed.graph.inputs, fresh.graph.inputs), (committed.graph.outputs, fresh.graph.outputs)):
        assert [(v.name, v.dtype, str(v.shape)) for v in got] == [(v.name, v.dtype, str(v.shape)) for v in want]
    assert committed.opset_imports == fresh.opset_imports

    def node(n):
        return (n.domain, n.op_type, n.name, [v.name if v else "" for v in n.inputs], [v.name for v in n.outputs],
                {k: repr(a.value) for k, a in n.attributes.items()})

    assert [node(n) for n in committed.graph] == [node(n) for n in fresh.graph]
    assert [n.metadata_props.get("lora_onnx.module") for n in committed.graph] == [
        n.metadata_props.get("lora_onnx.module") for n in fresh.graph]
    assert sorted(committed.graph.initializers) == sorted(fresh.graph.initializers)
    for name, value in fresh.graph.initializers.items():
        assert committed.graph.initializers[name].dtype == value.dtype, name
        np.testing.assert_array_equal(committed.graph.initializers[name].const_value.numpy(), value.const_value.numpy())


def test_with_past_refuses_other_example_inputs(decoders):
    model, _ = decoders("llama")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ExportError, match="token_type_ids"):
        export_peft(model, {"input_ids": ids, "token_type_ids": ids}, "unused.onnx", with_past=True)
    with pytest.raises(ExportError, match="dynamic_shapes"):
        export_peft(model, {"input_ids": ids}, "unused.onnx", with_past=True, dynamic_shapes={})


def test_mistral_sliding_window_is_applied(tmp_path):
    """A prompt longer than Mistral's sliding_window: the window is in the graph (ORT == PyTorch,
    which differs from full attention), for the prefill and for generation past the window."""
    from graph_tools import extract_adapters
    from graph_tools.runtime.session import AdapterSession

    model = decoder_models.causal_lm("mistral", sliding_window=4)
    export_peft(model, {"input_ids": _ids(1, 4, 0), "attention_mask": torch.ones(1, 4, dtype=torch.int64)},
                tmp_path / "m.onnx", with_past=True)
    session = AdapterSession(extract_adapters(tmp_path / "m.onnx", tmp_path / "pkg").path)
    ids = _ids(1, 12, 5)
    mask = torch.ones_like(ids)
    model.set_adapter("default")
    want, _ = decoder_models.reference_step(model, ids, mask)
    empty = np.zeros((1, 2, 0, 8), np.float32)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": np.arange(12)[None],
             "past_key_values.0.key": empty, "past_key_values.0.value": empty}
    got = session.run(["logits"], feeds, adapter="default")[0]
    assert np.abs(got - want.numpy()).max() <= TOL
    model.config.sliding_window = None  # the same weights with full attention: other logits
    full, _ = decoder_models.reference_step(model, ids, mask)
    model.config.sliding_window = 4
    assert np.abs(full.numpy() - want.numpy())[:, 4:].max() > 1e-3
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False).numpy()
    np.testing.assert_array_equal(session.generate(ids.numpy(), adapter="default", max_new_tokens=8), ref)
