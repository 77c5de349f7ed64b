"""convert_peft_adapter: an adapter trained and saved by PEFT *after* export becomes an adapter file
of the existing package (no re-export) and runs like PEFT, in every package mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig

import models
import package_helpers as H
from graph_tools.adapters import files
from graph_tools.adapters.convert import convert_peft_adapter
from graph_tools.adapters.load import load_package
from graph_tools.errors import AdapterError
from graph_tools.runtime.session import AdapterSession


@pytest.fixture(scope="module")
def case(zoo, tmp_path_factory):
    return H.get_case("llama", zoo, tmp_path_factory)


@pytest.fixture(scope="module")
def trained(case, tmp_path_factory):
    """A fresh copy of the exported model (same seeds) plus adapters added after export:
    ``trained`` (rank_pattern, a few SGD steps) and ``rs`` (rsLoRA, alpha_pattern), each saved
    with ``save_pretrained`` (safetensors and .bin)."""
    model, inputs = models.ZOO[H.ZOO_NAME["llama"]]()
    # same weights as the exported model
    np.testing.assert_allclose(H.peft_outputs(model, case.torch_feeds, "default")["logits"], case.ref("default")["logits"], atol=1e-6)
    model.add_adapter("trained", LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "k_proj", "v_proj"],
                                            rank_pattern={"k_proj": 2}, lora_dropout=0.0, init_lora_weights=False))
    model.add_adapter("rs", LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                       alpha_pattern={"v_proj": 7}, lora_dropout=0.0, init_lora_weights=False))
    model.set_adapter("trained")
    model.train()
    params = [p for n, p in model.named_parameters() if ".trained." in n]
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.SGD(params, lr=0.5)
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        opt.zero_grad()
        model(**inputs).logits.pow(2).mean().backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
    model.eval()
    with torch.no_grad():  # rsLoRA adapter: random non-zero weights
        g = torch.Generator().manual_seed(99)
        for n, p in model.named_parameters():
            if ".rs." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    root = tmp_path_factory.mktemp("peft_ckpt")
    model.save_pretrained(root / "st", selected_adapters=["trained", "rs"])
    model.save_pretrained(root / "bin", selected_adapters=["trained"], safe_serialization=False)
    dirs = {"trained": root / "st" / "trained", "rs": root / "st" / "rs", "bin": root / "bin" / "trained"}
    assert (dirs["trained"] / "adapter_model.safetensors").is_file() and (dirs["bin"] / "adapter_model.bin").is_file()
    return model, dirs


def _ref(model, case, choice):
    return H.peft_outputs(model, case.torch_feeds, choice)


@pytest.mark.parametrize("mode", list(H.MODES))
def test_converted_adapter_matches_peft(case, trained, mode, tmp_path):
    model, dirs = trained
    package = H.copy_package(H.get_package(case, mode), tmp_path / "pkg")
    before = json.loads((package / "manifest.json").read_text())
    path = convert_peft_adapter(dirs["trained"], package)  # name: the folder's name
    man = load_package(package).manifest
    fmt = "safetensors" if mode == "safetensors" else "onnx_adapter"
    assert path == package / "adapters" / f"trained{files.ADAPTER_SUFFIX[fmt]}"
    spec = man.adapter("trained")
    assert spec.format == fmt and spec.rank["model.layers.0.self_attn.k_proj"] == 2 and spec.source.endswith("trained")
    assert [a["name"] for a in before["adapters"]] + ["trained"] == [a.name for a in man.adapters]
    assert man.graph_fingerprint == before["graph_fingerprint"] and len(man.slots) == len(before["slots"])
    # the file holds exactly the names the graph takes (slots, or packs)
    packs = (man.extra or {}).get("packs") or []
    wanted = sorted(p["name"] for p in packs) if packs else sorted(s.name for s in man.slots)
    assert sorted(files.read_adapter(path)) == wanted

    session = AdapterSession(package)  # a session created after conversion sees it
    names = [o.name for o in session.get_outputs()]
    err = H.max_error(names, session.run(None, case.feeds, adapter="trained"), _ref(model, case, "trained"))
    print(f"ERR convert {mode:12s} trained {err:.2e}")
    assert err <= H.TOL
    # the extracted adapters are unchanged
    assert H.max_error(names, session.run(None, case.feeds, adapter="second"), case.ref("second")) <= H.TOL
    both = {"default": 1.0, "trained": 1.0}
    if mode in ("pack", "external"):  # fixed rank sized for the extracted adapters: 4 + 3 > 6 on q_proj
        with pytest.raises(AdapterError, match="exceeds the package's fixed rank"):
            session.run(None, case.feeds, adapter=both)
    else:
        assert H.max_error(names, session.run(None, case.feeds, adapter=both), _ref(model, case, both)) <= H.TOL


def test_load_converted_adapter_into_running_session(case, trained, tmp_path):
    model, dirs = trained
    package = H.copy_package(H.get_package(case, "inputs"), tmp_path / "pkg")
    session = AdapterSession(package)
    path = convert_peft_adapter(dirs["bin"], package, name="from_bin")  # .bin read without pickle
    session.load_adapter("from_bin", path)
    names = [o.name for o in session.get_outputs()]
    assert H.max_error(names, session.run(None, case.feeds, adapter="from_bin"), _ref(model, case, "trained")) <= H.TOL
    # plain onnxruntime reads the converted file too
    import onnxruntime as ort

    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    plain = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    got = plain.run(None, case.feeds, options)
    assert H.max_error(names, got, _ref(model, case, "trained")) <= H.TOL


@pytest.mark.parametrize("mode", ["inputs", "max_rank"])
def test_rslora_and_alpha_pattern_scale(case, trained, mode, tmp_path):
    model, dirs = trained
    package = H.copy_package(H.get_package(case, mode), tmp_path / "pkg")
    convert_peft_adapter(dirs["rs"], package)
    spec = load_package(package).manifest.adapter("rs")
    assert spec.scale["model.layers.0.self_attn.q_proj"] == pytest.approx(3 / np.sqrt(2))
    assert spec.scale["model.layers.0.self_attn.v_proj"] == pytest.approx(7 / np.sqrt(2))
    session = AdapterSession(package)
    names = [o.name for o in session.get_outputs()]
    assert H.max_error(names, session.run(None, case.feeds, adapter="rs"), _ref(model, case, "rs")) <= H.TOL
    choice = {"rs": 0.5, "second": 1.0}
    assert H.max_error(names, session.run(None, case.feeds, adapter=choice), _ref(model, case, choice)) <= H.TOL
