"""Round trip of every LoRA graph we have, ours or not, through every pass, checked with ORT
against the source graph itself (no torch here).

Sources: every committed fixture with LoRA (ours, torch.onnx dynamo and TorchScript exports,
names stripped, LoRA weights as graph inputs, hand-drawn variants whose site ``Add`` is the graph
output, chained adapters) and foreign graphs built below (a scale chain ``Mul(0.5)`` then
``Mul(s)`` with ``s`` an input, a stem conv with rank > C_in, three chained unnamed adapters, LoRA
inputs with defaults). Fixtures whose LoRA weights are inputs without values get random defaults
(their raw form must be refused by extraction, by name).

References are edits of the source graph, not our passes: "adapter k alone" is the source with
lora_B of every other adapter's sites set to zeros; "base" has every lora_B zero. Checked:
* extract (modes inputs, external, pack, max_rank) -> AdapterSession: no adapter == base, each
  adapter == that adapter alone, all adapters at once == the source graph;
* merge of each adapter from each package == that adapter alone;
* strip of the source graph == base (graph outputs keep their names).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import graph_builder as gb
from graph_tools import AdapterError, NoLoraError, find_lora_sites
from graph_tools.adapters.extract import extract_adapters
from graph_tools.adapters.merge import merge_adapter
from graph_tools.adapters.strip import strip_adapters
from graph_tools.runtime.session import AdapterSession

from graph_builder import FIXTURES
TOL = 1e-5
VOCAB = 64  # the zoo's vocabulary (tests/models.py), for token-id inputs
MODES = {
    "inputs": {},
    "external": {"mode": "external"},
    "pack": {"pack": True},
    "max_rank": {"max_rank": None},  # filled per case: one above the largest rank
}
LORA_FIXTURES = sorted(p.stem for p in FIXTURES.glob("*.onnx") if not p.stem.startswith("negative_"))
NEGATIVE_FIXTURES = sorted(p.stem for p in FIXTURES.glob("negative_*.onnx"))


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return options


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), _options(), providers=["CPUExecutionProvider"])


def _run(path, feeds) -> dict[str, np.ndarray]:
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})))


def _max_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """Max over every element of ``|got - want| / (1 + |want|)``: ``<= TOL`` is ``np.allclose``
    with atol = rtol = TOL (fp32 rounding grows with the value: the KV decoders' logits reach ~20)."""
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    return max(float((np.abs(got[k].astype(np.float64) - want[k]) / (1.0 + np.abs(want[k]))).max()) for k in want)


# -- foreign graphs built here ------------------------------------------------------------------
def _scale_chain() -> ir.Model:
    """x W + Mul(Mul(B(A x), 0.5), s) with s a graph input with a default: the scale is 0.5 * s."""
    b = gb.GraphBuilder(seed=3)
    x = b.input("x", ["batch", 16])
    base = b.op("MatMul", x, b.weight("W", [16, 12]))
    h = b.op("MatMul", b.op("MatMul", x, b.weight("A", [16, 4])), b.weight("B", [4, 12]))
    s = b.const("s", 1.8)
    b.inputs.append(s)
    return b.model(b.op("Add", base, b.op("Mul", b.op("Mul", h, b.const("half", 0.5)), s)))


def _conv_stem() -> ir.Model:
    """A stem conv on RGB with LoRA rank 6 > C_in = 3 (allowed: A reads 3 * 3 * 3 = 27 numbers)."""
    b = gb.GraphBuilder(seed=4)
    x = b.input("pixel_values", ["batch", 3, 8, 8])
    base = b.op("Conv", x, b.weight("W", [8, 3, 3, 3]), b.weight("bias", [8]), pads=[1, 1, 1, 1])
    h = b.op("Conv", x, b.weight("A", [6, 3, 3, 3]), pads=[1, 1, 1, 1])
    h = b.op("Conv", h, b.weight("B", [8, 6, 1, 1]))
    y = b.op("Add", base, b.op("Mul", h, b.const("s", 0.75)))
    return b.model(b.op("Relu", y))


def _three_chained_unnamed() -> ir.Model:
    """Three adapters of ranks 4, 2, 3 chained on one layer, then every name stripped."""
    b = gb.GraphBuilder(seed=5)
    x = b.input("x", ["batch", 5, 16])
    y = b.op("MatMul", x, b.weight("W", [16, 12]))
    for k, r in enumerate((4, 2, 3)):
        h = b.op("MatMul", b.op("MatMul", x, b.weight(f"A{k}", [16, r])), b.weight(f"B{k}", [r, 12]))
        y = b.op("Add", *((y, b.op("Mul", h, b.const(f"s{k}", 0.5 + k))) if k != 1 else (b.op("Mul", b.const(f"s{k}", 2.0), h), y)))
    return gb.strip_names(b.model(y))


def _reshape_between_a_and_b() -> ir.Model:
    """A on a 2-D view of x, reshaped back to 3-D between A and B; the site Add is the output."""
    b = gb.GraphBuilder(seed=7)
    x = b.input("x", ["batch", 5, 16])
    base = b.op("MatMul", x, b.weight("W", [16, 12]))
    h = b.op("MatMul", b.op("Reshape", x, b.const("flat", [-1, 16], np.int64)), b.weight("A", [16, 4]))
    h = b.op("Reshape", h, b.const("back", [-1, 5, 4], np.int64))
    h = b.op("Mul", b.op("MatMul", h, b.weight("B", [4, 12])), b.const("s", 1.25))
    return b.model(b.op("Add", base, h))


def _two_named_scales() -> ir.Model:
    """Mul(s) then Mul(t), both graph inputs: no single scale value; not a site we can prove."""
    b = gb.GraphBuilder(seed=6)
    x = b.input("x", ["batch", 16])
    base = b.op("MatMul", x, b.weight("W", [16, 12]))
    h = b.op("MatMul", b.op("MatMul", x, b.weight("A", [16, 4])), b.weight("B", [4, 12]))
    h = b.op("Mul", b.op("Mul", h, b.input("s", [])), b.input("t", []))
    return b.model(b.op("Add", base, h))


def _fixture(name: str) -> ir.Model:
    return ir.load(FIXTURES / f"{name}.onnx")


FOREIGN = {
    "scale_chain": _scale_chain,
    "conv_stem_rank_gt_cin": _conv_stem,
    "three_chained_unnamed": _three_chained_unnamed,
    "reshape_between_a_and_b": _reshape_between_a_and_b,
    # other exporters' graphs, edited as renaming tools and adapter extractors leave them
    "stripped_dynamo_llama_two_adapters": lambda: gb.strip_names(_fixture("dynamo_llama_two_adapters")),
    "stripped_torchscript_gpt2": lambda: gb.strip_names(_fixture("torchscript_gpt2")),
    "stripped_dynamo_cnn": lambda: gb.strip_names(_fixture("dynamo_cnn")),
    "inputs_torchscript_bert": lambda: _as_inputs(_fixture("torchscript_bert")),
    "inputs_dynamo_llama_two_adapters": lambda: _as_inputs(_fixture("dynamo_llama_two_adapters")),
}


def _as_inputs(model: ir.Model) -> ir.Model:
    """LoRA weights and scales that are initializers become graph inputs with those defaults (as
    an adapter-extraction tool leaves them; a scale shared with other nodes stays shared)."""
    for site in find_lora_sites(model):
        for value in (site.parts.a_value, site.parts.b_value, site.parts.scale_value):
            if value is not None and value.is_initializer() and not value.is_graph_input():
                model.graph.inputs.append(value)
    return model


def _with_defaults(model: ir.Model, seed: int = 11) -> ir.Model:
    """LoRA weights/scales that are graph inputs without values get random defaults (rank 3)."""
    rng = np.random.default_rng(seed)
    for site in find_lora_sites(model):
        for value in (site.parts.a_value, site.parts.b_value, site.parts.scale_value):
            if value is None or not value.is_graph_input() or value.const_value is not None:
                continue
            shape = [d if isinstance(d, int) else 3 for d in value.shape]
            array = (rng.standard_normal(shape) * 0.3 + (0.8 if value is site.parts.scale_value else 0)).astype(np.float32)
            value.const_value = ir.tensor(array, name=value.name)
            value.shape = ir.Shape(shape)
            model.graph.register_initializer(value)
    return model


# -- cases ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    name: str
    path: Path
    feeds: dict[str, np.ndarray]
    adapters: list[str]
    max_rank: int
    _refs: dict = dataclasses.field(default_factory=dict)

    def ref(self, keep: frozenset[str]) -> dict[str, np.ndarray]:
        """The source graph with lora_B of every site whose adapter is not in ``keep`` zeroed."""
        if keep not in self._refs:
            model = ir.load(self.path)
            for site in find_lora_sites(model):
                if site.adapter not in keep:
                    _zero(site.parts.b_value)
            folder = self.path.parent / f"ref-{len(self._refs)}"
            folder.mkdir()
            ir.save(model, folder / "model.onnx")
            self._refs[keep] = _run(folder / "model.onnx", self.feeds)
        return self._refs[keep]


def _zero(value: ir.Value) -> None:
    node = value.producer()
    if node is not None and node.op_type == "Constant":
        tensor = node.attributes["value"].as_tensor()
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.zeros_like(tensor.numpy())))
        return
    assert value.const_value is not None, f"lora_B {value.name!r} has no value to zero"
    value.const_value = ir.tensor(np.zeros_like(value.const_value.numpy()), name=value.name)


