"""Shared, session-scoped test data: the zoo models and their exports, built once per run.

Tests that need torch (PEFT models, export) carry the ``torch`` marker, set here for every test of
a file that imports torch/peft/transformers/exporters (or a helper that does) at the top, and for
every test using a fixture that builds torch models. Where torch is not installed (the graph-only
CI job: core dependencies + [test]), those files are not collected and ``-m "not torch"`` selects
the graph tests, which run on committed fixtures and graphs built with onnx-ir.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import sys
from pathlib import Path

import onnx_ir as ir
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_builder import FIXTURES  # noqa: E402

import graph_builder  # noqa: E402

#: top-level imports that make a test file need torch (our helpers import torch themselves)
TORCH_MODULES = {"torch", "peft", "transformers", "exporters", "models", "package_helpers", "decoder_models"}
#: fixtures that build or export torch models
TORCH_FIXTURES = {"zoo", "graphs", "decoders"}
HAVE_TORCH = importlib.util.find_spec("torch") is not None


@functools.cache
def needs_torch(path: Path) -> bool:
    """Whether the test file imports a torch module at its top level (ast, not importing it)."""
    tree = ast.parse(Path(path).read_text(), str(path))
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        if any(n.split(".")[0] in TORCH_MODULES for n in names):
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    if not HAVE_TORCH and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return needs_torch(collection_path) or None
    return None


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if needs_torch(Path(item.fspath)) or TORCH_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.torch)


class Zoo:
    """Zoo models built on first use; ``zoo[name] -> (peft_model, example_inputs)``."""

    def __init__(self):
        self._built: dict[str, tuple] = {}

    def __getitem__(self, name: str):
        if name not in self._built:
            import models

            self._built[name] = models.ZOO[name]()
        return self._built[name]


class Graphs:
    """``graphs(source, name) -> Path`` of zoo model ``name`` exported by ``source``, made once.

    Sources: ``ours`` / ``dynamo`` / ``torchscript`` (the exporters), ``inputs`` (ours with the
    LoRA weights and scales as graph inputs, symbolic ranks), ``stripped`` (ours with every name
    and all metadata removed).
    """

    def __init__(self, zoo: Zoo, folder: Path):
        self.zoo = zoo
        self.folder = folder
        self._paths: dict[tuple[str, str], Path] = {}
        self.results: dict[str, object] = {}  # zoo name -> ExportResult of export_peft

    def result(self, name: str):
        self("ours", name)
        return self.results[name]

    def __call__(self, source: str, name: str) -> Path:
        key = (source, name)
        if key not in self._paths:
            import models

            path = self.folder / f"{source}_{name}.onnx"
            if source == "ours":
                from exporters import export_peft

                model, inputs = self.zoo[name]
                self.results[name] = export_peft(model, inputs, path, dynamic_shapes=models.dynamic_axes(name, inputs))
            elif source in models.SOURCES:
                model, inputs = self.zoo[name]
                models.export_source(source, name, path, model, inputs)
            else:
                from graph_tools import find_lora_sites

                ours = self("ours", name)
                graph = ir.load(ours)
                if source == "inputs":
                    graph = graph_builder.lora_to_inputs(graph, find_lora_sites(graph))
                elif source == "stripped":
                    graph = graph_builder.strip_names(graph)
                else:
                    raise ValueError(f"unknown source {source!r}")
                ir.save(graph, path)
            self._paths[key] = path
        return self._paths[key]


@pytest.fixture(scope="session")
def zoo() -> Zoo:
    return Zoo()


@pytest.fixture(scope="session")
def graphs(zoo, tmp_path_factory) -> Graphs:
    return Graphs(zoo, tmp_path_factory.mktemp("graphs"))


class DecoderExports:
    """``decoders(family) -> (peft_model, path)``: a tiny PEFT causal LM of ``family`` (two adapters,
    see decoder_models.py) and its committed KV-cache export ``fixtures/kv_<family>.onnx`` (made by
    the same ``decoder_models.export_kv``; ``test_export_decoder`` checks it is what the exporter
    writes today). ``decoders.exported(family)`` exports afresh, once per run, for the export tests.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self._models: dict[str, object] = {}
        self._exported: dict[str, tuple] = {}

    def model(self, family: str):
        if family not in self._models:
            import decoder_models

            self._models[family] = decoder_models.causal_lm(family)
        return self._models[family]

    def __call__(self, family: str):
        return self.model(family), FIXTURES / f"kv_{family}.onnx"

    def exported(self, family: str):
        if family not in self._exported:
            import decoder_models

            path = self.folder / f"{family}.onnx"
            self._exported[family] = (path, decoder_models.export_kv(self.model(family), path))
        return self.model(family), self._exported[family][0]

    def result(self, family: str):
        self.exported(family)
        return self._exported[family][1]


@pytest.fixture(scope="session")
def decoders(tmp_path_factory) -> DecoderExports:
    return DecoderExports(tmp_path_factory.mktemp("decoders"))


@pytest.fixture(scope="session")
def decoder_packages(decoders, tmp_path_factory):
    """``decoder_packages(family, mode="inputs") -> package path`` of the family's KV export."""
    from graph_tools import extract_adapters

    folder = tmp_path_factory.mktemp("decoder_packages")
    made: dict[tuple[str, str], Path] = {}

    def get(family: str, mode: str = "inputs") -> Path:
        if (family, mode) not in made:
            made[family, mode] = extract_adapters(decoders(family)[1], folder / f"{family}_{mode}", mode=mode).path
        return made[family, mode]

    return get


@pytest.fixture(scope="session")
def tiny_llama_package(tmp_path_factory):
    """The built-in demo Llama (one layer, hidden 32, two adapters), its committed export
    ``fixtures/demo_tiny_llama.onnx`` extracted once per run (read-only: the quantization tests
    share it)."""
    from graph_tools import extract_adapters

    return extract_adapters(FIXTURES / "demo_tiny_llama.onnx", tmp_path_factory.mktemp("tiny_llama_package") / "pkg")
