"""Shared by the adapter-package tests: zoo models with two adapters of different ranks, exported
once per test session, PEFT reference outputs, and one package per (model, mode).

The exports are committed fixtures (``fixtures/make_fixtures.py``), so no test here exports: llama
is the zoo's ``llama_two_adapters`` (``ours_llama_two_adapters.onnx``); GPT-2, BERT and the CNN get
a ``second`` adapter (other rank, a subset of the targets plus one module of its own) on top of
the zoo model (``two_<name>.onnx``, exported from :func:`two_adapter_model`). The PyTorch models are
built here from the same seeds, for the PEFT reference outputs. Cases are cached at module level:
every test module asks :func:`get_case` and the first caller pays.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

import models

from graph_builder import FIXTURES

#: extract_adapters keyword arguments per mode under test
MODES: dict[str, dict] = {
    "inputs": {},
    "pack": {"pack": True},
    "max_rank": {"max_rank": 8},
    "external": {"mode": "external"},
    "safetensors": {"format": "safetensors"},
}
MODELS = ("llama", "gpt2", "bert", "cnn")

#: the ``second`` adapter added to a zoo model (llama: the zoo's llama_two_adapters has one)
SECOND: dict[str, dict] = {
    "gpt2": dict(r=2, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    "bert": dict(r=2, lora_alpha=3, target_modules=["query", "key", "word_embeddings"]),
    "cnn": dict(r=3, lora_alpha=5, target_modules=["conv1", "conv3"]),
}
ZOO_NAME = {"llama": "llama_two_adapters", "gpt2": "gpt2", "bert": "bert", "cnn": "cnn"}

#: every adapter choice a test runs: label -> AdapterSession ``adapter`` argument
CHOICES: dict[str, object] = {
    "base": None,
    "default": "default",
    "second": "second",
    "both": {"default": 1.0, "second": 1.0},
    "weighted": {"default": 0.5, "second": 1.5},
}
TOL = 1e-4


@dataclasses.dataclass
class Case:
    name: str
    model: torch.nn.Module
    export: Path
    feeds: dict[str, np.ndarray]  # another batch/sequence size than the export example
    torch_feeds: dict[str, torch.Tensor]
    folder: Path
    packages: dict[str, Path] = dataclasses.field(default_factory=dict)
    refs: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)

    def ref(self, label: str) -> dict[str, np.ndarray]:
        if label not in self.refs:
            self.refs[label] = peft_outputs(self.model, self.torch_feeds, CHOICES[label])
        return self.refs[label]


_CASES: dict[str, Case] = {}


def two_adapter_model(name: str):
    """Zoo model ``name`` with the ``second`` adapter of :data:`SECOND` (random, non-zero)."""
    model, inputs = models.ZOO[ZOO_NAME[name]]()
    if name in SECOND:
        model.add_adapter("second", LoraConfig(lora_dropout=0.0, init_lora_weights=False, **SECOND[name]))
        g = torch.Generator().manual_seed(4321)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if ".second" in pname:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return model.eval(), inputs


def fixture_name(name: str) -> str:
    """The committed export of case ``name`` (``fixtures/<this>.onnx``)."""
    return f"ours_{ZOO_NAME[name]}" if name == "llama" else f"two_{name}"


def get_case(name: str, zoo, tmp_path_factory) -> Case:
    if name not in _CASES:
        folder = tmp_path_factory.mktemp(f"pkg_{name}")
        model = zoo[ZOO_NAME[name]][0] if name == "llama" else two_adapter_model(name)[0]
        export = FIXTURES / f"{fixture_name(name)}.onnx"
        torch_feeds = models.example_inputs(ZOO_NAME[name], 3, 7)
        feeds = {k: v.numpy() for k, v in torch_feeds.items()}
        _CASES[name] = Case(name, model, Path(export), feeds, torch_feeds, folder)
    return _CASES[name]


def get_package(case: Case, mode: str) -> Path:
    """The package of ``case`` in ``mode`` (extracted once); do not modify it, copy it."""
    if mode not in case.packages:
        from graph_tools.adapters.extract import extract_adapters

        extract_adapters(case.export, case.folder / mode, **MODES[mode])
        case.packages[mode] = case.folder / mode
    return case.packages[mode]


def copy_package(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- PEFT references -------------------------------------------------------------------------------
def lora_layers(model: torch.nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def peft_outputs(model: torch.nn.Module, feeds: Mapping[str, torch.Tensor], choice) -> dict[str, np.ndarray]:
    """PEFT's outputs (named as the exporter names them) with ``choice`` active.

    ``None``: the base model (``disable_adapter``); a name: that adapter alone; ``{name: weight}``:
    PEFT's multi-adapter forward (every named adapter active on each layer that has it) with each
    adapter's ``scaling`` multiplied by its weight. The layers' state is restored afterwards.
    """
    layers = lora_layers(model)
    saved = [(m, m._active_adapter, dict(m.scaling), m._disable_adapters) for m in layers]
    try:
        with torch.no_grad():
            if choice is None:
                with model.disable_adapter():
                    out = model(**feeds)
            else:
                weights = {choice: 1.0} if isinstance(choice, str) else dict(choice)
                for m in layers:
                    m._active_adapter = [a for a in weights if a in m.scaling]
                    m._disable_adapters = False
                    for a, w in weights.items():
                        if a in m.scaling:
                            m.scaling[a] = m.scaling[a] * w
                out = model(**feeds)
    finally:
        for m, active, scaling, disabled in saved:
            m._active_adapter = active
            m.scaling.clear()
            m.scaling.update(scaling)
            m._disable_adapters = disabled
    if isinstance(out, torch.Tensor):
        return {"output": out.numpy()}
    return {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


def max_error(names, got, ref: Mapping[str, np.ndarray]) -> float:
    """Max abs error over every output ORT returned, matched to PEFT's outputs by name."""
    assert list(names), "no outputs"
    errors = []
    for name, value in zip(names, got):
        assert name in ref, f"output {name!r} not among PEFT's outputs {sorted(ref)}"
        assert value.shape == ref[name].shape, (name, value.shape, ref[name].shape)
        errors.append(float(np.abs(value.astype(np.float64) - ref[name]).max()))
    return max(errors)


def tree(folder: Path) -> set[str]:
    """Every path under ``folder`` (relative), hidden temp files included."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}
