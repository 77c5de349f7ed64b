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


@pytest.fixture
def force_layout(monkeypatch):
    """Make every mixed run use one layout ("rows" / "concat"); the fixtures' short inputs would
    otherwise all take "concat" (few tokens per row)."""
    from graph_tools.runtime import mixed

    def force(layout):
        monkeypatch.setattr(mixed, "choose_layout", lambda keys, tokens: layout)
    return force


@pytest.mark.parametrize("layout", ["rows", "concat"])
@pytest.mark.parametrize("mode", ["inputs", "pack", "max_rank", "external"])
@pytest.mark.parametrize("model", H.MODELS)
def test_mixed_rows_equal_rows_alone(model, mode, layout, zoo, tmp_path_factory, force_layout):
    case = H.get_case(model, zoo, tmp_path_factory)
    session = AdapterSession(H.get_package(case, mode))
    force_layout(layout)
    for rows in ROWS.values():
        _check_rows(session, case, rows)
    assert {layout} == {cached[1] for cached in session._mixed._feeds}


def test_layout_choice(monkeypatch):
    """Rank concat when it costs no more rank than per-row stacking (or for runs of at most
    CONCAT_MAX_TOKENS tokens per row); else per-row stacked."""
    from graph_tools.runtime import mixed

    eight = tuple(((f"a{i}", 1.0),) for i in range(8))
    assert mixed.choose_layout(eight, 1) == mixed.choose_layout(eight, 128) == "rows"
    assert mixed.choose_layout(((("a", 1.0),), None, (("a", 1.0),)), 512) == "concat"
    assert mixed.choose_layout(((("a", 1.0), ("b", 1.0)), (("b", 2.0),)), 512) == "concat"
    monkeypatch.setattr(mixed, "CONCAT_MAX_TOKENS", 4)
    assert mixed.choose_layout(eight, 4) == "concat" and mixed.choose_layout(eight, 5) == "rows"


def test_same_choice_everywhere_takes_the_package_graph(zoo, tmp_path_factory):
    case = H.get_case("llama", zoo, tmp_path_factory)
    session = AdapterSession(H.get_package(case, "inputs"))
    got = session.run(None, case.feeds, adapter=["default"] * 3)
    want = session.run(None, case.feeds, adapter="default")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert session._mixed is None  # no mixed-form session was made


def test_mixed_bad_input(zoo, tmp_path_factory):
    case = H.get_case("llama", zoo, tmp_path_factory)
    session = AdapterSession(H.get_package(case, "inputs"))
    with pytest.raises(AdapterError, match="3"):
        session.run(None, case.feeds, adapter=["default", "second"])
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        session.run(None, case.feeds, adapter=["default", "nope", None])
    with pytest.raises(AdapterError, match="no row choices"):
        session.run(None, case.feeds, adapter=[])
    with pytest.raises(LoraOnnxError, match="adapter slot"):
        session.run(None, {**case.feeds, "lora_rows.x.A": np.zeros(1, np.float32)}, adapter=["default", None, "second"])


def test_plain_onnxruntime_mixed_form(zoo, tmp_path_factory, tmp_path):
    """README: ``write_mixed_model`` + ``mixed_feeds_for`` served by plain onnxruntime."""
    from graph_tools.runtime.mixed import mixed_feeds_for, write_mixed_model

    case = H.get_case("bert", zoo, tmp_path_factory)
    package = H.copy_package(H.get_package(case, "inputs"), tmp_path / "pkg")
    rows = ["second", {"default": 0.5, "second": 1.5}, None]
    path = write_mixed_model(package)
    assert path == package / "model.mixed.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = AdapterSession(package).run(None, case.feeds, adapter=rows)
    for layout in ("rows", "concat"):
        got = session.run(None, {**case.feeds, **mixed_feeds_for(package, rows, layout=layout)})
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=ROW_TOL, err_msg=layout)
    with pytest.raises(AdapterError, match="layout"):
        mixed_feeds_for(package, rows, layout="stacked")
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


@pytest.mark.parametrize("prompt_layout", ["rows", "concat"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_generate_rows_equal_rows_alone(family, prompt_layout, decoder_packages, monkeypatch):
    """``generate(adapter=[...])``: one generation for every row, each row's ids = that row alone;
    the prompt step in either layout, the decode steps in "concat" (rebound after the prompt)."""
    from graph_tools.runtime import mixed

    if prompt_layout == "rows":  # the 5-token prompt takes "rows", the 1-token steps "concat"
        monkeypatch.setattr(mixed, "choose_layout", lambda keys, tokens: "rows" if tokens > 1 else "concat")
    session = AdapterSession(decoder_packages(family, "inputs"))
    ids = np.array([[5, 6, 7, 8, 9], [0, 0, 3, 2, 1], [4, 4, 8, 2, 7]], np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int64)
    rows = ["second", None, {"default": 0.5, "second": 1.5}]
    mixed = session.generate(ids, attention_mask=mask, adapter=rows, max_new_tokens=6)
    assert {cached[1] for cached in session._mixed._feeds} == ({"rows", "concat"} if prompt_layout == "rows" else {"concat"})
    for i, choice in enumerate(rows):
        alone = session.generate(ids[i: i + 1], attention_mask=mask[i: i + 1], adapter=choice, max_new_tokens=6)
        # a row alone stops at its eos; in the batch it is padded after it until every row stops
        np.testing.assert_array_equal(mixed[i: i + 1, : alone.shape[1]], alone, err_msg=f"row {i} {choice!r}")
        assert alone.shape[1] == mixed.shape[1] or len(set(mixed[i, alone.shape[1]:].tolist())) == 1
    with pytest.raises(AdapterError, match="2 row choices"):
        session.generate(ids, attention_mask=mask, adapter=["second", None], max_new_tokens=2)


def test_quantized_package_refuses_mixed_rows(tiny_llama_package, tmp_path):
    """A QDQ package: one adapter choice per run (per-adapter encodings); mixed rows are refused
    with the reason and what to do; a batch whose rows all choose the same still runs."""
    from graph_tools.quant import quantize

    rng = np.random.default_rng(0)
    calib = [{"input_ids": rng.integers(0, 128, (2, 6)), "attention_mask": np.ones((2, 6), np.int64)}]
    qpkg = quantize(tiny_llama_package.path, tmp_path / "q", calib)
    session = AdapterSession(qpkg.path)
    names = session.adapters
    feeds = {"input_ids": rng.integers(0, 128, (2, 6)), "attention_mask": np.ones((2, 6), np.int64)}
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}
    with pytest.raises(AdapterError, match=r"quantized package takes one adapter choice per run.*adapter=name.*float package"):
        session.run(None, feeds, adapter=[names[0], None])
    same = session.run(None, feeds, adapter=[names[0], names[0]])
    np.testing.assert_array_equal(same[0], session.run(None, feeds, adapter=names[0])[0])
    assert session._mixed is None
