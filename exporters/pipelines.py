"""The main job end to end: PEFT base + adapter folders -> verified (quantized) adapter package.

export -> inspect -> extract -> (quantize) -> verify: base-only and every adapter are run from the
package in one ORT session and compared with the PyTorch PEFT model. ``lora-onnx pipeline`` and
``lora-onnx demo`` are thin shells over :func:`pipeline`.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import sys
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from graph_tools._io import atomic_output, check_output_folder, refuse_overlap
from graph_tools.errors import AdapterError, LoraOnnxError, ModelLoadError, QuantizationError

__all__ = ["pipeline", "PipelineResult", "AdapterCheck", "load_base", "QUANT_PRESETS"]

logger = logging.getLogger(__name__)

QUANT_PRESETS = {
    "w8a16": {"weights": "int8", "activations": "uint16", "lora_weights": "int16"},
    "w8a8": {"weights": "int8", "activations": "uint8", "lora_weights": "int8"},
}
#: pass thresholds: fp32 package vs PyTorch (max abs), QDQ package vs PyTorch (cosine)
FLOAT_TOLERANCE = 1e-4
QDQ_MIN_COSINE = {"w8a16": 0.99, "w8a8": 0.95}


@dataclasses.dataclass
class AdapterCheck:
    adapter: str  # "(base)" for base-only
    rank: str
    sites: int
    file_bytes: int
    float_max_abs: float
    float_cosine: float
    qdq_max_abs: float | None
    qdq_cosine: float | None
    ms_per_run: float
    passed: bool
    layer_errors: list[tuple[str, float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PipelineResult:
    out_dir: Path
    package_dir: Path
    served_dir: Path
    quantize: str
    sites: list
    checks: list[AdapterCheck]
    stage_seconds: dict[str, float]
    report_path: Path | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def table(self) -> str:
        head = ["adapter", "rank", "sites", "file KiB", "fp32 max abs", "fp32 cos", "qdq max abs", "qdq cos", "ms/run", "ok"]
        rows = []
        for c in self.checks:
            rows.append([
                c.adapter, c.rank, str(c.sites), f"{c.file_bytes / 1024:.1f}", f"{c.float_max_abs:.2e}", f"{c.float_cosine:.6f}",
                "-" if c.qdq_max_abs is None else f"{c.qdq_max_abs:.2e}", "-" if c.qdq_cosine is None else f"{c.qdq_cosine:.5f}",
                f"{c.ms_per_run:.2f}", "yes" if c.passed else "NO",
            ])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]
        lines.append("")
        lines.append("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items()))
        return "\n".join(lines)


class _Progress:
    """One tqdm bar per stage on stderr, with elapsed time (silent with quiet=True)."""

    def __init__(self, label: str, total: int, quiet: bool):
        from tqdm import tqdm

        self._bar = tqdm(total=max(total, 1), desc=f"{label:<10}", disable=quiet, file=sys.stderr,
                         bar_format="{desc} {bar:24} {n_fmt}/{total_fmt} [{elapsed}]", ascii=True)

    def step(self, n: int = 1) -> None:
        self._bar.update(n)
        if self._bar.n >= self._bar.total:
            self._bar.close()


def load_base(base: str):
    """``builtin:minilm``, ``builtin:tiny-llama`` or a local Hugging Face model folder."""
    import transformers

    from exporters.demo_models import minilm_dir, tiny_llama_base

    if base == "builtin:tiny-llama":
        return tiny_llama_base()
    if base == "builtin:minilm":
        base = str(minilm_dir())
    elif base.startswith("builtin:"):
        raise ModelLoadError(f"unknown built-in model {base!r}; built-ins: builtin:minilm, builtin:tiny-llama")
    folder = Path(base)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
        arch = (config.architectures or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            cls = transformers.AutoModel
        return cls.from_pretrained(str(folder)).eval()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: cannot load the model ({str(exc).splitlines()[0][:200]})") from None


def _attach_adapters(base, adapters: Mapping[str, str | os.PathLike]):
    from peft import PeftModel

    from graph_tools.adapters.peft_checkpoint import read_peft_adapter

    if not adapters:
        raise AdapterError("give at least one adapter (NAME=PEFT_DIR)")
    model = None
    for name, path in adapters.items():
        read_peft_adapter(Path(path))  # clear errors before PEFT sees the folder
        try:
            if model is None:
                model = PeftModel.from_pretrained(base, str(path), adapter_name=name)
            else:
                model.load_adapter(str(path), adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise AdapterError(f"{path}: PEFT cannot load this adapter onto the base model ({str(exc).splitlines()[0][:200]})") from None
    return model.eval()


def _example_inputs(model, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    config = model.config
    g = torch.Generator().manual_seed(seed)
    vocab = int(getattr(config, "vocab_size", 100))
    ids = torch.randint(1, max(2, vocab - 1), (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    params = inspect.signature(model.get_base_model().forward).parameters
    if "token_type_ids" in params and getattr(config, "type_vocab_size", 0):
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def _set_active(model, adapters: list[str]) -> None:
    """Through PEFT's public switches: no adapter = adapter layers disabled; else these adapters
    (several at once: the tuner's ``set_adapter`` takes a list)."""
    tuner = model.base_model
    if not adapters:
        tuner.disable_adapter_layers()
        return
    tuner.enable_adapter_layers()
    tuner.set_adapter(list(adapters), inference_mode=True)


def _torch_outputs(model, feeds: dict[str, torch.Tensor], adapters: list[str]) -> list[np.ndarray]:
    _set_active(model, adapters)
    kwargs = dict(feeds)
    if hasattr(model.config, "use_cache"):
        kwargs["use_cache"] = False
    with torch.no_grad():
        out = model(**kwargs)
    if isinstance(out, torch.Tensor):
        return [out.numpy()]
    return [v.numpy() for v in out.values() if isinstance(v, torch.Tensor)]


def _compare(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    err, cos = 0.0, 1.0
    for r, g in zip(ref, got):
        err = max(err, float(np.abs(r - g).max()))
        a, b = r.ravel().astype(np.float64), g.ravel().astype(np.float64)
        cos = min(cos, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
    return err, cos


def _calibration_feeds(calibration, model, n: int = 8) -> list[dict[str, np.ndarray]]:
    if calibration is None:
        return [{k: v.numpy() for k, v in _example_inputs(model, 1, 16, seed=100 + i).items()} for i in range(n)]
    if isinstance(calibration, (str, os.PathLike)):
        from graph_tools._feeds import read_npz, split_rows

        return split_rows(read_npz(calibration, QuantizationError, "calibration data"), QuantizationError, calibration)
    from graph_tools.quant.calibrate import iter_calibration

    return iter_calibration(calibration)


def pipeline(
    base: str,
    adapters: Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    *,
    quantize: str = "w8a16",
    calibration=None,
    mode: str = "inputs",
    pack: bool = False,
    quiet: bool = False,
    report: bool = True,
    activation_scope: str = "auto",
    model=None,
) -> PipelineResult:
    """Run export -> inspect -> extract -> (quantize) -> verify (-> report.html) into ``out``.

    ``model``: an already built PEFT model (then ``base``/``adapters`` only label it).
    """
    from exporters.peft_export import export_peft
    from graph_tools.adapters.extract import extract_adapters
    from graph_tools.lora import find_lora_sites

    if quantize not in ("none", *QUANT_PRESETS):
        raise QuantizationError(f"--quantize must be none, {', '.join(QUANT_PRESETS)}; not {quantize!r}")
    if quantize != "none" and (mode != "inputs" or pack):
        raise QuantizationError("quantization needs --mode inputs without --pack")
    out = Path(out)
    # everything is read and checked before anything is written; the output appears whole or not at all
    sources = [Path(p) for p in adapters.values()]
    if model is None and not base.startswith("builtin:"):
        sources.append(Path(base))
    if isinstance(calibration, (str, os.PathLike)):
        sources.append(Path(calibration))
    refuse_overlap(out, sources)
    check_output_folder(out, marker="package")
    times: dict[str, float] = {}

    t = time.perf_counter()
    if model is None:
        bar = _Progress("load", 2, quiet)
        base_model = load_base(base)
        bar.step()
        model = _attach_adapters(base_model, adapters)
        bar.step()
    names = sorted({a for m in model.modules() if hasattr(m, "lora_A") for a in list(m.lora_A) + list(getattr(m, "lora_embedding_A", {}))})
    feeds = _calibration_feeds(calibration, model) if quantize != "none" else None
    times["load"] = time.perf_counter() - t

    with atomic_output(out, marker="package") as tmp:
        t = time.perf_counter()
        bar = _Progress("export", 1, quiet)
        example = _example_inputs(model, 1, 8, seed=0)
        export = export_peft(model, example, tmp / "export" / "model.onnx")
        bar.step()
        times["export"] = time.perf_counter() - t

        t = time.perf_counter()
        sites = find_lora_sites(export.path)
        times["inspect"] = time.perf_counter() - t

        t = time.perf_counter()
        package = extract_adapters(export.path, tmp / "package", mode=mode, pack=pack)
        times["extract"] = time.perf_counter() - t

        served = package
        if quantize != "none":
            from graph_tools.quant import quantize as run_quantize

            t = time.perf_counter()
            bar = _Progress("calibrate", 1, quiet)
            served = run_quantize(package.path, tmp / "quantized", feeds, activation_scope=activation_scope, **QUANT_PRESETS[quantize])
            bar.step()
            times["quantize"] = time.perf_counter() - t

        t = time.perf_counter()
        checks = _verify(model, names, sites, package, served, quantize, quiet)
        times["verify"] = time.perf_counter() - t

        final = out.resolve()
        result = PipelineResult(final, final / "package", final / served.path.name, quantize, sites, checks, times)
        if report:
            from graph_tools.report import write_report

            t = time.perf_counter()
            write_report(result, tmp / "report.html")
            result.report_path = final / "report.html"
            times["report"] = time.perf_counter() - t
    return result


def _verify(model, names, sites, package, served, quantize, quiet) -> list[AdapterCheck]:
    from graph_tools.runtime.session import AdapterSession

    feeds_t = _example_inputs(model, 2, 16, seed=42)
    feeds = {k: v.numpy() for k, v in feeds_t.items()}
    float_session = AdapterSession(package.path)
    q_session = AdapterSession(served.path) if served is not package else None
    probe = _LayerProbe(float_session, q_session) if q_session is not None else None
    checks = []
    choices: list[str | None] = [None, *names]
    bar = _Progress("verify", len(choices), quiet)
    for adapter in choices:
        ref = _torch_outputs(model, feeds_t, [adapter] if adapter else [])
        f_out = float_session.run(None, feeds, adapter=adapter)
        f_err, f_cos = _compare(ref, f_out)
        q_err = q_cos = None
        layer_errors: list[tuple[str, float]] = []
        session = float_session
        if q_session is not None:
            q_out = q_session.run(None, feeds, adapter=adapter)
            q_err, q_cos = _compare(ref, q_out)
            layer_errors = probe.errors(feeds, adapter)
            session = q_session
        ms = _latency(session, feeds, adapter)
        spec = next((a for a in served.manifest.adapters if a.name == adapter), None)
        size = (served.path / spec.file).stat().st_size if spec else 0
        ranks = sorted(set(spec.rank.values())) if spec and isinstance(spec.rank, dict) else ([spec.rank] if spec else [])
        n_sites = sum(1 for s in sites if s.adapter == adapter) if adapter else 0
        ok = f_err <= FLOAT_TOLERANCE and (q_cos is None or q_cos >= QDQ_MIN_COSINE[quantize])
        checks.append(AdapterCheck(
            adapter or "(base)", "-".join(map(str, ranks)) or "-", n_sites, size, f_err, f_cos, q_err, q_cos, ms, ok, layer_errors,
        ))
        bar.step()
    _set_active(model, names)
    return checks


def _latency(session, feeds, adapter, runs: int = 7) -> float:
    session.run(None, feeds, adapter=adapter)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feeds, adapter=adapter)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


class _LayerProbe:
    """Relative error of the QDQ graph vs fp32 at every LoRA site's output (the site Add).

    Built once per pipeline run: the site outputs are found once and both packages get one extra-
    output session each; ``errors(adapter)`` then only runs them."""

    def __init__(self, float_session, q_session):
        import onnx_ir as ir

        from graph_tools.lora import find_lora_sites
        from graph_tools.quant.calibrate import session_with_outputs

        self.float_session, self.q_session = float_session, q_session
        f_model = ir.load(float_session.package.model_path)
        self.adds: list[tuple[str, str]] = []
        for site in find_lora_sites(f_model):
            name = site.parts.add.outputs[0].name
            if name and name not in {a for _, a in self.adds}:
                self.adds.append((site.module, name))
        q_values = {v.name for n in ir.load(q_session.package.model_path).graph for v in n.outputs}
        # a site output that was quantized has a "<name>_dequant" twin; one kept float keeps its name
        self.q_names = [f"{a}_dequant" if f"{a}_dequant" in q_values else a for _, a in self.adds]
        self.f_run = session_with_outputs(float_session.package.model_path, [a for _, a in self.adds]) if self.adds else None
        self.q_run = session_with_outputs(q_session.package.model_path, self.q_names) if self.adds else None

    @staticmethod
    def _outputs(run, session, names, feeds, adapter):
        key = session._key(adapter)
        full = dict(feeds)
        full.update(session._slot_values(key) if key else {})
        return run.run(names, full)

    def errors(self, feeds, adapter) -> list[tuple[str, float]]:
        if not self.adds:
            return []
        f_vals = self._outputs(self.f_run, self.float_session, [a for _, a in self.adds], feeds, adapter)
        q_vals = self._outputs(self.q_run, self.q_session, self.q_names, feeds, adapter)
        return [(module, float(np.linalg.norm(f - q) / (np.linalg.norm(f) + 1e-12)))
                for (module, _), f, q in zip(self.adds, f_vals, q_vals)]