def _feeds(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(17)
    # KV-cache decoders (kv_* fixtures): a 6-token step after a 3-token past
    sizes = {"batch": 2, "sequence": 6, "past_sequence": 3, "total_sequence": 9}
    feeds = {}
    for i in _session(path).get_inputs():
        shape = [d if isinstance(d, int) else sizes.get(d, 3) for d in i.shape]
        if i.type == "tensor(int64)":
            if "mask" in i.name:
                feeds[i.name] = np.ones(shape, np.int64)
            elif i.name == "position_ids":
                feeds[i.name] = np.broadcast_to(np.arange(sizes["past_sequence"], sizes["total_sequence"]), shape).copy()
            elif "token_type" in i.name:
                feeds[i.name] = np.zeros(shape, np.int64)
            else:
                feeds[i.name] = rng.integers(0, VOCAB, shape).astype(np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _source_model(name: str) -> ir.Model:
    if name in FOREIGN:
        return FOREIGN[name]()
    return _with_defaults(_fixture(name))


_CASES: dict[str, Case] = {}


def _case(name: str, tmp_path_factory) -> Case:
    if name not in _CASES:
        folder = tmp_path_factory.mktemp(f"src-{name}")
        model = _source_model(name)
        path = folder / "source.onnx"
        ir.save(model, path)
        sites = find_lora_sites(path)
        assert all(isinstance(s.rank, int) for s in sites), name
        per_module: dict[str, int] = {}
        for s in sites:  # room for every adapter at once (the "all" run), plus padding
            per_module[s.module] = per_module.get(s.module, 0) + s.rank
        _CASES[name] = Case(name, path, _feeds(path), sorted({s.adapter for s in sites}), max(per_module.values()) + 1)
    return _CASES[name]


ALL = LORA_FIXTURES + sorted(FOREIGN)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ALL)
def test_extract_serve_merge(name, mode, tmp_path_factory, tmp_path):
    case = _case(name, tmp_path_factory)
    kwargs = dict(MODES[mode])
    if mode == "max_rank":
        kwargs["max_rank"] = case.max_rank
    package = extract_adapters(case.path, tmp_path / "pkg", **kwargs)
    assert sorted(package.adapters) == case.adapters
    session = AdapterSession(package.path, session_options=_options())
    names = [o.name for o in session.get_outputs()]
    got = lambda choice: dict(zip(names, session.run(None, case.feeds, adapter=choice)))  # noqa: E731
    errors = {"base": _max_error(got(None), case.ref(frozenset()))}
    errors["all"] = _max_error(got({a: 1.0 for a in case.adapters}), case.ref(frozenset(case.adapters)))
    for adapter in case.adapters:
        want = case.ref(frozenset([adapter]))
        errors[adapter] = _max_error(got(adapter), want)
        merged = merge_adapter(package.path, adapter, tmp_path / f"merged-{adapter}" / "model.onnx")
        assert not find_lora_sites(merged)
        errors[f"merge {adapter}"] = _max_error(_run(merged, case.feeds), want)
    print(f"ERR {name} {mode} " + json.dumps({k: f"{v:.1e}" for k, v in errors.items()}))
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("name", ALL)
def test_strip_is_the_base(name, tmp_path_factory, tmp_path):
    case = _case(name, tmp_path_factory)
    out = strip_adapters(case.path, tmp_path / "base.onnx")
    assert not find_lora_sites(out)
    onnx.checker.check_model(str(out), full_check=True)
    err = _max_error(_run(out, case.feeds), case.ref(frozenset()))
    print(f"ERR {name} strip {err:.1e}")
    assert err <= TOL


@pytest.mark.parametrize("name", ["hand_inputs", "inputs_bert", "inputs_llama_patterns"])
def test_lora_inputs_without_values_are_refused_by_name(name, tmp_path):
    """Nothing to extract from a graph whose LoRA weights are inputs without values; strip works."""
    with pytest.raises(AdapterError, match=r"graph input without a (default )?value"):
        extract_adapters(FIXTURES / f"{name}.onnx", tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()
    assert not find_lora_sites(strip_adapters(FIXTURES / f"{name}.onnx", tmp_path / "base.onnx"))


@pytest.mark.parametrize("name", NEGATIVE_FIXTURES + ["two_named_scales"])
def test_graphs_without_provable_sites_are_refused(name, tmp_path):
    path = FIXTURES / f"{name}.onnx"
    if name == "two_named_scales":
        path = tmp_path / "two_named_scales.onnx"
        ir.save(_two_named_scales(), path)
    assert find_lora_sites(path) == []
    with pytest.raises(NoLoraError, match="no LoRA sites"):
        extract_adapters(path, tmp_path / "pkg")
    with pytest.raises(NoLoraError, match="no LoRA sites"):
        strip_adapters(path, tmp_path / "base.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["two_named_scales.onnx"] if name == "two_named_scales" else [])


def test_scale_chain_is_the_product():
    (site,) = find_lora_sites(_scale_chain())
    assert (site.scale, site.scale_factor) == ("s", 0.5)


def test_conv_rank_above_input_channels_is_a_site():
    (site,) = find_lora_sites(_conv_stem())
    assert (site.kind, site.rank, site.in_features) == ("conv", 6, 3)


def test_every_model_form_is_accepted_and_left_unchanged(tmp_path):
    path = FIXTURES / "stripped_llama_two_adapters.onnx"
    proto = onnx.load(str(path))
    model = ir.load(path)
    nodes_before = len(model.graph)
    forms = {"path": path, "str": str(path), "proto": proto, "ir": model}
    sites = {k: [s.to_dict() for s in find_lora_sites(v)] for k, v in forms.items()}
    assert all(v == sites["path"] for v in sites.values()) and sites["path"]
    manifests = {}
    for key, form in forms.items():
        package = extract_adapters(form, tmp_path / key)
        manifests[key] = (package.manifest.graph_fingerprint, [s.name for s in package.manifest.slots])
        strip_adapters(form, tmp_path / f"{key}-base.onnx")
    assert len(set(map(json.dumps, manifests.values()))) == 1
    assert len(model.graph) == nodes_before and len(find_lora_sites(model)) == len(sites["path"])
    assert onnx.load(str(path)).SerializeToString() == proto.SerializeToString()


def _chain_with_intermediate_output() -> ir.Model:
    """Two adapters chained on one layer, and the sum after the first is also a graph output."""
    b = gb.GraphBuilder(seed=8)
    x = b.input("x", ["batch", 16])
    y = b.op("MatMul", x, b.weight("W", [16, 12]))
    sums = []
    for k in range(2):
        h = b.op("MatMul", b.op("MatMul", x, b.weight(f"A{k}", [16, 3])), b.weight(f"B{k}", [3, 12]))
        y = b.op("Add", y, h)
        sums.append(y)
    return b.model(sums[1], b.op("Relu", sums[0]))


def test_chain_read_in_the_middle_is_refused(tmp_path):
    path = tmp_path / "chain.onnx"
    ir.save(_chain_with_intermediate_output(), path)
    assert len(find_lora_sites(path)) == 2
    with pytest.raises(AdapterError, match="read outside the chain"):
        extract_adapters(path, tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


def test_passes_refuse_sites_of_another_graph():
    """Requires: the plan resolves on the model the pass runs on (a typed error, not onnx-ir's)."""
    from graph_tools.passes.extract import ReplaceLoraWithSlotsPass
    from graph_tools.passes.slots import plan_slots
    from graph_tools.passes.strip import StripLoraPass

    path = FIXTURES / "hand_two_adapters.onnx"
    sites, other = find_lora_sites(path), ir.load(path)
    with pytest.raises(AdapterError, match="belongs to another graph"):
        StripLoraPass(sites)(other)
    with pytest.raises(AdapterError, match="belongs to another graph"):
        plan_slots(other, sites)
    groups = plan_slots(model := ir.load(path), find_lora_sites(model))
    with pytest.raises(AdapterError, match="belongs to another graph"):
        ReplaceLoraWithSlotsPass(groups)(other)
    assert len(find_lora_sites(other)) == 2  # untouched


def test_model_proto_without_its_external_data_is_refused(tmp_path):
    from graph_tools import ModelLoadError

    ir.save(ir.load(FIXTURES / "ours_llama.onnx"), tmp_path / "m.onnx", external_data="m.onnx.data")
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    with pytest.raises(ModelLoadError, match="external data the proto does not hold"):
        find_lora_sites(proto)
    assert find_lora_sites(onnx.load(str(tmp_path / "m.onnx")))  # loaded with its data: fine
