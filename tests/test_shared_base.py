"""Packages that share the source's base weights file instead of copying it, and copies that
carry the base ranges only (graph_tools.adapters.shared)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import package_helpers as H
from graph_tools.adapters import shared
from graph_tools.adapters.extract import extract_adapters
from graph_tools.adapters.load import load_package
from graph_tools.errors import AdapterError, PackageError, SharedBaseChangedError
from graph_tools.runtime.session import AdapterSession

DATA = "model.onnx.data"


@pytest.fixture(scope="module")
def case(zoo, tmp_path_factory):
    return H.get_case("llama", zoo, tmp_path_factory)


def _exported(case, folder: Path) -> Path:
    """The case's LoRA graph saved with every initializer in ``folder/model.onnx.data``."""
    folder.mkdir(parents=True, exist_ok=True)
    ir.save(ir.load(case.export), folder / "model.onnx", external_data=DATA)
    return folder / "model.onnx"


def _check_outputs(package: Path, case) -> None:
    session = AdapterSession(package)
    names = [o.name for o in session.get_outputs()]
    for label in ("base", "default", "second", "weighted"):
        got = session.run(None, case.feeds, adapter=H.CHOICES[label])
        assert H.max_error(names, got, case.ref(label)) <= H.TOL, label
    mixed = session.run(None, case.feeds, adapter=["second", None, "default"])
    for i, label in enumerate(("second", "base", "default")):
        assert H.max_error(names, [m[i: i + 1] for m in mixed], {k: v[i: i + 1] for k, v in case.ref(label).items()}) <= H.TOL


@pytest.mark.parametrize("mode", ["inputs", "external"])
def test_package_beside_the_export_shares_its_data_file(case, tmp_path, mode):
    source = _exported(case, tmp_path / "export")
    data = source.parent / DATA
    before = data.stat()
    package = extract_adapters(source, source.parent, mode=mode)  # default: share
    after = data.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert (source.parent / "source.onnx").is_file()  # the LoRA graph, kept
    assert sorted(p.name for p in source.parent.iterdir()) == ["adapters", "manifest.json", "model.onnx", DATA, "source.onnx"]
    [record] = json.loads((source.parent / "manifest.json").read_text())["extra"]["shared_base"]
    assert record["file"] == DATA and record["size"] == before.st_size and record["fingerprint"].startswith("sha256:")
    graph = ir.load(package.model_path)
    locations = {v.const_value.location for v in graph.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)}
    assert DATA in locations
    _check_outputs(package.path, case)
    # the LoRA graph kept beside still runs the source model (its bytes are still in the file)
    again = extract_adapters(source.parent / "source.onnx", tmp_path / "copy", share_base=False)
    _check_outputs(again.path, case)


def test_changed_shared_file_is_a_clear_error(case, tmp_path):
    source = _exported(case, tmp_path / "export")
    extract_adapters(source, source.parent)
    data = source.parent / DATA
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(SharedBaseChangedError, match=f"shared base file '{DATA}' changed"):
        AdapterSession(source.parent)
    data.write_bytes(bytes(raw[:-4]))
    with pytest.raises(SharedBaseChangedError, match="changed"):
        load_package(source.parent)
    data.unlink()
    with pytest.raises(SharedBaseChangedError, match="missing"):
        load_package(source.parent)


@pytest.mark.parametrize("punch", [True, False], ids=["punch-hole", "zero-fill"])
def test_copy_carries_the_base_ranges_only(case, tmp_path, monkeypatch, punch):
    source = _exported(case, tmp_path / "export")
    if not punch:  # a file system without fallocate(PUNCH_HOLE): the ranges are overwritten with zeros
        monkeypatch.setattr(shared, "_punch", lambda fd, start, length: False)
    package = extract_adapters(source, tmp_path / "pkg")
    assert "shared_base" not in (package.manifest.extra or {})
    copy = (package.path / DATA).read_bytes()
    original = (source.parent / DATA).read_bytes()
    graph = ir.load(source)
    lora = [v.const_value for v in graph.graph.initializers.values()
            if ".lora_" in v.name and isinstance(v.const_value, ir.ExternalTensor)]
    base = [v.const_value for v in ir.load(package.model_path).graph.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)]
    assert lora and base
    for t in lora:  # no adapter byte ships with the base
        assert not any(copy[t.offset: t.offset + t.nbytes]), t.name
    for t in base:
        assert copy[t.offset: t.offset + t.nbytes] == original[t.offset: t.offset + t.nbytes], t.name
    # byte for byte: the referenced ranges as in the source, every other byte zero, same size
    expected = bytearray(len(original))
    for t in base:
        expected[t.offset: t.offset + t.nbytes] = original[t.offset: t.offset + t.nbytes]
    assert copy == bytes(expected)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left
    _check_outputs(package.path, case)


def test_failed_copy_extraction_leaves_nothing(case, tmp_path):
    """The background copy starts before the rewrite; a failure after it stops the copy and
    leaves no output, no temp folder and no thread."""
    source = _exported(case, tmp_path / "export")
    with pytest.raises(AdapterError, match="exceeds max_rank"):
        extract_adapters(source, tmp_path / "pkg", max_rank=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert not [t for t in threading.enumerate() if t.name == "lora-onnx-copy"]


def test_clear_unreferenced(tmp_path):
    """Everything outside the given ranges reads as zeros afterwards, punched or zero-filled."""
    data = bytes(range(256)) * 64  # 16 KiB
    for punch in (True, False):
        path = tmp_path / f"f{punch}"
        path.write_bytes(data)
        tensors = [ir.ExternalTensor(path.name, offset=o, length=n, dtype=ir.DataType.UINT8, shape=ir.Shape([n]),
                                     name=f"t{o}", base_dir=tmp_path) for o, n in ((100, 50), (120, 10), (5000, 4096))]
        real = shared._punch
        try:
            if not punch:
                shared._punch = lambda fd, start, length: False
            cleared = shared.clear_unreferenced(path, tensors)
        finally:
            shared._punch = real
        got = path.read_bytes()
        want = bytearray(len(data))
        for o, n in ((100, 50), (5000, 4096)):
            want[o: o + n] = data[o: o + n]
        assert got == bytes(want) and cleared == len(data) - 50 - 4096, punch


def test_share_base_refusals(case, tmp_path):
    source = _exported(case, tmp_path / "export")
    with pytest.raises(PackageError, match="not the folder of the source's external data"):
        extract_adapters(source, tmp_path / "elsewhere", share_base=True)
    with pytest.raises(PackageError, match="would overwrite"):
        extract_adapters(source, source.parent, share_base=False)
    with pytest.raises(PackageError, match="share_base must be"):
        extract_adapters(source, tmp_path / "x", share_base="yes")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(source.parent / DATA, other / DATA)
    shutil.copy(source, other / "lora.onnx")
    (other / "model.onnx").write_bytes(b"not mine")
    with pytest.raises(PackageError, match="not part of a package"):
        extract_adapters(other / "lora.onnx", other)
    assert (other / "model.onnx").read_bytes() == b"not mine"
    assert not (other / "manifest.json").exists()
