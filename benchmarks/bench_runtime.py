"""Runtime and export benchmarks (issue 5): unmerged LoRA vs merged latency, export_peft vs torch.onnx.

    python benchmarks/bench_runtime.py                 # the reported figures (~5-10 min on 2 cores)
    python benchmarks/bench_runtime.py --quick         # a tiny model, a quick check that everything runs

Builds a Llama-shaped PEFT model from a ``transformers.LlamaConfig`` (default: hidden 512,
intermediate 1376, 4 layers, 8 heads, vocab 8000), one adapter ``default`` r=16 on every attention
and MLP projection (q/k/v/o/gate/up/down), and prints one markdown table:

* per-run latency in ONNX Runtime (CPU), p50/p90 over ``--runs`` runs after ``--warmup`` runs, the
  three variants interleaved run by run (order shuffled every round), for each input shape:
  - ``AdapterSession(pkg).run(..., adapter="default")`` on the ``extract_adapters`` package
    (unmerged: LoRA weights fed as inputs);
  - plain ``InferenceSession`` on ``merge_adapter(pkg, "default", merged.onnx)`` (merged);
  - plain ``InferenceSession`` on the ``export_peft`` graph (unmerged, LoRA weights baked in).
  Goal: unmerged (AdapterSession) p50 <= 1.15x merged p50.
* ``export_peft`` vs plain ``torch.onnx.export(wrapper, dynamo=True)`` (default optimize=True) of
  the same PEFT model with the same dynamic axes, written to a file: wall time of the export call
  only (model building and imports excluded), each measurement in a fresh process, the two
  interleaved, median of ``--repeat``. Goal: <= 1.25x.

Not run in CI; outputs go to ``benchmarks/_work/runtime`` (gitignored).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "runtime"
RESULT = "RESULT "
GOAL_UNMERGED = 1.15
GOAL_EXPORT = 1.25
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SIZES = {
    "default": dict(hidden=512, intermediate=1376, layers=4, heads=8, vocab=8000),
    "quick": dict(hidden=64, intermediate=128, layers=2, heads=4, vocab=256),
}


# ============================================================================ model
def build_model(size: str, seed: int = 0):
    """The Llama-shaped PEFT model (deterministic) and example inputs (batch 1 x 16 tokens)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SIZES[size]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["heads"], max_position_embeddings=512)
    base = LlamaForCausalLM(config).eval()
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS, init_lora_weights=False))
    model.eval()
    ids = torch.randint(0, s["vocab"], (1, 16))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class PlainWrapper:  # built lazily so that importing this file does not import torch
    @staticmethod
    def make(model):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask):
                return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

        return Wrapper(model).eval()


def plain_export(model, inputs, path: Path):
    """What a user writes without lora-onnx: torch.onnx.export(dynamo=True), default optimize."""
    import torch

    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    torch.onnx.export(PlainWrapper.make(model), (inputs["input_ids"], inputs["attention_mask"]), str(path),
                      dynamo=True, input_names=list(axes), output_names=["logits"], dynamic_axes=axes)


