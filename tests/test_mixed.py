"""Mixed-adapter batches: one adapter choice per row, one run; each row equals that row run alone
with its own choice (fp32 <= 1e-5) and PEFT's output for that row (<= 1e-4)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

import package_helpers as H
from graph_tools.errors import AdapterError, LoraOnnxError
from graph_tools.runtime.session import AdapterSession

#: three rows: adapters of different ranks, the base model, weighted combinations
ROWS = {
    "names": ["default", None, "second"],
    "weighted": [{"default": 0.5, "second": 1.5}, "second", {"default": 1.0, "second": 1.0}],
    "repeat": ["second", "second", "default"],
}
LABEL = {None: "base", "default": "default", "second": "second"}
ROW_TOL = 1e-5


def _label(choice) -> str:
    if isinstance(choice, dict):
        return "weighted" if choice == H.CHOICES["weighted"] else "both"
    return LABEL[choice]


def _row(feeds, i):
    return {k: v[i: i + 1] for k, v in feeds.items()}


def _check_rows(session: AdapterSession, case, rows):
    names = [o.name for o in session.get_outputs()]
    mixed = session.run(None, case.feeds, adapter=rows)
    for i, choice in enumerate(rows):
        alone = session.run(None, _row(case.feeds, i), adapter=choice)
        for name, got, want in zip(names, mixed, alone):
            assert got[i: i + 1].shape == want.shape
            np.testing.assert_allclose(got[i: i + 1], want, rtol=0, atol=ROW_TOL, err_msg=f"row {i} {choice!r} {name}")
        ref = {k: v[i: i + 1] for k, v in case.ref(_label(choice)).items()}
        assert H.max_error(names, [m[i: i + 1] for m in mixed], ref) <= H.TOL


@pytest.mark.parametrize("mode", ["inputs", "pack", "max_rank", "external"])
@pytest.mark.parametrize("model", H.MODELS)
def test_mixed_rows_equal_rows_alone(model, mode, zoo, graphs, tmp_path_factory):
    case = H.get_case(model, zoo, graphs, tmp_path_factory)
    session = AdapterSession(H.get_package(case, mode))
    for rows in ROWS.values():
        _check_rows(session, case, rows)


def test_same_choice_everywhere_takes_the_package_graph(zoo, graphs, tmp_path_factory):
    case = H.get_case("llama", zoo, graphs, tmp_path_factory)
    session = AdapterSession(H.get_package(case, "inputs"))
    got = session.run(None, case.feeds, adapter=["default"] * 3)
    want = session.run(None, case.feeds, adapter="default")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert session._mixed is None  # no mixed-form session was made


def test_mixed_bad_input(zoo, graphs, tmp_path_factory):
    case = H.get_case("llama", zoo, graphs, tmp_path_factory)
    session = AdapterSession(H.get_package(case, "inputs"))
    with pytest.raises(AdapterError, match="3"):
        session.run(None, case.feeds, adapter=["default", "second"])
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        session.run(None, case.feeds, adapter=["default", "nope", None])
    with pytest.raises(AdapterError, match="no row choices"):
        session.run(None, case.feeds, adapter=[])
    with pytest.raises(LoraOnnxError, match="adapter slot"):
        session.run(None, {**case.feeds, "lora_rows.x.A": np.zeros(1, np.float32)}, adapter=["default", None, "second"])


def test_plain_onnxruntime_mixed_form(zoo, graphs, tmp_path_factory, tmp_path):
    """README: ``write_mixed_model`` + ``mixed_feeds_for`` served by plain onnxruntime."""
    from graph_tools.runtime.mixed import mixed_feeds_for, write_mixed_model

    case = H.get_case("bert", zoo, graphs, tmp_path_factory)
    package = H.copy_package(H.get_package(case, "inputs"), tmp_path / "pkg")
    rows = ["second", {"default": 0.5, "second": 1.5}, None]
    path = write_mixed_model(package)
    assert path == package / "model.mixed.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {**case.feeds, **mixed_feeds_for(package, rows)})
    want = AdapterSession(package).run(None, case.feeds, adapter=rows)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=ROW_TOL)
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["extra"]["mixed_batches"]["row_axis"] == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_decode_with_kv_cache(family, decoders, tmp_path):
    """A KV-cache decoder package: prefill and a decode step fed the presents, mixed rows = alone."""
    import onnx_ir as ir

    from graph_tools.adapters.extract import extract_adapters
    from graph_tools.runtime.decoder import read_decoder_info

    _, path = decoders(family)
    info = read_decoder_info(ir.load(path))
    session = AdapterSession(extract_adapters(path, tmp_path / "pkg").path)
    outputs = [o.name for o in session.get_outputs()]
    rows = ["second", None, "default"]
    ids = np.array([[5, 6, 7, 8], [9, 3, 2, 1], [4, 4, 8, 2]], np.int64)

    def feeds(tokens, past, start):
        f = {"input_ids": tokens, "attention_mask": np.ones((tokens.shape[0], start + tokens.shape[1]), np.int64)}
        if "position_ids" in {i.name for i in session.get_inputs()}:
            f["position_ids"] = np.broadcast_to(np.arange(start, start + tokens.shape[1]), tokens.shape).astype(np.int64)
        for i in range(info.num_hidden_layers):
            for j, kv in enumerate(("key", "value")):
                f[f"past_key_values.{i}.{kv}"] = past[2 * i + j]
        return f

    empty = [np.zeros((3, info.num_key_value_heads, 0, info.head_dim), np.float32)] * (2 * info.num_hidden_layers)
    first = dict(zip(outputs, session.run(None, feeds(ids, empty, 0), adapter=rows)))
    past = [first[f"present.{i}.{kv}"] for i in range(info.num_hidden_layers) for kv in ("key", "value")]
    nxt = first["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
    second = session.run(None, feeds(nxt, past, 4), adapter=rows)
    for i, choice in enumerate(rows):
        alone_first = dict(zip(outputs, session.run(None, _row(feeds(ids, empty, 0), i), adapter=choice)))
        alone_past = [alone_first[f"present.{k}.{kv}"] for k in range(info.num_hidden_layers) for kv in ("key", "value")]
        np.testing.assert_allclose(first["logits"][i: i + 1], alone_first["logits"], rtol=0, atol=ROW_TOL)
        alone = session.run(None, feeds(nxt[i: i + 1], alone_past, 4), adapter=choice)
        for got, want in zip(second, alone):
            np.testing.assert_allclose(got[i: i + 1], want, rtol=0, atol=ROW_TOL)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_generate_rows_equal_rows_alone(family, decoder_packages):
    """``generate(adapter=[...])``: one generation for every row, each row's ids = that row alone."""
    session = AdapterSession(decoder_packages(family, "inputs"))
    ids = np.array([[5, 6, 7, 8, 9], [0, 0, 3, 2, 1], [4, 4, 8, 2, 7]], np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int64)
    rows = ["second", None, {"default": 0.5, "second": 1.5}]
    mixed = session.generate(ids, attention_mask=mask, adapter=rows, max_new_tokens=6)
    assert session._mixed is not None
    for i, choice in enumerate(rows):
        alone = session.generate(ids[i: i + 1], attention_mask=mask[i: i + 1], adapter=choice, max_new_tokens=6)
        # a row alone stops at its eos; in the batch it is padded after it until every row stops
        np.testing.assert_array_equal(mixed[i: i + 1, : alone.shape[1]], alone, err_msg=f"row {i} {choice!r}")
        assert alone.shape[1] == mixed.shape[1] or len(set(mixed[i, alone.shape[1]:].tolist())) == 1
    with pytest.raises(AdapterError, match="2 row choices"):
        session.generate(ids, attention_mask=mask, adapter=["second", None], max_new_tokens=2)
