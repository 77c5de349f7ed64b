"""Generation benchmark (issue 10): decode ms/token and prefill ms, side by side in one run.

    python benchmarks/bench_generate.py                  # the reported figures (~10 min on 2 cores)
    python benchmarks/bench_generate.py --quick          # a tiny model: checks that every variant runs
    python benchmarks/bench_generate.py --rounds 9 --threads 2 --prepacking both

Model: a Llama-shaped ``transformers.LlamaConfig`` (hidden 512, intermediate 1376, 4 layers, 8 heads,
vocab 32000; random weights, fixed seed), PEFT ``r=16, lora_alpha=32`` on q/k/v/o/gate/up/down with
random (non-zero) A and B, exported with ``export_peft(..., with_past=True)`` and extracted into an
``inputs``-mode package. Variants, all fp32 on the CPU execution provider with the same thread count:

(a) ``merged``: ``merge_adapter(pkg, "default")`` -> a plain ``InferenceSession`` and a minimal
    IOBinding loop (presents bound as the next step's pasts, as ``generate`` does);
(b) ``AdapterSession.generate(adapter="default")`` on the package (the slots fed);
(c) ``onnxruntime-genai`` on ``write_genai_folder(pkg)`` with ``og.Adapters`` (adapter active);
(d) the ORT GenAI model builder's own graph for the same HF folder with ``adapter_path``
    (``python -m onnxruntime_genai.models.builder -p fp32 -e cpu --extra_options adapter_path=...``),
    run by onnxruntime-genai; if the builder fails here its error is printed in the table.

Metrics: *decode* = ms per generated token after the first, batch 1, 32-token prompt, 64 new tokens
(greedy); *prefill* = ms for one 1 x 128 prompt step (empty cache; for og: ``append_tokens``).
Rounds are interleaved (every variant once per round, order shuffled per round) after a warm-up
round; the table gives medians and the ratio to (a). ``--prepacking both`` adds (a) and (b) with
``session.disable_prepacking=1`` (what external-mode sessions set by default) and (b) on an
``external``-mode package with and without prepacking; ``--memory`` prints the resident memory
that costs instead. ``--clock cpu`` measures process CPU time instead of wall time (stable on a
shared machine; meaningful with ``--threads 1``, as spinning pool threads burn CPU time too).
``--spinning both`` adds (a) and (b) with ``session.intra_op.allow_spinning=0`` (pool threads
sleep instead of spinning between ops: much faster on an oversubscribed machine). ``--slot-forms`` adds, on plain ORT with the same loop as (a): the package graph as is, and two
other slot-branch forms derived from it (A/B slots pre-transposed; and the scale folded into A),
to show what the branch's form costs (ORT already fuses ``Transpose`` + ``MatMul`` into
``FusedMatMul(transB=1)``, so the package graph runs 4 ops per site, not 6).
The builder bakes the adapter into its graph (LoRA MatMuls with constant weights, B pre-scaled,
fused GroupQueryAttention), so (d) has no og.Adapters and serves one adapter per graph.
``--size 1b``: TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads,
vocab 32000; ~4.4 GB fp32, random weights), its own work folder (``_work/generate/1b``; ``--layers N``
gives a smaller ``1b-Nlayers`` one), no external-mode package; every session holds the weights, so run
it with ``--only a,b,c --prepacking on --rounds 3 --threads 1 --clock cpu`` (only the listed variants are built).
Nothing is asserted. Work files go to ``benchmarks/_work/generate``
(gitignored); the model is built once (in a subprocess: the timing process imports no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = Path(os.environ.get("LORA_ONNX_BENCH_DIR") or HERE / "_work") / "generate"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    "default": dict(hidden=512, intermediate=1376, layers=4, heads=8, vocab=32000),
    "quick": dict(hidden=64, intermediate=128, layers=2, heads=4, vocab=512),
    # TinyLlama-1.1B's shape (GQA: 4 KV heads), random weights: ~4.4 GB fp32
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
}
PROMPT, NEW, PREFILL = 32, 64, 128
GOAL = 1.10
CLOCK = time.perf_counter


# ============================================================================ build (subprocess, torch)
def build(size: str, root: Path, layers: int | None = None) -> None:
    """HF folder + PEFT adapter folder, export, package (inputs and external), merged graph, genai folder.
    ``1b``: no external-mode package (another 4.4 GB, only ``--prepacking both`` uses it)."""
    import logging
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from exporters import export_peft
    from graph_tools import extract_adapters, merge_adapter, write_genai_folder

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    s = dict(SIZES[size])
    s.setdefault("kv_heads", s["heads"])
    if layers:
        s["layers"] = layers
    torch.manual_seed(0)
    step_t0 = time.perf_counter()

    def step(what: str) -> None:  # progress on stderr: the 1.1B build takes minutes
        print(f"  build: {what} ({time.perf_counter() - step_t0:.0f} s, RSS {_rss_mb():.0f} MB)", file=sys.stderr, flush=True)

    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         max_position_embeddings=2048 if size == "1b" else 512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         attn_implementation="eager")
    base = LlamaForCausalLM(config).eval()
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base.save_pretrained(tmp / "hf")
    _tokenizer(tmp / "hf")
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS, lora_dropout=0.0,
                                            init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero A and B (init_lora_weights=False already is; make B visible)
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.02)
    model.eval()
    model.save_pretrained(tmp / "adapter")  # adapter_config.json + adapter_model.safetensors
    step("HF + adapter folders written")
    ids = torch.randint(3, s["vocab"], (1, 8))
    exported = export_peft(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp / "export" / "lora.onnx",
                           with_past=True, external_data=True).path
    step("exported")
    pkg = extract_adapters(exported, tmp / "pkg")
    step("inputs-mode package")
    if size != "1b":
        extract_adapters(exported, tmp / "pkg_external", mode="external")
    merge_adapter(pkg.path, "default", tmp / "merged" / "merged.onnx")
    step("merged")
    write_genai_folder(pkg.path, tmp / "genai")
    step("genai folder")
    # the reference continuation (checked against every variant before timing)
    prompt = torch.randint(3, s["vocab"], (1, PROMPT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                             do_sample=False, pad_token_id=0)
    step("PEFT reference continuation")
    (tmp / "info.json").write_text(json.dumps({"size": size, **s, "prompt": prompt[0].tolist(),
                                               "reference": out[0].tolist()}))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)


def _tokenizer(folder: Path) -> None:
    """A tiny word-level tokenizer (the builder and og only need the files to load)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<pad>").save_pretrained(str(folder))


