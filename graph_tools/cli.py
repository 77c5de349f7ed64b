"""``lora-onnx`` command line: a thin shell over the Python API.

Every user error is one line on stderr and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from graph_tools.errors import LoraOnnxError

__all__ = ["main", "entry", "format_site_table"]

logger = logging.getLogger(__name__)


def format_site_table(sites) -> str:
    """A plain-text table of sites plus counts per kind and adapter."""
    header = ("module", "adapter", "kind", "rank", "in", "out")
    rows = [(s.module, s.adapter, s.kind, str(s.rank), str(s.in_features), str(s.out_features)) for s in sites]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    kinds: dict[str, int] = {}
    adapters: dict[str, int] = {}
    for s in sites:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
        adapters[s.adapter] = adapters.get(s.adapter, 0) + 1
    modules = len({s.module for s in sites})
    out.append("")
    out.append(
        f"{len(sites)} LoRA sites on {modules} modules; "
        + "kinds: " + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items()))
        + "; adapters: " + ", ".join(f"{k}={v}" for k, v in sorted(adapters.items()))
    )
    return "\n".join(out)


def _cmd_inspect(args) -> int:
    from graph_tools.lora import find_lora_sites

    sites = find_lora_sites(args.model)
    if args.json:
        payload = {
            "model": str(args.model),
            "count": len(sites),
            "adapters": sorted({s.adapter for s in sites}),
            "modules": len({s.module for s in sites}),
            "sites": [s.to_dict() for s in sites],
        }
        print(json.dumps(payload, indent=2))
    else:
        print(format_site_table(sites))
    return 0


def _transformers_quiet_unless_verbose(command):
    """Without -v, transformers' progress bars and notes are not ours to print (torch commands
    only); its settings are restored when the command returns (``exporters.pipelines.quiet_transformers``)."""

    @functools.wraps(command)
    def run(args) -> int:
        from exporters.pipelines import quiet_transformers

        with quiet_transformers(not getattr(args, "verbose", False)):
            return command(args)

    return run


def _pipeline_result(args, base: str, adapters: dict[str, str], **kwargs):
    from exporters.pipelines import pipeline

    result = pipeline(base, adapters, args.output, quantize=args.quantize, calibration=getattr(args, "calibration", None),
                      mode=getattr(args, "mode", "inputs"), pack=getattr(args, "pack", False), quiet=args.quiet,
                      activation_scope=args.activation_scope, **kwargs)
    print(format_site_table(result.sites))
    print()
    print(result.table())
    if result.report_path:
        print(f"\nreport: {result.report_path}")
    return result


def _run_pipeline(args, base: str, adapters: dict[str, str], **kwargs) -> int:
    result = _pipeline_result(args, base, adapters, **kwargs)
    if not result.passed:
        print("error: verification failed (see the table)", file=sys.stderr)
    return 0 if result.passed else 1


@_transformers_quiet_unless_verbose
def _cmd_pipeline(args) -> int:
    adapters = {}
    for item in args.adapter or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LoraOnnxError(f"--adapter takes NAME=PEFT_DIR, got {item!r}")
        adapters[name] = path
    kwargs = {}
    if args.task == "text-generation":
        kwargs = dict(prompts=args.prompt, max_new_tokens=16 if args.max_new_tokens is None else args.max_new_tokens)
    elif args.prompt or args.max_new_tokens is not None:
        raise LoraOnnxError("--prompt and --max-new-tokens are for --task text-generation")
    return _run_pipeline(args, args.base, adapters, task=args.task, **kwargs)


@_transformers_quiet_unless_verbose
def _cmd_demo(args) -> int:
    from exporters.demo_models import generation_demo, minilm_dir, train_demo_adapters
    from exporters.pipelines import moved_sources

    import shutil
    import tempfile

    out = Path(args.output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # the adapters are trained beside the output (the pipeline refuses inputs inside its output)
    # and moved into it once the pipeline has written it whole
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.adapters-", dir=out.parent) as scratch:
        _say(args, "training two LoRA adapters on MiniLM (built-in tasks) ...")
        adapters = train_demo_adapters(minilm_dir(), Path(scratch) / "peft_adapters")
        result = _pipeline_result(args, "builtin:minilm", {k: str(v) for k, v in adapters.items()})
        shutil.move(str(Path(scratch) / "peft_adapters"), str(out / "peft_adapters"))
        moved_sources(result, Path(scratch) / "peft_adapters", out / "peft_adapters")
    _say(args, "\ntext generation: training a small language model and two topic adapters (sports, cooking) ...")
    gen = generation_demo(out / "generation", quantize=args.quantize, activation_scope=args.activation_scope, quiet=args.quiet)
    print(gen.table())
    if result.report_path:
        from graph_tools.report import write_report

        write_report(result, result.report_path, companions=[("Text generation", gen, "generation/report.html")])
        print(f"report: {result.report_path} (text generation: {gen.report_path})")
    given = Path(args.output)
    print(f"try: lora-onnx generate {given / 'generation' / 'package'} --adapter sports --prompt 'the' "
          f"--tokenizer {given / 'generation' / 'genai'}")
    passed = result.passed and gen.passed
    if not passed:
        print("error: verification failed (see the tables)", file=sys.stderr)
    return 0 if passed else 1


def _cmd_extract(args) -> int:
    from graph_tools.adapters.extract import extract_adapters

    _say(args, f"extracting adapters from {args.model} ...")
    package = extract_adapters(args.model, args.output, mode=args.mode, format=args.format, pack=args.pack, max_rank=args.max_rank)
    m = package.manifest
    print(f"package {package.path}: mode={m.mode} pack={m.pack} slots={len(m.slots)} modules={len({s.site for s in m.slots})}")
    for a in m.adapters:
        size = (package.path / a.file).stat().st_size
        ranks = sorted(set(a.rank.values())) if isinstance(a.rank, dict) else [a.rank]
        print(f"  adapter {a.name}: {a.file} ({size / 1024:.1f} KiB), modules={len(a.scale)}, ranks={ranks}")
    return 0


def _cmd_convert(args) -> int:
    from graph_tools.adapters.convert import convert_peft_adapter

    _say(args, f"converting {args.peft_dir} into {args.package} ...")
    path = convert_peft_adapter(args.peft_dir, args.package, name=args.name)
    print(f"wrote {path}")
    return 0


def _cmd_run(args) -> int:
    import numpy as np

    from graph_tools._feeds import read_npz
    from graph_tools._io import atomic_file, refuse_overlap
    from graph_tools.errors import OutputError
    from graph_tools.runtime.session import AdapterSession

    adapter = _parse_adapters(args.adapter)
    out = Path(args.output) if args.output else None
    if out is not None:
        if out.suffix != ".npz":
            raise OutputError(f"{out}: the output file must end in .npz")
        if out.is_dir():
            raise OutputError(f"output {out} is a folder; give a .npz file path")
        refuse_overlap(out, [args.package, args.feeds])
    feeds = read_npz(args.feeds, LoraOnnxError, "feeds")
    session = AdapterSession(args.package)
    outputs = session.run(None, feeds, adapter=adapter)
    names = [o.name for o in session.get_outputs()]
    if out is not None:
        with atomic_file(out) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **dict(zip(names, outputs)))
        print(f"wrote {out}")
    for n, o in zip(names, outputs):
        print(f"{n}: shape={list(o.shape)} dtype={o.dtype} mean={float(np.mean(o)):.6g} absmax={float(np.max(np.abs(o))):.6g}")
    return 0


def _cmd_generate(args) -> int:
    from graph_tools.runtime import generate as gen
    from graph_tools.runtime.session import AdapterSession

    tokenizer = None
    if args.prompt is not None:
        if not args.tokenizer:
            raise LoraOnnxError("--prompt needs --tokenizer DIR (or give --ids)")
        tokenizer = gen.load_tokenizer(args.tokenizer)
        ids = tokenizer.encode(args.prompt).ids
        if not ids:
            raise LoraOnnxError("--prompt encodes to no tokens")
    else:
        try:
            ids = [int(t) for t in args.ids.split(",") if t.strip()]
        except ValueError:
            raise LoraOnnxError(f"--ids {args.ids!r}: expected comma-separated token ids like 1,2,3") from None
    session = AdapterSession(args.package)
    steps = session.generate_stream(
        [ids], adapter=_parse_adapters(args.adapter), max_new_tokens=args.max_new_tokens, do_sample=args.sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    pieces = gen.stream_text(tokenizer, steps) if tokenizer is not None else (
        ("," if i else "") + str(int(step[0])) for i, step in enumerate(steps))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _parse_adapters(values):
    """``--adapter NAME`` -> ``"NAME"``; several or ``NAME=WEIGHT`` -> ``{name: weight}``."""
    if not values:
        return None
    parts = [v.split("=", 1) for v in values]
    if len(parts) == 1 and len(parts[0]) == 1:
        return parts[0][0]
    chosen = {}
    for p in parts:
        try:
            weight = float(p[1]) if len(p) > 1 else 1.0
        except ValueError:
            raise LoraOnnxError(f"--adapter {'='.join(p)}: the weight after '=' must be a number") from None
        if p[0] in chosen:
            raise LoraOnnxError(f"--adapter {p[0]} is given twice")
        chosen[p[0]] = weight
    return chosen


def _cmd_quantize(args) -> int:
    from graph_tools._feeds import read_npz, split_rows
    from graph_tools.errors import QuantizationError
    from graph_tools.quant import quantize

    feeds = split_rows(read_npz(args.calibration, QuantizationError, "calibration data"), QuantizationError, args.calibration)
    concurrencies = [c.split("+") for c in args.concurrency or []]
    package = quantize(args.package, args.output, feeds, weights=args.weights, activations=args.activations,
                       lora_weights=args.lora_weights, per_channel=not args.per_tensor, activation_scope=args.activation_scope,
                       share_tolerance=args.share_tolerance, mixed_precision=args.mixed_precision,
                       calibration_method=args.method, encodings_version=args.encodings_version, block_size=args.block_size,
                       concurrencies=concurrencies, per_row_embeddings=not args.per_tensor_embeddings,
                       aimet_placement=args.aimet_placement)
    q = package.manifest.extra["quantization"]
    wide = f", {len(q['activations_16bit'])} at 16 bits" if q["mixed_precision"] else ""
    combos = "".join(f"; concurrency {c['name']}" for c in q["concurrencies"])
    print(f"quantized package {package.path}: activation encodings {q['activation_summary']}{wide}, "
          f"{len(q['float_activations'])} kept float{combos}; encodings in {package.path / 'encodings'}")
    return 0


def _cmd_merge(args) -> int:
    from graph_tools.adapters.merge import merge_adapter

    _say(args, f"merging adapter {args.adapter} of {args.package} into the base weights ...")
    print(f"wrote {merge_adapter(args.package, args.adapter, args.output)}")
    return 0


def _cmd_strip(args) -> int:
    from graph_tools.adapters.strip import strip_adapters

    _say(args, f"removing every LoRA branch of {args.model} ...")
    print(f"wrote {strip_adapters(args.model, args.output)}")
    return 0


def _cmd_genai(args) -> int:
    from graph_tools.runtime.genai import write_genai_folder

    folder = write_genai_folder(args.package, args.output, tokenizer_dir=args.tokenizer, context_length=args.context_length)
    print(f"wrote {folder} (genai_config.json, model.onnx, adapters/: "
          f"{', '.join(sorted(p.stem for p in (folder / 'adapters').iterdir())) or 'none'})")
    return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _say(args, text: str) -> None:
    """Progress goes to stdout (stderr holds nothing but the one error line); -q silences it."""
    if not getattr(args, "quiet", False):
        print(text, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-onnx", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and counts")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list the LoRA sites of an ONNX model")
    p.add_argument("model", help="ONNX model file (or a package folder holding model.onnx)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("extract", help="turn a LoRA ONNX model into an adapter package")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="package folder to write")
    p.add_argument("--mode", choices=["inputs", "external"], default="inputs")
    p.add_argument("--format", choices=["onnx_adapter", "safetensors"], default="onnx_adapter")
    p.add_argument("--pack", action="store_true", help="pack slots of the same shape into few inputs")
    p.add_argument("--max-rank", type=int, default=None, help="fixed-shape slots zero-padded to this rank")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("convert", help="convert a PEFT adapter folder into an adapter file of a package")
    p.add_argument("peft_dir")
    p.add_argument("--package", required=True)
    p.add_argument("--name", default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("run", help="run a package with an adapter on feeds from a .npz file")
    p.add_argument("package")
    p.add_argument("--adapter", action="append", help="adapter name; repeat (NAME=WEIGHT) for several at once")
    p.add_argument("--feeds", required=True, help=".npz with one array per model input")
    p.add_argument("-o", "--output", default=None, help="write outputs to this .npz")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("generate", help="generate tokens from a KV-cache package, streaming to stdout")
    p.add_argument("package")
    p.add_argument("--adapter", action="append", help="adapter name; repeat (NAME=WEIGHT) for several at once")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs --tokenizer)")
    prompt.add_argument("--ids", help="prompt token ids, comma-separated: 1,2,3")
    p.add_argument("--tokenizer", help="Hugging Face tokenizer folder (tokenizer.json)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("quantize", help="QDQ-quantize a package with per-adapter encodings")
    p.add_argument("package")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--calibration", required=True, help=".npz of input arrays; one row per calibration batch")
    p.add_argument("--weights", choices=["int8", "int4"], default="int8")
    p.add_argument("--block-size", type=int, default=32, help="int4 block size")
    p.add_argument("--activations", choices=["uint16", "uint8", "int16", "int8"], default="uint16")
    p.add_argument("--lora-weights", choices=["int16", "int8"], default="int16")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel base weights")
    p.add_argument("--per-tensor-embeddings", action="store_true",
                   help="one scale per embedding table instead of one per row (what aimet-onnx can load)")
    p.add_argument("--aimet-placement", action="store_true",
                   help="quantize what aimet-onnx's QuantizationSimModel quantizes, as it does (strict encodings load)")
    p.add_argument("--activation-scope", choices=["auto", "lora", "all"], default="auto",
                   help="auto: share an activation encoding where it fits every adapter, per adapter elsewhere")
    p.add_argument("--share-tolerance", type=float, default=0.25,
                   help="auto scope: how much coarser a shared encoding may make any adapter's step (fraction)")
    p.add_argument("--mixed-precision", choices=["layernorm", "auto"], default=None,
                   help="8-bit activations: keep norm inputs/outputs (layernorm) or high-error tensors (auto) at 16 bits")
    p.add_argument("--concurrency", action="append", metavar="A+B", help="calibrate and serve these adapters together (repeat)")
    p.add_argument("--method", choices=["minmax", "percentile"], default="minmax")
    p.add_argument("--encodings-version", choices=["1.0.0", "2.0.0"], default="1.0.0")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("merge", help="fold one adapter into the base weights (plain ONNX model)")
    p.add_argument("package")
    p.add_argument("--adapter", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("strip", help="remove every LoRA branch (the base model)")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=_cmd_strip)

    p = sub.add_parser("genai", help="write an onnxruntime-genai folder for a KV-cache package")
    p.add_argument("package", help="package of a graph exported with past (export_peft(..., with_past=True))")
    p.add_argument("-o", "--output", required=True, help="folder to create (must not exist)")
    p.add_argument("--tokenizer", default=None, help="folder with tokenizer.json and tokenizer_config.json")
    p.add_argument("--context-length", type=int, default=None, help="override max_position_embeddings")
    p.set_defaults(func=_cmd_genai)

    p = sub.add_parser("pipeline", help="export -> inspect -> extract -> quantize -> verify a PEFT model")
    p.add_argument("--base", required=True, help="local HF model folder, builtin:minilm or builtin:tiny-llama")
    p.add_argument("--adapter", action="append", help="NAME=PEFT_DIR (repeat)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--task", choices=["feature-extraction", "text-generation"], default="feature-extraction",
                   help="text-generation: KV-cache export, ORT GenAI folder, greedy tokens compared with PEFT generate")
    p.add_argument("--prompt", action="append", default=None,
                   help="text-generation: a verify prompt (repeat; needs the base folder's tokenizer; default: random ids)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="text-generation: tokens verify generates (16)")
    p.add_argument("--quantize", choices=["w8a16", "w8a8", "none"], default="w8a16")
    p.add_argument("--calibration", default=None, help=".npz of input arrays; one row per calibration batch")
    p.add_argument("--mode", choices=["inputs", "external"], default="inputs")
    p.add_argument("--pack", action="store_true")
    p.add_argument("--activation-scope", choices=["auto", "lora", "all"], default="auto",
                   help="per-adapter activation encodings: where needed (auto), LoRA branches only (AIMET flow) or all")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("demo", help="the pipeline on real MiniLM weights with two adapters trained in-process")
    p.add_argument("-o", "--output", default="lora-onnx-demo", help="output folder (default: %(default)s)")
    p.add_argument("--quantize", choices=["w8a16", "w8a8", "none"], default="w8a16")
    p.add_argument("--activation-scope", choices=["auto", "lora", "all"], default="auto")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # built-ins are local; never reach for a hub
    if not args.verbose:  # library chatter (progress bars, deprecation notes) is not ours to print
        import warnings

        warnings.simplefilter("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return int(args.func(args) or 0)
    except LoraOnnxError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable destination, full disk ...: the user's environment, not a bug
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``lora-onnx`` console script (and ``python -m graph_tools.cli``): :func:`main`, then exit
    without interpreter teardown. Tearing down the ~1,000 modules onnx-ir, sympy and onnxruntime
    load takes 0.3 s or more, longer than some commands. Every command has finished its work when
    ``main`` returns: outputs are written, closed and renamed into place, temp folders removed and
    background threads joined (all in ``with``/``finally`` blocks, none left to ``atexit``); what is
    left is flushed here. An exception escaping ``main`` (a bug) exits the ordinary way, traceback
    and all."""
    code = main()
    logging.shutdown()  # flush and close the handlers logging.basicConfig made
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head): nothing left to lose
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
