"""Generate a synthetic Llama-shaped LoRA ONNX model for the benchmarks (not committed).

    python benchmarks/make_synthetic.py --size 1b     # ~1.1B parameters, fp16, ~2.2 GB
    python benchmarks/make_synthetic.py --size tiny   # a few hundred KB, for a quick check

Writes ``benchmarks/_work/<size>/`` (gitignored):

    model/model.onnx (+ model.onnx.data)   the LoRA graph, base + two adapters on every projection
    peft/<adapter>/                        the same adapters as PEFT ``save_pretrained`` folders
                                           (adapter_config.json + adapter_model.safetensors)
    info.json                              shape, parameter counts, adapter names

The graph has the structure ``exporters.export_peft`` produces for a PEFT Llama (names restored,
weights pre-transposed, ``lora_onnx.*`` node metadata)::

    x ─> MatMul(x, <m>.base_layer.weight [in, out]) ───────────────────────> Add ─> Add ─> y
    └──> MatMul(x, Transpose(<m>.lora_A.<a>.weight [r, in])) ─> MatMul(., Transpose(<m>.lora_B.<a>.weight
         [out, r])) ─> Mul(<m>.lora_scale.<a> (scalar)) ─────────────────────┘      │
    └──> ... same for the second adapter ────────────────────────────────────────────┘

on q/k/v/o/gate/up/down of every layer (``<m>`` = ``base_model.model.model.layers.N.self_attn.q_proj``
...). Everything else is simplified but runs in onnxruntime: RMSNorm, grouped-query attention
without RoPE or mask, SiLU MLP, an untied ``lm_head``.

Weights are deterministic (a seed per tensor name) and small (std 0.02) so fp16 does not overflow.
They are streamed into the external data file one tensor (or a slice of one) at a time; the graph
only references them (``ir.ExternalTensor``), so generation never holds the model in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

HERE = Path(__file__).resolve().parent
#: generated models go here; LORA_ONNX_BENCH_DIR moves them outside the repository (~2.2 GB for 1b)
WORK = Path(os.environ.get("LORA_ONNX_BENCH_DIR") or HERE / "_work")
PREFIX = "base_model.model."
DATA_NAME = "model.onnx.data"
ALIGN = 4096
CHUNK_ELEMS = 16 * 1024 * 1024  # random numbers generated per slice (64 MB as float32)
ADAPTERS = (("default", 32.0), ("second", 16.0))  # name, lora_alpha (r=16: scales 2.0 and 1.0)
DTYPES = ("float16", "float32")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rank: int = 16

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def projections(self) -> dict[str, tuple[str, int, int]]:
        """projection -> (block, in_features, out_features)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return {
            "q_proj": ("self_attn", h, h), "k_proj": ("self_attn", h, kv), "v_proj": ("self_attn", h, kv),
            "o_proj": ("self_attn", h, h), "gate_proj": ("mlp", h, i), "up_proj": ("mlp", h, i),
            "down_proj": ("mlp", i, h),
        }


SIZES = {
    # TinyLlama-1.1B's shape
    "1b": Shape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    "tiny": Shape(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, vocab=256),
}


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