def run_builder(root: Path, threads: int) -> str | None:
    """The ORT GenAI model builder on the HF folder with the PEFT adapter; ``None`` or its error."""
    out = root / "builder"
    if (out / "genai_config.json").is_file():
        return None
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(root / "hf"), "-o", str(out),
           "-p", "fp32", "-e", "cpu", "-c", str(root / "builder_cache"),
           "--extra_options", f"adapter_path={root / 'adapter'}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (root / "builder.log").write_text(proc.stdout + "\n----\n" + proc.stderr)
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        return f"builder exit {proc.returncode}: {lines[-1][:200] if lines else 'no output'}"
    return None


# ============================================================================ variants (no torch)
def _options(threads: int, prepacking: bool, spinning: bool = True):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.log_severity_level = 3
    if not prepacking:
        o.add_session_config_entry("session.disable_prepacking", "1")
    if not spinning:
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return o


class Merged:
    """(a): plain ORT on the merged graph, the loop ``generate`` runs (IOBinding, presents -> pasts)."""

    def __init__(self, path: Path, threads: int, prepacking: bool, layers: int, heads: int, head_dim: int,
                 extra: dict | None = None, spinning: bool = True):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), _options(threads, prepacking, spinning),
                                            providers=["CPUExecutionProvider"])
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.extra = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in (extra or {}).items()}  # bound once

    def generate(self, ids, new: int, times: list | None = None):
        import numpy as np
        import onnxruntime as ort

        s = self.session
        binding = s.io_binding()
        empty = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, self.heads, 0, self.head_dim), np.float32))
        past = [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(self.layers)]
        outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        for k, v in self.extra.items():
            binding.bind_ortvalue_input(k, v)
        for k, v in past:
            binding.bind_ortvalue_input(k, empty)
            binding.bind_ortvalue_input(v, empty)
        mask = np.ones((1, ids.shape[1]), np.int64)
        positions = np.arange(ids.shape[1], dtype=np.int64)[None]
        step, out = ids, []
        for _ in range(new):
            binding.bind_cpu_input("input_ids", step)
            binding.bind_cpu_input("attention_mask", mask)
            binding.bind_cpu_input("position_ids", positions)
            binding.clear_binding_outputs()
            for name in outputs:
                binding.bind_output(name, "cpu")
            s.run_with_iobinding(binding)
            values = binding.get_outputs()
            token = values[0].numpy()[:, -1, :].argmax(-1)
            out.append(int(token[0]))
            if times is not None:
                times.append(CLOCK())
            for (k, v), kv, vv in zip(past, values[1::2], values[2::2]):
                binding.bind_ortvalue_input(k, kv)
                binding.bind_ortvalue_input(v, vv)
            step = token[:, None].astype(np.int64)
            positions = positions[:, -1:] + 1
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
        return out


