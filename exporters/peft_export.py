"""PEFT (LoRA) model -> ONNX with every adapter kept as its own, unmerged branch.

What ``export_peft`` adds to ``torch.onnx.export(..., dynamo=True)``:

* every loaded adapter is active during export, so each becomes a branch
  ``base(x) + B(A(x)) * scale`` (PEFT's own forward is traced, so numerics are PEFT's);
* each site's scale is its own initializer ``<module>.lora_scale.<adapter>`` (PEFT's float
  ``scaling`` turned into a buffer for the export), never one literal shared across sites;
* the graph edits after torch.onnx are onnx-ir passes (:mod:`exporters.passes`, one
  ``ir.passes.Sequential``): weight initializers keep their PEFT state-dict names, base-weight
  transposes are folded into the initializer under the original name (lazily, at save time), LoRA
  weights stay in PEFT's layout behind a Transpose (cheap at rank r) so a PEFT checkpoint maps onto
  them 1:1, onnxscript's optimizer runs without merging LoRA weights or scales, and LoRA nodes
  carry metadata ``lora_onnx.module`` / ``lora_onnx.adapter`` / ``lora_onnx.role``;
* unsupported tuners and variants (DoRA, LoHa, LoKr, ...) fail early with UnsupportedAdapterError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import keyword
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import onnx_ir as ir
import torch

from graph_tools._io import save_model
from graph_tools.errors import ExportError, NoLoraError, UnsupportedAdapterError, first_line
from graph_tools.lora import LoraSite, naming
from graph_tools.passes._base import run_passes
from graph_tools.runtime.decoder import write_decoder_info

from exporters import decoder
from exporters.passes import export_passes

__all__ = ["export_peft", "ExportResult", "lora_layers"]

logger = logging.getLogger(__name__)

_WRAP = "peft_model"
_PROTOBUF_LIMIT = 1_800_000_000  # bytes of initializers above which weights go to external data
_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: Path
    sites: list[LoraSite]
    adapters: list[str]
    input_names: list[str]
    output_names: list[str]
    external_data: str | None


def export_peft(
    model: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | torch.Tensor,
    output_path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic_shapes: Mapping[str, Mapping[int, str]] | None = None,
    external_data: bool | None = None,
    with_past: bool = False,
) -> ExportResult:
    """Export a PEFT LoRA model to ONNX keeping every adapter as an unmerged branch.

    Args:
        model: a ``peft.PeftModel`` or any module with PEFT LoRA layers injected.
        example_inputs: keyword tensors (``{"input_ids": ...}``), a tuple of positional tensors,
            or one tensor.
        output_path: the ``.onnx`` file to write (its folder is created).
        opset: ONNX opset (torch.onnx's default when ``None``).
        dynamic_shapes: ``{input_name: {axis: dim_name}}``; by default batch and sequence axes
            of transformers text inputs are dynamic, other inputs static.
        external_data: ``True`` puts weights in ``<file>.data``; ``None`` does so only above the
            protobuf limit.
        with_past: export a causal LM as a KV-cache decoder (``input_ids``, ``attention_mask``,
            ``position_ids``, ``past_key_values.{i}.key/value`` -> ``logits``,
            ``present.{i}.key/value``; see :mod:`exporters.decoder`); ``example_inputs`` is
            ``{"input_ids", "attention_mask"}``, axes are always dynamic.
    """
    layers = lora_layers(model)
    if not layers:
        raise NoLoraError(f"{type(model).__name__} has no PEFT LoRA layers to export")
    output_path = Path(output_path)
    if output_path.suffix != ".onnx":
        raise ExportError(f"{output_path}: output path must end in .onnx")
    adapters = sorted({a for _, layer in layers for a in _layer_adapters(layer)})
    info = None
    if with_past:
        if dynamic_shapes is not None:
            raise ExportError("with_past=True: dynamic_shapes is not taken (batch, sequence and past axes are dynamic)")
        info = decoder.decoder_info(model)
        args, shapes = decoder.decoder_example(info, example_inputs, decoder.model_dtype(model))
        names, output_names = decoder.io_names(info)
        wrapper = decoder.DecoderWrapper(model, _WRAP, info.num_hidden_layers)
        export_kwargs: dict[str, Any] = {"dynamic_shapes": shapes}
    else:
        names, args = _normalize_inputs(model, example_inputs)
        axes = dict(dynamic_shapes) if dynamic_shapes is not None else _default_axes(model, names, args)
        wrapper = _make_wrapper(model, names, keywords=isinstance(example_inputs, Mapping))
        export_kwargs = {"input_names": names, "dynamic_axes": {k: dict(v) for k, v in axes.items()} or None}
    with _export_mode(model, layers):
        if info is None:
            try:
                with torch.no_grad():
                    outputs = wrapper(*args)
            except Exception as exc:  # a wrong dtype, shape or input name: the model cannot run on them
                given = ", ".join(f"{n} {a.dtype} {list(a.shape)}".replace("torch.", "") for n, a in zip(names, args))
                raise ExportError(f"the model does not run on the example inputs ({given}): {_first_line(exc)}") from None
            output_names = list(wrapper.output_names)
            del outputs
            export_kwargs["output_names"] = output_names
        try:
            with _quiet_torch_onnx():
                program = torch.onnx.export(
                    wrapper, tuple(args), dynamo=True, optimize=False, verbose=False, opset_version=opset,
                    report=False, **export_kwargs,
                )
        except Exception as exc:  # torch raises many types; all mean "could not export"
            raise ExportError(f"torch.onnx.export failed: {_first_line(exc)}") from exc
    ir_model = program.model
    if info is not None:
        decoder.name_graph_io(ir_model, names, output_names)
        write_decoder_info(ir_model, info)
    else:
        _refuse_unused_inputs(ir_model, model, names)
    expected = {(naming.strip_peft_prefix(name), a) for name, layer in layers for a in _layer_adapters(layer)}
    passes, annotate = export_passes(f"{_WRAP}.", expected)  # names, transposes, optimizer, metadata
    run_passes(ir_model, passes)
    sites = annotate.sites
    ir_model.producer_name = "lora-onnx"
    external = _save(ir_model, output_path, external_data)
    logger.info("exported %d LoRA sites (%d adapters) to %s", len(sites), len(adapters), output_path)
    # the result outlives the in-memory graph: keep the records, not the graph they point into
    return ExportResult(output_path, [s.detached() for s in sites], adapters, names, output_names, external)


# -- PEFT model inspection -------------------------------------------------------------------
def lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Return ``(name, layer)`` of every PEFT LoRA layer; raise on unsupported tuners/variants."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise UnsupportedAdapterError(f"peft is not importable: {exc}") from exc
    from peft.tuners.lora import layer as lora_layer_mod

    supported = (lora_layer_mod.Linear, lora_layer_mod.Embedding, lora_layer_mod._ConvNd)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if not isinstance(module, LoraLayer):
            raise UnsupportedAdapterError(
                f"{name}: {type(module).__module__}.{type(module).__name__} is not LoRA; "
                "supported: LoRA on Linear, transformers Conv1D, Embedding, Conv1d/Conv2d"
            )
        if not isinstance(module, supported):
            raise UnsupportedAdapterError(
                f"{name}: LoRA layer type {type(module).__name__} is not supported; "
                "supported: Linear, transformers Conv1D, Embedding, Conv1d/Conv2d"
            )
        if getattr(module, "merged_adapters", None):
            raise UnsupportedAdapterError(f"{name}: adapters {module.merged_adapters} are merged; unmerge them first")
        for adapter in _layer_adapters(module):
            variant = getattr(module, "lora_variant", {}).get(adapter)
            if variant is not None or module.use_dora.get(adapter, False):
                kind = type(variant).__name__ if variant is not None else "DoRA"
                raise UnsupportedAdapterError(
                    f"{name}: adapter {adapter!r} uses the LoRA variant {kind}; only plain LoRA "
                    "(incl. rsLoRA, rank/alpha patterns) is supported"
                )
            if module.lora_bias.get(adapter, False):
                raise UnsupportedAdapterError(f"{name}: adapter {adapter!r} uses lora_bias=True, not supported")
        found.append((name, module))
    return found


def _layer_adapters(layer) -> list[str]:
    keys = list(layer.lora_A.keys()) + list(getattr(layer, "lora_embedding_A", {}).keys())
    return [k for k in keys if k in layer.scaling]


class _ScaleView(dict):
    """Stands in for ``layer.scaling`` during export: items read the per-site scale buffers."""

    def __init__(self, layer: torch.nn.Module, original: dict):
        super().__init__(original)
        self._layer = layer

    def __getitem__(self, key):
        return getattr(self._layer.lora_scale, key)


@contextlib.contextmanager
def _export_mode(model: torch.nn.Module, layers) -> Iterator[None]:
    """eval(), all adapters active, scales as buffers; everything restored afterwards."""
    was_training = model.training
    saved = []
    try:
        model.eval()
        for _, layer in layers:
            adapters = _layer_adapters(layer)
            holder = torch.nn.Module()
            dtype = _lora_dtype(layer, adapters[0]) if adapters else torch.float32
            for adapter in adapters:
                holder.register_buffer(adapter, torch.tensor(float(layer.scaling[adapter]), dtype=dtype))
            # Private switches kept on purpose: PEFT's public set_adapter/enable_adapters also flip
            # requires_grad on the user's LoRA parameters, and export must leave the model as it was.
            saved.append((layer, layer.scaling, layer._active_adapter, layer._disable_adapters))
            layer.lora_scale = holder
            layer.scaling = _ScaleView(layer, layer.scaling)
            layer._active_adapter = list(adapters)
            layer._disable_adapters = False
        yield
    finally:
        for layer, scaling, active, disabled in saved:
            layer.scaling = scaling
            layer._active_adapter = active
            layer._disable_adapters = disabled
            if "lora_scale" in layer._modules:
                del layer._modules["lora_scale"]
        model.train(was_training)


def _lora_dtype(layer, adapter: str) -> torch.dtype:
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight.dtype
    return layer.lora_embedding_A[adapter].dtype


# -- inputs and outputs ----------------------------------------------------------------------
class _Wrapper(torch.nn.Module):
    """Named positional tensors in, a flat tuple of tensors out (what torch.onnx needs)."""

    def __init__(self, model: torch.nn.Module, names: list[str], keywords: bool):
        super().__init__()
        setattr(self, _WRAP, model)
        self._names = names
        self._keywords = keywords
        self._use_cache = hasattr(getattr(model, "config", None), "use_cache")
        self.output_names: list[str] = []

    def _call(self, args):
        model = getattr(self, _WRAP)
        if self._keywords:
            kwargs = dict(zip(self._names, args))
            if self._use_cache:
                kwargs["use_cache"] = False
            out = model(**kwargs)
        else:
            out = model(*args)
        names, tensors = _flatten_outputs(out)
        self.output_names = names
        return tuple(tensors)


def _make_wrapper(model: torch.nn.Module, names: list[str], keywords: bool) -> _Wrapper:
    """A wrapper whose ``forward`` has one named parameter per input (torch.export binds by name)."""
    params = ", ".join(names)
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {params}):\n    return self._call(({params},))\n", namespace)  # noqa: S102
    cls = type("LoraOnnxExportWrapper", (_Wrapper,), {"forward": namespace["forward"]})
    return cls(model, names, keywords)


def _flatten_outputs(out: Any) -> tuple[list[str], list[torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return ["output"], [out]
    if isinstance(out, Mapping):  # transformers ModelOutput is a Mapping of the non-None fields
        items = [(k, v) for k, v in out.items() if isinstance(v, torch.Tensor)]
        return [k for k, _ in items], [v for _, v in items]
    if isinstance(out, (tuple, list)):
        tensors = [t for t in out if isinstance(t, torch.Tensor)]
        return [f"output_{i}" for i in range(len(tensors))], tensors
    raise ExportError(f"model output of type {type(out).__name__} holds no tensors")


def _refuse_unused_inputs(ir_model, model, names: list[str]) -> None:
    """An example input the model's forward does not name and the graph never reads was passed
    through ``**kwargs`` and ignored: refuse it rather than export an input that does nothing."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    for value in ir_model.graph.inputs:
        if value.name in names and value.name not in named and not value.uses() and not value.is_graph_output():
            raise ExportError(
                f"example input {value.name!r} is not an input of {type(base).__name__}.forward "
                f"(it takes: {', '.join(n for n in params if n in named)})"
            )


def _normalize_inputs(model, example_inputs) -> tuple[list[str], list[torch.Tensor]]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        names = list(example_inputs)
        values = list(example_inputs.values())
    elif isinstance(example_inputs, (tuple, list)):
        values = list(example_inputs)
        names = [f"input_{i}" for i in range(len(values))]
    else:
        raise ExportError(f"example_inputs must be a dict, tuple or tensor, not {type(example_inputs).__name__}")
    for name, value in zip(names, values):
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ExportError(f"example input name {name!r} is not a valid Python identifier")
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"example input {name!r} is {type(value).__name__}, not a tensor")
    return names, values


