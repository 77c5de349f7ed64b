"""AdapterSession beyond numerics: plain onnxruntime without our wrapper (the README snippets),
thread safety, adapters prepared once, load_adapter."""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest

import package_helpers as H
from graph_tools.adapters import files
from graph_tools.errors import AdapterError
from graph_tools.runtime.session import AdapterSession


@pytest.fixture(scope="module")
def case(zoo, tmp_path_factory):
    return H.get_case("llama", zoo, tmp_path_factory)


@pytest.mark.parametrize("mode", ["inputs", "pack", "max_rank"])
def test_plain_onnxruntime_lora_adapter(case, mode):
    """README: ``LoraAdapter().Load(file)`` + ``RunOptions.add_active_adapter`` on an inputs package."""
    package = H.get_package(case, mode)
    ours = AdapterSession(package)
    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    base = session.run(None, case.feeds)  # nothing active: the slots' defaults = base model
    assert H.max_error(names, base, case.ref("base")) <= H.TOL
    for name in ("default", "second"):
        adapter = ort.LoraAdapter()
        adapter.Load(str(package / "adapters" / f"{name}.onnx_adapter"))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)  # ORT keeps no reference: `adapter` must outlive the runs
        got = session.run(None, case.feeds, options)
        want = ours.run(None, case.feeds, adapter=name)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        assert H.max_error(names, got, case.ref(name)) <= H.TOL
        del adapter, options


@pytest.mark.parametrize("fmt", ["onnx_adapter", "safetensors"])
def test_plain_onnxruntime_external_initializers(case, tmp_path, fmt):
    """README: external mode with ``SessionOptions.add_external_initializers`` from an adapter file."""
    from graph_tools.adapters.extract import extract_adapters

    package = H.get_package(case, "external") if fmt == "onnx_adapter" else \
        extract_adapters(case.export, tmp_path / "pkg", mode="external", format=fmt).path
    ours = AdapterSession(package)
    for name in ("default", "second"):
        path = package / "adapters" / f"{name}{files.ADAPTER_SUFFIX[fmt]}"
        if fmt == "onnx_adapter":
            values = ort.AdapterFormat.read_adapter(str(path)).get_parameters()  # name -> OrtValue
        else:
            from safetensors.numpy import load_file

            arrays = load_file(str(path))  # keep the arrays alive as long as the session
            values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}
        options = ort.SessionOptions()
        options.add_external_initializers(list(values), list(values.values()))
        session = ort.InferenceSession(str(package / "model.onnx"), options, providers=["CPUExecutionProvider"])
        got = session.run(None, case.feeds)
        want = ours.run(None, case.feeds, adapter=name)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)
        names = [o.name for o in session.get_outputs()]
        assert H.max_error(names, got, case.ref(name)) <= H.TOL


@pytest.mark.parametrize("mode", ["inputs", "pack", "external"])
def test_concurrent_runs_get_their_own_adapter(case, mode):
    package = H.get_package(case, mode)
    session = AdapterSession(package)
    choices = list(H.CHOICES.items())
    expected = {label: session.run(None, case.feeds, adapter=choice)[0] for label, choice in choices}
    fresh = AdapterSession(package)  # caches filled concurrently, not ahead of time
    failures: list[str] = []
    barrier = threading.Barrier(len(choices) * 2)

    def worker(label, choice, rounds=8):
        barrier.wait()
        for _ in range(rounds):
            got = fresh.run(None, case.feeds, adapter=choice)[0]
            if not np.allclose(got, expected[label], rtol=0, atol=1e-6):
                failures.append(label)

    threads = [threading.Thread(target=worker, args=c) for c in choices * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


def test_switching_adapters_recreates_nothing(case, monkeypatch):
    """Tensors are prepared once per adapter; switching only changes which prepared feed is used."""
    session = AdapterSession(H.get_package(case, "inputs"))
    for choice in H.CHOICES.values():
        session.run(None, case.feeds, adapter=choice)
    created = []
    real_session, real_value = ort.InferenceSession, ort.OrtValue.ortvalue_from_numpy
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: created.append("session") or real_session(*a, **k))
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(lambda *a: created.append("value") or real_value(*a)))
    for _ in range(3):
        for label, choice in H.CHOICES.items():
            got = session.run(None, case.feeds, adapter=choice)
            assert H.max_error([o.name for o in session.get_outputs()], got, case.ref(label)) <= H.TOL
    assert created == []


def test_load_adapter_and_unknown_names(case, tmp_path):
    package = H.get_package(case, "inputs")
    session = AdapterSession(package)
    session.load_adapter("copy", package / "adapters" / "second.onnx_adapter")
    assert sorted(session.adapters) == ["copy", "default", "second"]
    np.testing.assert_array_equal(session.run(None, case.feeds, adapter="copy")[0],
                                  session.run(None, case.feeds, adapter="second")[0])
    # two names of the same weights at once: the branch counts twice
    got = session.run(None, case.feeds, adapter={"copy": 0.5, "second": 0.5})[0]
    np.testing.assert_allclose(got, session.run(None, case.feeds, adapter="second")[0], rtol=0, atol=1e-5)
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        session.run(None, case.feeds, adapter="nope")
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        session.run(None, case.feeds, adapter={"default": 1.0, "nope": 1.0})
    with pytest.raises(AdapterError, match="finite"):
        session.run(None, case.feeds, adapter={"default": float("nan")})
    # a rank combination above a fixed-rank package's rank is refused, naming the module
    fixed = AdapterSession(H.get_package(case, "max_rank"))
    fixed.load_adapter("copy", H.get_package(case, "max_rank") / "adapters" / "default.onnx_adapter")
    with pytest.raises(AdapterError, match="exceeds the package's fixed rank 8"):
        fixed.run(None, case.feeds, adapter={"default": 1.0, "copy": 1.0, "second": 1.0})


def test_external_sessions_prepacking_off_unless_asked(case):
    """External mode disables weight prepacking (a packed copy per adapter session would duplicate
    the shared base weights); ``session_config`` can keep it; outputs are the same either way."""
    package = H.get_package(case, "external")
    default = AdapterSession(package)
    packed = AdapterSession(package, session_config={"session.disable_prepacking": "0"})
    for ours, want in ((default, "1"), (packed, "0")):
        ours.run(None, case.feeds, adapter="default")
        for session in ours._sessions.values():
            assert session.get_session_options().get_session_config_entry("session.disable_prepacking") == want
    for g, w in zip(packed.run(None, case.feeds, adapter="default"), default.run(None, case.feeds, adapter="default")):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # inputs mode (one session) keeps ORT's default: prepacking on
    options = AdapterSession(H.get_package(case, "inputs"))._session.get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):
        options.get_session_config_entry("session.disable_prepacking")


def test_external_sessions_share_base_weights(case):
    """External mode: one session per adapter, all reading the same memory-mapped base weights."""
    session = AdapterSession(H.get_package(case, "external"))
    for choice in ("default", "second", None):
        session.run(None, case.feeds, adapter=choice)
    sessions = list(session._sessions.values())
    assert len(sessions) == 3
    slots = {s.name for s in session.manifest.slots}
    base = [n for n in sessions[0]._lora_onnx_values if n not in slots]
    assert base, "no base weights were shared"
    for name in base:
        ptrs = {s._lora_onnx_values[name].data_ptr() for s in sessions}
        assert len(ptrs) == 1, name
