"""Bad input to the package tools: one clear line (a typed LoraOnnxError; the CLI exits 2 with no
traceback) and nothing half-written beside the output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import package_helpers as H
from graph_tools.adapters import files
from graph_tools.adapters.convert import convert_peft_adapter
from graph_tools.adapters.extract import extract_adapters
from graph_tools.adapters.load import load_package
from graph_tools.cli import main
from graph_tools.errors import AdapterError, LoraOnnxError, PackageError
from graph_tools.adapters.merge import merge_adapter
from graph_tools.runtime.session import AdapterSession

LORA_ONNX = shutil.which("lora-onnx", path=str(Path(sys.executable).parent)) or "lora-onnx"


@pytest.fixture(scope="module")
def case(zoo, tmp_path_factory):
    return H.get_case("llama", zoo, tmp_path_factory)


@pytest.fixture
def work(case, tmp_path):
    """A scratch folder with a copy of the inputs package and of the max_rank package, feeds as .npz."""
    H.copy_package(H.get_package(case, "inputs"), tmp_path / "pkg")
    H.copy_package(H.get_package(case, "max_rank"), tmp_path / "fixed")
    np.savez(tmp_path / "feeds.npz", **case.feeds)
    return tmp_path


def _peft_dir(folder: Path, package: Path, modules: dict[str, int], *, nan=False, bin=False, drop_b=False) -> Path:
    """A PEFT save_pretrained folder written by hand: ``{module: rank}`` with shapes from the package
    manifest (a module the package lacks gets [r, 32] / [32, r])."""
    slots = {(s.site, s.role): s for s in load_package(package).manifest.slots}
    folder.mkdir(parents=True)
    tensors, rng = {}, np.random.default_rng(0)
    for module, r in modules.items():
        a_spec, b_spec = slots.get((module, "lora_A")), slots.get((module, "lora_B"))
        in_f = a_spec.shape[1] if a_spec else 32
        out_f = b_spec.shape[0] if b_spec else 32
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = rng.standard_normal((r, in_f)).astype(np.float32)
        if not drop_b:
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((out_f, r)).astype(np.float32)
    if nan:
        next(iter(tensors.values()))[0, 0] = np.nan
    rank = next(iter(modules.values()))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
         "rank_pattern": {m: r for m, r in modules.items()}}))
    if bin:
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, folder / "adapter_model.bin")
    else:
        from safetensors.numpy import save_file

        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


Q = "model.layers.0.self_attn.q_proj"


def _break_adapter(package: Path, how: str) -> Path:
    path = package / "adapters" / "default.onnx_adapter"
    tensors = files.read_adapter(path)
    if how == "missing_b":
        del tensors[f"base_model.model.{Q}.lora_B.weight"]
        files.write_adapter(path, tensors)
    elif how == "missing_module":
        for suffix in ("lora_A.weight", "lora_B.weight", "lora_scale"):
            del tensors[f"base_model.model.{Q}.{suffix}"]
        files.write_adapter(path, tensors)
    elif how == "nan":  # written with ORT directly: our writer refuses NaN
        import onnxruntime as ort

        tensors[f"base_model.model.{Q}.lora_A.weight"][0, 0] = np.nan
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
        fmt.export_adapter(str(path))
    elif how == "corrupt":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3] + b"\x00garbage" * 10)
    elif how == "extra":
        tensors["not_a_slot"] = np.zeros((1,), np.float32)
        files.write_adapter(path, tensors)
    elif how == "bad_rank":
        tensors[f"base_model.model.{Q}.lora_scale"] = np.ones((3,), np.float32)
        files.write_adapter(path, tensors)
    return path


def _one_line_error(excinfo) -> str:
    text = str(excinfo.value)
    assert isinstance(excinfo.value, LoraOnnxError)
    assert text and "\n" not in text and "Traceback" not in text
    return text


def _cli(argv, capsys) -> str:
    """Run the CLI in-process; it must exit 2 with one 'error:' line and no traceback."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


# -- wrong package ---------------------------------------------------------------------------------
def test_wrong_package_folder(case, work, capsys):
    before = H.tree(work)
    with pytest.raises(PackageError) as e:
        AdapterSession(work / "missing")
    assert "not a package folder" in _one_line_error(e)
    with pytest.raises(PackageError) as e:  # a folder without model.onnx
        AdapterSession(work)
    assert "no model.onnx" in _one_line_error(e)
    nomanifest = H.copy_package(work / "pkg", work / "nomanifest")
    (nomanifest / "manifest.json").unlink()
    with pytest.raises(PackageError) as e:  # a model.onnx but no manifest
        AdapterSession(nomanifest)
    assert "no manifest" in _one_line_error(e)
    # a manifest that belongs to another package's graph
    shutil.copy(H.get_package(case, "max_rank") / "manifest.json", work / "pkg" / "manifest.json")
    before = H.tree(work)
    with pytest.raises(PackageError) as e:
        AdapterSession(work / "pkg")
    assert "does not match" in _one_line_error(e)
    with pytest.raises(PackageError):
        merge_adapter(work / "pkg", "default", work / "merged" / "model.onnx")
    assert "does not match" in _cli(["run", work / "pkg", "--feeds", work / "feeds.npz"], capsys)
    assert "not a package folder" in _cli(["convert", work, "--package", work / "missing"], capsys)
    assert "not a package folder" in _cli(["merge", work / "missing", "--adapter", "default", "-o", work / "m.onnx"], capsys)
    assert H.tree(work) == before


