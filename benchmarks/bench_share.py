"""Shared-base packages vs copies vs ``cp`` vs Olive ``ExtractAdapters``, whole process.

    LORA_ONNX_BENCH_DIR=/data/bench python benchmarks/bench_share.py --size 1b --olive-python <venv>/bin/python

Every case runs in a fresh process (``bench_extract.py --worker``); "whole process" is the wall
time from process start to exit (interpreter, imports, the call) and peak RSS its ``ru_maxrss``.
Rounds interleave the cases; medians of ``--repeat`` rounds. The data file is in the page cache
(read once first); ``sync`` before every case so no writeback of an earlier case competes.

* ``cp``: ``cp model.onnx model.onnx.data <dir>/`` (what "copy the base" costs at least)
* ``extract_adapters`` copy (inputs mode, out_dir elsewhere): base byte ranges copied by the kernel
* ``extract_adapters`` shared (out_dir = the export's folder): nothing of the base written; each
  round starts from the same folder with the package parts removed (onnx-ir refuses hard-linked
  data files, so the folder holds its own copy of the export, made once)
* ``lora-onnx extract model.onnx -o <export folder> -q``: the same shared-base extraction through
  the console script as pip generates it from ``[project.scripts]`` (``python -c "from <module>
  import <func>; sys.exit(<func>())"``), i.e. the user's whole process; its folder is restored
  like the API case's. There is no "call" figure for it: the process is the call.
* Olive ``ExtractAdapters`` with its defaults (make_inputs=True), if ``--olive-python`` imports it
* ``--baseline DIR``: the copy and shared cases once more with the ``graph_tools`` of another
  checkout (e.g. ``git worktree add /tmp/before <commit>``), in the same rounds

Besides wall time, each case's CPU time (user + system of the process) is shown: on a machine
shared with other jobs the wall time waits for the CPU, the CPU time much less so. The load
average (``os.getloadavg``, 1 min) is read before every case; its median and range are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_extract as B  # noqa: E402
import make_synthetic  # noqa: E402

GOAL_SHARED_S = 1.5
GOAL_SHARED_RSS = 400 * B.MiB
GOAL_COPY_VS_CP = 1.3


def _cp(model: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["cp", str(model), str(model.parent / make_synthetic.DATA_NAME), str(dst)], check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"process_wall": wall, "wall": wall, "process_cpu": cpu, "rss": 0}


def _shared(model: Path, folder: Path, code: str | None = None) -> dict:
    """Extract beside the export in ``folder`` (made once as a copy of the export; restored
    between rounds: the data file is never written, the package parts are removed)."""
    _restore_shared(model, folder)
    job = {"kind": "extract", "model": str(folder / "model.onnx"), "out": str(folder), "mode": "inputs", "pack": False,
           "format": "onnx_adapter", "share_base": True}
    return B.spawn(job, code=code)


def _restore_shared(model: Path, folder: Path) -> None:
    if not folder.is_dir():
        folder.mkdir(parents=True)
        shutil.copy(model, folder / "model.onnx")
        shutil.copy(model.parent / make_synthetic.DATA_NAME, folder / make_synthetic.DATA_NAME)
        B.warm_cache(folder / make_synthetic.DATA_NAME)
    if (folder / "source.onnx").is_file():
        os.replace(folder / "source.onnx", folder / "model.onnx")
    shutil.rmtree(folder / "adapters", ignore_errors=True)
    (folder / "manifest.json").unlink(missing_ok=True)
    os.sync()


def _script_command(root: Path) -> list[str]:
    """The ``lora-onnx`` console script, as pip writes it from ``root``'s ``[project.scripts]``
    (a checkout without pyproject.toml, e.g. ``git archive <commit> graph_tools``: its ``cli.main``)."""
    import tomllib

    pyproject = root / "pyproject.toml"
    target = (tomllib.loads(pyproject.read_text())["project"]["scripts"]["lora-onnx"] if pyproject.is_file()
              else "graph_tools.cli:main")
    module, _, func = target.partition(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


def _shared_cli(model: Path, folder: Path, code: str | None = None) -> dict:
    """``lora-onnx extract`` beside the export (shares by default); wall and ``wait4`` rusage of the one child."""
    _restore_shared(model, folder)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    B.bytecode_env(env)
    root = Path(code).resolve() if code is not None else HERE.parent
    env["PYTHONPATH"] = str(root)
    cmd = _script_command(root) + ["extract", str(folder / "model.onnx"), "-o", str(folder), "-q"]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # files: no pipe to drain while waiting
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=str(root))
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss: its peak)
        wall = time.perf_counter() - t0
        rc = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if rc != 0 or not stdout.startswith("package "):
        raise RuntimeError(f"lora-onnx extract failed (exit {rc}):\n{stderr[-2000:]}")
    return {"process_wall": wall, "wall": None, "process_cpu": usage.ru_utime + usage.ru_stime,
            "rss": usage.ru_maxrss * 1024}


def _copy(model: Path, out: Path, code: str | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    job = {"kind": "extract", "model": str(model), "out": str(out), "mode": "inputs", "pack": False,
           "format": "onnx_adapter", "share_base": False}
    return B.spawn(job, code=code)


def _olive(model: Path, out: Path, python: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    return B.spawn({"kind": "olive", "model": str(model), "out": str(out), "config": {}}, python=python)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(make_synthetic.SIZES), default="tiny")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--olive-python", default=None)
    parser.add_argument("--olive-repeat", type=int, default=3)
    parser.add_argument("--baseline", default=None, help="another checkout: its copy/shared rows in the same rounds")
    parser.add_argument("--baseline-label", default="before")
    args = parser.parse_args(argv)
    root = make_synthetic.generate(args.size)
    info = json.loads((root / "info.json").read_text())
    model = root / "model" / "model.onnx"
    work = root / "share_bench"
    B.warm_cache(model.parent / make_synthetic.DATA_NAME)
    olive = B.olive_version(args.olive_python) if args.olive_python else None
    for code in filter(None, [HERE.parent, args.baseline]):  # compile each checkout's bytecode once, before the rounds
        env = B.bytecode_env(dict(os.environ, PYTHONPATH=str(Path(code).resolve())))
        subprocess.run([sys.executable, "-c", "import graph_tools.cli"], check=True, env=env, cwd=str(code))
    cases = {"cp": lambda: _cp(model, work / "cp"), "copy": lambda: _copy(model, work / "copy"),
             "shared": lambda: _shared(model, work / "shared"), "cli": lambda: _shared_cli(model, work / "cli")}
    if args.baseline:
        cases["copy_base"] = lambda: _copy(model, work / "copy_base", args.baseline)
        cases["shared_base"] = lambda: _shared(model, work / "shared_base", args.baseline)
        cases["cli_base"] = lambda: _shared_cli(model, work / "cli_base", args.baseline)
    cases["olive"] = lambda: _olive(model, work / "olive", args.olive_python)
    results: dict[str, list[dict]] = {k: [] for k in cases}
    loads: list[float] = []
    rounds = max(args.repeat, args.olive_repeat if olive else 0)
    for i in range(rounds):
        todo = [k for k in cases if k != "olive" and i < args.repeat] + (["olive"] if olive and i < args.olive_repeat else [])
        if i % 2:  # alternate the order, so no case always follows the same one
            todo = todo[::-1]
        for key in todo:
            loads.append(os.getloadavg()[0])
            r = cases[key]()
            r["load"] = loads[-1]
            results[key].append(r)
            print(f"  {key} [{i + 1}]: process {r['process_wall']:.2f} s (cpu {r['process_cpu']:.2f} s), "
                  f"rss {B.fmt_mem(r['rss'])}, load {r['load']:.1f}", file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    results = {k: v for k, v in results.items() if v}
    med = {k: statistics.median(r["process_wall"] for r in v) for k, v in results.items()}
    cpu = {k: statistics.median(r["process_cpu"] for r in v) for k, v in results.items()}
    rss = {k: max(r["rss"] for r in v) for k, v in results.items()}
    call = {k: statistics.median(r["wall"] for r in v) if v[0]["wall"] is not None else None for k, v in results.items()}
    # paired: the median over rounds of (case / cp of the same round); rounds are minutes apart on a shared machine
    paired = {k: statistics.median(r["process_wall"] / c["process_wall"] for r, c in zip(v, results["cp"]))
              for k, v in results.items()}
    m = B.machine()
    lines = [
        f"Synthetic `{args.size}` graph: {B._count(info['base_params'])} base parameters {info['dtype']}, "
        f"{info['data_bytes'] / B.GiB:.2f} GiB data, {info['lora_tensors']} LoRA tensors. Whole process, median of "
        f"{args.repeat} interleaved rounds (Olive {args.olive_repeat if olive else 0}), page cache warm, `sync` before each case. "
        f"Load average (1 min) before the cases: median {statistics.median(loads):.1f}, {min(loads):.1f} to {max(loads):.1f}.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; onnxruntime {m.get('onnxruntime')}, "
        f"onnx-ir {m.get('onnx_ir')}; {m['date']}.", "",
        "| case | whole process (call) | CPU time | peak RSS | vs cp (paired) | vs Olive | goal |", "|---|---|---|---|---|---|---|",
    ]
    labels = {"cp": "`cp model.onnx model.onnx.data`", "copy": "`extract_adapters` copy (share_base=False)",
              "shared": "`extract_adapters` shared base (package beside the export)",
              "cli": "`lora-onnx extract model.onnx -o <export folder>` (shared base, console script)",
              "copy_base": f"{args.baseline_label}: copy", "shared_base": f"{args.baseline_label}: shared base",
              "cli_base": f"{args.baseline_label}: `lora-onnx extract` shared base",
              "olive": f"Olive {olive} `ExtractAdapters` (defaults)"}
    for key in ("cp", "copy", "shared", "cli", "copy_base", "shared_base", "cli_base", "olive"):
        if key not in med:
            continue
        goal = ""
        if key in ("shared", "cli"):
            goal = (f"{'✅' if med[key] <= GOAL_SHARED_S else '❌'} <= 1.5 s; "
                    f"{'✅' if rss[key] < GOAL_SHARED_RSS else '❌'} < 400 MiB")
            if "olive" in med:
                goal += f"; {'✅' if med['olive'] / med[key] >= 25 else '❌'} >= 25x Olive"
        if key == "copy":
            goal = f"{'✅' if paired[key] <= GOAL_COPY_VS_CP else '❌'} <= 1.3x cp"
        vs_olive = f"{med['olive'] / med[key]:.1f}x faster" if "olive" in med and key != "olive" else ""
        mem = B.fmt_mem(rss[key]) if rss[key] else ""
        whole = f"{B.fmt_s(med[key])} ({B.fmt_s(call[key])})" if call[key] is not None else B.fmt_s(med[key])
        lines.append(f"| {labels[key]} | {whole} | {B.fmt_s(cpu[key])} | {mem} | "
                     f"{med[key] / med['cp']:.2f}x ({paired[key]:.2f}x) | {vs_olive} | {goal} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
