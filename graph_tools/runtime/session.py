"""``AdapterSession``: one ONNX Runtime session, the adapter chosen per run.

* ``inputs`` packages: one ``InferenceSession``; each adapter's slot values are turned into
  ``OrtValue``s once, when the adapter is loaded; a run feeds them with the user's inputs. Base
  only = feed nothing (the slots' zero-rank defaults). Several adapters at once = their slots
  concatenated along rank with per-adapter weights (cached per combination). A quantized package
  runs one adapter per run, or a concurrency declared at quantize time (its own calibrated file).
* ``external`` packages: adapter values are supplied at session creation through
  ``SessionOptions.add_initializer`` (plain onnxruntime users can use
  ``add_external_initializers``, which copies); one session per adapter (created on first use),
  all sharing the base weights, which are read once from the memory-mapped data file. Weight
  prepacking is disabled for these sessions (``session.disable_prepacking=1``): ORT's Python API
  has no shared prepacked-weights container, so each session would keep its own packed copy of
  every MatMul weight (about the size of those weights, per adapter session). It costs speed
  (benchmarks/README.md, "Generation"); ``session_config={"session.disable_prepacking": "0"}``
  keeps prepacking, trading that memory for speed. ``inputs`` packages (one session) prepack.

``run`` is thread-safe: ORT's ``run`` is, and the caches are filled under a lock. The package's
graph must match its manifest (graph fingerprint), so a manifest copied from another package is
refused up front; feeds are checked by name before ORT sees them.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graph_tools._feeds import check_feeds, input_specs
from graph_tools.adapters import files
from graph_tools.adapters.manifest import check_adapter_tensors
from graph_tools.adapters.compose import compose, fill_empty_ranks, pack_tensors, read_slot_weights, unpack_tensors
from graph_tools.adapters.load import load_package, load_package_model
from graph_tools.errors import AdapterError, LoraOnnxError, first_line as _first_line
from graph_tools.passes.mixed import ROWS_PREFIX
from graph_tools.runtime import generate as generate_mod

__all__ = ["AdapterSession"]

logger = logging.getLogger(__name__)

AdapterChoice = str | Mapping[str, float] | None

#: prepared feeds kept per adapter *combination* (single adapters are always kept)
_MAX_COMBINATIONS = 32
#: session config key: external-mode sessions set it to "1" unless ``session_config`` sets it
_PREPACKING = "session.disable_prepacking"


class AdapterSession:
    """Serve every adapter of a package from one ORT session (see module docstring)."""

    def __init__(self, package_dir: str | os.PathLike, *, providers: Sequence | None = None,
                 session_options: ort.SessionOptions | None = None, session_config: Mapping[str, str] | None = None):
        """``session_options`` is used as given in inputs mode; external mode builds one options
        object per adapter session and copies its common attributes (threads, optimization level,
        execution mode, arena, memory pattern). ``session_config`` entries (e.g.
        ``{"session.intra_op.allow_spinning": "0"}``) are applied to every session in both modes; in external mode
        ``{"session.disable_prepacking": "0"}`` keeps weight prepacking (faster, one packed copy of
        the base MatMul weights per adapter session)."""
        self._config = dict(session_config or {})
        self.package = load_package(package_dir)
        self.manifest = self.package.manifest
        self._providers = list(providers) if providers else ["CPUExecutionProvider"]
        self._options = session_options
        self._lock = threading.Lock()
        self._slots = list(self.manifest.slots)
        self._slot_names = {s.name for s in self._slots}
        self._packs: list[dict] = list((self.manifest.extra or {}).get("packs") or [])
        self._weights: dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]] = {}
        self._feeds: collections.OrderedDict[object, dict[str, ort.OrtValue]] = collections.OrderedDict()
        self._sessions: collections.OrderedDict[object, ort.InferenceSession] = collections.OrderedDict()
        self._base_values: dict[str, ort.OrtValue] | None = None
        self.external = self.manifest.mode == "external"
        self.quantized = bool((self.manifest.extra or {}).get("quantization"))
        self._raw: dict[str, dict[str, np.ndarray]] = {}
        self._mixed = None  # graph_tools.runtime.mixed.MixedBatches, made on the first mixed batch
        graph = load_package_model(self.package).graph  # checks the graph against the manifest
        adapter_fed = self._slot_names | {p["name"] for p in self._packs}
        self._required = [v.name for v in graph.inputs if v.name not in graph.initializers and v.name not in adapter_fed]
        self._specs = input_specs(graph, adapter_fed)
        del graph
        self._input_names = set(self._required)
        if not self.external:
            options = session_options if session_options is not None else self._session_options()
            if session_options is not None:
                for key, value in self._config.items():
                    options.add_session_config_entry(key, str(value))
            self._session = _create_session(self.package.model_path, options, self._providers)
            self._input_names = {i.name for i in self._session.get_inputs()} - adapter_fed
        # declared concurrencies of a quantized package: sorted adapter names -> stored tensors
        self._combos: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
        for spec in self.manifest.adapters:
            self._load(spec.name, self.package.path / spec.file, expected=set(spec.scale))
        for combo in (self.manifest.extra or {}).get("quantization", {}).get("concurrencies") or []:
            self._combos[tuple(sorted(combo["adapters"]))] = self._read_quantized(self.package.path / combo["file"])

    # -- adapters ------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(self._weights)

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Read an adapter file, check it against the slots, prepare its values once."""
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter name must be a non-empty string, not {name!r}")
        self._load(name, Path(path), expected=None)

    def _load(self, name: str, path: Path, expected: set[str] | None) -> None:
        if self.quantized:
            # quantized values + encodings are fed as stored: one adapter (or declared concurrency) per run
            weights = {}
            self._raw[name] = self._read_quantized(path)
        else:
            weights = read_slot_weights(self._slots, self._packs, path, expected_modules=expected)
        with self._lock:
            self._weights[name] = weights
            if expected is None:  # a replaced adapter: its declared concurrencies no longer match
                for combo in [c for c in self._combos if name in c]:
                    del self._combos[combo]
            for key in [k for k in self._feeds if _mentions(k, name)]:
                del self._feeds[key]
            for key in [k for k in self._sessions if _mentions(k, name)]:
                del self._sessions[key]
            if self._mixed is not None:
                self._mixed.forget(name)

    def _read_quantized(self, path: Path) -> dict[str, np.ndarray]:
        tensors = unpack_tensors(self._packs, files.read_adapter(Path(path)), source=path)
        check_adapter_tensors(self.manifest, tensors, source=str(path))
        return fill_empty_ranks(self._slots, tensors)  # no empty inner dim reaches ORT

    @property
    def concurrencies(self) -> list[tuple[str, ...]]:
        """Adapter combinations a quantized package serves in one run (declared at quantize time)."""
        return list(self._combos)

    def _key(self, adapter: AdapterChoice):
        if adapter is None:
            return None
        if isinstance(adapter, str):
            if adapter not in self._weights:
                raise AdapterError(f"unknown adapter {adapter!r}; loaded: {', '.join(self._weights) or 'none'}")
            return ((adapter, 1.0),)
        if isinstance(adapter, Mapping):
            for a in adapter:
                if a not in self._weights:
                    raise AdapterError(f"unknown adapter {a!r}; loaded: {', '.join(self._weights) or 'none'}")
            for a, w in adapter.items():
                if isinstance(w, bool) or not isinstance(w, (int, float, np.floating, np.integer)) or not math.isfinite(w):
                    raise AdapterError(f"adapter {a!r}: weight must be a finite number, not {w!r}")
            return tuple(sorted((a, float(w)) for a, w in adapter.items())) or None
        raise AdapterError(f"adapter must be None, a name or a {{name: weight}} dict, not {type(adapter).__name__}")

    def _slot_values(self, key) -> dict[str, np.ndarray]:
        if self.quantized:
            if not key:
                return {}
            if len(key) == 1 and key[0][1] == 1.0:
                return dict(self._raw[key[0][0]])
            names = tuple(a for a, _ in key)
            if names in self._combos and all(w == 1.0 for _, w in key):
                return dict(self._combos[names])
            declared = ", ".join("+".join(c) for c in self._combos) or "none"
            asked = "+".join(f"{a}" if w == 1.0 else f"{a}={w:g}" for a, w in key)
            raise AdapterError(f"a quantized package runs one adapter at a time (weight 1.0) or a declared concurrency "
                               f"(weight 1.0 each; declared: {declared}), not {asked}: its encodings were calibrated "
                               "per adapter; declare it with quantize(..., concurrencies=[...])")
        chosen = [(self._weights[a], w) for a, w in key] if key else []
        values = compose(self._slots, chosen)
        return pack_tensors(self._packs, values) if self._packs else values

    def _feed_for(self, key) -> dict[str, ort.OrtValue]:
        feed = self._feeds.get(key)
        if feed is None:
            with self._lock:
                feed = self._feeds.get(key)
                if feed is None:
                    feed = {n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in self._slot_values(key).items()}
                    self._feeds[key] = feed
                    _evict(self._feeds)
        return feed

    # -- running -------------------------------------------------------------------------------
    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray],
            adapter: AdapterChoice | Sequence[AdapterChoice] = None, run_options: ort.RunOptions | None = None):
        """Run with ``adapter``: ``None`` (base model), a name, or ``{name: weight, ...}``; or a list
        of those, one per batch row (a mixed batch, one run: :mod:`graph_tools.runtime.mixed`)."""
        if isinstance(adapter, (list, tuple)):
            return self._run_mixed(output_names, feeds, adapter, run_options)
        key = self._key(adapter)
        self._check_feeds(feeds)
        full = dict(feeds)
        if self.external:
            session = self._external_session(key)
        else:
            session = self._session
            if key is not None:
                full.update(self._feed_for(key))
        return self._ort_run(session, output_names, full, run_options)

    def _run_mixed(self, output_names, feeds, choices: Sequence[AdapterChoice], run_options):
        from graph_tools.runtime.mixed import check_rows, choose_layout, refuse_quantized, tokens_per_row

        self._check_feeds(feeds)
        keys = self._row_keys(choices)
        if len(set(keys)) == 1:  # every row the same: the package graph, one adapter
            return self.run(output_names, feeds, choices[0], run_options)
        refuse_quantized(self)
        check_rows(feeds, len(keys))
        layout = choose_layout(keys, tokens_per_row(feeds, self._required[0] if self._required else None))
        session, values = self._mixed_session(keys, layout)
        return self._ort_run(session, output_names, {**feeds, **values}, run_options)

    def _row_keys(self, choices: Sequence[AdapterChoice]) -> tuple:
        keys = tuple(self._key(c) for c in choices)
        if not keys:
            raise AdapterError("adapter=[] lists no row choices; give one per batch row")
        return keys

    def _mixed_session(self, keys: tuple, layout: str) -> tuple[ort.InferenceSession, dict[str, ort.OrtValue]]:
        """The mixed-form session and the row values for ``keys`` (one per row) in ``layout``
        (prepared once per composition and layout)."""
        from graph_tools.runtime.mixed import MixedBatches

        with self._lock:
            if self._mixed is None:
                self._mixed = MixedBatches(self)
            return self._mixed.session, self._mixed.feed_for(keys, layout)

    def _mixed_generation_session(self, choices: Sequence[AdapterChoice], rows: int, prompt_tokens: int):
        """:meth:`_generation_session` for one choice per row (``generate(adapter=[...])``), plus
        the values for the decode steps when they differ from the prompt's (else None)."""
        from graph_tools.runtime.mixed import choose_layout, refuse_quantized

        keys = self._row_keys(choices)
        if len(set(keys)) == 1:
            return (*self._generation_session(keys[0]), None)
        refuse_quantized(self)
        if len(keys) != rows:
            raise AdapterError(f"adapter= lists {len(keys)} row choices but the prompt has {rows} rows")
        prompt_layout, step_layout = choose_layout(keys, prompt_tokens), choose_layout(keys, 1)
        session, values = self._mixed_session(keys, prompt_layout)
        return session, values, (None if step_layout == prompt_layout else self._mixed_session(keys, step_layout)[1])

    def _ort_run(self, session, output_names, feed, run_options):
        try:
            return session.run(output_names, feed, run_options if run_options is not None else _quiet_run_options())
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.Fail,
                ort.capi.onnxruntime_pybind11_state.RuntimeException) as exc:
            raise LoraOnnxError(f"{self.package.path}: onnxruntime refused the run: {_first_line(exc)}") from None

    # -- generation (the loop lives in graph_tools.runtime.generate) ---------------------------
    def generate(self, input_ids, *, attention_mask=None, adapter: AdapterChoice | Sequence[AdapterChoice] = None,
                 max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, eos_token_id=None) -> np.ndarray:
        """Generate on a KV-cache package: int64 ``[batch, prompt + new]`` like Hugging Face
        ``generate`` (left-padded batches, rows padded after eos). ``adapter`` as in :meth:`run`."""
        config = generate_mod.GenerationConfig(max_new_tokens, do_sample, temperature, top_k, top_p, seed, eos_token_id)
        return generate_mod.generate(self, input_ids, attention_mask=attention_mask, adapter=adapter, config=config)

    def generate_stream(self, input_ids, *, attention_mask=None, adapter: AdapterChoice = None,
                        max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                        eos_token_id=None):
        """Like :meth:`generate`, yielding each step's new token per row (``[batch]`` int64)."""
        config = generate_mod.GenerationConfig(max_new_tokens, do_sample, temperature, top_k, top_p, seed, eos_token_id)
        return generate_mod.generate_stream(self, input_ids, attention_mask=attention_mask, adapter=adapter,
                                            config=config)

    def _generation_session(self, key) -> tuple[ort.InferenceSession, dict[str, ort.OrtValue]]:
        """The session and the slot values to bind for adapter choice ``key`` (prepared once)."""
        if self.external:
            return self._external_session(key), {}
        return self._session, (self._feed_for(key) if key is not None else {})

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        if not isinstance(feeds, Mapping):
            raise LoraOnnxError(f"feeds must be a dict of input name -> array, not {type(feeds).__name__}")
        for name in feeds:
            if name in self._slot_names or (name or "").startswith(("lora_pack.", ROWS_PREFIX)):
                raise LoraOnnxError(f"feed {name!r} is an adapter slot; choose adapters with adapter=..., not feeds")
            if name not in self._input_names:
                raise LoraOnnxError(
                    f"feed {name!r} is not a model input of this package (inputs: {', '.join(sorted(self._input_names))})"
                )
        missing = [n for n in self._required if n not in feeds]
        if missing:
            raise LoraOnnxError(f"missing feed {missing[0]!r} (inputs: {', '.join(sorted(self._input_names))})")
        check_feeds(feeds, self._specs)

    def get_inputs(self):
        session = self._session if not self.external else self._external_session(None)
        return [i for i in session.get_inputs() if i.name not in self._slot_names and not i.name.startswith("lora_pack.")]

    def get_outputs(self):
        session = self._session if not self.external else self._external_session(None)
        return session.get_outputs()

    # -- external mode -------------------------------------------------------------------------
    def _session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # slots are initializers that are also inputs: by design; errors are raised as ours
        if self._options is not None:
            for attr in ("graph_optimization_level", "intra_op_num_threads", "inter_op_num_threads", "execution_mode",
                         "log_severity_level", "enable_cpu_mem_arena", "enable_mem_pattern"):
                setattr(options, attr, getattr(self._options, attr))
        for key, value in self._config.items():
            options.add_session_config_entry(key, str(value))
        return options

    def _external_session(self, key) -> ort.InferenceSession:
        session = self._sessions.get(key)
        if session is not None:
            return session
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                options = self._session_options()
                values = {n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in self._slot_values(key).items()}
                base = self._shared_base_values()
                values.update(base)
                # add_initializer uses the caller's buffers as they are; add_external_initializers
                # copies them into every session, and MLAS prepacking makes a per-session packed copy
                # of every MatMul weight: both would duplicate the base weights per adapter session.
                # (slots, whose data file is deliberately absent, must go the external way: ORT
                # validates external paths of add_initializer overrides; slots are small anyway).
                if _PREPACKING not in self._config:  # the caller's choice wins (see the module docstring)
                    options.add_session_config_entry(_PREPACKING, "1")
                slot_values = {n: v for n, v in values.items() if n in self._slot_names}
                options.add_external_initializers(list(slot_values), list(slot_values.values()))
                for name, value in values.items():
                    if name not in slot_values:
                        options.add_initializer(name, value)
                session = _create_session(self.package.model_path, options, self._providers)
                session._lora_onnx_values = values  # keep the buffers alive as long as the session
                self._sessions[key] = session
                _evict(self._sessions)
        return session

    def _shared_base_values(self) -> dict[str, ort.OrtValue]:
        """Base weights as OrtValues over one memory map: every external-mode session shares them."""
        if self._base_values is None:
            model = ir.load(self.package.model_path)  # fresh: external tensors, not placeholders
            values = {}
            maps: dict[str, np.memmap] = {}
            for init in model.graph.initializers.values():
                tensor = init.const_value
                if not isinstance(tensor, ir.ExternalTensor) or init.name in self._slot_names:
                    continue
                path = str(Path(tensor.base_dir) / tensor.location)
                if path not in maps:
                    maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
                raw = maps[path][tensor.offset or 0: (tensor.offset or 0) + tensor.nbytes]
                array = raw.view(tensor.dtype.numpy()).reshape(tensor.shape.numpy())
                values[init.name] = ort.OrtValue.ortvalue_from_numpy(array)
            self._base_values = values
        return self._base_values


def _quiet_run_options() -> ort.RunOptions:
    """Run options that keep ORT's own error log off stderr: every failure is raised as ours."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def _create_session(path: Path, options: ort.SessionOptions, providers) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.Fail,
            ort.capi.onnxruntime_pybind11_state.InvalidGraph, ort.capi.onnxruntime_pybind11_state.NoSuchFile) as exc:
        raise LoraOnnxError(f"{path}: onnxruntime cannot load the package graph: {_first_line(exc)}") from None


def _evict(cache: collections.OrderedDict) -> None:
    """Keep every single-adapter entry; drop the oldest combinations above the limit."""
    combos = [k for k in cache if k is not None and (len(k) != 1 or k[0][1] != 1.0)]
    for key in combos[: max(0, len(combos) - _MAX_COMBINATIONS)]:
        del cache[key]


def _mentions(key, name: str) -> bool:
    return key is not None and any(a == name for a, _ in key)
