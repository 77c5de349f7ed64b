"""The real ``lora-onnx`` console script, as pip generates it from ``[project.scripts]``, and
``python -m graph_tools.cli``: both end with ``os._exit`` (no interpreter teardown), so these
check in a subprocess that nothing is lost: the package is complete, stdout (a pipe, so block
buffered) arrives whole, the exit codes stay 0 and 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import onnx_ir as ir
import pytest

from graph_tools.adapters.load import load_package

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "dynamo_llama_two_adapters.onnx"


def _script_target() -> tuple[str, str]:
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["lora-onnx"]
    module, _, func = target.partition(":")
    return module, func


def _run(how: str, *argv) -> subprocess.CompletedProcess:
    if how == "script":  # what pip's generated script does
        module, func = _script_target()
        cmd = [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]
    else:
        cmd = [sys.executable, "-m", "graph_tools.cli"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("PYTHONUNBUFFERED", None)  # stdout to a pipe is block buffered: only the flush brings it
    return subprocess.run(cmd + [str(a) for a in argv], capture_output=True, text=True, env=env, timeout=300)


def test_console_script_is_the_exiting_entry():
    assert _script_target() == ("graph_tools.cli", "entry")


@pytest.mark.parametrize("how", ["script", "module"])
def test_entry_writes_a_complete_shared_package(tmp_path, how):
    export = tmp_path / "export"
    export.mkdir()
    ir.save(ir.load(FIXTURE), export / "model.onnx", external_data="model.onnx.data")
    proc = _run(how, "extract", export / "model.onnx", "-o", export)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("extracting adapters from")
    assert lines[1].startswith(f"package {export}: mode=inputs")
    package = load_package(export)  # manifest valid, shared base file as recorded
    names = sorted(a.name for a in package.manifest.adapters)
    assert len(names) == 2
    assert sum(ln.startswith("  adapter ") for ln in lines) == 2  # the last line too
    for a in package.manifest.adapters:
        assert (export / a.file).stat().st_size > 0
    assert json.loads((export / "manifest.json").read_text())["extra"]["shared_base"]
    assert (export / "source.onnx").is_file()
    assert not [p for p in export.iterdir() if p.name.startswith(".")]  # no temp folder left
    ir.load(export / "model.onnx")  # the package graph is whole


@pytest.mark.parametrize("how", ["script", "module"])
def test_entry_error_is_one_line_exit_2(tmp_path, how):
    proc = _run(how, "extract", tmp_path / "missing.onnx", "-o", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists()
