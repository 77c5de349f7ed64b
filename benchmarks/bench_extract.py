"""Adapter-package benchmarks: extraction, conversion, per-run latency; Olive side by side.

    python benchmarks/bench_extract.py --size 1b        # the reported figures (~15 min, 2 cores)
    python benchmarks/bench_extract.py --size tiny      # a quick check that everything runs

Generates the synthetic model first if needed (``make_synthetic.py``), then runs every measurement
in a fresh Python process, so "peak RSS" is that process's ``ru_maxrss`` (whole process: imports,
the call, everything), and prints one markdown table:

* ``extract_adapters``: modes inputs / inputs+pack / external: wall time of the call (median of
  ``--repeat``) and peak RSS; Olive's ``ExtractAdapters`` pass (``olive-ai``, if importable by
  ``--olive-python``) on the same file, make_inputs=True / False.
* ``convert_peft_adapter`` for one adapter of the model (a PEFT ``save_pretrained`` folder).
* ``AdapterSession`` per-run latency, p50/p90 over ``--runs`` runs of batch 1 x 8 tokens, the
  modes interleaved run by run: base only, the same adapter every run, switching adapters every
  run; plain onnxruntime with ``RunOptions.add_active_adapter`` switching; external mode (one
  cached session per adapter) switching, and the cost of creating a session per adapter instead.

Goals (issue 5): >= 10x faster than Olive, < 1 GiB peak RSS for extraction, <= 2% p50 switching
overhead, convert < 1 s. Not run in CI; outputs go to ``benchmarks/_work/`` (gitignored).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# make_synthetic (onnx-ir, numpy) is imported by the driver functions only: a worker's process must
# import nothing of its own before the code it measures (onnx-ir first would load sympy eagerly)

GiB = 1024 ** 3
MiB = 1024 ** 2
RESULT = "RESULT "
GOAL_SPEEDUP = 10.0
GOAL_RSS = 1 * GiB
GOAL_SWITCH = 0.02
GOAL_CONVERT = 1.0


# =============================================================================== workers
# Each runs in its own process: `python bench_extract.py --worker '<json>'`, prints RESULT <json>.


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker_extract(job: dict) -> dict:
    from graph_tools.adapters.extract import extract_adapters

    base = _peak_rss()
    t0 = time.perf_counter()
    package = extract_adapters(job["model"], job["out"], mode=job["mode"], pack=job["pack"], format=job["format"],
                               share_base=job.get("share_base"))
    wall = time.perf_counter() - t0
    return {"wall": wall, "rss": _peak_rss(), "rss_import": base, "adapters": package.adapters}


def worker_olive(job: dict) -> dict:
    os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
    from olive.common.utils import WeightsFileFormat
    from olive.model import ONNXModelHandler
    from olive.passes.olive_pass import create_pass_from_dict
    from olive.passes.onnx.extract_adapters import ExtractAdapters

    base = _peak_rss()
    t0 = time.perf_counter()
    config = dict(job["config"])
    if "save_format" in config:
        config["save_format"] = WeightsFileFormat(config["save_format"])
    p = create_pass_from_dict(ExtractAdapters, config, disable_search=True)
    out = p.run(ONNXModelHandler(model_path=job["model"]), str(Path(job["out"]) / "model.onnx"))
    wall = time.perf_counter() - t0
    attrs = out.model_attributes or {}
    n = len(attrs.get("constant_inputs") or attrs.get("external_initializers") or {})
    return {"wall": wall, "rss": _peak_rss(), "rss_import": base, "tensors": n}


def worker_convert(job: dict) -> dict:
    import numpy as np

    if job.get("preimport"):  # diagnostic: the call without the cost of importing peft
        import peft  # noqa: F401
        import peft.utils.constants  # noqa: F401
        import peft.utils.other  # noqa: F401

    from graph_tools.adapters import files
    from graph_tools.adapters.convert import convert_peft_adapter

    base = _peak_rss()
    t0 = time.perf_counter()
    path = convert_peft_adapter(job["peft"], job["package"], name=job["name"])
    wall = time.perf_counter() - t0
    rss = _peak_rss()
    # sanity: the converted file holds exactly what extraction wrote for the same adapter
    ours, ref = files.read_adapter(path), files.read_adapter(job["reference"])
    same = sorted(ours) == sorted(ref) and all(np.array_equal(ours[k], ref[k]) for k in ref)
    return {"wall": wall, "rss": rss, "rss_import": base, "same_as_extracted": bool(same)}


def _percentiles(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50": statistics.median(s), "p90": s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))], "n": len(s)}


def _feeds(vocab: int):
    import numpy as np

    return {"input_ids": (np.arange(8, dtype=np.int64).reshape(1, 8) * 7 + 3) % vocab}


def _session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # slots are initializers that are also inputs: ORT warns per slot
    if threads:
        options.intra_op_num_threads = threads
    return options


def worker_latency(job: dict) -> dict:
    """inputs-mode package: AdapterSession base / same / switching, plain ORT LoraAdapter switching."""
    import onnxruntime as ort

    from graph_tools.runtime.session import AdapterSession

    feeds = _feeds(job["vocab"])
    a, b = job["adapters"][:2]
    session = AdapterSession(job["package"], session_options=_session_options(job["threads"]))
    plain = ort.InferenceSession(str(Path(job["package"]) / "model.onnx"), _session_options(job["threads"]),
                                 providers=["CPUExecutionProvider"])
    lora = {}
    run_options = {}
    for name in (a, b):
        lora[name] = ort.LoraAdapter()
        lora[name].Load(str(Path(job["package"]) / "adapters" / f"{name}.onnx_adapter"))
        run_options[name] = ort.RunOptions()
        run_options[name].add_active_adapter(lora[name])  # keeps a raw pointer: `lora` stays alive

    state = {"switch": 0, "ort_switch": 0}

    def base_only():
        session.run(None, feeds, adapter=None)

    def same():
        session.run(None, feeds, adapter=a)

    def same_b():
        session.run(None, feeds, adapter=b)

    def switch():
        state["switch"] ^= 1
        session.run(None, feeds, adapter=(a, b)[state["switch"]])

    def ort_switch():
        state["ort_switch"] ^= 1
        plain.run(None, feeds, run_options[(a, b)[state["ort_switch"]]])

    cases = {"base": base_only, "same": same, "same_b": same_b, "switch": switch, "ort_switch": ort_switch}
    return {"latency": _interleaved(cases, job["runs"], job["warmup"]), "rss": _peak_rss()}


def worker_external(job: dict) -> dict:
    """external-mode package: one cached session per adapter, switching; cost of a new session."""
    from graph_tools.runtime.session import AdapterSession

    feeds = _feeds(job["vocab"])
    a, b = job["adapters"][:2]
    rss0 = _peak_rss()
    session = AdapterSession(job["package"], session_options=_session_options(job["threads"]))
    created, rss_after = {}, {}
    for name in (a, b):  # the first run with an adapter creates its session
        t0 = time.perf_counter()
        session.run(None, feeds, adapter=name)
        created[name] = time.perf_counter() - t0
        rss_after[name] = _peak_rss()
    rss_two = _peak_rss()
    state = {"switch": 0}

    def same():
        session.run(None, feeds, adapter=a)

    def same_b():
        session.run(None, feeds, adapter=b)

    def switch():
        state["switch"] ^= 1
        session.run(None, feeds, adapter=(a, b)[state["switch"]])

    latency = _interleaved({"ext_same": same, "ext_same_b": same_b, "ext_switch": switch}, job["runs"], job["warmup"])
    # the alternative to a cached session per adapter: a new session at every switch
    new_session = []
    for i in range(job["new_sessions"]):
        name = (a, b)[i % 2]
        t0 = time.perf_counter()
        fresh = AdapterSession(job["package"], session_options=_session_options(job["threads"]))
        fresh.run(None, feeds, adapter=name)
        new_session.append(time.perf_counter() - t0)
        del fresh
    if new_session:
        latency["ext_new_session"] = _percentiles(new_session)
    return {"latency": latency, "first_run_with_new_adapter": created, "rss_before": rss0, "rss_after": rss_after,
            "rss_two_sessions": rss_two, "rss": _peak_rss()}


def _interleaved(cases: dict, runs: int, warmup: int) -> dict:
    """Run every case ``runs`` times, the order shuffled each round, so drift hits all alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in cases}
    order = list(cases)
    rng = random.Random(0)
    for _ in range(runs):
        rng.shuffle(order)
        for key in order:
            t0 = time.perf_counter()
            cases[key]()
            samples[key].append(time.perf_counter() - t0)
    result = {k: _percentiles(v) for k, v in samples.items()}
    # reference: "same adapter every run", the mean of adapter A's and adapter B's cases (so a cost
    # difference between the two adapters is not mistaken for switching overhead)
    refs = [k for k in samples if k.endswith(("same", "same_b"))]
    ref_p50 = statistics.mean(result[k]["p50"] for k in refs)
    ref_rounds = [statistics.mean(r) for r in zip(*(samples[k] for k in refs))]
    for k, v in samples.items():
        result[k]["vs_same"] = result[k]["p50"] / ref_p50 - 1
        # paired estimate: median over rounds of (case / reference - 1), robust to drift between rounds
        result[k]["paired"] = statistics.median(x / y - 1 for x, y in zip(v, ref_rounds))
    return result


