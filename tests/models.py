"""Tiny PEFT models built from code: the test zoo (no downloads, no hub).

Each builder returns ``(peft_model, example_inputs)``: a ``peft.PeftModel`` in eval mode whose
every LoRA weight is random (``init_lora_weights=False``, so lora_B is not all zeros and exporters
cannot fold a branch away), and a dict of keyword tensors to export with. Seeds are fixed, so a
builder gives the same weights on every call. Sizes are ~32 hidden, 1-2 layers: an exported graph
stays under 200 KB. ``export_source`` exports a zoo model with each exporter (``SOURCES``).

``ZOO`` maps a short name to a builder; ``EXPECTED`` gives, per zoo name, the ``(module, adapter)``
LoRA sites a detector must find in any export of it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

__all__ = [
    "ZOO",
    "EXPECTED",
    "SEED",
    "llama",
    "llama_two_adapters",
    "llama_rslora",
    "llama_patterns",
    "gpt2",
    "bert",
    "cnn",
    "llama_dora",
    "llama_loha",
    "plain_llama",
    "example_inputs",
    "activate_all_adapters",
    "adapter_names",
    "expected_sites",
    "reference_output",
    "SOURCES",
    "export_source",
    "dynamic_axes",
]

SEED = 1234
VOCAB = 64
HIDDEN = 32

Built = tuple[PeftModel, dict[str, torch.Tensor]]


def _lora(r: int = 4, alpha: int = 8, targets=("q_proj", "v_proj"), **kwargs) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, init_lora_weights=False, **kwargs)


def _text_inputs(batch: int = 2, seq: int = 5, *, token_type: bool = False, seed: int = SEED) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.int64),
    }
    if token_type:
        inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.int64)
    return inputs


# -- base models ---------------------------------------------------------------------------------
def _llama_base(layers: int = 1, intermediate: int = 48) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def _gpt2_base() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=1,
        n_head=4,
        n_inner=64,
        n_positions=64,
        use_cache=False,
        attn_implementation="eager",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def _bert_base() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config, add_pooling_layer=False).eval()


class TinyCNN(torch.nn.Module):
    """Conv2d -> ReLU -> Conv2d -> flatten rows -> Conv1d -> mean: LoRA targets on all three convs."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, kernel_size=3, stride=2, padding=1)
        self.conv3 = torch.nn.Conv1d(8, 16, kernel_size=3, padding=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(pixel_values))
        h = torch.relu(self.conv2(h))
        h = h.flatten(2)  # (N, C, H*W): a 1-d signal for the Conv1d
        return self.conv3(h).mean(dim=-1)


def _finish(model: PeftModel, seed: int) -> PeftModel:
    """Give every LoRA weight (all adapters) fresh, fixed random values of a moderate size."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return model.eval()


# -- the zoo -------------------------------------------------------------------------------------
def llama() -> Built:
    """Llama-shaped, 1 layer, LoRA on q/v/o and the MLP down projection."""
    model = get_peft_model(_llama_base(), _lora(targets=("q_proj", "v_proj", "o_proj", "down_proj")))
    return _finish(model, SEED), _text_inputs()


def llama_two_adapters() -> Built:
    """Llama-shaped, 2 layers; adapter ``default`` (r=4 on q/v) and ``second`` (r=2 on q/k)."""
    model = get_peft_model(_llama_base(layers=2, intermediate=32), _lora(r=4, alpha=8, targets=("q_proj", "v_proj")))
    model.add_adapter("second", _lora(r=2, alpha=6, targets=("q_proj", "k_proj")))
    return _finish(model, SEED + 1), _text_inputs()


def llama_rslora() -> Built:
    """Llama-shaped with rsLoRA (scale alpha/sqrt(r))."""
    model = get_peft_model(_llama_base(), _lora(r=4, alpha=8, targets=("q_proj", "v_proj"), use_rslora=True))
    return _finish(model, SEED + 2), _text_inputs()


def llama_patterns() -> Built:
    """Llama-shaped with ``rank_pattern``/``alpha_pattern``: per-module rank and alpha."""
    config = _lora(
        r=4,
        alpha=8,
        targets=("q_proj", "k_proj", "v_proj", "up_proj"),
        rank_pattern={"k_proj": 2, "up_proj": 8},
        alpha_pattern={"v_proj": 3, "up_proj": 4},
    )
    model = get_peft_model(_llama_base(), config)
    return _finish(model, SEED + 3), _text_inputs()


def gpt2() -> Built:
    """GPT-2-shaped, 1 layer; LoRA on c_attn/c_proj (transformers Conv1D, fan_in_fan_out)."""
    config = _lora(r=4, alpha=16, targets=("c_attn", "c_proj"), fan_in_fan_out=True)
    model = get_peft_model(_gpt2_base(), config)
    return _finish(model, SEED + 4), _text_inputs()


def bert() -> Built:
    """BERT-shaped encoder; LoRA on query/value and on the word embeddings (nn.Embedding)."""
    config = _lora(r=4, alpha=8, targets=("query", "value", "word_embeddings"))
    model = get_peft_model(_bert_base(), config)
    return _finish(model, SEED + 5), _text_inputs(token_type=True)


def cnn() -> Built:
    """Small CNN; LoRA on two nn.Conv2d and one nn.Conv1d."""
    torch.manual_seed(SEED)
    config = _lora(r=2, alpha=4, targets=("conv1", "conv2", "conv3"))
    model = get_peft_model(TinyCNN().eval(), config)
    g = torch.Generator().manual_seed(SEED)
    return _finish(model, SEED + 6), {"pixel_values": torch.randn(2, 3, 8, 8, generator=g)}


# -- models an exporter must refuse --------------------------------------------------------------
def llama_dora() -> Built:
    model = get_peft_model(_llama_base(), _lora(targets=("q_proj", "v_proj"), use_dora=True))
    return _finish(model, SEED), _text_inputs()


def llama_loha() -> Built:
    from peft import LoHaConfig

    config = LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    return get_peft_model(_llama_base(), config).eval(), _text_inputs()


def plain_llama() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The Llama base model without any LoRA layer."""
    return _llama_base(), _text_inputs()


