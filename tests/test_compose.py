"""adapters/compose.py: adapter weights -> slot tensors (several adapters at once = rank
concatenation with per-rank scales times each adapter's weight; untouched modules rank-1 zeros;
fixed-rank padding) and back (weights_from_slot_tensors, read_slot_weights).

Slots come from a package's manifest (extracted from a hand-built graph); the rank axis is read
from the slot shapes (the symbolic dim), so the tests hold for either slot layout."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import graph_builder as gb
from graph_tools import extract_adapters
from graph_tools.adapters import files
from graph_tools.adapters.compose import (
    compose,
    fill_empty_ranks,
    read_slot_weights,
    slot_tensors,
    weights_from_slot_tensors,
)
from graph_tools.errors import AdapterError


@pytest.fixture(scope="module")
def layers():
    # "second" does not adapt k_proj
    return gb.lora_layers(("q_proj", "k_proj"), {"default": 4, "second": 2}, skip={"second": ("k_proj",)})


@pytest.fixture(scope="module")
def package(layers, tmp_path_factory):
    return extract_adapters(layers.model, tmp_path_factory.mktemp("compose") / "pkg")


@pytest.fixture(scope="module")
def slots(package):
    return package.manifest.slots


def _spec(slots, module, role):
    return next(s for s in slots if s.site == module and s.role == role)


def _rank_axis(spec) -> int:
    (axis,) = [i for i, d in enumerate(spec.shape) if isinstance(d, str)]
    return axis


def _rows(array, spec, start, stop):
    return np.take(array, range(start, stop), axis=_rank_axis(spec))


def test_one_adapter_fills_every_slot(layers, slots):
    feed = slot_tensors(slots, layers.weights["default"])
    assert set(feed) == {s.name for s in slots}
    for spec in slots:
        array = feed[spec.name]
        assert array.dtype == np.dtype(spec.dtype) and array.ndim == len(spec.shape)
        assert array.shape[_rank_axis(spec)] == 4
        assert all(n == d for n, d in zip(array.shape, spec.shape) if isinstance(d, int))
        assert array.flags.c_contiguous
    scale = feed[_spec(slots, "q_proj", "lora_scale").name]
    np.testing.assert_array_equal(scale, np.full(4, layers.weights["default"]["q_proj"][2], np.float32))


def test_concurrency_concatenates_ranks_and_scales_by_weight(layers, slots):
    one = slot_tensors(slots, layers.weights["default"])
    two = slot_tensors(slots, layers.weights["second"])
    both = compose(slots, [(layers.weights["default"], 0.5), (layers.weights["second"], 2.0)])
    for role in ("lora_A", "lora_B"):
        spec = _spec(slots, "q_proj", role)
        got = both[spec.name]
        assert got.shape[_rank_axis(spec)] == 4 + 2
        np.testing.assert_array_equal(_rows(got, spec, 0, 4), one[spec.name])  # in the order given
        np.testing.assert_array_equal(_rows(got, spec, 4, 6), two[spec.name])  # weights unscaled
    s_default, s_second = layers.weights["default"]["q_proj"][2], layers.weights["second"]["q_proj"][2]
    np.testing.assert_allclose(both[_spec(slots, "q_proj", "lora_scale").name],
                               [0.5 * s_default] * 4 + [2.0 * s_second] * 2, rtol=1e-6)
    # k_proj: only "default" adapts it; "second" contributes rank 0
    k_scale = both[_spec(slots, "k_proj", "lora_scale").name]
    np.testing.assert_allclose(k_scale, [0.5 * layers.weights["default"]["k_proj"][2]] * 4, rtol=1e-6)


def test_a_module_no_adapter_touches_gets_rank_one_zeros(layers, slots):
    feed = slot_tensors(slots, layers.weights["second"])  # no k_proj
    for role in ("lora_A", "lora_B", "lora_scale"):
        spec = _spec(slots, "k_proj", role)
        array = feed[spec.name]
        assert array.shape[_rank_axis(spec)] == 1 and not array.any(), role
    nothing = compose(slots, [])
    assert all(v.shape[_rank_axis(_spec(slots, s.site, s.role))] == 1 and not v.any()
               for s in slots for v in [nothing[s.name]])


def test_fixed_rank_pads_with_zeros_and_refuses_more(layers, slots):
    fixed = [dataclasses.replace(s, shape=[8 if isinstance(d, str) else d for d in s.shape]) for s in slots]
    axes = {s.name: _rank_axis(d) for s, d in zip(fixed, slots)}
    feed = compose(fixed, [(layers.weights["default"], 1.0), (layers.weights["second"], 1.0)])
    dynamic = compose(slots, [(layers.weights["default"], 1.0), (layers.weights["second"], 1.0)])
    for spec in fixed:
        array = feed[spec.name]
        assert list(array.shape) == spec.shape
        used = dynamic[spec.name].shape[axes[spec.name]]
        np.testing.assert_array_equal(np.take(array, range(used), axis=axes[spec.name]), dynamic[spec.name])
        assert not np.take(array, range(used, 8), axis=axes[spec.name]).any()
    tight = [dataclasses.replace(s, shape=[5 if isinstance(d, str) else d for d in s.shape]) for s in slots]
    with pytest.raises(AdapterError, match="rank 6 exceeds the package's fixed rank 5"):
        compose(tight, [(layers.weights["default"], 1.0), (layers.weights["second"], 1.0)])


def test_mismatched_weights_are_refused(layers, slots):
    a, b, s = layers.weights["default"]["q_proj"]
    with pytest.raises(AdapterError, match="lora_A has rank 4 but lora_B has rank 3"):
        slot_tensors(slots, {"q_proj": (a, b[:, :3], s)})
    with pytest.raises(AdapterError, match="expected shape"):
        slot_tensors(slots, {"q_proj": (a[:, :-1], b, s)})


def test_slot_tensors_back_to_weights(layers, slots):
    for adapter, weights in layers.weights.items():
        back = weights_from_slot_tensors(slots, slot_tensors(slots, weights), "f")
        assert set(back) == set(weights)  # rank-1 zero fill reads back as "not adapted"
        for module, (a, b, s) in weights.items():
            np.testing.assert_array_equal(back[module][0], a)
            np.testing.assert_array_equal(back[module][1], b)
            assert back[module][2] == pytest.approx(s)
    both = compose(slots, [(layers.weights["default"], 1.0), (layers.weights["second"], 1.0)])
    with pytest.raises(AdapterError, match="not one value over the leading rank rows"):
        weights_from_slot_tensors(slots, both, "f")


def test_fill_empty_ranks_widens_rank_zero_to_one_zero_row(slots):
    empty = {}
    for spec in slots:
        shape = [0 if isinstance(d, str) else d for d in spec.shape]
        empty[spec.name] = np.zeros(shape, np.dtype(spec.dtype))
    filled = fill_empty_ranks(slots, empty)
    for spec in slots:
        assert filled[spec.name].shape[_rank_axis(spec)] == 1 and not filled[spec.name].any()


def test_read_slot_weights_of_the_package_files(layers, package, slots):
    for spec in package.manifest.adapters:
        weights = read_slot_weights(slots, [], package.path / spec.file, expected_modules=spec.scale)
        assert set(weights) == set(layers.weights[spec.name]) == set(spec.scale)
        for module, (a, b, s) in layers.weights[spec.name].items():
            np.testing.assert_allclose(weights[module][0], a, rtol=1e-6)
            assert weights[module][2] == pytest.approx(s)


def test_read_slot_weights_refusals(layers, package, slots, tmp_path):
    good = slot_tensors(slots, layers.weights["default"])
    path = tmp_path / "x.safetensors"
    files.write_adapter(path, good | {"extra": np.zeros(1, np.float32)})
    with pytest.raises(AdapterError, match="'extra' is not a slot"):
        read_slot_weights(slots, [], path)
    b_name = _spec(slots, "k_proj", "lora_B").name
    files.write_adapter(path, {k: v for k, v in good.items() if k != b_name})
    with pytest.raises(AdapterError, match="missing tensor"):
        read_slot_weights(slots, [], path)
    k_names = {s.name for s in slots if s.site == "k_proj"}
    files.write_adapter(path, {k: v for k, v in good.items() if k not in k_names})
    with pytest.raises(AdapterError, match="lists module 'k_proj'"):
        read_slot_weights(slots, [], path, expected_modules=["q_proj", "k_proj"])
