"""The main job end to end: PEFT base + adapter folders -> verified (quantized) adapter package.

export -> inspect -> extract -> (quantize) -> verify: base-only and every adapter are run from the
package in one ORT session and compared with the PyTorch PEFT model. ``lora-onnx pipeline`` and
``lora-onnx demo`` are thin shells over :func:`pipeline`.

``task="text-generation"`` (a causal LM): the export has a KV cache (``with_past=True``), the
output also holds an ORT GenAI folder (``genai/``, with the base folder's tokenizer files when it
has them), and verify compares, per adapter and for the base model, the greedy tokens
``AdapterSession.generate`` produces with PEFT ``model.generate(do_sample=False)`` (a left-padded
batch of prompts) besides the prefill logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from graph_tools._io import atomic_output, check_output_folder, refuse_overlap
from graph_tools.errors import AdapterError, LoraOnnxError, ModelLoadError, QuantizationError

__all__ = ["pipeline", "PipelineResult", "AdapterCheck", "load_base", "moved_sources", "QUANT_PRESETS", "TASKS"]

logger = logging.getLogger(__name__)

QUANT_PRESETS = {
    "w8a16": {"weights": "int8", "activations": "uint16", "lora_weights": "int16"},
    "w8a8": {"weights": "int8", "activations": "uint8", "lora_weights": "int8"},
}
#: pass thresholds: fp32 package vs PyTorch (max abs), QDQ package vs PyTorch (cosine)
FLOAT_TOLERANCE = 1e-4
QDQ_MIN_COSINE = {"w8a16": 0.99, "w8a8": 0.95}
#: ``feature-extraction``: outputs of one forward pass compared; ``text-generation``: a KV-cache
#: decoder, greedy tokens compared with PEFT ``generate`` (see the module docstring)
TASKS = ("feature-extraction", "text-generation")
GENAI_DIR = "genai"


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
    # text-generation only: greedy tokens of the fp32 / QDQ package equal to PEFT's, out of all
    tokens_same: int | None = None
    tokens_total: int | None = None
    qdq_tokens_same: int | None = None
    #: the fp32 package's continuation per prompt row (new tokens only), and its text when the
    #: base folder has a tokenizer
    continuations: list[list[int]] = dataclasses.field(default_factory=list)
    texts: list[str] | None = None


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
    task: str = "feature-extraction"
    genai_dir: Path | None = None
    #: text-generation: the prompt rows (ids, padding removed) and their text when known
    prompts: list[list[int]] = dataclasses.field(default_factory=list)
    prompt_texts: list[str] | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def table(self) -> str:
        head, rows = self.columns(), self.rows()
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]
        lines.append("")
        lines += self.generation_lines()
        lines.append("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items()))
        return "\n".join(lines)

    @property
    def generation(self) -> bool:
        return self.task == "text-generation"

    def columns(self) -> list[str]:
        if self.generation:
            return ["adapter", "rank", "sites", "file KiB", "prefill max abs", "greedy == PEFT", "qdq cos", "qdq tokens",
                    "ms/token", "ok"]
        return ["adapter", "rank", "sites", "file KiB", "fp32 max abs", "fp32 cos", "qdq max abs", "qdq cos", "ms/run", "ok"]

    def rows(self) -> list[list[str]]:
        rows = []
        for c in self.checks:
            qcos = "-" if c.qdq_cosine is None else f"{c.qdq_cosine:.5f}"
            if self.generation:
                same = f"{c.tokens_same}/{c.tokens_total}"
                qtok = "-" if c.qdq_tokens_same is None else f"{c.qdq_tokens_same}/{c.tokens_total}"
                rows.append([c.adapter, c.rank, str(c.sites), f"{c.file_bytes / 1024:.1f}", f"{c.float_max_abs:.2e}", same,
                             qcos, qtok, f"{c.ms_per_run:.2f}", "yes" if c.passed else "NO"])
            else:
                rows.append([
                    c.adapter, c.rank, str(c.sites), f"{c.file_bytes / 1024:.1f}", f"{c.float_max_abs:.2e}",
                    f"{c.float_cosine:.6f}", "-" if c.qdq_max_abs is None else f"{c.qdq_max_abs:.2e}", qcos,
                    f"{c.ms_per_run:.2f}", "yes" if c.passed else "NO",
                ])
        return rows

    def generation_lines(self) -> list[str]:
        """Text-generation: each prompt's greedy continuation per adapter (text when known, else ids)."""
        if not self.generation or not self.checks:
            return []
        lines = []
        width = max(len(c.adapter) for c in self.checks)
        for row, prompt in enumerate(self.prompts):
            shown = self.prompt_texts[row] if self.prompt_texts else ",".join(map(str, prompt))
            lines.append(f"prompt {row}: {shown!r}" if self.prompt_texts else f"prompt {row}: {shown}")
            for c in self.checks:
                text = c.texts[row] if c.texts else ",".join(map(str, c.continuations[row]))
                lines.append(f"  {c.adapter.ljust(width)}  {text!r}" if c.texts else f"  {c.adapter.ljust(width)}  {text}")
        if self.genai_dir is not None:
            lines.append(f"ORT GenAI folder: {self.genai_dir}")
        lines.append("")
        return lines


