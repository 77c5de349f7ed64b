"""A corpus of hostile inputs over every CLI command and public function.

Each case builds its own broken material in a fresh folder from small pieces made here (the
committed ``fixtures/ours_llama.onnx``, a package extracted from it, a PEFT folder written with
numpy), then runs one command or call. Every case must end in a typed :class:`LoraOnnxError`
(CLI: exit 2, exactly one stderr line ``error: ...``, no traceback, no onnxruntime log line) whose
one-line message names the culprit, and the whole folder (inputs, would-be outputs, temp files)
must be byte-identical afterwards: nothing half-written, nothing outside the output changed, no
input overwritten, no pickle executed.

Most cases run ``cli.main`` in-process (fast); a few run the real CLI in a subprocess for the
true exit code and stderr. Plus: concurrent ``convert`` processes into one package, and 8
threads on one ``AdapterSession``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graph_tools import cli
from graph_tools.errors import (
    AdapterError,
    EncodingsError,
    ExportError,
    ExternalDataError,
    InvalidGraphError,
    LoraOnnxError,
    ModelLoadError,
    OutputError,
    PackageError,
    QuantizationError,
)

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "fixtures" / "ours_llama.onnx"  # inputs input_ids/attention_mask [batch, sequence], vocab 64
DEEP = "[" * 100_000 + "]" * 100_000
VOCAB = 64


# ------------------------------------------------------------------------------------- material


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> Path:
    """model.onnx (weights inline), ext/model.onnx (+ .data), pkg/ (extracted), peft/ (a PEFT
    folder for the package), feeds.npz, calib.npz. Copied into every case's folder."""
    from safetensors.numpy import save_file

    from graph_tools.adapters import files
    from graph_tools.adapters.extract import extract_adapters

    root = tmp_path_factory.mktemp("material")
    shutil.copy(FIXTURE, root / "model.onnx")
    (root / "ext").mkdir()
    ir.save(ir.load(FIXTURE), root / "ext" / "model.onnx", external_data="model.onnx.data", size_threshold_bytes=0)
    extract_adapters(root / "model.onnx", root / "pkg")
    tensors = files.read_adapter(root / "pkg" / "adapters" / "default.onnx_adapter")
    _peft(root / "peft", {k: v * 0.5 for k, v in tensors.items() if "lora_scale" not in k})
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (3, 8)).astype(np.int64)
    np.savez(root / "feeds.npz", input_ids=ids[:1], attention_mask=np.ones((1, 8), np.int64))
    np.savez(root / "calib.npz", input_ids=ids, attention_mask=np.ones((3, 8), np.int64))
    return root


def _peft(folder: Path, tensors: dict, config: dict | None = None) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(dict(tensors), str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config or cfg))
    return folder