class Ours:
    """(b): ``AdapterSession.generate`` / ``generate_stream`` with the adapter."""

    def __init__(self, pkg: Path, threads: int, prepacking: bool, adapter: str | None = "default", spinning: bool = True):
        """``prepacking`` sets ``session.disable_prepacking`` explicitly (external mode: "1" unless given)."""
        from graph_tools import AdapterSession

        o = _options(threads, True)
        config = {"session.disable_prepacking": "0" if prepacking else "1"}
        if not spinning:
            config["session.intra_op.allow_spinning"] = "0"
        self.session = AdapterSession(pkg, session_options=o, session_config=config)
        self.adapter = adapter

    def generate(self, ids, new: int, times: list | None = None):
        out = []
        for token in self.session.generate_stream(ids, adapter=self.adapter, max_new_tokens=new, eos_token_id=[]):
            out.append(int(token[0]))
            if times is not None:
                times.append(CLOCK())
        return out


class OgModel:
    """(c)/(d): onnxruntime-genai on a genai folder, the adapter active."""

    def __init__(self, folder: Path, threads: int, adapter_file: Path | None, name: str = "default"):
        import onnxruntime_genai as og

        config_path = folder / "genai_config.json"
        config = json.loads(config_path.read_text())
        opts = config["model"]["decoder"].setdefault("session_options", {})
        opts["intra_op_num_threads"] = threads
        opts["inter_op_num_threads"] = 1
        opts.setdefault("provider_options", [])
        config["search"]["max_length"] = max(config["search"].get("max_length", 0), PREFILL + NEW + 8)
        config_path.write_text(json.dumps(config, indent=2))
        self.og = og
        self.model = og.Model(str(folder))
        self.adapters = None
        if adapter_file is not None:
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(adapter_file), name)
        self.name = name

    def generate(self, ids, new: int, times: list | None = None):
        import numpy as np

        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=ids.shape[1] + new, min_length=ids.shape[1] + new, do_sample=False)
        generator = og.Generator(self.model, params)
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, self.name)
        if times is not None:
            times.append(CLOCK())  # generator creation (cache allocation) is not counted
        generator.append_tokens(ids.astype(np.int32))
        out = []
        if times is not None:
            times.append(CLOCK())
        while not generator.is_done() and len(out) < new:
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
            if times is not None:
                times.append(CLOCK())
        return out