class DataWriter:
    """Appends tensors to one external data file and returns ``ir.ExternalTensor`` references."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.file = open(folder / DATA_NAME, "wb")
        self.offset = 0

    def random(self, name: str, shape: tuple[int, ...], std: float = 0.02, dtype=np.float16) -> ir.ExternalTensor:
        """Deterministic N(0, std) tensor, generated and written in slices along the first axis."""
        rng = np.random.default_rng(_seed(name))
        rows = shape[0]
        row_elems = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        step = max(1, CHUNK_ELEMS // max(1, row_elems))
        start = self._begin()
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            chunk = rng.standard_normal((n, *shape[1:]), dtype=np.float32)
            chunk *= std
            self.file.write(chunk.astype(dtype).tobytes())
        return self._end(name, start, shape, dtype)

    def array(self, name: str, array: np.ndarray) -> ir.ExternalTensor:
        start = self._begin()
        self.file.write(np.ascontiguousarray(array).tobytes())
        return self._end(name, start, array.shape, array.dtype)

    def _begin(self) -> int:
        pad = (-self.offset) % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        return self.offset

    def _end(self, name, start, shape, dtype) -> ir.ExternalTensor:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        self.offset = start + nbytes
        assert self.file.tell() == self.offset, (name, self.file.tell(), self.offset)
        return ir.ExternalTensor(DATA_NAME, offset=start, length=nbytes, dtype=ir.DataType.from_numpy(np.dtype(dtype)),
                                 shape=ir.Shape(shape), name=name, base_dir=self.folder)

    def close(self):
        self.file.close()


class Builder:
    """A few-lines graph builder over onnx-ir (external weights through a DataWriter)."""

    def __init__(self, data: DataWriter, dtype=np.float16):
        self.data = data
        self.dtype = np.dtype(dtype)
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self._consts: dict[tuple, ir.Value] = {}
        self.params = 0

    def weight(self, name: str, shape, std: float = 0.02) -> ir.Value:
        tensor = self.data.random(name, tuple(shape), std, self.dtype)
        self.params += int(np.prod(shape))
        return self._init(name, tensor)

    def ones(self, name: str, n: int) -> ir.Value:
        self.params += n
        return self._init(name, ir.tensor(np.ones([n], self.dtype), name=name))

    def scalar(self, name: str, value: float) -> ir.Value:
        # 0-d, like the scale buffer torch.onnx writes for PEFT's `scaling`
        return self._init(name, ir.tensor(np.array(value, self.dtype), name=name))

    def const(self, value, dtype=np.int64) -> ir.Value:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self._consts[key] = self._init(name, ir.tensor(array, name=name))
        return self._consts[key]

    def _init(self, name, tensor) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.initializers.append(value)
        return value

    def op(self, op_type: str, *inputs, name: str, meta: dict | None = None, **attrs) -> ir.Value:
        node = ir.Node("", op_type, inputs, attributes=ir.convenience.convert_attributes(attrs), name=name)
        node.outputs[0].name = name
        for k, v in (meta or {}).items():
            node.metadata_props[k] = v
        self.nodes.append(node)
        return node.outputs[0]


def rms_norm(b: Builder, x: ir.Value, weight_name: str, hidden: int, tag: str) -> ir.Value:
    w = b.ones(weight_name, hidden)
    sq = b.op("Mul", x, x, name=f"{tag}/sq")
    mean = b.op("ReduceMean", sq, b.const([-1]), name=f"{tag}/mean", keepdims=1)
    eps = b.op("Add", mean, b.const(1e-5, b.dtype), name=f"{tag}/eps")
    inv = b.op("Reciprocal", b.op("Sqrt", eps, name=f"{tag}/sqrt"), name=f"{tag}/inv")
    return b.op("Mul", b.op("Mul", x, inv, name=f"{tag}/scale"), w, name=f"{tag}/weight")


def lora_linear(b: Builder, x: ir.Value, module: str, in_f: int, out_f: int, rank: int, lora_values: dict) -> ir.Value:
    """Base MatMul + one LoRA branch per adapter, chained Adds: what export_peft writes."""
    full = PREFIX + module
    w = b.weight(f"{full}.base_layer.weight", (in_f, out_f))  # pre-transposed [in, out]
    y = b.op("MatMul", x, w, name=f"{module}/base", meta={"lora_onnx.module": module, "lora_onnx.role": "base"})
    for adapter, alpha in ADAPTERS:
        def meta(role, adapter=adapter):
            return {"lora_onnx.module": module, "lora_onnx.adapter": adapter, "lora_onnx.role": role}
        a_name, b_name = f"{full}.lora_A.{adapter}.weight", f"{full}.lora_B.{adapter}.weight"
        a = b.weight(a_name, (rank, in_f))
        bw = b.weight(b_name, (out_f, rank))
        lora_values.setdefault(adapter, {})[module] = (a.const_value, bw.const_value)
        a_t = b.op("Transpose", a, name=f"{module}/lora_A.{adapter}/T", perm=[1, 0])
        h = b.op("MatMul", x, a_t, name=f"{module}/lora_A.{adapter}", meta=meta("lora_A"))
        b_t = b.op("Transpose", bw, name=f"{module}/lora_B.{adapter}/T", perm=[1, 0])
        h = b.op("MatMul", h, b_t, name=f"{module}/lora_B.{adapter}", meta=meta("lora_B"))
        s = b.scalar(f"{full}.lora_scale.{adapter}", alpha / rank)
        h = b.op("Mul", h, s, name=f"{module}/lora_scale.{adapter}", meta=meta("lora_scale"))
        y = b.op("Add", y, h, name=f"{module}/lora_add.{adapter}", meta=meta("lora_add"))
    return y


def build(shape: Shape, folder: Path, dtype: str = "float16") -> tuple[ir.Model, dict, int]:
    data = DataWriter(folder)
    b = Builder(data, dtype)
    ids = ir.Value(name="input_ids", shape=ir.Shape(["batch", "sequence"]), type=ir.TensorType(ir.DataType.INT64))
    embed = b.weight(f"{PREFIX}model.embed_tokens.weight", (shape.vocab, shape.hidden))
    h = b.op("Gather", embed, ids, name="model/embed_tokens", axis=0)
    lora_values: dict = {}
    g = shape.heads // shape.kv_heads
    d = shape.head_dim
    for layer in range(shape.layers):
        t0 = time.perf_counter()
        lp = f"model.layers.{layer}"
        x = rms_norm(b, h, f"{PREFIX}{lp}.input_layernorm.weight", shape.hidden, f"{lp}/input_layernorm")
        proj = {}
        for name in ("q_proj", "k_proj", "v_proj"):
            block, in_f, out_f = shape.projections()[name]
            proj[name] = lora_linear(b, x, f"{lp}.{block}.{name}", in_f, out_f, shape.rank, lora_values)
        # grouped-query attention without RoPE/mask: q [b,kv,g,s,d] @ k^T [b,kv,1,d,s]
        q = b.op("Transpose", b.op("Reshape", proj["q_proj"], b.const([0, 0, shape.kv_heads, g, d]), name=f"{lp}/q_r"),
                 name=f"{lp}/q_t", perm=[0, 2, 3, 1, 4])
        k = b.op("Transpose", b.op("Reshape", proj["k_proj"], b.const([0, 0, shape.kv_heads, 1, d]), name=f"{lp}/k_r"),
                 name=f"{lp}/k_t", perm=[0, 2, 3, 4, 1])
        v = b.op("Transpose", b.op("Reshape", proj["v_proj"], b.const([0, 0, shape.kv_heads, 1, d]), name=f"{lp}/v_r"),
                 name=f"{lp}/v_t", perm=[0, 2, 3, 1, 4])
        scores = b.op("Mul", b.op("MatMul", q, k, name=f"{lp}/qk"), b.const(d ** -0.5, b.dtype),
                      name=f"{lp}/qk_scaled")
        probs = b.op("Softmax", scores, name=f"{lp}/softmax", axis=-1)
        ctx = b.op("Transpose", b.op("MatMul", probs, v, name=f"{lp}/pv"), name=f"{lp}/ctx_t", perm=[0, 3, 1, 2, 4])
        ctx = b.op("Reshape", ctx, b.const([0, 0, shape.hidden]), name=f"{lp}/ctx")
        _, in_f, out_f = shape.projections()["o_proj"]
        o = lora_linear(b, ctx, f"{lp}.self_attn.o_proj", in_f, out_f, shape.rank, lora_values)
        h = b.op("Add", h, o, name=f"{lp}/attn_residual")
        x = rms_norm(b, h, f"{PREFIX}{lp}.post_attention_layernorm.weight", shape.hidden, f"{lp}/post_attention_layernorm")
        gate = lora_linear(b, x, f"{lp}.mlp.gate_proj", shape.hidden, shape.intermediate, shape.rank, lora_values)
        up = lora_linear(b, x, f"{lp}.mlp.up_proj", shape.hidden, shape.intermediate, shape.rank, lora_values)
        act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate, name=f"{lp}/mlp/sigmoid"), name=f"{lp}/mlp/silu"),
                   up, name=f"{lp}/mlp/act")
        down = lora_linear(b, act, f"{lp}.mlp.down_proj", shape.intermediate, shape.hidden, shape.rank, lora_values)
        h = b.op("Add", h, down, name=f"{lp}/mlp_residual")
        print(f"  layer {layer + 1}/{shape.layers} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
    x = rms_norm(b, h, f"{PREFIX}model.norm.weight", shape.hidden, "model/norm")
    lm_head = b.weight(f"{PREFIX}lm_head.weight", (shape.hidden, shape.vocab))
    logits = b.op("MatMul", x, lm_head, name="logits")
    logits.shape = ir.Shape(["batch", "sequence", shape.vocab])
    logits.type = ir.TensorType(ir.DataType.from_numpy(b.dtype))
    data.close()
    graph = ir.Graph([ids], [logits], nodes=b.nodes, initializers=b.initializers, opset_imports={"": 18},
                     name="synthetic_llama_lora")
    model = ir.Model(graph, ir_version=10, producer_name="lora-onnx-benchmarks")
    return model, lora_values, b.params


def write_peft(folder: Path, shape: Shape, lora_values: dict) -> None:
    """The graph's adapters as PEFT save_pretrained folders (same values, PEFT key names)."""
    from safetensors.numpy import save_file

    for adapter, alpha in ADAPTERS:
        out = folder / adapter
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for module, (a, bw) in lora_values[adapter].items():
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a.numpy()
            tensors[f"{PREFIX}{module}.lora_B.weight"] = bw.numpy()
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
            "r": shape.rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
            "target_modules": list(PROJECTIONS), "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
            "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
        }
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def work_dir(size: str, dtype: str = "float16") -> Path:
    return WORK / (size if dtype == "float16" else f"{size}-{dtype}")


