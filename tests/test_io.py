"""Bad input: every broken file is one typed, one-line error; the CLI exits 2 without a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import onnx
import onnx_ir as ir
import pytest

import graph_builder as gb
from graph_tools import ExternalDataError, LoraOnnxError, ModelLoadError, cli, find_lora_sites

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "model" / "model.onnx"
    path.parent.mkdir()
    ir.save(gb.lora_variant("mul_after_b").model, path)
    return path


@pytest.fixture
def external(tmp_path) -> Path:
    """A model whose every initializer lives in ``model.onnx.data``."""
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    ir.save(gb.lora_variant("mul_after_b").model, path, external_data="model.onnx.data", size_threshold_bytes=0)
    return path


def _relocate(path: Path, location: str) -> None:
    """Point every external tensor of ``path`` at ``location`` (raw protobuf edit, test-only)."""
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(proto.SerializeToString())


def _subprocess(*args: str) -> subprocess.CompletedProcess:
    """The real command line, in its own process (exit code and streams as a user sees them)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "graph_tools.cli", *args], capture_output=True, text=True, env=env, timeout=120)


def _cli(*args: str) -> SimpleNamespace:
    """``cli.main`` in-process (fast): its exit code and what it wrote to stdout/stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def _fails(path, error: type[LoraOnnxError], *words: str) -> None:
    with pytest.raises(error) as info:
        find_lora_sites(path)
    message = str(info.value)
    assert "\n" not in message and message
    for word in words:
        assert word in message, message
    result = _cli("inspect", str(path))
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:"), result.stderr


def test_good_model_loads(good, external, tmp_path):
    assert len(find_lora_sites(good)) == 1
    assert len(find_lora_sites(external)) == 1
    for run in (_cli, _subprocess):
        result = run("inspect", str(external), "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["count"] == 1
    result = _subprocess("inspect", str(tmp_path / "nope.onnx"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:"), result.stderr


def test_missing_file(tmp_path):
    _fails(tmp_path / "nope.onnx", ModelLoadError, "nope.onnx")


def test_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 20)
    _fails(path, ModelLoadError, "notes.onnx")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    _fails(path, ModelLoadError, "empty.onnx")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_model(good, fraction):
    data = good.read_bytes()
    good.write_bytes(data[: int(len(data) * fraction)])
    _fails(good, ModelLoadError, "model.onnx")


def test_external_data_missing(external):
    (external.parent / "model.onnx.data").unlink()
    _fails(external, ExternalDataError, "model.onnx.data", "missing", str(external))  # names the model too


def test_external_data_truncated(external):
    data = external.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    _fails(external, ExternalDataError, "model.onnx.data", "truncated", str(external))


def test_external_data_escaping_with_dotdot(external):
    shutil.copy(external.parent / "model.onnx.data", external.parent.parent / "x.data")  # exists: refused anyway
    _relocate(external, "../x.data")
    _fails(external, ExternalDataError, "../x.data", "escapes", str(external))


def test_external_data_absolute_path(external, tmp_path):
    target = tmp_path / "elsewhere" / "x.data"
    target.parent.mkdir()
    shutil.copy(external.parent / "model.onnx.data", target)
    _relocate(external, str(target))
    _fails(external, ExternalDataError, "escapes")


def test_folder_without_model(tmp_path):
    _fails(tmp_path, ModelLoadError, "model.onnx")


def test_gc_paused_restores_the_collector():
    import gc

    from graph_tools._io import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with gc_paused():
            raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # the caller's choice stays
    finally:
        gc.enable()


def test_extraction_leaves_the_collector_on(tmp_path):
    import gc

    from graph_tools import NoLoraError, extract_adapters

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "dynamo_llama_two_adapters.onnx"
    extract_adapters(fixture, tmp_path / "pkg")
    assert gc.isenabled()
    plain = tmp_path / "plain.onnx"
    b = gb.GraphBuilder()
    y = b.op("Relu", b.input("X", [2], ir.DataType.FLOAT))
    y.name = "Y"
    ir.save(b.model(y), plain)
    with pytest.raises(NoLoraError):
        extract_adapters(plain, tmp_path / "none")
    assert gc.isenabled()
