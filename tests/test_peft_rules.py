"""PEFT rules we copied, compared with peft's own objects so they cannot drift (needs [export]).

graph_tools reads PEFT checkpoints and names slots without importing peft (seconds of torch and
transformers import; graph work runs without torch). What it copies from peft:

- adapters/peft_checkpoint.py: ``get_pattern_key`` (rank_pattern/alpha_pattern key match), the
  LoraConfig fields tagged ``is_lora_variant``, the options we refuse, the ``init_lora_weights``
  values after which an adapter belongs to a modified base, ``EMBEDDING_LAYER_NAMES``, PEFT's
  ``scaling`` (``lora_alpha / r``, rsLoRA ``/ sqrt(r)``) and the saved key layout;
- lora/naming.py + passes/slots.py: PEFT's parameter names (``<module>.lora_A.<adapter>.weight``)
  and the keys ``get_peft_model_state_dict`` writes (slot names).
Each test builds the PEFT object and compares; a peft upgrade that changes a rule fails here.
"""

from __future__ import annotations

import dataclasses
import sys
import typing

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from peft.utils.constants import EMBEDDING_LAYER_NAMES
from peft.utils.other import get_pattern_key

from graph_tools.adapters import peft_checkpoint as pc
from graph_tools.lora import naming
from graph_tools.passes.slots import slot_names

LORA_FIELDS = {f.name: f for f in dataclasses.fields(LoraConfig)}
#: every init_lora_weights value PEFT offers -> whether convert refuses it (the adapter was trained
#: against a base PEFT rewrote: PiSSA, OLoRA and CorDA subtract their init from the base weight,
#: LoftQ replaces it by a quantized copy)
INIT_REFUSED = {"gaussian": False, "eva": False, "olora": True, "pissa": True, "pissa_niter_[number of iters]": True,
                "corda": True, "loftq": True, "orthogonal": False, "mica": False}


def _hide_peft(monkeypatch):
    """peft_checkpoint's copies in force: peft hidden from sys.modules (monkeypatch puts it back)
    and the cached choice between peft's function and the copy cleared (again at teardown)."""
    for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
        monkeypatch.delitem(sys.modules, name)
    pc._get_pattern_key.cache_clear()
    pc._variant_fields.cache_clear()


@pytest.fixture
def copies(monkeypatch):
    """Run the test with peft's functions out of reach; call ``copies()`` once the test is done
    with peft (building and saving models imports parts of it)."""
    yield lambda: (_hide_peft(monkeypatch), pc)[1]
    pc._get_pattern_key.cache_clear()
    pc._variant_fields.cache_clear()


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(10, 8)
        self.lin = torch.nn.Linear(8, 6)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 6) for _ in range(3)])


def _peft_model(**config):
    torch.manual_seed(0)
    defaults = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lin", "conv", "0", "1", "2"], init_lora_weights=False)
    return get_peft_model(_Net(), LoraConfig(**(defaults | config)))


def _lora_layers(model):
    return {naming.strip_peft_prefix(n): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_variant_fields_are_peft_is_lora_variant(copies):
    assert copies()._variant_fields() == pc._VARIANT_FIELDS
    assert pc._VARIANT_FIELDS == tuple(n for n, f in LORA_FIELDS.items() if f.metadata.get("is_lora_variant"))


def test_refused_options_are_lora_config_fields():
    assert set(pc._UNSUPPORTED) <= set(LORA_FIELDS)


def test_every_init_lora_weights_value_is_classified():
    hint = typing.get_type_hints(LoraConfig)["init_lora_weights"]
    offered = {a for a in typing.get_args(hint) if typing.get_origin(a) is typing.Literal}
    values = {v for lit in offered for v in typing.get_args(lit)}
    assert values == set(INIT_REFUSED), "PEFT changed init_lora_weights: classify the new values (in _init_refusal)"
    for value, refused in INIT_REFUSED.items():
        sample = value.replace("[number of iters]", "16")
        assert (pc._init_refusal(sample) is not None) is refused, value


def test_embedding_layer_names(copies):
    assert tuple(copies()._embedding_layer_names()) == tuple(EMBEDDING_LAYER_NAMES)


def test_pattern_key_copy_matches_peft(copies):
    ours = copies()._get_pattern_key()
    assert ours is not get_pattern_key  # the copy is what runs without peft
    patterns = ["q_proj", "layers.0.self_attn.v_proj", r"model\.layers\.1\..*", "k_proj|v_proj", "proj", "^lm_head"]
    keys = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj",
            "model.layers.2.self_attn.k_proj", "model.layers.3.self_attn.o_proj", "lm_head", "xq_proj", "q_proj"]
    for order in (patterns, patterns[::-1]):  # first match wins, in the config's order
        for key in keys:
            assert ours(order, key) == get_pattern_key(order, key), (order, key)


@pytest.mark.parametrize("rslora", [False, True])
def test_checkpoint_ranks_alphas_scales_are_peft_s(copies, tmp_path, rslora):
    """A saved PEFT adapter read with the copies gives each layer PEFT's own r, alpha, scaling."""
    model = _peft_model(rank_pattern={"layers.1": 2, r"layers\.2": 3}, alpha_pattern={"lin": 3, "conv": 5},
                        use_rslora=rslora)
    layers = _lora_layers(model)
    model.save_pretrained(tmp_path)
    adapter = copies().read_peft_adapter(tmp_path)
    assert "peft" not in sys.modules
    assert set(adapter.sites()) == set(layers)
    for module, site in adapter.sites().items():
        layer = layers[module]
        assert site.rank == layer.r["default"], module
        assert site.alpha == layer.lora_alpha["default"], module
        assert site.scale == pytest.approx(layer.scaling["default"], rel=1e-12), module
    assert {m: s.kind for m, s in adapter.sites().items()} == {
        "embed_tokens": "embedding", "lin": "linear", "conv": "conv", "layers.0": "linear", "layers.1": "linear",
        "layers.2": "linear"}


def test_saved_keys_are_slot_names_and_parse_back():
    model = _peft_model()
    kinds = {"embed_tokens": "embedding", "conv": "conv"}
    saved = set(get_peft_model_state_dict(model))
    ours = {name for module in _lora_layers(model) for name in slot_names(module, kinds.get(module, "linear"))[:2]}
    assert ours == saved  # slots carry exactly the keys PEFT writes, so a checkpoint maps by name
    for key in saved:
        match = pc._LORA_KEY.match(key)
        assert match and pc._strip_prefix(match.group("module")) in _lora_layers(model), key


def test_parameter_names_parse_to_module_adapter_role():
    model = _peft_model()
    model.add_adapter("second", LoraConfig(r=2, target_modules=["lin"]))
    found = set()
    for name, _ in model.named_parameters():
        parsed = naming.parse_lora_weight_name(name)
        if "lora_" in name:
            assert parsed is not None, name
            module, adapter, role = parsed
            assert name == f"{naming.PEFT_PREFIX}{module}.{role}.{adapter}" + ("" if "embedding" in role else ".weight")
            found.add((module, adapter))
        else:
            assert parsed is None, name
            assert naming.module_from_base_weight(name) in ({*_lora_layers(model)} | {None}) or not name.endswith(".base_layer.weight")
    assert ("lin", "second") in found and ("embed_tokens", "default") in found and len(found) == 7
