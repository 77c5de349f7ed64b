"""lora/naming.py: how PEFT's names are read back (module, adapter, role), on the name forms the
exporters and PEFT write: state-dict parameters, saved keys, torch.onnx name scopes, base weights.
(peft's own names are compared in tests/test_peft_rules.py.)"""

from __future__ import annotations

import pytest

from graph_tools.lora.naming import (
    PEFT_PREFIX,
    module_from_base_weight,
    parse_lora_weight_name,
    parse_scope,
    strip_peft_prefix,
)

Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "name, expected",
    [
        (f"{PEFT_PREFIX}{Q}.lora_A.default.weight", (Q, "default", "lora_A")),
        (f"{PEFT_PREFIX}{Q}.lora_B.french.weight", (Q, "french", "lora_B")),
        (f"{Q}.lora_A.default.weight", (Q, "default", "lora_A")),  # prefix already gone
        (f"{PEFT_PREFIX}model.embed_tokens.lora_embedding_A.default", ("model.embed_tokens", "default", "lora_embedding_A")),
        (f"{PEFT_PREFIX}model.embed_tokens.lora_embedding_B.x2", ("model.embed_tokens", "x2", "lora_embedding_B")),
        (f"{Q}.lora_scale.default", (Q, "default", "lora_scale")),  # the exporter's per-site scale
        (f"{PEFT_PREFIX}{PEFT_PREFIX}{Q}.lora_A.default.weight", (Q, "default", "lora_A")),  # nested wrappers
        ("conv.lora_A.default.weight", ("conv", "default", "lora_A")),
    ],
)
def test_lora_weight_names_parse(name, expected):
    assert parse_lora_weight_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        f"{PEFT_PREFIX}{Q}.base_layer.weight",  # the base weight
        f"{PEFT_PREFIX}{Q}.weight",
        "lora_A.default.weight",  # no module
        f"{Q}.lora_A.a.b.weight",  # adapter names hold no dots
        f"{Q}.lora_C.default.weight",
        f"{Q}.lora_A.default.bias",  # lora_bias: not a LoRA weight we carry
        f"{Q}.lora_A",
        "",
    ],
)
def test_other_names_do_not(name):
    assert parse_lora_weight_name(name) is None


def test_strip_prefix_strips_every_leading_wrapper_and_only_those():
    assert strip_peft_prefix(f"{PEFT_PREFIX}{PEFT_PREFIX}{Q}") == Q
    assert strip_peft_prefix(Q) == Q
    assert strip_peft_prefix(f"x.{PEFT_PREFIX}{Q}") == f"x.{PEFT_PREFIX}{Q}"  # not a prefix there


@pytest.mark.parametrize(
    "scope, expected",
    [
        (f"peft_model.{PEFT_PREFIX}{Q}.lora_A.default", (Q, "default")),  # torch.onnx scope under our wrapper
        (f"{PEFT_PREFIX}{Q}.lora_B.second", (Q, "second")),
        (f"{Q}.lora_embedding_A.default", (Q, "default")),
        (f"{Q}.lora_A.default.weight", None),  # a weight, not a scope
        (f"{Q}.base_layer", None),
        (Q, None),
    ],
)
def test_scopes_parse(scope, expected):
    assert parse_scope(scope) == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        (f"{PEFT_PREFIX}{Q}.base_layer.weight", Q),
        (f"{Q}.base_layer.weight", Q),
        ("lm_head.weight", "lm_head"),
        (f"{PEFT_PREFIX}model.embed_tokens.weight", "model.embed_tokens"),
        (".weight", None),
        ("weight", None),
        (f"{Q}.bias", None),
    ],
)
def test_module_from_base_weight(name, expected):
    assert module_from_base_weight(name) == expected