def generate(size: str, *, dtype: str = "float16", force: bool = False) -> Path:
    """Generate ``_work/<size>[-<dtype>]`` (skipped when complete unless ``force``); returns the folder."""
    shape = SIZES[size]
    root = work_dir(size, dtype)
    if (root / "info.json").is_file() and not force:
        return root
    if root.exists():
        shutil.rmtree(root)
    model_dir = root / "model"
    model_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    print(f"generating {size} synthetic model into {root}", file=sys.stderr)
    model, lora_values, params = build(shape, model_dir, dtype)
    ir.save(model, model_dir / "model.onnx")  # ExternalTensors stay references to model.onnx.data
    # torch.onnx's graphs carry every value's type and shape: so does ours (weights are not read)
    import onnx.shape_inference

    onnx.shape_inference.infer_shapes_path(str(model_dir / "model.onnx"), str(model_dir / "model.onnx"), strict_mode=True)
    write_peft(root / "peft", shape, lora_values)
    lora_params = sum(a.size + bw.size for mods in lora_values.values() for a, bw in mods.values())
    info = {
        "size": size, "shape": dataclasses.asdict(shape), "base_params": params - lora_params,
        "lora_params": lora_params, "lora_tensors": 2 * sum(len(m) for m in lora_values.values()),
        "adapters": [a for a, _ in ADAPTERS], "dtype": dtype,
        "data_bytes": (model_dir / DATA_NAME).stat().st_size, "seconds": round(time.perf_counter() - t0, 1),
    }
    (root / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info), file=sys.stderr)
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--dtype", choices=DTYPES, default="float16",
                        help="weight dtype (float32: for comparisons; the reported figures use float16)")
    parser.add_argument("--force", action="store_true", help="regenerate even if present")
    parser.add_argument("--check", action="store_true", help="run the model once in onnxruntime")
    args = parser.parse_args(argv)
    root = generate(args.size, dtype=args.dtype, force=args.force)
    if args.check:
        import onnxruntime as ort

        session = ort.InferenceSession(str(root / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
        ids = np.arange(8, dtype=np.int64).reshape(1, 8) % SIZES[args.size].vocab
        (logits,) = session.run(None, {"input_ids": ids})
        print(f"ok: logits {logits.shape} {logits.dtype}, finite={np.isfinite(logits).all()}, "
              f"std={float(logits.astype(np.float32).std()):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