def slot_form(root: Path, fold_scale: bool):
    """Another slot-branch form, for comparison only (``--slot-forms``): the package graph with its
    A/B slots pre-transposed (``MatMul(x, A_T)``, no ``Transpose``) and, with ``fold_scale``, the
    scale folded into ``A_T`` (no ``Mul``). Returns the graph path and the adapter's feeds."""
    import numpy as np
    import onnx_ir as ir

    from graph_tools import AdapterSession
    from graph_tools._io import save_model
    from graph_tools.adapters.load import load_package, load_package_model

    out = root / "slot_forms" / ("folded" if fold_scale else "transposed") / "model.onnx"
    s = AdapterSession(root / "pkg")
    feeds = {k: np.array(v.numpy()) for k, v in s._feed_for(s._key("default")).items()}
    src = root / "slot_forms" / "pkg"  # a copy: write_genai_folder hard-links the package's data file, and
    if not src.is_dir():              # onnx-ir refuses to read a hard-linked data file
        shutil.copytree(root / "pkg", src)
    model = load_package_model(load_package(src))
    graph = model.graph
    for node in list(graph):
        if node.op_type == "Transpose" and node.inputs[0] is not None and node.inputs[0].name in feeds:
            slot = node.inputs[0]
            new = ir.Value(name=f"{slot.name}.T", shape=ir.Shape(list(slot.shape)[::-1]), type=slot.type)
            graph.inputs.append(new)
            node.outputs[0].replace_all_uses_with(new)
            graph.remove(node, safe=True)
            feeds[new.name] = np.ascontiguousarray(feeds.pop(slot.name).T)
    if fold_scale:
        for node in list(graph):
            scale = next((i for i in node.inputs if i is not None and (i.name or "").endswith(".lora_scale")), None)
            if node.op_type == "Mul" and scale is not None:
                node.outputs[0].replace_all_uses_with(next(i for i in node.inputs if i is not scale))
                graph.remove(node, safe=True)
                a_t = scale.name[: -len(".lora_scale")] + ".lora_A.weight.T"
                feeds[a_t] = np.ascontiguousarray(feeds[a_t] * feeds.pop(scale.name)[None, :])
    for value in list(graph.inputs):  # the old slots (and their defaults) go
        if value.name in graph.initializers and ".lora_" in value.name and not value.uses():
            graph.inputs.remove(value)
            graph.initializers.pop(value.name)
    names = {v.name for v in graph.inputs}
    feeds = {k: v for k, v in feeds.items() if k in names}
    if not out.is_file():
        save_model(model, out)
    return out, feeds


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_worker(root: Path, disable: str) -> None:
    """Resident MB after opening an external-mode package and after each adapter session."""
    import numpy as np

    from graph_tools import AdapterSession

    s = AdapterSession(root / "pkg_external", session_config={"session.disable_prepacking": disable})
    row = [_rss_mb()]
    for adapter in (None, "default"):
        s.generate(np.array([[5, 6, 7, 8]]), adapter=adapter, max_new_tokens=2)
        row.append(_rss_mb())
    print("RESULT " + json.dumps(row))


def memory_table(root: Path) -> int:
    print("| external-mode package | RSS after open (MB) | + base session | + adapter session |")
    print("|---|---:|---:|---:|")
    for disable in ("1", "0"):
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_memory", disable]
                              + (["--quick"] if root.name == "quick" else []),
                              capture_output=True, text=True, cwd=str(HERE.parent), check=True)
        row = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
        print(f"| session.disable_prepacking={disable} | {row[0]:.0f} | {row[1]:.0f} (+{row[1] - row[0]:.0f}) "
              f"| {row[2]:.0f} (+{row[2] - row[1]:.0f}) |")
    return 0


