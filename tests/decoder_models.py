"""Tiny PEFT causal LMs (one per decoder family) for KV-cache export and generation tests.

``causal_lm(family)`` returns a ``peft.PeftModel`` in eval mode with two adapters, ``default``
and ``second`` (other ranks and targets), every LoRA weight random (``init_lora_weights=False``).
Built from transformers config classes: no download, a few KB of weights, fixed seeds.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

__all__ = ["FAMILIES", "VOCAB", "causal_lm", "export_kv", "reference_step", "save_hf_folders"]

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, attn_implementation="eager", use_cache=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# family -> (config class name, config kwargs, targets of "default", targets of "second")
_SPECS = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=48),
              ["q_proj", "v_proj", "o_proj", "down_proj"], ["q_proj", "k_proj", "up_proj"]),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=48, sliding_window=None),
                ["q_proj", "v_proj"], ["k_proj", "gate_proj"]),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=48),
              ["q_proj", "k_proj", "v_proj"], ["v_proj", "o_proj"]),
    "phi3": ("Phi3Config", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=48, original_max_position_embeddings=48,
                                resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
             ["qkv_proj", "gate_up_proj"], ["qkv_proj", "o_proj", "down_proj"]),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=1, n_head=4, n_inner=48, n_positions=48, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0),
             ["c_attn", "c_proj"], ["c_attn", "c_fc"]),
}
FAMILIES = tuple(_SPECS)


def _base(family: str, seed: int, **overrides):
    import transformers

    config_name, kwargs, _, _ = _SPECS[family]
    config = getattr(transformers, config_name)(**_COMMON, **{**kwargs, **overrides})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def save_hf_folders(family: str, root, *, seed: int = 4321, lora_scale: float = 0.1):
    """What a user has on disk: the base model saved with ``save_pretrained`` in ``root/base`` and
    two PEFT adapters (``default``'s and ``second``'s configs of :func:`causal_lm`, random weights
    of trained-adapter size) saved with PEFT's ``save_pretrained`` in ``root/a`` and ``root/b``.
    Returns ``(base_dir, {"a": dir, "b": dir})``."""
    from pathlib import Path

    import transformers

    root = Path(root)
    _, _, first, second = _SPECS[family]
    _base(family, seed).save_pretrained(root / "base")
    lora = dict(lora_dropout=0.0, init_lora_weights=False, fan_in_fan_out=family == "gpt2")
    folders = {}
    for k, (name, cfg) in enumerate({"a": LoraConfig(r=4, lora_alpha=8, target_modules=first, **lora),
                                     "b": LoraConfig(r=2, lora_alpha=6, target_modules=second, **lora)}.items()):
        model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(root / "base"), cfg)
        g = torch.Generator().manual_seed(seed + 10 + k)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if ".lora_" in pname:
                    param.copy_(torch.randn(param.shape, generator=g) * (1.0 if "lora_A" in pname else lora_scale))
        model.save_pretrained(root / name)
        folders[name] = root / name
    return root / "base", folders


def causal_lm(family: str, seed: int = 4321, **config):
    """``config``: config fields to override (``sliding_window=4`` ...)."""
    _, _, first, second = _SPECS[family]
    base = _base(family, seed, **config)
    conv1d = family == "gpt2"
    lora = dict(lora_dropout=0.0, init_lora_weights=False, fan_in_fan_out=conv1d)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=first, **lora))
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=second, **lora))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.4)
    return model.eval()


def export_kv(model, path):
    """``export_peft(model, ..., with_past=True)`` with the example prompt every KV test uses (the
    committed ``fixtures/kv_<family>.onnx`` are made by this too)."""
    from exporters import export_peft

    example = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.int64)}
    return export_peft(model, example, path, with_past=True)


def reference_step(model, input_ids, attention_mask, past=None):
    """PyTorch logits and presents (list of (key, value)) for one step with Hugging Face positions."""
    from transformers.cache_utils import DynamicCache

    past_len = 0 if past is None else past[0][0].shape[2]
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, past_len:]
    cache = DynamicCache(ddp_cache_data=past) if past is not None else DynamicCache()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                    past_key_values=cache, use_cache=True)
    return out.logits, [(layer.keys, layer.values) for layer in out.past_key_values.layers]
