"""Calibration: run a package's float graph in ORT with extra outputs and collect ranges.

The graph is run once for the base model (no adapter fed: the slots' zero defaults) and once per
adapter (or declared concurrency) with its slot values; ranges are collected per run, and for
mixed precision a second pass measures each tensor's error under a candidate encoding. Only the serialized graph (no weight bytes) is handed to ORT;
weights are read by ORT from the package's external data folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graph_tools._feeds import check_feeds, input_specs
from graph_tools._io import load_graph_file
from graph_tools.errors import QuantizationError

__all__ = ["Ranges", "collect_ranges", "collect_errors", "iter_calibration", "session_with_outputs"]

logger = logging.getLogger(__name__)


class Ranges:
    """Per tensor running min/max (MinMax) or mean of per-batch percentiles."""

    def __init__(self, method: str = "minmax", percentile: float = 99.99):
        if method not in ("minmax", "percentile"):
            raise QuantizationError(f"calibration method must be minmax or percentile, not {method!r}")
        self.method = method
        self.percentile = percentile
        self._lo: dict[str, list[float]] = {}
        self._hi: dict[str, list[float]] = {}

    def update(self, name: str, array: np.ndarray) -> None:
        if array.size == 0:  # an empty tensor (a past KV input at prefill) says nothing about the range
            self._lo.setdefault(name, [])
            self._hi.setdefault(name, [])
            return
        if self.method == "minmax":
            lo, hi = float(array.min()), float(array.max())
        else:
            lo = float(np.percentile(array, 100 - self.percentile))
            hi = float(np.percentile(array, self.percentile))
        self._lo.setdefault(name, []).append(lo)
        self._hi.setdefault(name, []).append(hi)

    def seen(self, name: str) -> bool:
        """Whether ``name`` held any value in the calibration (not only empty tensors)."""
        return bool(self._lo.get(name))

    def get(self, name: str) -> tuple[float, float]:
        if name not in self._lo:
            raise QuantizationError(f"tensor {name!r} was not calibrated")
        if not self._lo[name]:  # only ever seen empty (see ``seen``): nothing to cover
            return 0.0, 0.0
        if self.method == "minmax":
            return min(self._lo[name]), max(self._hi[name])
        return float(np.mean(self._lo[name])), float(np.mean(self._hi[name]))


def iter_calibration(calibration) -> list[dict[str, np.ndarray]]:
    """Materialize calibration data: an iterable of feed dicts or an ORT CalibrationDataReader."""
    feeds: list[dict[str, np.ndarray]] = []
    if calibration is None:
        raise QuantizationError("no calibration data given")
    if hasattr(calibration, "get_next"):
        while True:
            item = calibration.get_next()
            if item is None:
                break
            feeds.append(_feed(item, len(feeds)))
    else:
        try:
            items = iter(calibration)
        except TypeError:
            raise QuantizationError(f"calibration must be an iterable of feed dicts, not {type(calibration).__name__}") from None
        for item in items:
            feeds.append(_feed(item, len(feeds)))
    if not feeds:
        raise QuantizationError("calibration data is empty")
    return feeds


def _feed(item, k: int) -> dict[str, np.ndarray]:
    if not isinstance(item, Mapping):
        raise QuantizationError(f"calibration batch {k}: expected a dict of input name -> array, got {type(item).__name__}")
    feed = {}
    for name, value in item.items():
        if not isinstance(value, (np.ndarray, np.generic)):
            raise QuantizationError(f"calibration batch {k}: {name!r} is a {type(value).__name__}, not a numpy array")
        feed[name] = value
    return feed


def session_with_outputs(model_path: Path, names: Iterable[str]) -> ort.InferenceSession:
    """An unoptimized ORT session of ``model_path`` whose outputs also include ``names``
    (intermediate tensors). The graph is loaded with onnx-ir (weights stay external, unread) and
    serialized; ORT reads the weights from the model's own external data folder."""
    model = load_graph_file(model_path)
    graph = model.graph
    values = {v.name: v for v in graph.inputs}
    values.update({v.name: v for node in graph for v in node.outputs if v.name})
    existing = {o.name for o in graph.outputs}
    for name in dict.fromkeys(names):
        if name not in existing:
            if name not in values:
                raise QuantizationError(f"tensor {name!r} not found in {model_path.name}")
            graph.outputs.append(values[name])
    options = ort.SessionOptions()
    options.log_severity_level = 4  # ORT's own error lines stay off stderr: failures are raised as ours
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_path.parent))
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def collect_ranges(model_path: Path, tensors: list[str], runs: Mapping[str | None, Mapping[str, np.ndarray]],
                   feeds: list[dict[str, np.ndarray]], *, method: str = "minmax") -> dict[str | None, Ranges]:
    """Ranges of ``tensors`` for each run (``None`` = base; else run name -> slot feeds)."""
    result = {key: Ranges(method) for key in runs}
    for key, name, value in _iter_values(model_path, tensors, runs, feeds):
        result[key].update(name, value)
    return result


