"""Regression: detection on every committed fixture graph matches its golden JSON.

``LORA_ONNX_REGEN_FIXTURES=1 pytest tests/test_fixtures.py`` regenerates graphs and golden files
on purpose first (``fixtures/make_fixtures.py``); review the diff before committing it.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

import graph_builder as gb
from graph_tools import find_lora_sites

from graph_builder import FIXTURES


def _maker():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the fixture builders export torch models; without torch (graph-only CI) the committed files are read
MAKER = _maker() if importlib.util.find_spec("torch") else None
GOLDEN_NAMES = sorted(p.name.removesuffix(".sites.json") for p in FIXTURES.glob("*.sites.json"))
NAMES = sorted(MAKER.FIXTURES) if MAKER else GOLDEN_NAMES


@pytest.fixture(scope="session", autouse=True)
def regenerate():
    if os.environ.get("LORA_ONNX_REGEN_FIXTURES") == "1":
        assert MAKER is not None, "regenerating fixtures needs torch (the [export] extra)"
        MAKER.main([])


def test_fixture_folder_matches_the_list():
    graphs = {p.name.removesuffix(".onnx") for p in FIXTURES.glob("*.onnx")}
    golden = {p.name.removesuffix(".sites.json") for p in FIXTURES.glob("*.sites.json")}
    assert graphs == golden == set(NAMES) == set(GOLDEN_NAMES)
    assert len(NAMES) >= 20


@pytest.mark.parametrize("name", NAMES)
def test_detection_matches_golden(name):
    path = FIXTURES / f"{name}.onnx"
    assert path.stat().st_size <= gb.MAX_BYTES
    want = json.loads((FIXTURES / f"{name}.sites.json").read_text())
    got = json.loads(json.dumps(gb.golden(find_lora_sites(path))))
    assert got == want


@pytest.mark.torch
def test_expected_counts():
    """Golden files hold what the fixtures are built to contain (guards a bad regeneration)."""
    import decoder_models
    import models
    import package_helpers

    counts = {name: len(json.loads((FIXTURES / f"{name}.sites.json").read_text())) for name in NAMES}
    for name, count in counts.items():
        source, _, rest = name.partition("_")
        if source in ("ours", "dynamo", "torchscript", "inputs", "stripped"):
            assert count == len(models.EXPECTED[rest]), name
        elif source == "negative":
            assert count == 0, name
        elif source == "kv":  # every (module, adapter) of the tiny causal LM
            assert count == len(models.expected_sites(decoder_models.causal_lm(rest))), name
        elif source == "demo":
            from exporters.demo_models import tiny_llama

            assert count == len(models.expected_sites(tiny_llama(layers=1, hidden=32)[0])), name
        elif source == "two":
            assert count == len(models.expected_sites(package_helpers.two_adapter_model(rest)[0])), name
        else:
            assert count == (2 if rest == "two_adapters" else 1), name