def measure(case, ids_prompt, ids_prefill, is_og: bool, prefill_repeat: int = 1) -> tuple[float, float]:
    """(decode ms/token, prefill ms: median of ``prefill_repeat``) of one round."""
    times: list[float] = []
    prefills = []
    if is_og:
        # og: [created, prompt appended, token 1, ..., token NEW]; token 1 = the prompt's logits
        case.generate(ids_prompt, NEW, times)
        decode = (times[-1] - times[2]) / (NEW - 1)
        for _ in range(prefill_repeat):
            times = []
            case.generate(ids_prefill, 1, times)
            prefills.append(times[1] - times[0])
    else:
        case.generate(ids_prompt, NEW, times)
        decode = (times[-1] - times[0]) / (NEW - 1)
        for _ in range(prefill_repeat):
            t0 = CLOCK()
            case.generate(ids_prefill, 1)
            prefills.append(CLOCK() - t0)
    return decode * 1e3, statistics.median(prefills) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model (checks that every variant runs)")
    parser.add_argument("--size", choices=["default", "1b"], default="default",
                        help="1b: TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads; ~4.4 GB fp32, "
                             "own work folder; use --only a,b,c --prepacking on and few --rounds)")
    parser.add_argument("--layers", type=int, default=None, help="override the size's layer count (own work folder)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prefill-repeat", type=int, default=1, help="prefill runs per round (the round keeps their median)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every session (og included)")
    parser.add_argument("--prepacking", choices=["on", "both"], default="both",
                        help="both: also (a)/(b) with session.disable_prepacking=1 and (b) external mode")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated variant keys (a,b,c,d,a-nopack,b-nopack,b-ext,b-ext-pack)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time (stable on a loaded machine; use with --threads 1, spinning threads count)")
    parser.add_argument("--spinning", choices=["on", "both"], default="on",
                        help="both: also (a)/(b) with session.intra_op.allow_spinning=0 (og keeps its own default)")
    parser.add_argument("--slot-forms", action="store_true",
                        help="also time two other slot-branch forms on plain ORT: pre-transposed slots, scale folded")
    parser.add_argument("--memory", action="store_true",
                        help="only: resident memory of external-mode sessions with and without prepacking (subprocesses)")
    parser.add_argument("--_build", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = "quick" if args.quick else args.size
    root = WORK / (size + (f"-{args.layers}layers" if args.layers else ""))
    if args._build:
        build(args._build, root, args.layers)
        return 0
    if args._memory:
        memory_worker(root, args._memory)
        return 0
    if args.rebuild or not (root / "info.json").is_file():
        print(f"building the {size} model in {root} (export, package, merge, genai folder) ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_build", size, "--size", args.size]
                       + (["--quick"] if args.quick else []) + (["--layers", str(args.layers)] if args.layers else []),
                       check=True, cwd=str(HERE.parent))
        print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.rebuild:
        shutil.rmtree(root / "builder", ignore_errors=True)
    if args.memory:
        return memory_table(root)
    keep = set(args.only.split(",")) | {"a"} if args.only else None

    def wanted(key: str) -> bool:  # construct only the sessions that run (1.1B: each holds ~4.4 GB)
        return keep is None or key in keep

    builder_error = run_builder(root, args.threads) if wanted("d") else "not run (--only)"
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    import numpy as np
    import onnxruntime as ort
    import onnxruntime_genai as og

    info = json.loads((root / "info.json").read_text())
    heads, head_dim = info.get("kv_heads", info["heads"]), info["hidden"] // info["heads"]  # past: KV heads
    t = args.threads
    # og rewrites genai_config.json (threads): work on copies
    for name in ("genai", "builder"):
        if (root / name).is_dir():
            shutil.rmtree(root / f"{name}.run", ignore_errors=True)
            shutil.copytree(root / name, root / f"{name}.run", symlinks=False)
    cases: dict[str, tuple[str, object, bool]] = {}
    merged_path = root / "merged" / "merged.onnx"
    cases["a"] = ("(a) merged weights, plain ORT loop", Merged(merged_path, t, True, info["layers"], heads, head_dim), False)
    if wanted("b"):
        cases["b"] = ("(b) AdapterSession.generate, adapter", Ours(root / "pkg", t, True), False)
    if wanted("c"):
        cases["c"] = ("(c) onnxruntime-genai + og.Adapters, our folder",
                      OgModel(root / "genai.run", t, root / "genai.run" / "adapters" / "default.onnx_adapter"), True)
    if builder_error is None and wanted("d"):
        adapter_files = sorted((root / "builder.run").glob("*.onnx_adapter"))
        cases["d"] = ("(d) GenAI model builder graph (adapter_path), og", OgModel(root / "builder.run", t, None), True)
    if args.prepacking == "both" and (root / "pkg_external").is_dir():  # 1b: no external-mode package
        cases["a-nopack"] = ("(a) merged, disable_prepacking=1",
                             Merged(merged_path, t, False, info["layers"], heads, head_dim), False)
        cases["b-nopack"] = ("(b) AdapterSession, disable_prepacking=1", Ours(root / "pkg", t, False), False)
        cases["b-ext"] = ("(b) external-mode package (prepacking off: its default)", Ours(root / "pkg_external", t, False), False)
        cases["b-ext-pack"] = ("(b) external-mode package, disable_prepacking=0", Ours(root / "pkg_external", t, True), False)
    if args.spinning == "both":
        cases["a-nospin"] = ("(a) merged, allow_spinning=0",
                             Merged(merged_path, t, True, info["layers"], heads, head_dim, spinning=False), False)
        cases["b-nospin"] = ("(b) AdapterSession, allow_spinning=0", Ours(root / "pkg", t, True, spinning=False), False)
    if args.slot_forms:
        for key, fold, label in (("b-T", False, "slots pre-transposed: MatMul, Mul, MatMul, Add"),
                                 ("b-T-fold", True, "pre-transposed, scale folded: MatMul, MatMul, Add")):
            path, feeds = slot_form(root, fold)
            cases[key] = (f"plain ORT, {label}", Merged(path, t, True, info["layers"], heads, head_dim, feeds), False)
        path = root / "pkg" / "model.onnx"
        s = cases["b"][1].session
        feeds = {k: v.numpy() for k, v in s._feed_for(s._key("default")).items()}
        cases["b-plain"] = ("plain ORT, package graph as is: (Transpose) MatMul, Mul, (Transpose) MatMul, Add",
                            Merged(path, t, True, info["layers"], heads, head_dim, feeds), False)
    if args.only:
        keep = set(args.only.split(",")) | {"a"}
        cases = {k: v for k, v in cases.items() if k in keep}

    rng = np.random.default_rng(0)
    ids_prompt = np.array([info["prompt"]], np.int64)
    ids_prefill = rng.integers(3, info["vocab"], (1, PREFILL), dtype=np.int64)
    # same greedy continuation as PEFT (a sanity check, not a benchmark)
    want = info["reference"][PROMPT:]
    checks = {}
    for key, (_, case, _) in cases.items():
        got = case.generate(ids_prompt, len(want))
        checks[key] = "ok" if got == want else f"DIFFERS {got} vs {want}"

    samples = {k: ([], []) for k in cases}
    order = list(cases)
    shuffle = random.Random(0)
    load_before = os.getloadavg()
    for r in range(args.rounds + 1):  # round 0 warms up
        shuffle.shuffle(order)
        for key in order:
            _, case, is_og = cases[key]
            decode, prefill = measure(case, ids_prompt, ids_prefill, is_og, args.prefill_repeat)
            if r:
                samples[key][0].append(decode)
                samples[key][1].append(prefill)
        print(f"  round {r}/{args.rounds}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    med = {k: (statistics.median(d), statistics.median(p)) for k, (d, p) in samples.items()}
    base_d, base_p = med["a"]
    print()
    print(f"Llama-shaped: hidden {info['hidden']}, intermediate {info['intermediate']}, {info['layers']} layers, "
          f"{info['heads']} heads ({heads} KV), vocab {info['vocab']}; LoRA r=16 on q/k/v/o/gate/up/down; fp32, CPU EP")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; intra-op threads {t}; "
          f"onnxruntime {ort.__version__}, onnxruntime-genai {og.__version__}; {args.rounds} interleaved rounds, medians "
          f"of {'process CPU time' if args.clock == 'cpu' else 'wall time'}; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print()
    print(f"| variant | decode ms/token (1 x {PROMPT} + {NEW}) | x (a) | prefill ms (1 x {PREFILL}) | x (a) | greedy == PEFT |")
    print("|---|---:|---:|---:|---:|---|")
    for key, (label, _, _) in cases.items():
        d, p = med[key]
        print(f"| {label} | {d:.2f} | {d / base_d:.2f} | {p:.1f} | {p / base_p:.2f} | {checks[key]} |")
    if builder_error is not None and wanted("d"):
        print(f"| (d) GenAI model builder graph (adapter_path) | - | - | - | - | did not build: {builder_error} |")
    if "b" in med:
        d, p = med["b"]
        print()
        print(f"goals: (b) <= {GOAL:.2f}x (a): decode {d / base_d:.2f}x, prefill {p / base_p:.2f}x; "
              + (f"(b) vs (c): decode {d / med['c'][0]:.2f}x, prefill {p / med['c'][1]:.2f}x" if "c" in med else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