def collect_errors(model_path: Path, tensors: Mapping[str, Mapping[str | None, tuple[float, int, int, int]]],
                   runs: Mapping[str | None, Mapping[str, np.ndarray]], feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Relative quantization error of each tensor, worst over runs: ``||x - qdq(x)|| / ||x||`` with
    ``tensors[name][run] = (scale, zero_point, qmin, qmax)`` (the encoding that run would get)."""
    err: dict[tuple[str, str | None], list[float]] = {}
    for key, name, x in _iter_values(model_path, list(tensors), runs, feeds):
        scale, zp, qmin, qmax = tensors[name][key]
        x = x.astype(np.float64)
        q = (np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale
        acc = err.setdefault((name, key), [0.0, 0.0])
        acc[0] += float(np.sum((x - q) ** 2))
        acc[1] += float(np.sum(x ** 2))
    out: dict[str, float] = {}
    for (name, _), (noise, signal) in err.items():
        rel = float(np.sqrt(noise / signal)) if signal > 0 else 0.0
        out[name] = max(out.get(name, 0.0), rel)
    return out


def _iter_values(model_path: Path, tensors: list[str], runs: Mapping[str | None, Mapping[str, np.ndarray]],
                 feeds: list[dict[str, np.ndarray]]):
    """Yield ``(run, tensor name, float32 value)`` for every run and calibration batch."""
    session = session_with_outputs(model_path, tensors)
    inputs = {i.name: i for i in session.get_inputs()}
    _check_feeds(feeds, inputs, runs, model_path)
    out_names = [o.name for o in session.get_outputs()]
    wanted = set(tensors)
    for key, slot_feed in runs.items():
        for k, feed in enumerate(feeds):
            full = dict(feed)
            full.update(slot_feed or {})
            try:
                values = session.run(out_names, full)
            except Exception as exc:  # ORT's InvalidArgument/Fail/RuntimeException: the feeds do not fit
                raise QuantizationError(f"calibration batch {k}: onnxruntime refused it "
                                        f"({_ort_reason(exc)})") from None
            for name, value in zip(out_names, values):
                if name in wanted:
                    yield key, name, np.asarray(value, dtype=np.float32)
        logger.info("calibrated %s on %d batches", key or "base", len(feeds))


def _check_feeds(feeds, inputs, runs, model_path) -> None:
    slot_names = {n for run in runs.values() if run for n in run}
    required = [n for n in inputs if n not in slot_names]
    specs = input_specs(load_graph_file(model_path).graph, slot_names)
    for k, feed in enumerate(feeds):
        for name in feed:
            if name not in inputs or name in slot_names:
                raise QuantizationError(f"calibration batch {k}: {name!r} is not a model input; inputs: {', '.join(required)}")
        missing = [n for n in required if n not in feed and n in specs]
        if missing:
            raise QuantizationError(f"calibration batch {k}: missing input {missing[0]!r}; inputs: {', '.join(required)}")
        check_feeds(feed, specs, error=QuantizationError, where=f"calibration batch {k}")


def _ort_reason(exc: BaseException) -> str:
    from graph_tools.errors import first_line

    text = first_line(exc, limit=1000)
    return text.split(" : ", 2)[-1][:200] if text.startswith("[ONNXRuntimeError]") else text[:200]