def _default_axes(model, names, args) -> dict[str, dict[int, str]]:
    if getattr(model, "config", None) is None:
        return {}
    axes = {}
    for name, value in zip(names, args):
        if name in _TEXT_INPUTS and value.dim() >= 2:
            axes[name] = {0: "batch", 1: "sequence"}
    return axes


def _save(model: ir.Model, path: Path, external_data: bool | None) -> str | None:
    """Weights to ``<file>.data`` when asked, or automatically above the protobuf limit."""
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    use_external = external_data if external_data is not None else total > _PROTOBUF_LIMIT
    save_model(model, path, external_data=use_external)
    return f"{path.name}.data" if use_external else None


@contextlib.contextmanager
def _quiet_torch_onnx() -> Iterator[None]:
    """torch.onnx prints progress to stdout and warns about optional packages; keep our CLI's
    output ours (its messages still reach the logger at debug level)."""
    import io
    import warnings

    buffer = io.StringIO()
    torch_loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export")]
    levels = [lg.level for lg in torch_loggers]
    try:
        for lg in torch_loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(torch_loggers, levels):
            lg.setLevel(level)
        if buffer.getvalue():
            logger.debug("torch.onnx: %s", buffer.getvalue().strip())


def _first_line(exc: BaseException) -> str:
    """torch.onnx messages open with "[torch.onnx] ..." banner lines; report the first real one."""
    return first_line("\n".join(l for l in str(exc).splitlines() if not l.strip().startswith("[")) or exc, limit=300)