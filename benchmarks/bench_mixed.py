"""Mixed-adapter batches: 8 requests for 8 different adapters in one run vs 8 sequential runs.

    python benchmarks/bench_mixed.py            # ~5 min on 2 cores (export included)

Model: a transformers ``LlamaConfig`` (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab
32000) with 8 PEFT adapters r=16 on q/k/v/o/gate/up/down (random, ``init_lora_weights=False``),
exported with ``export_peft(with_past=True)`` and extracted into one package (fp32). Cases, each
request 1 x 128 prompt tokens (prefill) then 64 greedy new tokens (decode, KV cache fed back):

* ``sequential``: the 8 requests one after the other, switching adapter per request
* ``mixed``: the 8 requests as one batch of 8, ``adapter=[a0, ..., a7]`` (one run per step; the
  layout chosen per run: "rows", per-row stacked, for this batch)
* ``mixed, concat layout``: the same on a second session forced to the "concat" layout (rank
  concat + row mask) for every run
* ``concat``: batch of 8, all 8 adapters active on every row (``{a0: 1, ..., a7: 1}``) on the
  package graph: every row pays the sum of ranks, as the "concat" layout does
* ``one adapter``: batch of 8, every row ``a0`` (the package graph, single-adapter path)
* ``merged``: batch of 8 on ``merge_adapter(a0)`` (plain ORT, no LoRA branch): the reference
  for the per-row cost of the adapter path

Timings: median of ``--repeat`` rounds, ``--threads`` intra-op threads; within a round the cases
are interleaved step by step (one prefill or decode step of each in turn, 8 one-row steps of the
sequential case, whose 8 requests run one after the other), so that load from other processes falls on
every case alike. The mixed rows are checked against the sequential ones (max abs logit difference
printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORK = Path(os.environ.get("LORA_ONNX_BENCH_DIR") or HERE / "_work") / "mixed"

N_ADAPTERS, PROMPT, NEW = 8, 128, 64
GOAL_DECODE = 3.0
GOAL_ROW_COST = 1.15


def build(folder: Path) -> tuple[Path, Path]:
    """Export + extract once: (package folder, merged model path)."""
    package, merged = folder / "package", folder / "merged" / "model.onnx"
    if (package / "manifest.json").is_file() and merged.is_file():
        return package, merged
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from exporters import export_peft
    from graph_tools.adapters.extract import extract_adapters
    from graph_tools.adapters.merge import merge_adapter

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    peft_model = get_peft_model(model, lora, adapter_name="a0")
    for i in range(1, N_ADAPTERS):
        peft_model.add_adapter(f"a{i}", lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape) * 0.02)
    example = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.int64)}
    export = folder / "export" / "model.onnx"
    export_peft(peft_model.eval(), example, export, with_past=True)
    extract_adapters(export, package)
    merge_adapter(package, "a0", merged)
    return package, merged


class Runner:
    """Greedy prefill + decode through ``run(feeds) -> [logits, presents...]``, one step per
    ``next()`` (so that the cases can be interleaved step by step); times add up in ``times``."""

    def __init__(self, run, layers: int, kv_shape: tuple[int, int]):
        self.run, self.layers, self.kv_shape = run, layers, kv_shape

    def steps(self, ids: np.ndarray, times: dict, last: list):
        batch, seq = ids.shape
        past = [np.zeros((batch, self.kv_shape[0], 0, self.kv_shape[1]), np.float32)] * (2 * self.layers)
        mask = np.ones((batch, seq), np.int64)
        t0 = time.perf_counter()
        logits, past = self._step(ids, mask, past, 0)
        times["prefill"] += time.perf_counter() - t0
        tokens = [logits[:, -1].argmax(-1)]
        for _ in range(NEW - 1):
            yield
            t0 = time.perf_counter()
            mask = np.ones((batch, mask.shape[1] + 1), np.int64)
            logits, past = self._step(tokens[-1][:, None], mask, past, mask.shape[1] - 1)
            tokens.append(logits[:, -1].argmax(-1))
            times["decode"] += time.perf_counter() - t0
        last.append(logits[:, -1])
        yield

    def _step(self, ids, mask, past, start):
        seq = ids.shape[1]
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask,
                 "position_ids": np.broadcast_to(np.arange(start, start + seq, dtype=np.int64), ids.shape).copy()}
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        out = self.run(feeds)
        return out[0], out[1:]


def interleaved(cases: dict, order: list, per_turn: dict) -> dict:
    """Run every case once, ``per_turn[case]`` steps (default 1) of each in turn:
    ``{case: (prefill s, decode s, last logits)}``."""
    times = {k: {"prefill": 0.0, "decode": 0.0} for k in cases}
    last = {k: [] for k in cases}
    running = {k: cases[k](times[k], last[k]) for k in order}
    while running:
        for key in list(running):
            for _ in range(per_turn.get(key, 1)):
                if next(running[key], StopIteration) is StopIteration:
                    del running[key]
                    break
    return {k: (times[k]["prefill"], times[k]["decode"], np.concatenate(last[k], 0)) for k in cases}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    from graph_tools.runtime.session import AdapterSession

    package, merged = build(WORK)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3  # slots are initializers that are also inputs: by design
    session = AdapterSession(package, session_options=options)
    forced = AdapterSession(package, session_options=options)  # its own mixed session: every run "concat"

    def concat_layout(output_names, feeds, choices, run_options):
        values = forced._mixed_session(forced._row_keys(choices), "concat")
        return forced._ort_run(values[0], output_names, {**feeds, **values[1]}, run_options)

    forced._run_mixed = concat_layout
    plain = ort.InferenceSession(str(merged), options, providers=["CPUExecutionProvider"])
    past_in = [i for i in plain.get_inputs() if i.name.startswith("past_key_values")]
    kv_shape = (int(past_in[0].shape[1]), int(past_in[0].shape[3]))
    layers = len(past_in) // 2
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 32000, (N_ADAPTERS, PROMPT))

    def with_adapter(choice):
        return Runner(lambda feeds: session.run(None, feeds, adapter=choice), layers, kv_shape)

    def sequential(times, last):
        for i, name in enumerate(names):
            yield from with_adapter(name).steps(prompts[i: i + 1], times, last)

    merged_runner = Runner(lambda feeds: plain.run(None, feeds), layers, kv_shape)
    cases = {
        "sequential": sequential,
        "mixed": lambda times, last: with_adapter(list(names)).steps(prompts, times, last),
        "mixed, concat layout": lambda times, last: Runner(lambda feeds: forced.run(None, feeds, adapter=list(names)),
                                                           layers, kv_shape).steps(prompts, times, last),
        "concat": lambda times, last: with_adapter({n: 1.0 for n in names}).steps(prompts, times, last),
        "one adapter": lambda times, last: with_adapter("a0").steps(prompts, times, last),
        "merged": lambda times, last: merged_runner.steps(prompts, times, last),
    }
    load_start = os.getloadavg()[0]
    per_turn = {"sequential": N_ADAPTERS}  # 8 one-row steps per turn, against one 8-row step of the others
    interleaved(cases, list(cases), per_turn)  # warm-up: sessions, cached feeds
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    outputs = {}
    order = list(cases)
    for r in range(args.repeat):
        order = order[1:] + order[:1]
        for key, (pre, dec, logits) in interleaved(cases, order, per_turn).items():
            samples[key].append((pre, dec))
            outputs[key] = logits
        print(f"  round {r + 1}/{args.repeat} done", file=sys.stderr, flush=True)
    diff = float(np.abs(outputs["mixed"] - outputs["sequential"]).max())
    med = {k: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v)) for k, v in samples.items()}
    pre_tps = {k: N_ADAPTERS * PROMPT / v[0] for k, v in med.items()}
    dec_tps = {k: N_ADAPTERS * (NEW - 1) / v[1] for k, v in med.items()}
    import platform

    lines = [
        f"Llama-shaped (hidden 512, 4 layers, vocab 32000) fp32, {N_ADAPTERS} adapters r=16 on q/k/v/o/gate/up/down; "
        f"{N_ADAPTERS} requests x {PROMPT} prompt tokens, {NEW} greedy new tokens each; intra-op threads {args.threads}; "
        f"median of {args.repeat} rounds, cases interleaved step by step; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"onnxruntime {ort.__version__}; load average (1 min) {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end. "
        f"Mixed vs sequential last logits: max abs diff {diff:.2e}.",
        "",
        "| case | prefill | prefill tok/s | decode (63 steps) | decode tok/s | vs sequential (decode) | per-row cost vs merged (prefill / decode) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in cases:
        pre, dec = med[key]
        ratio = f"{dec_tps[key] / dec_tps['sequential']:.2f}x"
        row = f"{med[key][0] / med['merged'][0]:.2f}x / {med[key][1] / med['merged'][1]:.2f}x"
        lines.append(f"| {key} | {pre * 1000:.0f} ms | {pre_tps[key]:.0f} | {dec * 1000:.0f} ms | {dec_tps[key]:.0f} | {ratio} | {row} |")
    ok_dec = dec_tps["mixed"] / dec_tps["sequential"] >= GOAL_DECODE
    ok_row = med["mixed"][1] / med["merged"][1] <= GOAL_ROW_COST
    lines += ["", f"Goals: decode >= 3x sequential tokens/s: {'✅' if ok_dec else '❌'} "
                  f"{dec_tps['mixed'] / dec_tps['sequential']:.2f}x; per-row cost of the adapter path <= 1.15x merged "
                  f"(decode): {'✅' if ok_row else '❌'} {med['mixed'][1] / med['merged'][1]:.2f}x "
                  f"(prefill {med['mixed'][0] / med['merged'][0]:.2f}x)."]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