# ============================================================================ workers
def worker(spec: dict) -> dict:
    """One export measurement in this (fresh) process; ``spec["profile"]`` writes a cProfile."""
    import contextlib
    import io
    import logging
    import warnings

    import torch

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(torch.get_num_threads())
    model, inputs = build_model(spec["size"])
    out = Path(spec["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    if spec["kind"] == "export_peft":
        from exporters.peft_export import export_peft

        call = lambda: export_peft(model, inputs, out)  # noqa: E731
    else:
        call = lambda: plain_export(model, inputs, out)  # noqa: E731
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        call()
        if profiler:
            profiler.disable()
        wall = time.perf_counter() - t0
    if profiler:
        profiler.dump_stats(spec["profile"])
    return {"kind": spec["kind"], "wall": wall, "bytes": out.stat().st_size}


def run_worker(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, cwd=str(HERE.parent))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {spec['kind']} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


# ============================================================================ latency
def prepare(size: str) -> dict[str, Path]:
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    from exporters.peft_export import export_peft
    from graph_tools.adapters.extract import extract_adapters
    from graph_tools.adapters.merge import merge_adapter

    root = WORK / size
    model, inputs = build_model(size)
    exported = export_peft(model, inputs, root / "lora.onnx").path
    pkg = extract_adapters(exported, root / "pkg")
    merged = merge_adapter(pkg.path, "default", root / "merged.onnx")
    return {"exported": exported, "pkg": pkg.path, "merged": Path(merged)}


def measure_latency(paths: dict[str, Path], vocab: int, seqs: list[int], runs: int, warmup: int) -> list[dict]:
    import numpy as np
    import onnxruntime as ort

    from graph_tools.runtime.session import AdapterSession

    def options():
        o = ort.SessionOptions()
        o.log_severity_level = 3
        return o

    cpu = ["CPUExecutionProvider"]
    adapter_session = AdapterSession(paths["pkg"], session_options=options())
    merged = ort.InferenceSession(str(paths["merged"]), options(), providers=cpu)
    baked = ort.InferenceSession(str(paths["exported"]), options(), providers=cpu)
    rows = []
    for seq in seqs:
        rng = np.random.default_rng(seq)
        ids = rng.integers(0, vocab, (1, seq), dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        cases = {
            "unmerged: AdapterSession adapter=default": lambda: adapter_session.run(None, feeds, adapter="default"),
            "merged: merge_adapter -> InferenceSession": lambda: merged.run(None, feeds),
            "unmerged, baked: export_peft graph -> InferenceSession": lambda: baked.run(None, feeds),
        }
        # same numbers from all three (a sanity check, not a benchmark)
        outs = [np.asarray(f()[0], dtype=np.float32) for f in cases.values()]
        err = max(float(np.max(np.abs(o - outs[2]))) for o in outs)
        for f in cases.values():
            for _ in range(warmup):
                f()
        samples: dict[str, list[float]] = {k: [] for k in cases}
        order = list(cases)
        shuffle = random.Random(seq)
        for _ in range(runs):
            shuffle.shuffle(order)
            for k in order:
                t = time.perf_counter()
                cases[k]()
                samples[k].append(time.perf_counter() - t)
        for k, v in samples.items():
            q = statistics.quantiles(v, n=10)
            rows.append({"seq": seq, "case": k, "p50": statistics.median(v) * 1e3, "p90": q[8] * 1e3, "n": len(v),
                         "max_abs_diff": err})
    return rows


# ============================================================================ report
def profile_summary(path: Path, top: int = 25) -> str:
    import io
    import pstats

    buf = io.StringIO()
    stats = pstats.Stats(str(path), stream=buf)
    stats.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def table(lat_rows: list[dict], export: dict, args) -> str:
    lines = ["| benchmark | variant | figure | goal | result |", "|---|---|---|---|---|"]
    for seq in sorted({r["seq"] for r in lat_rows}):
        rows = [r for r in lat_rows if r["seq"] == seq]
        merged = next(r for r in rows if r["case"].startswith("merged"))
        for r in rows:
            ratio = r["p50"] / merged["p50"]
            fig = f"p50 {r['p50']:.2f} ms, p90 {r['p90']:.2f} ms ({ratio:.2f}x merged p50, n={r['n']})"
            if r["case"].startswith("unmerged: AdapterSession"):
                goal = f"<= {GOAL_UNMERGED:.2f}x merged p50"
                res = "met" if ratio <= GOAL_UNMERGED else f"**MISSED** ({ratio:.2f}x)"
            else:
                goal, res = "reference", ""
            lines.append(f"| latency 1 x {seq} tokens | {r['case']} | {fig} | {goal} | {res} |")
    peft, plain = export["export_peft"], export["plain"]
    ratio = statistics.median(peft) / statistics.median(plain)
    fmt = lambda v: ", ".join(f"{x:.1f}" for x in v)  # noqa: E731
    lines.append(f"| export wall time (fresh process each) | plain torch.onnx.export(dynamo=True) | "
                 f"median {statistics.median(plain):.2f} s ({fmt(plain)}) | reference | |")
    res = "met" if ratio <= GOAL_EXPORT else f"**MISSED** ({ratio:.2f}x)"
    lines.append(f"| export wall time (fresh process each) | export_peft | median {statistics.median(peft):.2f} s "
                 f"({fmt(peft)}), {ratio:.2f}x plain | <= {GOAL_EXPORT:.2f}x plain | {res} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few runs: checks that everything runs")
    ap.add_argument("--runs", type=int, default=40, help="timed runs per variant and shape (after warm-up)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seqs", default="128,16", help="sequence lengths (batch 1)")
    ap.add_argument("--repeat", type=int, default=3, help="export measurements per exporter (fresh process each)")
    ap.add_argument("--profile", action="store_true", help="also cProfile one export_peft and one plain export")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(RESULT + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    size = "quick" if args.quick else "default"
    runs, warmup, repeat = (5, 1, 1) if args.quick else (args.runs, args.warmup, args.repeat)
    seqs = [int(s) for s in args.seqs.split(",")]
    print(f"model: {size} {SIZES[size]}, LoRA r=16 on {'/'.join(p.split('_')[0] for p in PROJECTIONS)}", file=sys.stderr)

    t0 = time.perf_counter()
    paths = prepare(size)
    print(f"prepared export/extract/merge in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    lat = measure_latency(paths, SIZES[size]["vocab"], seqs, runs, warmup)
    print(f"latency done (max |diff| between variants {max(r['max_abs_diff'] for r in lat):.2e})", file=sys.stderr)

    export: dict[str, list[float]] = {"export_peft": [], "plain": []}
    for i in range(repeat):
        for kind in (("export_peft", "plain") if i % 2 == 0 else ("plain", "export_peft")):
            r = run_worker({"kind": kind, "size": size, "out": str(WORK / size / f"export_{kind}.onnx")})
            export[kind].append(r["wall"])
            print(f"  {kind}: {r['wall']:.2f} s", file=sys.stderr)
    if args.profile:
        for kind in ("export_peft", "plain"):
            prof = WORK / size / f"{kind}.prof"
            run_worker({"kind": kind, "size": size, "out": str(WORK / size / f"export_{kind}.onnx"), "profile": str(prof)})
            print(f"\n--- cProfile {kind} (cumulative, top 25) ---\n{profile_summary(prof)}", file=sys.stderr)

    print(table(lat, export, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