def _tree_hash(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` (hidden and temp files too) -> sha256 of its bytes (or 'dir')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _edit(path: Path, fn: Callable[[onnx.ModelProto], None]) -> None:
    """Raw protobuf edit of a model file (test-only: makes graphs no tool would write)."""
    proto = onnx.load(path, load_external_data=False)
    fn(proto)
    path.write_bytes(proto.SerializeToString())


def _cycle(proto: onnx.ModelProto) -> None:
    proto.graph.node[3].input[0] = proto.graph.node[-1].output[0]


def _self_loop(proto: onnx.ModelProto) -> None:
    node = proto.graph.node[5]
    node.input[0] = node.output[0]


def _dangling(proto: onnx.ModelProto) -> None:
    proto.graph.node[3].input[0] = "nobody_makes_this"


def _dangling_output(proto: onnx.ModelProto) -> None:
    proto.graph.output[0].name = "never_produced"


def _external(key: str, change: Callable[[int], int]) -> Callable[[onnx.ModelProto], None]:
    def edit(proto: onnx.ModelProto) -> None:
        tensor = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        entries = {e.key: e for e in tensor.external_data}
        if key not in entries:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, "0"
            entries[key] = entry
        entries[key].value = str(change(int(entries[key].value)))
    return edit


def _pickle_bomb(path: Path, marker: Path, *, zipped: bool) -> None:
    """An adapter_model.bin whose unpickling would create ``marker``."""

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    if zipped:
        import torch

        torch.save({"base_model.model.x.lora_A.weight": Bomb()}, str(path))
    else:
        path.write_bytes(pickle.dumps({"base_model.model.x.lora_A.weight": Bomb()}))


# ------------------------------------------------------------------------------------ the corpus


@dataclasses.dataclass
class Hostile:
    """One case: ``build(w)`` makes the hostile material in ``w`` and returns the CLI argv (run
    in-process) or a zero-argument callable (the API); the error type and words of its message."""

    name: str
    build: Callable[[Path], list | Callable[[], object]]
    error: type[LoraOnnxError]
    words: tuple[str, ...] = ()

    @property
    def needs_torch(self) -> bool:
        """PEFT models, torch.save, the pipeline: not in the torch-free CI job."""
        return self.name.startswith(("pipeline", "export_peft")) or "torch zip" in self.name or "read_peft_adapter: a pickle" in self.name


CASES: list[Hostile] = []


def hostile(name: str, error: type[LoraOnnxError] = LoraOnnxError, *words: str):
    def register(build):
        CASES.append(Hostile(name, build, error, words))
        return build
    return register


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _ids(n: int = 8, value=None, dtype=np.int64, rows: int = 1) -> np.ndarray:
    if value is not None:
        return np.full((rows, n), value, dtype)
    return (np.arange(rows * n).reshape(rows, n) % VOCAB).astype(dtype)


def _mask(n: int = 8, rows: int = 1) -> np.ndarray:
    return np.ones((rows, n), np.int64)


# -- outputs that overlap inputs -------------------------------------------------------------------
@hostile("extract -o the model's folder", OutputError, "contains the input")
def _(w):  # weights inline: no shared-base package possible (graph_tools.adapters.shared)
    (w / "inline").mkdir()
    shutil.copy(w / "model.onnx", w / "inline" / "model.onnx")
    return ["extract", w / "inline" / "model.onnx", "-o", w / "inline"]
hostile("extract -o the model file", OutputError, "is the input")(
    lambda w: ["extract", w / "model.onnx", "-o", w / "model.onnx"])
hostile("extract -o the external data file", OutputError, "model.onnx.data")(
    lambda w: ["extract", w / "ext" / "model.onnx", "-o", w / "ext" / "model.onnx.data"])
hostile("extract -o a folder containing the model", OutputError, "contains the input")(
    lambda w: ["extract", w / "model.onnx", "-o", w])
hostile("extract -o inside the model's data file path", OutputError, "lies inside")(
    lambda w: ["extract", w / "ext" / "model.onnx", "-o", w / "ext" / "model.onnx.data" / "pkg"])
hostile("quantize -o the package", OutputError, "is the input")(
    lambda w: ["quantize", w / "pkg", "-o", w / "pkg", "--calibration", w / "calib.npz"])
hostile("quantize -o inside the package", OutputError, "lies inside")(
    lambda w: ["quantize", w / "pkg", "-o", w / "pkg" / "q", "--calibration", w / "calib.npz"])
hostile("quantize -o a folder containing the package", OutputError, "contains the input")(
    lambda w: ["quantize", w / "pkg", "-o", w, "--calibration", w / "calib.npz"])
hostile("merge -o pkg/model.onnx", OutputError, "lies inside")(
    lambda w: ["merge", w / "pkg", "--adapter", "default", "-o", w / "pkg" / "model.onnx"])
hostile("merge -o pkg/adapters/x.onnx", OutputError, "lies inside")(
    lambda w: ["merge", w / "pkg", "--adapter", "default", "-o", w / "pkg" / "adapters" / "x.onnx"])
hostile("strip -o the input", OutputError, "is the input")(
    lambda w: ["strip", w / "model.onnx", "-o", w / "model.onnx"])
hostile("strip -o the input's data file", OutputError, "model.onnx.data")(
    lambda w: ["strip", w / "ext" / "model.onnx", "-o", w / "ext" / "model.onnx.data"])
hostile("strip a package -o inside it", OutputError, "lies inside")(
    lambda w: ["strip", w / "pkg", "-o", w / "pkg" / "base.onnx"])
hostile("strip a package's model -o inside the package", OutputError, "lies inside")(
    lambda w: ["strip", w / "pkg" / "model.onnx", "-o", w / "pkg" / "base.onnx"])
hostile("genai -o inside the package", OutputError, "lies inside")(
    lambda w: ["genai", w / "pkg", "-o", w / "pkg" / "genai"])
hostile("genai -o a folder containing the package", OutputError, "contains the input")(
    lambda w: ["genai", w / "pkg", "-o", w])
hostile("run -o the feeds file", OutputError, "is the input")(
    lambda w: ["run", w / "pkg", "--feeds", w / "feeds.npz", "-o", w / "feeds.npz"])
hostile("run -o inside the package", OutputError, "lies inside")(
    lambda w: ["run", w / "pkg", "--feeds", w / "feeds.npz", "-o", w / "pkg" / "out.npz"])


@hostile("extract_adapters(ir.Model) -o its data folder", OutputError, "contains the input")
def _(w):
    from graph_tools.adapters.extract import extract_adapters

    return lambda: extract_adapters(ir.load(w / "ext" / "model.onnx"), w / "ext")


@hostile("strip_adapters -o its own model", OutputError, "is the input")
def _(w):
    from graph_tools.adapters.strip import strip_adapters

    return lambda: strip_adapters(w / "model.onnx", w / "model.onnx")


@hostile("merge_adapter -o the package folder", OutputError, "is the input")
def _(w):
    from graph_tools.adapters.merge import merge_adapter

    return lambda: merge_adapter(w / "pkg", "default", w / "pkg")


@hostile("convert a PEFT folder that is the package", OutputError, "lies inside")
def _(w):
    from graph_tools.adapters.convert import convert_peft_adapter

    for f in (w / "peft").iterdir():
        shutil.copy(f, w / "pkg" / f.name)
    return lambda: convert_peft_adapter(w / "pkg", w / "pkg", name="self")


@hostile("pipeline -o the adapter folder", OutputError, "peft")
def _(w):
    return ["pipeline", "--base", "builtin:tiny-llama", "--adapter", f"a={w / 'peft'}", "-o", w / "peft", "-q"]


@hostile("pipeline -o a folder holding the calibration file", OutputError, "calib.npz")
def _(w):
    (w / "data").mkdir()
    shutil.move(w / "calib.npz", w / "data" / "calib.npz")
    return ["pipeline", "--base", "builtin:tiny-llama", "--adapter", f"a={w / 'peft'}", "-o", w / "data",
            "--calibration", w / "data" / "calib.npz", "-q"]


# -- outputs of the wrong kind (nothing half-written) ----------------------------------------------
@hostile("merge -o an existing folder", OutputError, "is a folder")
def _(w):
    (w / "merged").mkdir()
    return ["merge", w / "pkg", "--adapter", "default", "-o", w / "merged"]


@hostile("merge -o where <out>.data is a folder", OutputError, "is a folder")
def _(w):
    (w / "merged.onnx.data").mkdir()
    return ["merge", w / "pkg", "--adapter", "default", "-o", w / "merged.onnx"]


@hostile("strip -o an existing folder", OutputError, "is a folder")
def _(w):
    (w / "base").mkdir()
    return ["strip", w / "model.onnx", "-o", w / "base"]


@hostile("run -o an existing folder", OutputError, "is a folder")
def _(w):
    (w / "out.npz").mkdir()
    return ["run", w / "pkg", "--feeds", w / "feeds.npz", "-o", w / "out.npz"]


hostile("run -o not .npz", OutputError, ".npz")(
    lambda w: ["run", w / "pkg", "--feeds", w / "feeds.npz", "-o", w / "out.txt"])


@hostile("extract -o an existing file", OutputError, "not a folder")
def _(w):
    (w / "notes.txt").write_text("mine")
    return ["extract", w / "model.onnx", "-o", w / "notes.txt"]


@hostile("extract -o a folder of other files", OutputError, "other files")
def _(w):
    (w / "docs").mkdir()
    (w / "docs" / "thesis.tex").write_text("years of work")
    return ["extract", w / "model.onnx", "-o", w / "docs"]


@hostile("quantize -o an existing file", OutputError, "not a folder")
def _(w):
    (w / "q").write_text("mine")
    return ["quantize", w / "pkg", "-o", w / "q", "--calibration", w / "calib.npz"]


@hostile("pipeline -o a folder of other files", OutputError, "other files")
def _(w):
    (w / "docs").mkdir()
    (w / "docs" / "keep.txt").write_text("mine")
    return ["pipeline", "--base", "builtin:tiny-llama", "--adapter", f"a={w / 'peft'}", "-o", w / "docs",
            "--quantize", "none", "-q"]


@hostile("pipeline with a missing base creates no output", ModelLoadError, "config.json")
def _(w):
    return ["pipeline", "--base", w / "no_such_model", "--adapter", f"a={w / 'peft'}", "-o", w / "out", "-q"]


@hostile("extract failing while writing adapters leaves nothing", AdapterError, "disk full")
def _(w):
    from graph_tools.adapters import files
    from graph_tools.adapters.extract import extract_adapters

    def run():
        original = files.write_adapter

        def broken(*args, **kwargs):
            raise AdapterError("simulated: disk full")

        files.write_adapter = broken
        try:
            extract_adapters(w / "model.onnx", w / "out")
        finally:
            files.write_adapter = original
    return run


@hostile("merge failing at the model's rename restores the old data file", OutputError, "simulated")
def _(w):
    from graph_tools import _io
    from graph_tools.adapters.merge import merge_adapter

    (w / "merged.onnx.data").write_bytes(b"the previous weights")

    def run():
        original = os.replace

        def replace(src, dst):
            if str(dst).endswith("merged.onnx"):
                raise OutputError("simulated rename failure")
            return original(src, dst)

        _io.os.replace = replace
        try:
            merge_adapter(w / "pkg", "default", w / "merged.onnx")
        finally:
            _io.os.replace = original
    return run


# -- invalid graphs --------------------------------------------------------------------------------
for _cmd in ("inspect", "extract", "strip"):
    for _label, _fn, _word in (("cycle", _cycle, "cycle"), ("self-loop", _self_loop, "cycle"),
                               ("dangling input", _dangling, "nobody_makes_this")):
        def _build(w, cmd=_cmd, fn=_fn):
            _edit(w / "model.onnx", fn)
            tail = {"inspect": [], "extract": ["-o", w / "out"], "strip": ["-o", w / "out.onnx"]}[cmd]
            return [cmd, w / "model.onnx", *tail]
        hostile(f"{_cmd} a graph with a {_label}", InvalidGraphError, _word)(_build)


@hostile("inspect a graph whose output nothing produces", InvalidGraphError, "never_produced")
def _(w):
    _edit(w / "model.onnx", _dangling_output)
    return ["inspect", w / "model.onnx"]


@hostile("run a package whose graph has a cycle", InvalidGraphError, "cycle")
def _(w):
    _edit(w / "pkg" / "model.onnx", _cycle)
    return ["run", w / "pkg", "--feeds", w / "feeds.npz"]


@hostile("find_lora_sites on a dangling graph", InvalidGraphError, "dangling")
def _(w):
    from graph_tools import find_lora_sites

    _edit(w / "model.onnx", _dangling)
    return lambda: find_lora_sites(w / "model.onnx")


# -- external data ---------------------------------------------------------------------------------
for _cmd in ("inspect", "extract", "strip"):
    def _build(w, cmd=_cmd):
        _edit(w / "ext" / "model.onnx", _external("length", lambda n: n // 2))
        tail = {"inspect": [], "extract": ["-o", w / "out"], "strip": ["-o", w / "out.onnx"]}[cmd]
        return [cmd, w / "ext" / "model.onnx", *tail]
    hostile(f"{_cmd}: external length shorter than the tensor", ExternalDataError, "declares length")(_build)


@hostile("run a package whose external length is short", ExternalDataError, "declares length")
def _(w):
    _edit(w / "pkg" / "model.onnx", _external("length", lambda n: n - 4))
    return ["run", w / "pkg", "--feeds", w / "feeds.npz"]


@hostile("external length longer than the tensor", ExternalDataError, "declares length")
def _(w):
    _edit(w / "ext" / "model.onnx", _external("length", lambda n: n + 64))
    return ["inspect", w / "ext" / "model.onnx"]


@hostile("external offset beyond the file", ExternalDataError, "truncated")
def _(w):
    _edit(w / "ext" / "model.onnx", _external("offset", lambda n: 10**7))
    return ["inspect", w / "ext" / "model.onnx"]


@hostile("external data file truncated", ExternalDataError, "truncated")
def _(w):
    data = w / "ext" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    return ["extract", w / "ext" / "model.onnx", "-o", w / "out"]


@hostile("external data file missing", ExternalDataError, "missing")
def _(w):
    (w / "ext" / "model.onnx.data").unlink()
    return ["strip", w / "ext" / "model.onnx", "-o", w / "out.onnx"]


@hostile("external data path escaping the folder", ExternalDataError, "escapes")
def _(w):
    shutil.copy(w / "ext" / "model.onnx.data", w / "stolen.data")

    def relocate(proto):
        for t in proto.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = "../stolen.data"
    _edit(w / "ext" / "model.onnx", relocate)
    return ["inspect", w / "ext" / "model.onnx"]


# -- JSON ------------------------------------------------------------------------------------------
for _cmd in ("run", "merge", "quantize", "convert", "strip"):
    def _build(w, cmd=_cmd):
        (w / "pkg" / "manifest.json").write_text(DEEP)
        return {
            "run": ["run", w / "pkg", "--feeds", w / "feeds.npz"],
            "merge": ["merge", w / "pkg", "--adapter", "default", "-o", w / "m.onnx"],
            "quantize": ["quantize", w / "pkg", "-o", w / "q", "--calibration", w / "calib.npz"],
            "convert": ["convert", w / "peft", "--package", w / "pkg"],
            "strip": ["strip", w / "pkg", "-o", w / "s.onnx"],
        }[cmd]
    hostile(f"{_cmd}: deeply nested manifest", PackageError, "nested too deeply")(_build)


@hostile("convert: deeply nested adapter_config.json", AdapterError, "nested too deeply")
def _(w):
    (w / "peft" / "adapter_config.json").write_text(DEEP)
    return ["convert", w / "peft", "--package", w / "pkg"]


@hostile("read_peft_adapter: deeply nested adapter_config.json", AdapterError, "nested too deeply")
def _(w):
    from graph_tools.adapters.peft_checkpoint import read_peft_adapter

    (w / "peft" / "adapter_config.json").write_text(DEEP)
    return lambda: read_peft_adapter(w / "peft")


@hostile("read_encodings: deeply nested file", EncodingsError, "nested too deeply")
def _(w):
    from graph_tools.quant.encodings import read_encodings

    (w / "base.encodings").write_text(DEEP)
    return lambda: read_encodings(w / "base.encodings")


@hostile("read_manifest: deeply nested object", PackageError, "nested too deeply")
def _(w):
    from graph_tools.adapters.manifest import read_manifest

    (w / "pkg" / "manifest.json").write_text('{"a": ' * 50_000 + "1" + "}" * 50_000)
    return lambda: read_manifest(w / "pkg")


@hostile("manifest is not JSON", PackageError, "not valid JSON")
def _(w):
    (w / "pkg" / "manifest.json").write_text("{ half a manifest")
    return ["run", w / "pkg", "--feeds", w / "feeds.npz"]


@hostile("manifest is a JSON list", PackageError, "expected an object")
def _(w):
    (w / "pkg" / "manifest.json").write_text("[1, 2, 3]")
    return ["merge", w / "pkg", "--adapter", "default", "-o", w / "m.onnx"]


@hostile("adapter_config.json is not UTF-8", AdapterError, "adapter_config.json")
def _(w):
    (w / "peft" / "adapter_config.json").write_bytes(b"\xff\xfe\x00garbage")
    return ["convert", w / "peft", "--package", w / "pkg"]


# -- calibration data ------------------------------------------------------------------------------
def _quantize_with(make: Callable[[Path], Path], error=QuantizationError, *words):
    def build(w):
        return ["quantize", w / "pkg", "-o", w / "q", "--calibration", make(w)]
    return build


_CALIBRATION = {
    "a bare .npy": (lambda w: (np.save(w / "c.npy", _ids(rows=2)), w / "c.npy")[1], ("single array",)),
    "object arrays": (lambda w: _npz(w / "c.npz", input_ids=np.array([None, 1], dtype=object), attention_mask=_mask()),
                      ("input_ids",)),
    "float ids": (lambda w: _npz(w / "c.npz", input_ids=_ids(dtype=np.float32, rows=2), attention_mask=_mask(rows=2)),
                  ("input_ids", "float32")),
    "out-of-vocabulary ids": (lambda w: _npz(w / "c.npz", input_ids=_ids(value=1000, rows=2), attention_mask=_mask(rows=2)),
                              ("input_ids", "1000")),
    "negative out-of-range ids": (lambda w: _npz(w / "c.npz", input_ids=_ids(value=-500, rows=2), attention_mask=_mask(rows=2)),
                                  ("input_ids", "-500")),
    "mismatched sequence lengths": (lambda w: _npz(w / "c.npz", input_ids=_ids(8, rows=2), attention_mask=_mask(5, rows=2)),
                                    ("attention_mask", "input_ids")),
    "mismatched row counts": (lambda w: _npz(w / "c.npz", input_ids=_ids(rows=3), attention_mask=_mask(rows=2)),
                              ("rows",)),
    "a 0-d array": (lambda w: _npz(w / "c.npz", input_ids=np.array(3), attention_mask=_mask()), ("0-d",)),
    "a missing input": (lambda w: _npz(w / "c.npz", input_ids=_ids(rows=2)), ("attention_mask",)),
    "an unknown input": (lambda w: _npz(w / "c.npz", input_ids=_ids(rows=2), attention_mask=_mask(rows=2),
                                        pixel_values=np.zeros((2, 3), np.float32)), ("pixel_values",)),
    "wrong rank": (lambda w: _npz(w / "c.npz", input_ids=np.zeros((2, 1, 8), np.int64), attention_mask=np.ones((2, 1, 8), np.int64)),
                   ("input_ids", "shape")),
    "an empty .npz": (lambda w: _npz(w / "c.npz"), ("no arrays",)),
    "a text file": (lambda w: (w / "c.npz").write_text("input_ids=1,2,3") and w / "c.npz", ("c.npz",)),
    "a missing file": (lambda w: w / "nope.npz", ("nope.npz",)),
}
for _label, (_make, _words) in _CALIBRATION.items():
    hostile(f"quantize: calibration with {_label}", QuantizationError, *_words)(_quantize_with(_make))


class _ListReader:
    """An onnxruntime-style CalibrationDataReader that yields lists instead of dicts."""

    def __init__(self):
        self.n = 0

    def get_next(self):
        self.n += 1
        return [_ids()] if self.n < 3 else None


@hostile("quantize(): a calibration reader yielding lists", QuantizationError, "list")
def _(w):
    from graph_tools.quant import quantize

    return lambda: quantize(w / "pkg", w / "q", _ListReader())


@hostile("quantize(): calibration items holding str values", QuantizationError, "input_ids", "str")
def _(w):
    from graph_tools.quant import quantize

    return lambda: quantize(w / "pkg", w / "q", [{"input_ids": "hello", "attention_mask": _mask()}])


@hostile("quantize(): calibration that is not iterable", QuantizationError, "int")
def _(w):
    from graph_tools.quant import quantize

    return lambda: quantize(w / "pkg", w / "q", 42)


@hostile("quantize(): out-of-vocabulary ids in a feed list", QuantizationError, "input_ids", "777")
def _(w):
    from graph_tools.quant import quantize

    return lambda: quantize(w / "pkg", w / "q", [{"input_ids": _ids(value=777), "attention_mask": _mask()}])


# -- run feeds -------------------------------------------------------------------------------------
_FEEDS = {
    "float ids": (lambda w: _npz(w / "f.npz", input_ids=_ids(dtype=np.float32), attention_mask=_mask()), ("float32",)),
    "out-of-vocabulary ids": (lambda w: _npz(w / "f.npz", input_ids=_ids(value=999), attention_mask=_mask()), ("999",)),
    "mismatched shapes": (lambda w: _npz(w / "f.npz", input_ids=_ids(8), attention_mask=_mask(3)), ("attention_mask",)),
    "wrong rank": (lambda w: _npz(w / "f.npz", input_ids=_ids()[0], attention_mask=_mask()[0]), ("shape",)),
    "object arrays": (lambda w: _npz(w / "f.npz", input_ids=np.array(["a", None], dtype=object), attention_mask=_mask()),
                      ("input_ids",)),
    "a bare .npy": (lambda w: (np.save(w / "f.npy", _ids()), w / "f.npy")[1], ("single array",)),
    "an unknown input": (lambda w: _npz(w / "f.npz", input_ids=_ids(), attention_mask=_mask(), bogus=_ids()), ("bogus",)),
    "a missing input": (lambda w: _npz(w / "f.npz", input_ids=_ids()), ("attention_mask",)),
    "a slot fed as input": (lambda w: _npz(w / "f.npz", input_ids=_ids(), attention_mask=_mask(), **{
        "base_model.model.model.layers.0.self_attn.q_proj.lora_scale": np.ones(4, np.float32)}), ("slot",)),
    "str ids": (lambda w: _npz(w / "f.npz", input_ids=np.array([["a"] * 8]), attention_mask=_mask()), ("input_ids",)),
}
for _label, (_make, _words) in _FEEDS.items():
    def _build(w, make=_make):
        return ["run", w / "pkg", "--adapter", "default", "--feeds", make(w), "-o", w / "out.npz"]
    hostile(f"run: feeds with {_label}", LoraOnnxError, *_words)(_build)


hostile("run: an unknown adapter", AdapterError, "nobody")(
    lambda w: ["run", w / "pkg", "--adapter", "nobody", "--feeds", w / "feeds.npz"])
hostile("run: an adapter weight that is not a number", LoraOnnxError, "number")(
    lambda w: ["run", w / "pkg", "--adapter", "default=lots", "--feeds", w / "feeds.npz"])


def _session_run(feeds: Callable[[], object], adapter="default"):
    def build(w):
        from graph_tools.runtime.session import AdapterSession

        return lambda: AdapterSession(w / "pkg").run(None, feeds(), adapter=adapter)
    return build


hostile("AdapterSession.run: a str feed", LoraOnnxError, "input_ids", "str")(
    _session_run(lambda: {"input_ids": "hello world", "attention_mask": _mask()}))
hostile("AdapterSession.run: a list feed", LoraOnnxError, "input_ids", "list")(
    _session_run(lambda: {"input_ids": [[1, 2, 3]], "attention_mask": _mask(3)}))
hostile("AdapterSession.run: feeds that are a list", LoraOnnxError, "dict")(
    _session_run(lambda: [_ids(), _mask()]))
hostile("AdapterSession.run: int32 ids", LoraOnnxError, "int32", "int64")(
    _session_run(lambda: {"input_ids": _ids(dtype=np.int32), "attention_mask": _mask()}))
hostile("AdapterSession.run: adapter of a wrong type", AdapterError, "int")(
    _session_run(lambda: {"input_ids": _ids(), "attention_mask": _mask()}, adapter=42))
hostile("AdapterSession.run: NaN adapter weight", AdapterError, "finite")(
    _session_run(lambda: {"input_ids": _ids(), "attention_mask": _mask()}, adapter={"default": float("nan")}))


# -- adapter files and checkpoints -----------------------------------------------------------------
@hostile("convert: int32 A/B into a float32 package", AdapterError, "int32", "lora_A")
def _(w):
    from safetensors.numpy import load_file, save_file

    path = w / "peft" / "adapter_model.safetensors"
    save_file({k: (v * 10).astype(np.int32) for k, v in load_file(str(path)).items()}, str(path))
    return ["convert", w / "peft", "--package", w / "pkg", "--name", "ints"]


@hostile("AdapterSession: an int32 adapter file in a float32 package", AdapterError, "int32", "float32")
def _(w):
    from graph_tools.adapters import files
    from graph_tools.runtime.session import AdapterSession

    path = w / "pkg" / "adapters" / "default.onnx_adapter"
    tensors = files.read_adapter(path)
    files.write_adapter(path, {k: (v * 10).astype(np.int32) for k, v in tensors.items()})
    return lambda: AdapterSession(w / "pkg")


@hostile("merge: a float64 adapter file in a float32 package", AdapterError, "float64")
def _(w):
    from graph_tools.adapters import files

    path = w / "pkg" / "adapters" / "default.onnx_adapter"
    files.write_adapter(path, {k: v.astype(np.float64) for k, v in files.read_adapter(path).items()})
    return ["merge", w / "pkg", "--adapter", "default", "-o", w / "merged.onnx"]


for _zipped in (False, True):
    def _build(w, zipped=_zipped):
        (w / "peft" / "adapter_model.safetensors").unlink()
        _pickle_bomb(w / "peft" / "adapter_model.bin", w / "PWNED", zipped=zipped)
        return ["convert", w / "peft", "--package", w / "pkg"]
    hostile(f"convert: a pickle bomb in adapter_model.bin ({'torch zip' if _zipped else 'raw pickle'})",
            AdapterError, "adapter_model.bin")(_build)


@hostile("read_peft_adapter: a pickle bomb in adapter_model.bin", AdapterError, "adapter_model.bin")
def _(w):
    from graph_tools.adapters.peft_checkpoint import read_peft_adapter

    (w / "peft" / "adapter_model.safetensors").unlink()
    _pickle_bomb(w / "peft" / "adapter_model.bin", w / "PWNED", zipped=True)
    return lambda: read_peft_adapter(w / "peft")


@hostile("convert: truncated safetensors", AdapterError, "safetensors")
def _(w):
    path = w / "peft" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return ["convert", w / "peft", "--package", w / "pkg"]


@hostile("convert: NaN in lora_B", AdapterError, "lora_B")
def _(w):
    from safetensors.numpy import load_file, save_file

    path = w / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = np.nan
    save_file(tensors, str(path))
    return ["convert", w / "peft", "--package", w / "pkg"]


@hostile("convert into a quantized-looking package", PackageError, "not a float adapter package")
def _(w):
    data = json.loads((w / "pkg" / "manifest.json").read_text())
    data["extra"]["quantization"] = {"weights": "int8"}
    (w / "pkg" / "manifest.json").write_text(json.dumps(data))
    return ["convert", w / "peft", "--package", w / "pkg"]


hostile("convert: an invalid adapter name", AdapterError, "invalid adapter name")(
    lambda w: ["convert", w / "peft", "--package", w / "pkg", "--name", "../escape"])
hostile("merge: an unknown adapter", AdapterError, "nobody")(
    lambda w: ["merge", w / "pkg", "--adapter", "nobody", "-o", w / "m.onnx"])


@hostile("load_adapter: a truncated onnx_adapter file", AdapterError, "onnx_adapter")
def _(w):
    from graph_tools.runtime.session import AdapterSession

    src = w / "pkg" / "adapters" / "default.onnx_adapter"
    (w / "broken.onnx_adapter").write_bytes(src.read_bytes()[:200])
    return lambda: AdapterSession(w / "pkg").load_adapter("broken", w / "broken.onnx_adapter")


# -- export_peft -----------------------------------------------------------------------------------
def _export(inputs: Callable[[dict], dict]):
    def build(w):
        import models
        from exporters import export_peft

        model, example = models.ZOO["llama"]()
        return lambda: export_peft(model, inputs(example), w / "export" / "model.onnx")
    return build


hostile("export_peft: an input the model does not take", ExportError, "bogus")(
    _export(lambda ex: {**ex, "bogus": ex["input_ids"].clone()}))
hostile("export_peft: float ids", ExportError, "input_ids")(
    _export(lambda ex: {k: v.float() for k, v in ex.items()}))
hostile("export_peft: mismatched input shapes", ExportError, "attention_mask")(
    _export(lambda ex: {"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"][:, :3]}))


# ------------------------------------------------------------------------------------------ runner


def _run_case(case: Hostile, w: Path, capfd) -> str:
    target = case.build(w)
    before = _tree_hash(w)
    capfd.readouterr()
    if callable(target):
        with pytest.raises(LoraOnnxError) as info:
            target()
        message = str(info.value)
        assert isinstance(info.value, case.error), f"{type(info.value).__name__}: {message}"
        assert "\n" not in message, message
        err = capfd.readouterr().err
        assert err == "", err  # no onnxruntime or onnx-ir log line either
    else:
        code = cli.main([str(a) for a in target])
        err = capfd.readouterr().err
        assert code == 2, err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        message = lines[0]
    assert "Traceback" not in message
    for word in case.words:
        assert word in message, message
    assert _tree_hash(w) == before, "the folder changed"
    assert not (w / "PWNED").exists(), "a pickle was executed"
    return message


def test_corpus_size():
    assert len(CASES) >= 80
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.torch] if c.needs_torch else [])
                                  for c in CASES])
def test_hostile(case, material, tmp_path, capfd):
    w = tmp_path / "w"
    shutil.copytree(material, w)
    _run_case(case, w, capfd)


# -------------------------------------------------------------------------- real processes, stderr


def _subprocess(*argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "graph_tools.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=300)


SUBPROCESS_CASES = {
    "run oov ids": lambda w: ["run", w / "pkg", "--feeds", _npz(w / "f.npz", input_ids=_ids(value=999), attention_mask=_mask())],
    "quantize oov calibration": lambda w: ["quantize", w / "pkg", "-o", w / "q", "--calibration",
                                           _npz(w / "c.npz", input_ids=_ids(value=999, rows=2), attention_mask=_mask(rows=2))],
    "inspect a cycle": lambda w: (_edit(w / "model.onnx", _cycle), ["inspect", w / "model.onnx"])[1],
    "extract a dangling graph": lambda w: (_edit(w / "model.onnx", _dangling), ["extract", w / "model.onnx", "-o", w / "o"])[1],
    "strip onto its input": lambda w: ["strip", w / "model.onnx", "-o", w / "model.onnx"],
    "convert a pickle bomb": lambda w: ((w / "peft" / "adapter_model.safetensors").unlink(),
                                        _pickle_bomb(w / "peft" / "adapter_model.bin", w / "PWNED", zipped=False),
                                        ["convert", w / "peft", "--package", w / "pkg"])[2],
}


@pytest.mark.parametrize("name", list(SUBPROCESS_CASES))
def test_hostile_subprocess(name, material, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(material, w)
    argv = SUBPROCESS_CASES[name](w)
    before = _tree_hash(w)
    res = _subprocess(*argv)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr  # no "[E:onnxruntime" line first
    assert "Traceback" not in res.stderr
    assert _tree_hash(w) == before
    assert not (w / "PWNED").exists()


@pytest.mark.torch
def test_pipeline_late_failure_leaves_nothing(tmp_path):
    """Calibration data that only the quantize stage refuses (after export and extract ran)."""
    from peft import LoraConfig, get_peft_model

    from exporters.demo_models import tiny_llama_base

    model = get_peft_model(tiny_llama_base(layers=1, hidden=32), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "peft")
    _npz(tmp_path / "calib.npz", input_ids=np.full((2, 8), 5000, np.int64), attention_mask=np.ones((2, 8), np.int64))
    before = _tree_hash(tmp_path)
    with pytest.raises(QuantizationError, match="input_ids"):
        from exporters.pipelines import pipeline

        pipeline("builtin:tiny-llama", {"a": tmp_path / "peft"}, tmp_path / "out", calibration=tmp_path / "calib.npz",
                 quiet=True, report=False, model=_attach(tiny_llama_base(layers=1, hidden=32), tmp_path / "peft"))
    assert _tree_hash(tmp_path) == before  # no out/, no out/export, no temp folder


def _attach(base, path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path), adapter_name="a").eval()


# ------------------------------------------------------------------------------ concurrency, threads


def _convert_script(peft: Path, pkg: Path, name: str, go: Path) -> str:
    return (
        "import time, pathlib\n"
        "from graph_tools.adapters.convert import convert_peft_adapter\n"
        f"go = pathlib.Path({str(go)!r})\n"
        "while not go.exists(): time.sleep(0.005)\n"
        f"convert_peft_adapter({str(peft)!r}, {str(pkg)!r}, name={name!r})\n"
    )


def test_concurrent_converts_into_one_package(material, tmp_path):
    from safetensors.numpy import load_file

    from graph_tools.adapters import files
    from graph_tools.adapters.manifest import read_manifest

    pkg = shutil.copytree(material / "pkg", tmp_path / "pkg")
    tensors = load_file(str(material / "peft" / "adapter_model.safetensors"))
    names = [f"a{i}" for i in range(5)]
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = []
    for i, name in enumerate(names):
        peft = _peft(tmp_path / name, {k: v * (i + 2) for k, v in tensors.items()})
        procs.append(subprocess.Popen([sys.executable, "-c", _convert_script(peft, pkg, name, go)], env=env,
                                      stderr=subprocess.PIPE, text=True))
    import time

    time.sleep(1.5)  # let every process import and wait at the barrier
    go.touch()
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    manifest = read_manifest(pkg)
    assert sorted(a.name for a in manifest.adapters) == sorted(["default", *names])
    for i, name in enumerate(names):
        written = files.read_adapter(pkg / "adapters" / f"{name}.onnx_adapter")
        key = next(k for k in tensors if "lora_B" in k)
        np.testing.assert_array_equal(written[key], tensors[key] * (i + 2))
    assert sorted(p.name for p in (pkg / "adapters").iterdir()) == sorted(f"{n}.onnx_adapter" for n in ["default", *names])
    assert not [p for p in pkg.rglob(".*")], "temp or lock files left behind"


def test_eight_threads_on_one_session(material, tmp_path):
    import onnxruntime as ort

    from graph_tools.adapters.convert import convert_peft_adapter
    from graph_tools.runtime.session import AdapterSession

    pkg = shutil.copytree(material / "pkg", tmp_path / "pkg")
    convert_peft_adapter(material / "peft", pkg, name="half")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = AdapterSession(pkg, session_options=options)
    rng = np.random.default_rng(1)
    choices = [None, "default", "half", {"default": 1.0, "half": 0.5}]
    feeds = [{"input_ids": rng.integers(0, VOCAB, (2, n)).astype(np.int64), "attention_mask": np.ones((2, n), np.int64)}
             for n in (3, 8)]
    jobs = [(c, f) for c in range(len(choices)) for f in range(len(feeds))]
    reference = {(c, f): session.run(None, feeds[f], adapter=choices[c]) for c, f in jobs}
    assert not np.allclose(reference[(1, 0)][0], reference[(0, 0)][0])  # the adapters change the output
    results: dict[int, list] = {t: [] for t in range(8)}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(t: int) -> None:
        try:
            start.wait()
            for k in range(24):
                c, f = jobs[(t + k) % len(jobs)]
                results[t].append(((c, f), session.run(None, feeds[f], adapter=choices[c])))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for t in range(8):
        assert len(results[t]) == 24
        for key, outputs in results[t]:
            for got, ref in zip(outputs, reference[key]):
                np.testing.assert_array_equal(got, ref)