# -- helpers -------------------------------------------------------------------------------------
def example_inputs(name: str, batch: int, seq: int, seed: int = SEED + 100) -> dict[str, torch.Tensor]:
    """Inputs for zoo model ``name`` with another batch/sequence (spatial) size than its example."""
    if name == "cnn":
        g = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=g)}
    return _text_inputs(batch, seq, token_type=(name == "bert"), seed=seed)


def adapter_names(model: torch.nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            names.update(module.lora_A.keys())
            names.update(module.lora_embedding_A.keys())
    return sorted(names)


def activate_all_adapters(model: torch.nn.Module) -> None:
    """Make every loaded adapter active on every LoRA layer (PEFT then sums their branches)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module._active_adapter = [a for a in adapter_names(model) if a in module.scaling]
            module._disable_adapters = False


ZOO: dict[str, Callable[[], Built]] = {
    "llama": llama,
    "llama_two_adapters": llama_two_adapters,
    "llama_rslora": llama_rslora,
    "llama_patterns": llama_patterns,
    "gpt2": gpt2,
    "bert": bert,
    "cnn": cnn,
}


def _sites(modules, adapter="default") -> set[tuple[str, str]]:
    return {(m, adapter) for m in modules}


_L0 = "model.layers.0"
EXPECTED: dict[str, set[tuple[str, str]]] = {
    "llama": _sites([f"{_L0}.self_attn.q_proj", f"{_L0}.self_attn.v_proj", f"{_L0}.self_attn.o_proj", f"{_L0}.mlp.down_proj"]),
    "llama_two_adapters": _sites([f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")])
    | _sites([f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "k_proj")], "second"),
    "llama_rslora": _sites([f"{_L0}.self_attn.q_proj", f"{_L0}.self_attn.v_proj"]),
    "llama_patterns": _sites([f"{_L0}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")] + [f"{_L0}.mlp.up_proj"]),
    "gpt2": _sites([f"transformer.h.0.{p}" for p in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")]),
    "bert": _sites(["embeddings.word_embeddings", "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]),
    "cnn": _sites(["conv1", "conv2", "conv3"]),
}


# -- what detection must find ------------------------------------------------------------------
def expected_sites(model: torch.nn.Module) -> dict[tuple[str, str], dict]:
    """``(module, adapter) -> {kind, rank, in_features, out_features, scale}`` read off PEFT itself."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora import layer as lora_layer

    sites = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if isinstance(module, lora_layer.Embedding):
            kind = "embedding"
        elif isinstance(module, lora_layer._ConvNd):
            kind = "conv"
        else:
            kind = "linear"
        path = name.removeprefix("base_model.model.")
        for adapter, scale in module.scaling.items():
            sites[(path, adapter)] = dict(
                kind=kind,
                rank=module.r[adapter],
                in_features=module.in_features,
                out_features=module.out_features,
                scale=float(scale),
            )
    return sites


def reference_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """PyTorch outputs (by name, as the exporter names them) with every adapter active."""
    activate_all_adapters(model)
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return {"output": out.numpy()}
    return {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


# -- graphs of the zoo, from every exporter --------------------------------------------------------
def dynamic_axes(name: str, inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    if name == "cnn":
        return {"pixel_values": {0: "batch"}}
    return {k: {0: "batch", 1: "sequence"} for k in inputs}


class _FirstOutput(torch.nn.Module):
    """What users write for a plain ``torch.onnx.export``: one tensor out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def _first(self, **kwargs) -> torch.Tensor:
        out = self.model(**{k: v for k, v in kwargs.items() if v is not None})
        return out if isinstance(out, torch.Tensor) else next(v for v in out.values() if isinstance(v, torch.Tensor))


class TextWrapper(_FirstOutput):
    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self._first(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


class ImageWrapper(_FirstOutput):
    def forward(self, pixel_values):
        return self._first(pixel_values=pixel_values)


#: ours: exporters.export_peft; dynamo: plain torch.onnx.export(dynamo=True) with its default
#: optimizer; torchscript: torch.onnx.export(dynamo=False).
SOURCES = ("ours", "dynamo", "torchscript")


def export_source(source: str, name: str, path, model=None, inputs=None):
    """Export zoo model ``name`` with exporter ``source`` to ``path``; returns the path."""
    import contextlib
    import io
    from pathlib import Path

    if model is None:
        model, inputs = ZOO[name]()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = dynamic_axes(name, inputs)
    if source == "ours":
        from exporters import export_peft

        export_peft(model, inputs, path, dynamic_shapes=axes)
        return path
    activate_all_adapters(model)
    wrapper = (ImageWrapper if name == "cnn" else TextWrapper)(model).eval()
    kwargs = dict(input_names=list(inputs), output_names=["output"], dynamic_axes=axes)
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        if source == "dynamo":
            torch.onnx.export(wrapper, tuple(inputs.values()), path, dynamo=True, **kwargs)
        elif source == "torchscript":
            torch.onnx.export(wrapper, tuple(inputs.values()), path, dynamo=False, opset_version=17, **kwargs)
        else:
            raise ValueError(f"unknown source {source!r}")
    return path