class _Progress:
    """One tqdm bar per stage on stderr, with elapsed time (silent with quiet=True). When stderr is
    not a terminal (a log file, CI), one plain line per finished stage instead of ``\r`` updates."""

    def __init__(self, label: str, total: int, quiet: bool):
        from tqdm import tqdm

        self._label, self._total, self._done = label, max(total, 1), 0
        self._start = time.perf_counter()
        isatty = getattr(sys.stderr, "isatty", None)
        self._plain = not quiet and not (isatty and isatty())
        self._bar = None if quiet or self._plain else tqdm(
            total=self._total, desc=f"{label:<10}", file=sys.stderr, bar_format="{desc} {bar:24} {n_fmt}/{total_fmt} [{elapsed}]",
            ascii=True)

    def step(self, n: int = 1) -> None:
        before, self._done = self._done, self._done + n
        if self._bar is not None:
            self._bar.update(n)
            if self._done >= self._total:
                self._bar.close()
        elif self._plain and before < self._total <= self._done:
            print(f"{self._label:<10} {self._total}/{self._total} [{time.perf_counter() - self._start:.1f}s]",
                  file=sys.stderr, flush=True)


def load_base(base: str, task: str | None = None):
    """``builtin:minilm``, ``builtin:tiny-llama`` or a local Hugging Face model folder
    (``task="text-generation"``: loaded as a causal LM)."""
    import transformers

    from exporters.demo_models import minilm_dir, tiny_llama_base

    if base == "builtin:tiny-llama":
        return tiny_llama_base()
    if base == "builtin:minilm":
        if task == "text-generation":
            raise ModelLoadError("builtin:minilm is an encoder; --task text-generation needs a causal LM")
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
        if task == "text-generation":
            if arch and not (arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")):
                raise ModelLoadError(f"{folder}: a {arch}, not a causal LM; --task text-generation needs one "
                                     "(a *ForCausalLM model)")
            if cls is None:
                cls = transformers.AutoModelForCausalLM
        elif cls is None:
            cls = transformers.AutoModel
        return cls.from_pretrained(str(folder)).eval()
    except (OSError, ValueError, KeyError) as exc:
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


def _calibration_feeds(calibration, model, n: int = 8, task: str = "feature-extraction",
                       tokenizer=None) -> list[dict[str, np.ndarray]]:
    if task == "text-generation" and isinstance(calibration, (list, tuple)) and calibration \
            and all(isinstance(t, str) for t in calibration):  # texts: one prefill per text
        if tokenizer is None:
            raise QuantizationError("calibration texts need a tokenizer: the base folder has no tokenizer.json and "
                                    "tokenizer_config.json")
        rows = [list(tokenizer.encode(t).ids) for t in calibration]
        if not all(rows):
            raise QuantizationError("a calibration text encodes to no tokens")
        return _decoder_calibration(model, rows)
    if calibration is None:
        if task == "text-generation":
            return _decoder_calibration(model, [_example_inputs(model, 1, 16, seed=100 + i)["input_ids"][0].tolist()
                                                for i in range(n)])
        return [{k: v.numpy() for k, v in _example_inputs(model, 1, 16, seed=100 + i).items()} for i in range(n)]
    if isinstance(calibration, (str, os.PathLike)):
        from graph_tools._feeds import read_npz, split_rows

        return split_rows(read_npz(calibration, QuantizationError, "calibration data"), QuantizationError, calibration)
    from graph_tools.quant.calibrate import iter_calibration

    return iter_calibration(calibration)


def _decoder_calibration(model, rows: list[list[int]]) -> list[dict[str, np.ndarray]]:
    """Per token row: its prefill (empty past), and per adapter choice (base and each adapter) a
    chunked step: the second half with the first half's cache, computed by PyTorch with that
    choice, as past. The quantizer runs every adapter on every feed and an input has one encoding,
    so the past inputs are calibrated on the caches of all choices (an empty past alone gives them
    no range at all; the base model's cache alone is too narrow for an adapter's)."""
    from transformers.cache_utils import DynamicCache

    from exporters.decoder import decoder_info

    info = decoder_info(model)
    names = sorted({a for m in model.modules() if hasattr(m, "lora_A") for a in m.lora_A})
    steps: list[tuple[np.ndarray, int]] = []
    feeds = []
    for row in rows:
        ids = np.asarray([row], np.int64)
        feeds.append(_decoder_feeds(model, {"input_ids": ids}))
        if len(row) >= 2:
            steps.append((ids, len(row) // 2))
    for choice in [None, *names]:
        _set_active(model, [choice] if choice else [])
        for ids, k in steps:
            with torch.no_grad():
                out = model(input_ids=torch.from_numpy(ids[:, :k]), attention_mask=torch.ones(1, k, dtype=torch.int64),
                            position_ids=torch.arange(k)[None], past_key_values=DynamicCache(), use_cache=True)
            step = {"input_ids": ids[:, k:], "attention_mask": np.ones_like(ids), "position_ids": np.arange(k, ids.shape[1])[None]}
            for i, layer in enumerate(out.past_key_values.layers):
                step[info.past_key % i] = layer.keys.numpy()
                step[info.past_value % i] = layer.values.numpy()
            feeds.append(step)
    _set_active(model, names)
    return feeds


def _decoder_feeds(model, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Prefill feeds of a KV-cache decoder graph: ids, mask, Hugging Face positions, empty past."""
    from exporters.decoder import decoder_info, model_dtype

    info = decoder_info(model)
    ids = np.asarray(inputs["input_ids"], np.int64)
    mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids)), np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": (np.cumsum(mask, -1) - 1) * (mask != 0)}
    dtype = torch.empty(0, dtype=model_dtype(model)).numpy().dtype
    empty = np.zeros((ids.shape[0], info.num_key_value_heads, 0, info.head_dim), dtype)
    for i in range(info.num_hidden_layers):
        feeds[info.past_key % i] = empty
        feeds[info.past_value % i] = empty
    return feeds


@contextlib.contextmanager
def quiet_transformers(quiet: bool = True):
    """With ``quiet``: no transformers progress bars ("Loading weights", "Writing model shards")
    and only its errors, restored afterwards (transformers keeps both as process-wide settings)."""
    if not quiet:
        yield
        return
    import warnings

    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hub_off = hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # (also turns huggingface_hub's bars off)
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars:
            with warnings.catch_warnings():  # hub: "cannot enable" when its env variable is set
                warnings.simplefilter("ignore")
                hf_logging.enable_progress_bar()
        if hub_off and not hub_utils.are_progress_bars_disabled():
            hub_utils.disable_progress_bars()  # the user's own hub setting, not transformers'
        hf_logging.set_verbosity(level)


def quiet_when_asked(fn):
    """Run ``fn`` inside :func:`quiet_transformers` when it is called with ``quiet=True``."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with quiet_transformers(bool(inspect.signature(fn).bind(*args, **kwargs).arguments.get("quiet"))):
            return fn(*args, **kwargs)

    return call


@quiet_when_asked
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
    task: str | None = None,
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 16,
) -> PipelineResult:
    """Run export -> inspect -> extract -> (quantize) -> verify (-> report.html) into ``out``.

    ``model``: an already built PEFT model (then ``base``/``adapters`` only label it).
    ``task``: ``feature-extraction`` (default) or ``text-generation`` (see the module docstring);
    for text generation, ``prompts`` (texts, encoded with the base folder's tokenizer; default:
    random token ids) and ``max_new_tokens`` set what verify generates, and ``calibration`` may
    also be a list of texts (one prefill each). Without calibration data, the quantizer sees
    random token ids: fine for a random model, too far from real text for a trained one (the
    demo calibrates on its corpus).
    """
    from exporters.peft_export import export_peft
    from graph_tools.adapters.extract import extract_adapters

    from graph_tools.lora import find_lora_sites

    task = task or "feature-extraction"
    if task not in TASKS:
        raise LoraOnnxError(f"task must be one of {', '.join(TASKS)}; not {task!r}")
    generation = task == "text-generation"
    if quantize not in ("none", *QUANT_PRESETS):
        raise QuantizationError(f"--quantize must be none, {', '.join(QUANT_PRESETS)}; not {quantize!r}")
    if quantize != "none" and (mode != "inputs" or pack):
        raise QuantizationError("quantization needs --mode inputs without --pack")
    if generation and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0):
        raise LoraOnnxError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
    if prompts is not None and not generation:
        raise LoraOnnxError("prompts are for task='text-generation'")
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
    given = model is not None
    if model is None:
        bar = _Progress("load", 2, quiet)
        base_model = load_base(base, task)
        bar.step()
        model = _attach_adapters(base_model, adapters)
        bar.step()
    names = sorted({a for m in model.modules() if hasattr(m, "lora_A") for a in list(m.lora_A) + list(getattr(m, "lora_embedding_A", {}))})
    tokenizer_dir = _tokenizer_dir(base) if generation else None
    tokenizer = None
    if tokenizer_dir is not None:
        from graph_tools.runtime.generate import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
    prompt = _prompts(model, prompts, tokenizer, max_new_tokens) if generation else None
    feeds = _calibration_feeds(calibration, model, task=task, tokenizer=tokenizer) if quantize != "none" else None
    times["load"] = time.perf_counter() - t

    with atomic_output(out, marker="package") as tmp:
        t = time.perf_counter()
        bar = _Progress("export", 1, quiet)
        example = _example_inputs(model, 1, 8, seed=0)
        if generation:
            example = {k: example[k] for k in ("input_ids", "attention_mask")}
        export = export_peft(model, example, tmp / "export" / "model.onnx", with_past=generation)
        bar.step()
        times["export"] = time.perf_counter() - t

        t = time.perf_counter()
        sites = find_lora_sites(export.path)
        times["inspect"] = time.perf_counter() - t

        t = time.perf_counter()
        package = extract_adapters(export.path, tmp / "package", mode=mode, pack=pack)
        package = _name_sources(package, base, adapters, given)
        times["extract"] = time.perf_counter() - t

        genai_dir = None
        if generation and mode == "inputs":
            from graph_tools.runtime.genai import write_genai_folder

            t = time.perf_counter()
            write_genai_folder(package, tmp / GENAI_DIR, tokenizer_dir=tokenizer_dir)
            genai_dir = out.resolve() / GENAI_DIR
            times["genai"] = time.perf_counter() - t

        served = package
        if quantize != "none":
            from graph_tools.quant import quantize as run_quantize

            t = time.perf_counter()
            bar = _Progress("calibrate", 1, quiet)
            served = run_quantize(package.path, tmp / "quantized", feeds, activation_scope=activation_scope, **QUANT_PRESETS[quantize])
            bar.step()
            times["quantize"] = time.perf_counter() - t

        t = time.perf_counter()
        if generation:
            checks = _verify_generation(model, names, sites, package, served, quantize, quiet, prompt)
        else:
            checks = _verify(model, names, sites, package, served, quantize, quiet)
        times["verify"] = time.perf_counter() - t

        final = out.resolve()
        result = PipelineResult(final, final / "package", final / served.path.name, quantize, sites, checks, times, task=task,
                                genai_dir=genai_dir)
        if generation:
            result.prompts = prompt.rows
            result.prompt_texts = prompt.texts
        if report:
            from graph_tools.report import write_report

            t = time.perf_counter()
            write_report(result, tmp / "report.html")
            result.report_path = final / "report.html"
            times["report"] = time.perf_counter() - t
    return result


def _name_sources(package, base: str, adapters: Mapping[str, str | os.PathLike], given: bool):
    """The manifest names where the weights came from: the user's adapter folders (``peft:<dir>``)
    and base model (``extra.base``), not the pipeline's temporary export."""
    from graph_tools.adapters import manifest as mf
    from graph_tools.adapters.load import load_package

    label = base if base.startswith("builtin:") or given and not Path(base).is_dir() else str(Path(base).resolve())

    def source(name: str) -> str:
        if name in adapters:
            return f"peft:{Path(adapters[name]).resolve()}"
        return f"model:{label}"

    man = package.manifest
    new = dataclasses.replace(man, adapters=[dataclasses.replace(a, source=source(a.name)) for a in man.adapters],
                              extra={**man.extra, "base": label})
    mf.write_manifest(package.path, new)
    return load_package(package.path)


def _sessions(package, served):
    """The float package's session, the served (quantized) package's when it differs, and the
    per-layer probe comparing the two (None, None without quantization)."""
    from graph_tools.runtime.session import AdapterSession

    float_session = AdapterSession(package.path)
    q_session = AdapterSession(served.path) if served is not package else None
    return float_session, q_session, (_LayerProbe(float_session, q_session) if q_session is not None else None)


def _adapter_facts(served, sites, adapter) -> tuple[str, int, int]:
    """For the summary row: the adapter's rank(s) as text, its site count and its file size."""
    spec = next((a for a in served.manifest.adapters if a.name == adapter), None)
    size = (served.path / spec.file).stat().st_size if spec else 0
    ranks = sorted(set(spec.rank.values())) if spec and isinstance(spec.rank, dict) else ([spec.rank] if spec else [])
    n_sites = sum(1 for s in sites if s.adapter == adapter) if adapter else 0
    return "-".join(map(str, ranks)) or "-", n_sites, size


def _verify(model, names, sites, package, served, quantize, quiet) -> list[AdapterCheck]:
    feeds_t = _example_inputs(model, 2, 16, seed=42)
    feeds = {k: v.numpy() for k, v in feeds_t.items()}
    float_session, q_session, probe = _sessions(package, served)
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
        rank, n_sites, size = _adapter_facts(served, sites, adapter)
        ok = f_err <= FLOAT_TOLERANCE and (q_cos is None or q_cos >= QDQ_MIN_COSINE[quantize])
        checks.append(AdapterCheck(
            adapter or "(base)", rank, n_sites, size, f_err, f_cos, q_err, q_cos, ms, ok, layer_errors,
        ))
        bar.step()
    _set_active(model, names)
    return checks


def moved_sources(result: PipelineResult, old: str | os.PathLike, new: str | os.PathLike) -> None:
    """The input folders under ``old`` were moved to ``new`` after the run (the demo trains beside
    its output, then moves the folders in): make the output's manifests name the new place."""
    from graph_tools.adapters import manifest as mf

    old, new = str(Path(old).resolve()), str(Path(new).resolve())

    def moved(path, prefix=""):  # ``prefix + path`` under old -> the same under new
        if isinstance(path, str) and (path == prefix + old or path.startswith(prefix + old + os.sep)):
            return prefix + new + path[len(prefix + old):]
        return path

    for folder in dict.fromkeys([result.package_dir, result.served_dir]):
        man = mf.read_manifest(folder)
        adapters = [dataclasses.replace(a, source=moved(a.source, "peft:")) for a in man.adapters]
        extra = {**man.extra, "base": moved(man.extra["base"])} if "base" in man.extra else dict(man.extra)
        mf.write_manifest(folder, dataclasses.replace(man, adapters=adapters, extra=extra))


@dataclasses.dataclass
class _Prompt:
    ids: np.ndarray  # [batch, prompt] int64, left-padded
    mask: np.ndarray
    rows: list[list[int]]  # without padding
    texts: list[str] | None
    tokenizer: object | None
    pad: int
    eos: list[int]
    max_new_tokens: int


def _tokenizer_dir(base: str) -> Path | None:
    """The base folder, when it holds the tokenizer files og.Tokenizer and ``--prompt`` need."""
    from graph_tools.runtime.genai import TOKENIZER_REQUIRED

    folder = Path(base)
    if base.startswith("builtin:") or not all((folder / n).is_file() for n in TOKENIZER_REQUIRED):
        return None
    return folder


def _prompts(model, prompts, tokenizer, max_new_tokens: int) -> _Prompt:
    """The verify batch: the given prompt texts, or two rows of seeded random ids (8 and 5 tokens)."""
    from exporters.decoder import decoder_info

    info = decoder_info(model)
    eos = list(info.eos_token_id)
    pad = info.pad_token_id if info.pad_token_id is not None else (eos[0] if eos else 0)
    if prompts is not None:
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise LoraOnnxError("prompts must be a non-empty list of non-empty texts")
        if tokenizer is None:
            raise LoraOnnxError("prompts need a tokenizer: the base folder has no tokenizer.json and tokenizer_config.json")
        rows = [list(tokenizer.encode(p).ids) for p in prompts]
        if not all(rows):
            raise LoraOnnxError("a prompt encodes to no tokens")
    else:
        special = {pad, *eos, *([info.bos_token_id] if info.bos_token_id is not None else [])}
        pool = np.array([t for t in range(info.vocab_size) if t not in special])
        rng = np.random.default_rng(0)
        rows = [rng.choice(pool, n).tolist() for n in (8, 5)]
    width = max(len(r) for r in rows)
    if info.context_length and width + max_new_tokens > info.context_length:
        raise LoraOnnxError(f"a prompt of {width} tokens + max_new_tokens {max_new_tokens} exceeds the model's context "
                            f"of {info.context_length} tokens")
    ids = np.full((len(rows), width), pad, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    texts = list(prompts) if prompts is not None else (
        [tokenizer.decode(r, skip_special_tokens=True) for r in rows] if tokenizer is not None else None)
    return _Prompt(ids, mask, rows, texts, tokenizer, int(pad), [int(e) for e in eos], max_new_tokens)


def _peft_generate(model, adapter, prompt: _Prompt) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch prefill logits and PEFT ``generate(do_sample=False)`` ids for one adapter choice."""
    from transformers import GenerationConfig

    _set_active(model, [adapter] if adapter else [])
    ids, mask = torch.from_numpy(prompt.ids), torch.from_numpy(prompt.mask)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    # a fresh config: sampling, penalties ... a base folder's generation_config.json may set are not greedy
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=prompt.max_new_tokens,
                              pad_token_id=prompt.pad, eos_token_id=prompt.eos or None)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return logits.float().numpy(), generated.numpy()


def _token_agreement(ref: np.ndarray, got: np.ndarray, start: int) -> tuple[int, int]:
    """Generated positions equal in both, out of all generated positions (the longer one counts)."""
    width = max(ref.shape[1], got.shape[1]) - start
    a = np.full((ref.shape[0], width), -1, np.int64)
    b = np.full((ref.shape[0], width), -2, np.int64)
    a[:, : ref.shape[1] - start] = ref[:, start:]
    b[:, : got.shape[1] - start] = got[:, start:]
    return int((a == b).sum()), int(a.size)


def _continuations(generated: np.ndarray, prompt: _Prompt) -> list[list[int]]:
    """The new tokens of each row, up to and including its eos (the padding after it dropped)."""
    rows = []
    for row in generated[:, prompt.ids.shape[1]:].tolist():
        for i, token in enumerate(row):
            if token in prompt.eos:
                row = row[: i + 1]
                break
        rows.append(row)
    return rows


def _verify_generation(model, names, sites, package, served, quantize, quiet, prompt: _Prompt) -> list[AdapterCheck]:
    feeds = _decoder_feeds(model, {"input_ids": prompt.ids, "attention_mask": prompt.mask})
    keep = prompt.mask.astype(bool)
    start = prompt.ids.shape[1]
    float_session, q_session, probe = _sessions(package, served)
    checks = []
    choices: list[str | None] = [None, *names]
    bar = _Progress("verify", len(choices), quiet)
    for adapter in choices:
        ref_logits, ref_ids = _peft_generate(model, adapter, prompt)
        f_logits = float_session.run(["logits"], feeds, adapter=adapter)[0]
        f_err, f_cos = _compare([ref_logits[keep]], [f_logits[keep]])
        got = float_session.generate(prompt.ids, attention_mask=prompt.mask, adapter=adapter,
                                     max_new_tokens=prompt.max_new_tokens)
        same, total = _token_agreement(ref_ids, got, start)
        q_err = q_cos = q_same = None
        layer_errors: list[tuple[str, float]] = []
        session = float_session
        if q_session is not None:
            q_logits = q_session.run(["logits"], feeds, adapter=adapter)[0]
            q_err, q_cos = _compare([ref_logits[keep]], [q_logits[keep]])
            q_got = q_session.generate(prompt.ids, attention_mask=prompt.mask, adapter=adapter,
                                       max_new_tokens=prompt.max_new_tokens)
            q_same, _ = _token_agreement(ref_ids, q_got, start)
            layer_errors = probe.errors(feeds, adapter)
            session = q_session
        ms = _ms_per_token(session, prompt, adapter)
        rank, n_sites, size = _adapter_facts(served, sites, adapter)
        ok = same == total and f_err <= FLOAT_TOLERANCE and (q_cos is None or q_cos >= QDQ_MIN_COSINE[quantize])
        rows = _continuations(got, prompt)
        texts = [prompt.tokenizer.decode(r, skip_special_tokens=True) for r in rows] if prompt.tokenizer is not None else None
        checks.append(AdapterCheck(
            adapter or "(base)", rank, n_sites, size, f_err, f_cos, q_err, q_cos, ms, ok, layer_errors,
            tokens_same=same, tokens_total=total, qdq_tokens_same=q_same, continuations=rows, texts=texts,
        ))
        bar.step()
    _set_active(model, names)
    return checks


def _ms_per_token(session, prompt: _Prompt, adapter, runs: int = 3) -> float:
    """Median ms per generated token at batch 1 (the first prompt row, no eos stop)."""
    ids = np.asarray([prompt.rows[0]], np.int64)
    n = prompt.max_new_tokens
    session.generate(ids, adapter=adapter, max_new_tokens=n, eos_token_id=[])
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.generate(ids, adapter=adapter, max_new_tokens=n, eos_token_id=[])
        times.append((time.perf_counter() - t) * 1000 / n)
    return float(np.median(times))


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