WORKERS = {"extract": worker_extract, "olive": worker_olive, "convert": worker_convert,
           "latency": worker_latency, "external": worker_external}


# ================================================================================ driver


def spawn(job: dict, *, python: str | None = None, timeout: float = 3600, code: str | os.PathLike | None = None) -> dict:
    """Run one worker in a fresh process; returns its result plus the process's wall time
    (``process_wall``) and CPU time (``process_cpu``: user + system, children included).
    ``code``: another checkout whose ``graph_tools`` the worker imports (e.g. the code before a change)."""
    cmd = [python or sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = dict(os.environ, OLIVE_DISABLE_TELEMETRY="1", PYTHONWARNINGS="ignore")
    bytecode_env(env)
    if code is not None:
        env["PYTHONPATH"] = str(Path(code).resolve())
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(Path(code).resolve() if code is not None else HERE.parent))
    total = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"worker {job['kind']} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1][len(RESULT):])
    result["process_wall"] = total
    result["process_cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def bytecode_env(env: dict) -> dict:
    """Workers cache compiled bytecode, as a default Python and ``pip install`` do: without
    ``PYTHONDONTWRITEBYTECODE`` (set on some CI/dev machines) every process would recompile
    graph_tools' sources, ~0.1 s that no installed user pays. ``__pycache__`` is gitignored."""
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def warm_cache(path: Path) -> None:
    """Read a file once so every measured run starts with it in the page cache."""
    with open(path, "rb") as f:
        while f.read(64 * MiB):
            pass


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    versions = {}
    for mod in ("onnxruntime", "onnx_ir", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass
    return {"cpu": cpu, "cores": cores, "ram_gib": round(ram / GiB, 1), "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), **versions}


def olive_version(python: str) -> str | None:
    code = "import importlib.metadata as m; print(m.version('olive-ai'))"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def fmt_s(x: float) -> str:
    return f"{x:.2f} s" if x >= 0.1 else f"{x * 1000:.1f} ms"


def fmt_ms(x: float) -> str:
    if x < 0.001:
        return f"{x * 1000:.3f} ms"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def fmt_mem(x: int) -> str:
    return f"{x / GiB:.2f} GiB" if x >= GiB else f"{x / MiB:.0f} MiB"


def run_all(args) -> str:
    import make_synthetic

    root = make_synthetic.generate(args.size, dtype=args.dtype)
    info = json.loads((root / "info.json").read_text())
    model = root / "model" / "model.onnx"
    out = root / "out"
    _rmtree(out)
    out.mkdir()
    warm_cache(model.parent / make_synthetic.DATA_NAME)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows: list[tuple] = []
    extract_wall: dict[str, float] = {}
    extract_rss: dict[str, int] = {}

    def measure(label, job, repeat, python=None, keep=False):
        walls, rsses, procs, base = [], [], [], []
        for i in range(repeat):
            _rmtree(Path(job["out"]))
            os.sync()  # start clean: no writeback of earlier runs' output competing with this one
            log(f"  {label} [{i + 1}/{repeat}] ...")
            r = spawn(job, python=python)
            walls.append(r["wall"])
            rsses.append(r["rss"])
            procs.append(r["process_wall"])
            base.append(r["rss_import"])
            log(f"    {fmt_s(r['wall'])}, peak RSS {fmt_mem(r['rss'])}")
        if not keep:
            _rmtree(Path(job["out"]))
        return statistics.median(walls), max(rsses), statistics.median(procs), max(base)

    parts = set(args.parts.split(","))
    convert_wall = convert_preimported = None
    lat, ext = {}, None

    # -- extraction ------------------------------------------------------------------------
    log("extraction")
    ours = {"inputs": ("inputs", False), "inputs+pack": ("inputs", True), "external": ("external", False)}
    if "extract" not in parts:  # only the packages the other parts need, untimed
        ours = {k: v for k, v in ours.items() if k in ("inputs", "external")}
    for label, (mode, pack) in ours.items():
        job = {"kind": "extract", "model": str(model), "out": str(out / f"pkg_{label}"), "mode": mode, "pack": pack,
               "format": "onnx_adapter"}
        wall, rss, proc, base = measure(label, job, args.repeat if "extract" in parts else 1,
                                        keep=label in ("inputs", "external"))
        if "extract" not in parts:
            continue
        extract_wall[label], extract_rss[label] = wall, rss
        rows.append(("extract", f"`extract_adapters` mode={label}", wall, rss, proc, base))

    olive_python = args.olive_python or sys.executable
    olive = None if args.no_olive or "extract" not in parts else olive_version(olive_python)
    if olive:
        external = {"save_as_external_data": True, "all_tensors_to_one_file": True, "save_format": "onnx_adapter"}
        olive_cases = (
            # Olive's defaults: what issue 5's reference figures (43.8 s, 9.05 GiB) were measured with
            ("olive inputs default", "make_inputs=True, default config", {}),
            ("olive inputs", "make_inputs=True, save_as_external_data", {"make_inputs": True, **external}),
            ("olive external", "make_inputs=False, save_as_external_data", {"make_inputs": False, **external}),
        )
        for key, text, config in olive_cases:
            job = {"kind": "olive", "model": str(model), "out": str(out / "olive"), "config": config}
            try:
                wall, rss, proc, base = measure(key, job, args.olive_repeat, python=olive_python)
            except Exception as exc:  # report, keep going
                log(f"  {key} failed: {exc}")
                continue
            extract_wall[key], extract_rss[key] = wall, rss
            rows.append(("extract", f"Olive {olive} `ExtractAdapters` {text}", wall, rss, proc, base))
    elif "extract" in parts:
        log("  olive-ai not importable: Olive rows skipped")

    # -- convert ---------------------------------------------------------------------------
    adapter = info["adapters"][0]
    pkg_inputs = out / "pkg_inputs"
    walls, rsses, same = [], [], True
    for i in range(args.repeat if "convert" in parts else 0):
        if i == 0:
            log("convert")
        r = spawn({"kind": "convert", "peft": str(root / "peft" / adapter), "package": str(pkg_inputs),
                   "name": f"converted_{adapter}", "reference": str(pkg_inputs / "adapters" / f"{adapter}.onnx_adapter")})
        walls.append(r["wall"])
        rsses.append(r["rss"])
        same = same and r["same_as_extracted"]
        log(f"  [{i + 1}/{args.repeat}] {fmt_s(r['wall'])}, peak RSS {fmt_mem(r['rss'])}, same as extracted: {same}")
    diag = []
    for i in range(args.repeat if "convert" in parts else 0):
        r = spawn({"kind": "convert", "peft": str(root / "peft" / adapter), "package": str(pkg_inputs), "preimport": True,
                   "name": f"converted_{adapter}", "reference": str(pkg_inputs / "adapters" / f"{adapter}.onnx_adapter")})
        diag.append(r["wall"])
    if walls:
        convert_wall, convert_preimported = statistics.median(walls), statistics.median(diag)
        log(f"  with peft already imported: {fmt_s(convert_preimported)}")

    # -- latency ---------------------------------------------------------------------------
    lat_size = args.latency_size or args.size
    if lat_size != args.size and "latency" in parts:
        lat_root = make_synthetic.generate(lat_size, dtype=args.dtype)
        lat_out = lat_root / "out"
        _rmtree(lat_out)
        lat_out.mkdir()
        for label, mode in (("inputs", "inputs"), ("external", "external")):
            spawn({"kind": "extract", "model": str(lat_root / "model" / "model.onnx"), "out": str(lat_out / f"pkg_{label}"),
                   "mode": mode, "pack": False, "format": "onnx_adapter"})
    else:
        lat_out = out
    vocab = make_synthetic.SIZES[lat_size].vocab
    common = {"vocab": vocab, "adapters": info["adapters"], "runs": args.runs, "warmup": args.warmup,
              "threads": args.threads}
    if "latency" in parts:
        log(f"latency ({lat_size} graph, {args.runs} runs per case)")
        lat = spawn({"kind": "latency", "package": str(lat_out / "pkg_inputs"), **common})["latency"]
        log("latency, external mode")
        ext = spawn({"kind": "external", "package": str(lat_out / "pkg_external"), "new_sessions": args.new_sessions,
                     **common})
        lat.update(ext["latency"])

    # -- table -----------------------------------------------------------------------------
    m = machine()
    olive_best = {k: v for k, v in extract_wall.items() if k.startswith("olive")}
    lines = [
        f"Synthetic Llama-shaped graph `{args.size}`: {_count(info['base_params'])} base parameters {info['dtype']} "
        f"({info['data_bytes'] / GiB:.2f} GiB external data), {len(info['adapters'])} adapters r=16 on q/k/v/o/gate/up/down, "
        f"{info['lora_tensors']} LoRA tensors ({info['lora_params'] * (2 if info['dtype'] == 'float16' else 4) / MiB:.0f} MiB). "
        f"Latency on the `{lat_size}` graph, batch 1 x 8 tokens, p50/p90 of {args.runs} runs per case, the cases "
        f"interleaved in shuffled rounds; \"paired median\" = median over rounds of (case / same-adapter mean of that round - 1).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; Python {m['python']}, onnxruntime "
        f"{m.get('onnxruntime')}, onnx-ir {m.get('onnx_ir')}; {m['date']}.",
        "",
        "| measurement | wall (median) | peak RSS | goal |",
        "|---|---|---|---|",
    ]
    for _, label, wall, rss, proc, base in rows:
        goal = ""
        if label.startswith("`extract"):
            key = label.split("mode=")[1].rstrip("`").strip()
            checks = [("< 1 GiB RSS", rss < GOAL_RSS)]
            refs = [("olive inputs default", "Olive defaults")]
            refs.append(("olive external", "Olive external") if key == "external" else ("olive inputs", "Olive ext. data"))
            for i, (olive_key, olive_text) in enumerate(refs):
                if olive_key in olive_best:
                    speedup = olive_best[olive_key] / wall
                    checks.append((f"{speedup:.1f}x faster than {olive_text}" + (" (goal >= 10x)" if i == 0 else ""),
                                   speedup >= GOAL_SPEEDUP))
            goal = "; ".join(f"{'✅' if ok else '❌'} {text}" for text, ok in checks)
        lines.append(f"| {label} | {fmt_s(wall)} (process {fmt_s(proc)}) | {fmt_mem(rss)} (imports {fmt_mem(base)}) | {goal} |")
    ok = convert_wall is not None and convert_wall < GOAL_CONVERT
    if convert_wall is not None:
        lines.append(f"| `convert_peft_adapter` one adapter ({info['lora_tensors'] // 2} tensors) | {fmt_s(convert_wall)} | "
                 f"{fmt_mem(max(rsses))} | {'✅' if ok else '❌'} < 1 s; output identical to extracted: {same} |")
        lines.append(f"| `convert_peft_adapter`, peft already imported (diagnostic) | {fmt_s(convert_preimported)} | | |")
    if lat:
        lines += ["", "| per-run latency | p50 | p90 | vs same adapter (mean of A, B): p50 / paired median | goal |",
              "|---|---|---|---|---|"]
    names = {
        "base": "AdapterSession, base only (no adapter)",
        "same": "AdapterSession, same adapter every run (adapter A)",
        "same_b": "AdapterSession, same adapter every run (adapter B)",
        "switch": "AdapterSession, switching adapters every run",
        "ort_switch": "plain ORT `RunOptions.add_active_adapter`, switching",
        "ext_same": "external mode, same adapter A (cached session)",
        "ext_same_b": "external mode, same adapter B (cached session)",
        "ext_switch": "external mode, switching (one cached session per adapter)",
        "ext_new_session": "external mode, new session per adapter (create + first run)",
    }
    for key, label in names.items():
        if key not in lat:
            continue
        p50, p90 = lat[key]["p50"], lat[key]["p90"]
        rel = lat[key].get("vs_same", 0.0)
        paired = lat[key].get("paired")
        goal = ""
        if key in ("switch", "ext_switch"):  # judged on the paired median: robust when latency is bimodal
            goal = f"{'✅' if paired <= GOAL_SWITCH else '❌'} <= 2% overhead (paired median)"
        both = "" if key == "ext_new_session" else f"{rel * 100:+.1f}% / {paired * 100:+.1f}%"
        lines.append(f"| {label} | {fmt_ms(p50)} | {fmt_ms(p90)} | {both} | {goal} |")
    if ext is not None:
        lines += ["", f"External mode: first run with a new adapter (creates its session): "
                  + ", ".join(f"{k} {fmt_s(v)}" for k, v in ext["first_run_with_new_adapter"].items())
                  + f"; peak RSS after imports {fmt_mem(ext['rss_before'])}, after the first adapter session "
                  + f"{fmt_mem(ext['rss_after'][info['adapters'][0]])}, after the second {fmt_mem(ext['rss_two_sessions'])}."]
    if not args.keep:
        _rmtree(out)
        if lat_out != out:
            _rmtree(lat_out)
    return "\n".join(lines)


def main(argv=None) -> int:
    import make_synthetic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(make_synthetic.SIZES), default="tiny")
    parser.add_argument("--dtype", choices=make_synthetic.DTYPES, default="float16",
                        help="weight dtype of the synthetic model (the reported figures: float16)")
    parser.add_argument("--latency-size", choices=sorted(make_synthetic.SIZES), default=None,
                        help="graph for the latency rows (default: --size)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per extraction/convert measurement (median)")
    parser.add_argument("--olive-repeat", type=int, default=3)
    parser.add_argument("--runs", type=int, default=100, help="runs per latency case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--new-sessions", type=int, default=4, help="session creations timed (external mode)")
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    parser.add_argument("--olive-python", default=None,
                        help="python with olive-ai installed (default: this one; e.g. benchmarks/_work/olive-venv/bin/python)")
    parser.add_argument("--no-olive", action="store_true")
    parser.add_argument("--parts", default="extract,convert,latency",
                        help="comma-separated subset of extract,convert,latency")
    parser.add_argument("--keep", action="store_true", help="keep the extracted packages in _work/<size>/out")
    parser.add_argument("--output", default=None, help="also write the table to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args.worker)
    table = run_all(args)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return 0


def run_worker(job: str) -> int:
    job = json.loads(job)
    print(RESULT + json.dumps(WORKERS[job["kind"]](job)), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":  # spawn(): straight to the job, nothing else imported
        sys.exit(run_worker(sys.argv[2]))
    sys.exit(main())