# -- rank ------------------------------------------------------------------------------------------
def test_rank_above_max_rank(case, work, capsys):
    before = H.tree(work)
    with pytest.raises(AdapterError) as e:
        extract_adapters(case.export, work / "out", max_rank=3)
    assert "rank 4 exceeds max_rank 3" in _one_line_error(e)
    assert "exceeds max_rank 3" in _cli(["extract", case.export, "-o", work / "out", "--max-rank", 3, "-q"], capsys)
    # a PEFT adapter of rank 10 into the rank-8 package
    peft = _peft_dir(work / "peft_r10", work / "fixed", {Q: 10})
    before = H.tree(work)
    manifest = (work / "fixed" / "manifest.json").read_text()
    with pytest.raises(AdapterError) as e:
        convert_peft_adapter(peft, work / "fixed")
    assert "rank 10 exceeds the package's fixed rank 8" in _one_line_error(e)
    assert "fixed rank 8" in _cli(["convert", peft, "--package", work / "fixed"], capsys)
    assert (work / "fixed" / "manifest.json").read_text() == manifest
    assert H.tree(work) == before


def test_inconsistent_rank_in_adapter_file(work):
    _break_adapter(work / "pkg", "bad_rank")
    with pytest.raises(AdapterError) as e:
        AdapterSession(work / "pkg")
    assert "rank differs" in _one_line_error(e) and Q in str(e.value)


# -- adapter files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("how,expected", [
    ("missing_b", "missing tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight'"),
    ("missing_module", "missing tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'"),
    ("nan", "non-finite"),
    ("corrupt", "not a valid onnx_adapter file"),
    ("extra", "'not_a_slot' is not a slot"),
])
def test_broken_adapter_file(case, work, how, expected, capsys):
    path = _break_adapter(work / "pkg", how)
    before = H.tree(work)
    with pytest.raises(AdapterError) as e:
        AdapterSession(work / "pkg")
    text = _one_line_error(e)
    assert expected in text and str(path) in text
    with pytest.raises(AdapterError) as e:  # merge refuses it as well, writing nothing
        merge_adapter(work / "pkg", "default", work / "merged" / "model.onnx")
    assert expected in _one_line_error(e)
    good = AdapterSession(H.get_package(case, "inputs"))
    if how == "missing_module":  # a file the manifest does not list may adapt fewer modules
        good.load_adapter("fewer", path)
    else:  # load_adapter into a good session refuses it too
        with pytest.raises(AdapterError) as e:
            good.load_adapter("broken", path)
        assert expected in _one_line_error(e)
    assert expected in _cli(["run", work / "pkg", "--adapter", "second", "--feeds", work / "feeds.npz", "-o", work / "o.npz"], capsys)
    assert H.tree(work) == before


def test_broken_packed_adapter_file(case, tmp_path):
    package = H.copy_package(H.get_package(case, "pack"), tmp_path / "pkg")
    path = package / "adapters" / "default.onnx_adapter"
    tensors = files.read_adapter(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name][:1]  # one member short
    files.write_adapter(path, tensors)
    with pytest.raises(AdapterError) as e:
        AdapterSession(package)
    assert f"tensor {name!r} has shape" in _one_line_error(e)
    del tensors[name]
    files.write_adapter(path, tensors)
    with pytest.raises(AdapterError) as e:
        AdapterSession(package)
    assert f"missing tensor {name!r}" in _one_line_error(e)


# -- names -----------------------------------------------------------------------------------------
def test_unknown_adapter_name(case, work, capsys):
    session = AdapterSession(work / "pkg")
    before = H.tree(work)
    with pytest.raises(AdapterError) as e:
        session.run(None, case.feeds, adapter="nope")
    assert "unknown adapter 'nope'" in _one_line_error(e)
    with pytest.raises(AdapterError) as e:
        merge_adapter(work / "pkg", "nope", work / "merged" / "model.onnx")
    assert "unknown adapter 'nope'" in _one_line_error(e)
    assert "unknown adapter 'nope'" in _cli(["run", work / "pkg", "--adapter", "nope", "--feeds", work / "feeds.npz"], capsys)
    assert "unknown adapter 'nope'" in _cli(["run", work / "pkg", "--adapter", "default=1", "--adapter", "nope=0.5",
                                            "--feeds", work / "feeds.npz"], capsys)
    assert "unknown adapter 'nope'" in _cli(["merge", work / "pkg", "--adapter", "nope", "-o", work / "m" / "model.onnx"], capsys)
    assert H.tree(work) == before


