"""aimet-onnx side of bench_quant_peers.py; runs in the aimet venv (setup_aimet_venv.sh), one job per call.

    python _aimet_worker.py JOB.json

JOB.json: ``{"kind": "quantize" | "load", "model": path, "held": npz, "out": npz,
"result": json, "threads": n, ...}``

* ``quantize``: ``QuantizationSimModel(model, param_type, activation_type, quant_scheme,
  config_file)``, ``compute_encodings`` on ``calib`` (npz, run in batches of ``batch``), then
  ``last_hidden_state`` of the held-out feeds through the sim.
* ``load``: a sim of the fp32 ``model`` with ``config_file`` (AIMET's default when null); the
  quantizers of the tensors in ``disable`` (the package's float tensors) are disabled, then
  ``load_encodings_to_sim(sim, encodings, strict=strict)``; the result records what AIMET reported
  (mismatches, or the error a strict load raised) and how many quantizers hold a loaded encoding.
  ``feeds`` (npz, optional): extra inputs for every run (the adapter's slot values).
* ``mismatch_kinds``: the reported mismatches counted by field and by the op producing the tensor
  (or ``input``/``constant``).

Only numpy, onnx and aimet_onnx are imported here (no lora-onnx code).
"""

from __future__ import annotations

import json
import sys
import traceback

import numpy as np
import onnx


def _batches(npz, batch):
    n = len(next(iter(npz.values())))
    for i in range(0, n, batch):
        yield {k: v[i:i + batch] for k, v in npz.items()}


def _inputs(sim, feeds):
    names = {i.name for i in sim.session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def _outputs(sim, held, batch, extra):
    outs = [sim.session.run(None, _inputs(sim, {**f, **extra}))[0] for f in _batches(held, batch)]
    return np.concatenate(outs)


def _kinds(model, mismatches) -> dict[str, int]:
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    inputs = {i.name for i in model.graph.input}
    counts: dict[str, int] = {}
    for m in mismatches:
        name = m.quantizer_name
        where = producer.get(name) or ("input" if name in inputs else "constant")
        for field in ("enabled", "dtype", "bitwidth", "is_symmetric", "enc_type"):
            value = getattr(m, f"{field}_mismatch", None)
            if value is not None:
                key = f"{field} {value[0]}->{value[1]} ({where})"
                counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _sim(job):
    from aimet_onnx.quantsim import QuantizationSimModel

    model = onnx.load(job["model"])
    return QuantizationSimModel(
        model,
        param_type=job.get("param_type", "int8"),
        activation_type=job.get("activation_type", "int16"),
        quant_scheme=job.get("quant_scheme", "min_max"),
        config_file=job.get("config_file"),
        providers=["CPUExecutionProvider"],
        session_options_kwargs={"intra_op_num_threads": job.get("threads", 2), "inter_op_num_threads": 1},
    )


def run(job) -> dict:
    held = dict(np.load(job["held"]))
    batch = job.get("batch", 8)
    result: dict = {"kind": job["kind"]}
    sim = _sim(job)
    quantizers = sim.qc_quantize_op_dict
    result["quantizers_enabled"] = sum(1 for q in quantizers.values() if q.enabled)
    extra = dict(np.load(job["feeds"])) if job.get("feeds") else {}
    if job["kind"] == "quantize":
        calib = dict(np.load(job["calib"]))
        sim.compute_encodings([_inputs(sim, f) for f in _batches(calib, batch)])
    else:
        from aimet_onnx.quantsim import load_encodings_to_sim

        disabled = [n for n in job.get("disable", []) if n in quantizers]
        for name in disabled:
            quantizers[name].enabled = False
        result["disabled"] = len(disabled)
        try:
            mismatches = load_encodings_to_sim(sim, job["encodings"], strict=job["strict"])
        except Exception as exc:  # noqa: BLE001 - a refused load is the result we report
            result["loaded"] = False
            result["error"] = f"{type(exc).__name__}: {str(exc)[:6000]}"
            listed = str(exc).splitlines()[1:]  # a strict refusal lists "name:" then its "\tsetting" lines
            result["refused_quantizers"] = sum(1 for line in listed if line.endswith(":") and not line.startswith("\t"))
            result["traceback"] = traceback.format_exc()[-3000:]
            return result
        result["loaded"] = True
        result["mismatches"] = [str(m) for m in mismatches]
        result["mismatch_kinds"] = _kinds(onnx.load(job["model"], load_external_data=False), mismatches)
        enc = json.load(open(job["encodings"]))
        names = [e["name"] for e in enc.get("activation_encodings", []) + enc.get("param_encodings", [])]
        names += [e["name"] for e in enc.get("encodings", [])]
        result["encodings_in_file"] = len(names)
        result["encodings_applied"] = sum(1 for n in names if n in quantizers and quantizers[n].enabled)
        result["missing_in_sim"] = [n for n in names if n not in quantizers]
        result["quantizers_enabled_after"] = sum(1 for q in quantizers.values() if q.enabled)
    np.save(job["out"], _outputs(sim, held, batch, extra))
    return result


def main():
    job = json.load(open(sys.argv[1]))
    try:
        result = run(job)
    except Exception:  # noqa: BLE001 - reported to the parent, which prints it in the table
        result = {"kind": job.get("kind"), "error": traceback.format_exc()[-4000:]}
    with open(job["result"], "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
