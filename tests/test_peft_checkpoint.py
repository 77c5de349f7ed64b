"""Reading PEFT checkpoints: compared against live PEFT models saved with save_pretrained."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from peft import LoHaConfig, LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.numpy import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from graph_tools.adapters.peft_checkpoint import (
    CONFIG_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    peft_scale,
    read_peft_adapter,
)
from graph_tools.errors import AdapterError

PREFIX = "base_model.model."


def _llama(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).to(dtype)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.proj = nn.Linear(6, 4)

    def forward(self, x):
        return self.proj(self.conv(x).mean((2, 3)))


def _lora(**overrides) -> LoraConfig:
    options = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    options.update(overrides)
    return LoraConfig(**options)


def _live_sites(peft_model, adapter: str = "default") -> dict[str, dict]:
    """module path -> what the live PEFT layer holds for ``adapter``."""
    sites = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.scaling:
            continue
        if adapter in module.lora_A:
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        else:
            a, b = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
        sites[name.removeprefix(PREFIX)] = {
            "A": a.detach(), "B": b.detach(), "scale": module.scaling[adapter],
            "r": module.r[adapter], "alpha": module.lora_alpha[adapter],
        }
    return sites


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _assert_matches_live(adapter, peft_model, name: str = "default") -> None:
    live = _live_sites(peft_model, name)
    sites = adapter.sites()
    assert set(sites) == set(live)
    for module, site in sites.items():
        expected = live[module]
        assert site.scale == expected["scale"], module  # exactly PEFT's float
        assert site.rank == expected["r"] and site.alpha == expected["alpha"], module
        assert adapter.rank_of(module) == expected["r"] and adapter.alpha_of(module) == expected["alpha"]
        for got, want in ((site.lora_A, expected["A"]), (site.lora_B, expected["B"])):
            want = _to_numpy(want)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert got.tobytes() == want.tobytes(), module


# ----------------------------------------------------------------------- against live PEFT

PATTERNS = dict(
    # first matching key wins; keys are regexes anchored at a module-path boundary
    rank_pattern={r"model\.layers\.1\.self_attn\.(q|v)_proj": 2, "q_proj": 6, "embed_tokens": 3},
    alpha_pattern={"layers.0.self_attn.v_proj": 5, r"mlp\..*": 12},
)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_scales_and_tensors_match_live_peft(tmp_path, use_rslora, safe):
    config = _lora(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], use_rslora=use_rslora, **PATTERNS)
    peft_model = get_peft_model(_llama(), config)
    peft_model.save_pretrained(tmp_path, safe_serialization=safe)
    adapter = read_peft_adapter(tmp_path)
    assert adapter.weights_file.name == (SAFETENSORS_WEIGHTS_NAME if safe else WEIGHTS_NAME)
    _assert_matches_live(adapter, peft_model)
    sites = adapter.sites()
    # the patterns did something: several distinct ranks and scales
    assert {s.rank for s in sites.values()} == {2, 3, 4, 6}
    assert sites["model.embed_tokens"].kind == "embedding"
    assert sites["model.layers.0.mlp.down_proj"].kind == "linear"
    assert sites["model.layers.0.self_attn.q_proj"].a_key == f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
    # PEFT saved the embedding's base weight alongside; it is kept apart, not a site
    assert all(".base_layer." in key or key.endswith(".weight") for key in adapter.base_weights)


def test_conv_sites(tmp_path):
    peft_model = get_peft_model(_ConvNet(), _lora(target_modules=["conv", "proj"], alpha_pattern={"conv": 2}))
    peft_model.save_pretrained(tmp_path)
    adapter = read_peft_adapter(tmp_path)
    _assert_matches_live(adapter, peft_model)
    assert adapter.sites()["conv"].kind == "conv" and adapter.sites()["conv"].lora_A.shape == (4, 3, 3, 3)


def test_bfloat16_bin(tmp_path):
    peft_model = get_peft_model(_llama(torch.bfloat16), _lora(), autocast_adapter_dtype=False)
    peft_model.save_pretrained(tmp_path, safe_serialization=False)
    adapter = read_peft_adapter(tmp_path)
    assert {s.lora_A.dtype for s in adapter.sites().values()} == {np.dtype(ml_dtypes.bfloat16)}
    _assert_matches_live(adapter, peft_model)


def test_second_adapter_lives_in_a_subfolder(tmp_path):
    peft_model = get_peft_model(_llama(), _lora())
    peft_model.add_adapter("other", _lora(r=2, lora_alpha=3, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path)
    _assert_matches_live(read_peft_adapter(tmp_path), peft_model, "default")
    _assert_matches_live(read_peft_adapter(tmp_path / "other"), peft_model, "other")
    nested = tmp_path / "nested"
    nested.mkdir()
    (tmp_path / "other").rename(nested / "other")
    with pytest.raises(AdapterError, match="adapters found in subfolders: other"):
        read_peft_adapter(nested)


def test_scale_rule():
    assert peft_scale(8, 4, use_rslora=False) == 2.0
    assert peft_scale(8, 4, use_rslora=True) == 4.0


# ------------------------------------------------------------------------------- refusals


def _saved(tmp_path, config=None, model=None, safe=True):
    peft_model = get_peft_model(model if model is not None else _llama(), config or _lora())
    peft_model.save_pretrained(tmp_path, safe_serialization=safe)
    return tmp_path


def _edit_config(folder, **changes):
    path = folder / CONFIG_NAME
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_lora(use_dora=True), "use_dora=True is not supported"),
        (_lora(lora_bias=True), "lora_bias=True is not supported"),
        (LoHaConfig(r=4, target_modules=["q_proj"], init_weights=False), "peft_type 'LOHA' is not supported"),
        (_lora(modules_to_save=["lm_head"]), "modules_to_save=\\['lm_head'\\] is not supported"),
    ],
)
def test_unsupported_configs(tmp_path, config, message):
    folder = _saved(tmp_path, config)
    with pytest.raises(AdapterError, match=message) as info:
        read_peft_adapter(folder)
    assert str(info.value).startswith(str(folder / CONFIG_NAME))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"init_lora_weights": "pissa_niter_4"}, "modified base model"),
        ({"init_lora_weights": "loftq"}, "LoftQ-quantized copy of the base weights"),
        ({"r": 0}, "r must be a positive number"),
        ({"rank_pattern": {"q_proj": "x"}}, "rank_pattern must map patterns"),
        ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens=\\[1, 2\\] is not supported"),
    ],
)
def test_unsupported_config_values(tmp_path, changes, message):
    folder = _saved(tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(AdapterError, match=message):
        read_peft_adapter(folder)


def test_missing_files(tmp_path):
    with pytest.raises(AdapterError, match="no such PEFT adapter folder"):
        read_peft_adapter(tmp_path / "absent")
    with pytest.raises(AdapterError, match=f"no {CONFIG_NAME}"):
        read_peft_adapter(tmp_path)
    folder = _saved(tmp_path)
    (folder / SAFETENSORS_WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match=f"no {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}"):
        read_peft_adapter(folder)
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_peft_adapter(folder)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_truncated_weights(tmp_path, safe):
    folder = _saved(tmp_path, safe=safe)
    weights = folder / (SAFETENSORS_WEIGHTS_NAME if safe else WEIGHTS_NAME)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(AdapterError) as info:
        read_peft_adapter(folder)
    assert str(info.value).startswith(str(weights)) and "\n" not in str(info.value)


def test_bin_with_pickled_objects_is_refused(tmp_path):
    folder = _saved(tmp_path, safe=False)
    torch.save({"x": torch.zeros(2), "evil": _ConvNet()}, folder / WEIGHTS_NAME)
    with pytest.raises(AdapterError, match="not a readable tensor checkpoint"):
        read_peft_adapter(folder)


def _rewrite(folder, edit):
    path = folder / SAFETENSORS_WEIGHTS_NAME
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


KEY_A = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"


def test_nan_weights(tmp_path):
    folder = _saved(tmp_path)
    _rewrite(folder, lambda t: t[KEY_B].__setitem__((0, 0), np.nan))
    with pytest.raises(AdapterError, match=f"tensor '{KEY_B}' has 1 non-finite values"):
        read_peft_adapter(folder)


def test_rank_mismatch(tmp_path):
    folder = _saved(tmp_path)
    _rewrite(folder, lambda t: t.__setitem__(KEY_B, t[KEY_B][:, :3].copy()))
    with pytest.raises(AdapterError, match=f"tensor '{KEY_B}' has rank 3 but '{KEY_A}' has rank 4"):
        read_peft_adapter(folder)
    folder2 = _saved(tmp_path / "two")
    _edit_config(folder2, r=8)
    with pytest.raises(AdapterError, match="lora_A.weight' has rank 4 but the config gives r=8 for 'model.layers"):
        read_peft_adapter(folder2)


def test_unpaired_and_unknown_tensors(tmp_path):
    folder = _saved(tmp_path)
    _rewrite(folder, lambda t: t.pop(KEY_B))
    with pytest.raises(AdapterError, match=f"tensor '{KEY_A}' has no matching lora_B tensor"):
        read_peft_adapter(folder)
    folder2 = _saved(tmp_path / "two")
    magnitude = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    _rewrite(folder2, lambda t: t.__setitem__(magnitude, np.ones(16, np.float32)))
    with pytest.raises(AdapterError, match="lora_magnitude_vector' is not a LoRA weight"):
        read_peft_adapter(folder2)