def test_wrong_feed_names(case, work, capsys):
    session = AdapterSession(work / "pkg")
    feeds = dict(case.feeds)
    feeds["input_idz"] = feeds.pop("input_ids")
    with pytest.raises(LoraOnnxError) as e:
        session.run(None, feeds, adapter="default")
    assert "feed 'input_idz' is not a model input" in _one_line_error(e)
    with pytest.raises(LoraOnnxError) as e:
        session.run(None, {k: v for k, v in case.feeds.items() if k != "attention_mask"})
    assert "missing feed 'attention_mask'" in _one_line_error(e)
    slot = load_package(work / "pkg").manifest.slots[0].name
    with pytest.raises(LoraOnnxError) as e:
        session.run(None, {**case.feeds, slot: np.zeros((0, 32), np.float32)})
    assert "is an adapter slot" in _one_line_error(e)
    with pytest.raises(LoraOnnxError) as e:  # right name, wrong dtype: refused before ORT runs, one line
        session.run(None, {**case.feeds, "input_ids": case.feeds["input_ids"].astype(np.float32)})
    assert "feed 'input_ids' has dtype float32, the model expects int64" in _one_line_error(e)
    external = AdapterSession(H.get_package(case, "external"))
    with pytest.raises(LoraOnnxError) as e:
        external.run(None, feeds, adapter="default")
    assert "feed 'input_idz' is not a model input" in _one_line_error(e)
    np.savez(work / "bad_feeds.npz", **feeds)
    before = H.tree(work)
    assert "input_idz" in _cli(["run", work / "pkg", "--adapter", "default", "--feeds", work / "bad_feeds.npz",
                               "-o", work / "out.npz"], capsys)
    np.save(work / "plain.npy", case.feeds["input_ids"])
    assert "cannot read feeds" in _cli(["run", work / "pkg", "--feeds", work / "plain.npy"], capsys)
    assert "cannot read feeds" in _cli(["run", work / "pkg", "--feeds", work / "nope.npz"], capsys)
    assert "must be a number" in _cli(["run", work / "pkg", "--adapter", "default=x", "--feeds", work / "feeds.npz"], capsys)
    assert H.tree(work) - before == {"plain.npy"}


# -- PEFT checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize("how,expected", [
    ("missing_module", "has no slot in the package"),
    ("nan", "non-finite"),
    ("nan_bin", "non-finite"),
    ("missing_b", "has no matching lora_B tensor"),
    ("corrupt", "not a valid safetensors file"),
    ("no_config", "not a PEFT adapter folder"),
])
def test_bad_peft_checkpoint(work, how, expected, capsys):
    modules = {Q: 2, "model.layers.0.self_attn.o_proj": 2} if how == "missing_module" else {Q: 2}
    peft = _peft_dir(work / "peft", work / "pkg", modules, nan=how.startswith("nan"), bin=how == "nan_bin",
                     drop_b=how == "missing_b")
    if how == "corrupt":
        (peft / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    if how == "no_config":
        (peft / "adapter_config.json").unlink()
    before = H.tree(work)
    manifest = (work / "pkg" / "manifest.json").read_text()
    with pytest.raises(AdapterError) as e:
        convert_peft_adapter(peft, work / "pkg")
    assert expected in _one_line_error(e)
    assert expected in _cli(["convert", peft, "--package", work / "pkg", "--name", "x"], capsys)
    assert H.tree(work) == before
    assert (work / "pkg" / "manifest.json").read_text() == manifest


def test_good_hand_written_checkpoint_converts(case, work):
    """The hand-written checkpoints above are valid apart from the one fault (the tests would be blind otherwise)."""
    peft = _peft_dir(work / "peft", work / "pkg", {Q: 2}, bin=True)
    path = convert_peft_adapter(peft, work / "pkg", name="hand")
    assert path.name == "hand.onnx_adapter"
    session = AdapterSession(work / "pkg")
    assert "hand" in session.adapters
    assert not np.array_equal(session.run(None, case.feeds, adapter="hand")[0], session.run(None, case.feeds)[0])


# -- the real entry point ----------------------------------------------------------------------------
@pytest.mark.parametrize("argv,expected", [
    (["run", "{pkg}", "--adapter", "nope", "--feeds", "{feeds}"], "unknown adapter 'nope'"),
    (["extract", "{export}", "-o", "{out}", "--max-rank", "1"], "exceeds max_rank 1"),
    (["merge", "{missing}", "--adapter", "default", "-o", "{out}/m.onnx"], "not a package folder"),
])
def test_cli_subprocess_exit_2_one_line(case, work, argv, expected):
    values = {"pkg": work / "pkg", "feeds": work / "feeds.npz", "export": case.export, "out": work / "out",
              "missing": work / "missing"}
    before = H.tree(work)
    proc = subprocess.run([LORA_ONNX, *[a.format(**values) for a in argv]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith(("extracting", "merging"))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert H.tree(work) == before
