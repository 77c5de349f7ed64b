"""Safe model loading and atomic output folders.

* :func:`load_model` reads an ONNX file with onnx-ir (external data stays lazy and memory-mapped)
  and turns every way a file can be broken into a :class:`ModelLoadError` naming the file.
* :func:`atomic_output` yields a temporary folder beside the destination and renames it into
  place only when the body succeeds, so a failure never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import onnx_ir as ir

if TYPE_CHECKING:
    import onnx

from graph_tools.errors import ExternalDataError, ModelLoadError, first_line as _first_line

__all__ = ["load_model", "working_copy", "check_external_data", "atomic_output", "atomic_file", "save_model"]

logger = logging.getLogger(__name__)


def load_model(model_or_path: ir.Model | onnx.ModelProto | str | os.PathLike) -> ir.Model:
    """Return an ``ir.Model``: an ``ir.Model`` as is, an ``onnx.ModelProto`` wrapped (its
    tensors are shared, not copied), a path loaded lazily and checked (see module docstring)."""
    if isinstance(model_or_path, ir.Model):
        return model_or_path
    if type(model_or_path).__name__ == "ModelProto" and hasattr(model_or_path, "SerializeToString"):
        try:
            model = ir.from_proto(model_or_path)
        except Exception as exc:  # noqa: BLE001 - a malformed proto is bad input
            raise ModelLoadError(f"<onnx.ModelProto>: not a valid ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
        for value in _all_initializers(model):  # no folder to resolve them against
            if isinstance(value.const_value, ir.ExternalTensor):
                raise ModelLoadError(
                    f"<onnx.ModelProto>: initializer {value.name!r} is external data the proto does not hold; "
                    "pass the model's path, or load it with load_external_data=True"
                )
        return model
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise ModelLoadError(f"expected an ONNX model (path, onnx.ModelProto or onnx_ir.Model), not {type(model_or_path).__name__}")
    path = Path(model_or_path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        candidate = path / "model.onnx"
        if not candidate.is_file():
            raise ModelLoadError(f"{path}: is a folder without model.onnx")
        path = candidate
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file, not an ONNX model")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf DecodeError, ValueError, ... : all mean "not a valid model"
        raise ModelLoadError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
    if len(model.graph) == 0 and not model.graph.outputs:
        raise ModelLoadError(f"{path}: not a valid ONNX model (empty graph)")
    check_external_data(model, path.parent)
    return model


def working_copy(model_or_path: ir.Model | onnx.ModelProto | str | os.PathLike) -> ir.Model:
    """:func:`load_model`, but an ``ir.Model`` given by the caller is cloned (tensors shared), so
    an API that transforms the graph never changes the caller's model."""
    if isinstance(model_or_path, ir.Model):
        return model_or_path.clone()
    return load_model(model_or_path)


def check_external_data(model: ir.Model, base_dir: str | os.PathLike) -> None:
    """Refuse external data that is missing, too short, or outside ``base_dir``."""
    base = Path(base_dir).resolve()
    sizes: dict[Path, int] = {}
    for value in _all_initializers(model):
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = tensor.location
        target = (base / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(base):
            raise ExternalDataError(
                f"initializer {value.name!r}: external data path {location!r} escapes the model folder {base}"
            )
        if target not in sizes:
            if not target.is_file():
                raise ExternalDataError(f"initializer {value.name!r}: external data file {location!r} is missing")
            sizes[target] = target.stat().st_size
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[target]:
            raise ExternalDataError(
                f"initializer {value.name!r}: external data file {location!r} is truncated "
                f"(needs {end} bytes, has {sizes[target]})"
            )


def _all_initializers(model: ir.Model) -> Iterator[ir.Value]:
    yield from model.graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from attr.value.initializers.values()


@contextlib.contextmanager
def atomic_output(destination: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp folder in ``destination``'s parent; on success it replaces ``destination``."""
    dest = Path(destination).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(dest)
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, dest)


@contextlib.contextmanager
def atomic_file(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file path beside ``destination``; renamed into place on success."""
    dest = Path(destination).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)


def save_model(model: ir.Model, out_path: str | os.PathLike, *, external_data: bool = True) -> Path:
    """Save ``model`` to ``out_path`` (weights in ``<name>.data``) via a temp folder + rename."""
    out = Path(out_path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    data = f"{out.name}.data" if external_data else None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        ir.save(model, tmp / out.name, external_data=data)
        if data and (tmp / data).exists():
            os.replace(tmp / data, out.parent / data)
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
