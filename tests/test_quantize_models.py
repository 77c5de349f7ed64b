"""Quantized GPT-2- and BERT-shaped tiny models (two adapters of different rank) pass the same
switching test as float packages: one quantized AdapterSession serves base-only and each adapter,
close to the float package's session on calibrated inputs."""

from __future__ import annotations


import numpy as np
import pytest

from graph_tools.adapters.extract import extract_adapters
from graph_tools.quant import quantize
from graph_tools.runtime.session import AdapterSession

from graph_builder import FIXTURES
VOCAB = 64  # models.VOCAB, the zoo's vocabulary (this file runs without torch)


def _batches(name: str, n: int, seed: int, batch: int = 2, seq: int = 6):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        feed = {"input_ids": rng.integers(0, VOCAB, (batch, seq)),
                "attention_mask": np.ones((batch, seq), np.int64)}
        if name == "bert":
            feed["token_type_ids"] = np.zeros((batch, seq), np.int64)
        out.append(feed)
    return out


def _cos(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=["gpt2", "bert"])
def packages(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    # the zoo model with package_helpers' `second` adapter, exported (fixtures/make_fixtures.py)
    fpkg = extract_adapters(FIXTURES / f"two_{name}.onnx", root / "pkg")
    calib = _batches(name, 3, seed=11)
    # zoo adapters move outputs far beyond the base ranges: the default scope ("auto") makes those
    # encodings per adapter ("lora" scope would clip downstream of each site)
    qpkg = quantize(fpkg.path, root / "q", calib)
    return name, fpkg, qpkg, calib


def test_quantized_session_switches_like_float(packages):
    name, fpkg, qpkg, calib = packages
    fs, qs = AdapterSession(fpkg.path), AdapterSession(qpkg.path)
    assert sorted(qs.adapters) == sorted(fs.adapters) == ["default", "second"]
    ranks = {a.name: set(a.rank.values()) for a in fpkg.manifest.adapters}
    assert ranks["default"] != ranks["second"]
    for feeds in calib[:2]:  # calibrated inputs: errors are quantization steps, not clipping
        outs, errs = {}, {}
        for adapter in (None, "default", "second"):
            f = fs.run(None, feeds, adapter=adapter)[0]
            q = qs.run(None, feeds, adapter=adapter)[0]
            outs[adapter], errs[adapter] = (f, q), np.abs(f - q).max()
            assert _cos(f, q) > 0.99, (name, adapter, _cos(f, q))
            print(name, adapter, f"cos={_cos(f, q):.5f} err={errs[adapter]:.4g} max={np.abs(f).max():.4g}")
            # the zoo adapters blow internal activations up ~50x (attention scores ~200), so the
            # uint16 steps there cost more than the output magnitude suggests
            assert errs[adapter] < 0.15 * np.abs(f).max(), (name, adapter, errs[adapter], np.abs(f).max())
        for adapter in ("default", "second"):
            # each adapter really changes the output, far beyond the quantization error
            f_delta = np.abs(outs[adapter][0] - outs[None][0]).max()
            q_delta = np.abs(outs[adapter][1] - outs[None][1]).max()
            assert q_delta > 5 * max(errs[adapter], errs[None]), (name, adapter, q_delta, errs)
            assert abs(q_delta - f_delta) < 0.2 * f_delta, (name, adapter)
        # switching back and forth inside one session is stateless
        again = qs.run(None, feeds, adapter=None)[0]
        np.testing.assert_array_equal(again, outs[None][1])


def test_adapter_files_carry_their_own_encodings(packages):
    name, _, qpkg, _ = packages
    quant = qpkg.manifest.extra["quantization"]
    dependent = set(quant["adapter_dependent_activations"])
    shared = set(quant["shared_activations"])
    # the LoRA branch internals (after A, scale, B) and site outputs are quantized (one shared
    # encoding where it fits both adapters, per adapter elsewhere), never left float; a Gather
    # (embedding LoRA's A lookup) moves values already on A's grid and gets none, as in aimet-onnx
    import onnx_ir as ir

    from graph_tools.lora import find_lora_sites
    from graph_tools.quant.aimet import UNQUANTIZED_OUTPUT_OPS

    fmodel = ir.load(packages[1].model_path)
    nodes = {n.name: n for n in fmodel.graph}
    branch = set()
    for site in find_lora_sites(fmodel):
        for node_name in (site.a_node, site.scale_node, site.b_node, site.add_node):
            if node_name and nodes[node_name].op_type not in UNQUANTIZED_OUTPUT_OPS:
                branch.add(nodes[node_name].outputs[0].name)
    assert branch <= shared | dependent, (name, branch - shared - dependent)
    assert branch & dependent, name  # two random adapters do not fit one encoding everywhere
