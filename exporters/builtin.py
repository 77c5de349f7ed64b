"""Built-in demo models, built from a transformers config (no download)."""

from __future__ import annotations

import torch

__all__ = ["tiny_llama"]


def tiny_llama(*, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A tiny Llama-shaped PEFT model with two LoRA adapters of different ranks.

    Returns ``(peft_model, example_inputs)``. ``default``: r=8 on every attention and MLP
    projection; ``second``: r=4 rsLoRA on q/v with a rank pattern. Weights are random but
    deterministic (``init_lora_weights=False`` so B is not zero).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    base = LlamaForCausalLM(config).eval()
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=projections, init_lora_weights=False))
    model.add_adapter(
        "second",
        LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                   rank_pattern={"layers.0.self_attn.v_proj": 2}, init_lora_weights=False),
    )
    model.eval()
    ids = torch.randint(0, config.vocab_size, (1, 8))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
