"""Safe model loading, whole-or-nothing outputs, and outputs that never touch an input.

* :func:`load_model` reads an ONNX file with onnx-ir (external data stays lazy and memory-mapped)
  and turns every way a file can be broken into a :class:`ModelLoadError` naming the file: not
  ONNX, external data missing / short / outside the folder / shorter than its tensor, a graph with
  a cycle or a value nothing produces (:func:`check_topology`).
* :func:`refuse_overlap` is called by every writer before it writes: an output that is, contains
  or lies inside one of its inputs (:func:`model_files` lists a model's files) is an
  :class:`OutputError`.
* :func:`atomic_output` (a folder), :func:`atomic_file` and :func:`save_model` (model + ``.data``)
  build the output in a temp folder beside the destination and rename it into place only when the
  body succeeded, so a failure never leaves a half-written output or a temp file.
* :func:`package_lock` is an OS lock (``flock``) on a package folder, held by every writer that
  changes an existing package (adapter files + manifest), so concurrent writers lose no update.
* :func:`read_json` reads a JSON file as one typed error on every failure (also nesting too deep).
* :func:`gc_paused`: no cyclic garbage collection while a graph is built and rewritten.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import onnx_ir as ir

if TYPE_CHECKING:
    import onnx

from graph_tools.errors import (
    ExternalDataError,
    InvalidGraphError,
    LoraOnnxError,
    ModelLoadError,
    OutputError,
    first_line as _first_line,
)

__all__ = [
    "load_model",
    "working_copy",
    "check_external_data",
    "check_topology",
    "model_files",
    "refuse_overlap",
    "check_output_folder",
    "atomic_output",
    "atomic_file",
    "save_model",
    "package_lock",
    "read_json",
    "gc_paused",
]

logger = logging.getLogger(__name__)

@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the body, back on after (if it was on). Loading a
    1.1B graph makes ~100k onnx-ir objects that all stay alive; the collections their allocation
    triggers scan them again and again and free nothing (~15% of an extraction). Reference
    counting still frees everything else; cycles made meanwhile wait for the next collection."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# ------------------------------------------------------------------------------------ loading


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
        check_topology(model, "<onnx.ModelProto>")
        for value in _all_initializers(model):  # no folder to resolve them against
            if isinstance(value.const_value, ir.ExternalTensor):
                raise ModelLoadError(
                    f"<onnx.ModelProto>: initializer {value.name!r} is external data the proto does not hold; "
                    "pass the model's path, or load it with load_external_data=True"
                )
        return model
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise ModelLoadError(f"expected an ONNX model (path, onnx.ModelProto or onnx_ir.Model), not {type(model_or_path).__name__}")
    path = _model_path(model_or_path)
    model = _parse(path)
    if len(model.graph) == 0 and not model.graph.outputs:
        raise ModelLoadError(f"{path}: not a valid ONNX model (empty graph)")
    check_topology(model, str(path))
    check_external_data(model, path.parent, path)
    return model


def working_copy(model_or_path: ir.Model | onnx.ModelProto | str | os.PathLike) -> ir.Model:
    """:func:`load_model`, but an ``ir.Model`` given by the caller is cloned (tensors shared), so
    an API that transforms the graph never changes the caller's model."""
    if isinstance(model_or_path, ir.Model):
        return model_or_path.clone()
    return load_model(model_or_path)


def load_graph_file(path: str | os.PathLike) -> ir.Model:
    """``ir.load`` with our errors and onnx-ir's own warnings kept quiet (we check ourselves)."""
    return _parse(Path(path))


def _model_path(model_or_path: str | os.PathLike) -> Path:
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
    return path


def _parse(path: Path) -> ir.Model:
    serde = logging.getLogger("onnx_ir.serde")  # warns on dangling inputs; check_topology refuses them
    level = serde.level
    serde.setLevel(logging.ERROR)
    try:
        return ir.load(path)
    except Exception as exc:  # protobuf DecodeError, ValueError, ... : all mean "not a valid model"
        raise ModelLoadError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
    finally:
        serde.setLevel(level)


def check_topology(model: ir.Model, source: str = "model") -> None:
    """Refuse a graph (or subgraph) with a cycle, or with a node input / graph output that no node
    produces and that is neither a graph input nor an initializer (:class:`InvalidGraphError`)."""
    _check_graph(model.graph, source)


def _check_graph(graph: ir.Graph, source: str) -> None:
    nodes = list(graph)
    index = {id(node): i for i, node in enumerate(nodes)}
    deps: list[set[int]] = []
    for node in nodes:
        mine: set[int] = set()
        for value in _consumed(node):
            producer = value.producer()
            if producer is None:
                if not value.is_graph_input() and not value.is_initializer():
                    raise InvalidGraphError(
                        f"{source}: input {value.name!r} of node {_label(node)} is produced by no node and is "
                        "neither a graph input nor an initializer (dangling value)"
                    )
                continue
            j = index.get(id(producer))
            if j is not None:
                mine.add(j)
        deps.append(mine)
        for sub in _subgraphs(node):
            _check_graph(sub, source)
    for value in graph.outputs:
        if value.producer() is None and not value.is_graph_input() and not value.is_initializer():
            raise InvalidGraphError(f"{source}: graph output {value.name!r} is produced by no node (dangling value)")
    if all(j < i for i, mine in enumerate(deps) for j in mine):
        return  # sorted: no cycle possible
    users: list[list[int]] = [[] for _ in nodes]
    pending = [len(mine) for mine in deps]
    for i, mine in enumerate(deps):
        for j in mine:
            users[j].append(i)
    ready = [i for i, n in enumerate(pending) if n == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for k in users[i]:
            pending[k] -= 1
            if pending[k] == 0:
                ready.append(k)
    if done < len(nodes):
        culprit = next(nodes[i] for i, n in enumerate(pending) if n)
        raise InvalidGraphError(f"{source}: the graph has a cycle through node {_label(culprit)}")


def _consumed(node: ir.Node) -> Iterator[ir.Value]:
    """The node's inputs plus the outer values its subgraphs read."""
    for value in node.inputs:
        if value is not None:
            yield value
    for sub in _subgraphs(node):
        inner = {id(sub)} | {id(g) for n in ir.traversal.RecursiveGraphIterator(sub) for g in _subgraphs(n)}
        for n in ir.traversal.RecursiveGraphIterator(sub):
            for value in n.inputs:
                producer = value.producer() if value is not None else None
                if producer is not None and id(producer.graph) not in inner:
                    yield value


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    out = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            out.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            out.extend(attr.value)
    return out


def _label(node: ir.Node) -> str:
    return repr(node.name) if node.name else f"<unnamed {node.op_type}>"


def check_external_data(model: ir.Model, base_dir: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    """Refuse external data that is missing, too short, outside ``base_dir``, or whose declared
    ``length`` is not the tensor's byte size. Messages start with ``source`` (the model's path;
    default ``base_dir``)."""
    base = Path(base_dir).resolve()
    where = source if source is not None else base
    files: dict[str, tuple[Path, int]] = {}  # location -> (resolved file, size); one stat per file
    for value in _all_initializers(model):
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = tensor.location
        if location not in files:
            target = (base / location).resolve()
            if Path(location).is_absolute() or not target.is_relative_to(base):
                raise ExternalDataError(
                    f"{where}: initializer {value.name!r}: external data path {location!r} escapes the model folder {base}"
                )
            if not target.is_file():
                raise ExternalDataError(f"{where}: initializer {value.name!r}: external data file {location!r} is missing")
            files[location] = (target, target.stat().st_size)
        size = files[location][1]
        nbytes = tensor.nbytes
        if tensor.length is not None and tensor.length != nbytes:
            raise ExternalDataError(
                f"{where}: initializer {value.name!r}: external data entry declares length {tensor.length} in {location!r}, "
                f"but the tensor {tensor.dtype.name}{list(tensor.shape)} has {nbytes} bytes"
            )
        end = (tensor.offset or 0) + nbytes
        if end > size:
            raise ExternalDataError(
                f"{where}: initializer {value.name!r}: external data file {location!r} is truncated "
                f"(needs {end} bytes, has {size})"
            )


def _all_initializers(model: ir.Model) -> Iterator[ir.Value]:
    yield from model.graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from attr.value.initializers.values()


def read_json(path: str | os.PathLike, error: type[LoraOnnxError], what: str = "file", **kwargs: Any) -> Any:
    """``json.loads`` of ``path``; unreadable, not UTF-8, not JSON, nested too deep: ``error``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"), **kwargs)
    except RecursionError:
        raise error(f"{path}: {what} is nested too deeply to be read") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise error(f"{path}: {what} is not valid JSON ({_first_line(exc)})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({_first_line(exc)})") from None


# ------------------------------------------------------------------------------------ overlap


def model_files(path: str | os.PathLike | None, model: ir.Model | None = None) -> list[Path]:
    """The files a model stands for: the ``.onnx`` file, every external data file it references,
    and its package folder when it is a package's ``model.onnx`` (or a folder). ``path=None``: an
    in-memory model, whose external tensors still point at files."""
    out: list[Path] = []
    if path is not None:
        path = Path(path)
        if path.is_dir():
            return [path]
        out.append(path)
        if path.name == "model.onnx" and (path.parent / "manifest.json").is_file():
            out.append(path.parent)
        if model is None and path.is_file():
            try:
                model = _parse(path)
            except ModelLoadError:
                return out
    if model is not None:
        for value in _all_initializers(model):
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and tensor.location:
                base = tensor.base_dir or (path.parent if path is not None else ".")
                out.append(Path(base) / tensor.location)
    return out


def refuse_overlap(outputs: str | os.PathLike | Iterable[str | os.PathLike],
                   inputs: Iterable[str | os.PathLike | None]) -> None:
    """Raise :class:`OutputError` when an output is, contains or lies inside an input."""
    outs = [outputs] if isinstance(outputs, (str, os.PathLike)) else list(outputs)
    for out in outs:
        o = Path(out).resolve()
        for src in inputs:
            if src is None:
                continue
            i = Path(src).resolve()
            if o == i:
                raise OutputError(f"output {out} is the input {src}; refusing to overwrite what is read")
            if i.is_relative_to(o):
                raise OutputError(f"output {out} contains the input {src}; write it somewhere else")
            if o.is_relative_to(i):
                raise OutputError(f"output {out} lies inside the input {src}; write it somewhere else")


# ------------------------------------------------------------------------------------ writing


def _umask_mode(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def check_output_folder(destination: str | os.PathLike, *, overwrite: bool = True,
                        marker: str | None = "manifest.json") -> None:
    """Refuse a folder destination that exists as a file, or as a folder of something other than
    an earlier output (non-empty without ``marker``): what :func:`atomic_output` would replace."""
    dest = Path(destination)
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir():
            raise OutputError(f"output {destination} exists and is not a folder")
        if not overwrite:
            raise OutputError(f"output {destination} exists")
        if marker is not None and any(dest.iterdir()) and not (dest / marker).exists():
            raise OutputError(f"output {destination} is a folder of other files (no {marker}); refusing to replace it")


@contextlib.contextmanager
def atomic_output(destination: str | os.PathLike, *, overwrite: bool = True,
                  marker: str | None = "manifest.json") -> Iterator[Path]:
    """Yield a temp folder in ``destination``'s parent; on success it replaces ``destination``.

    An existing destination is replaced only when it is empty or looks like an earlier output
    (holds ``marker``); a file, or a folder of something else, is refused before the body runs.
    """
    dest = Path(destination).resolve()
    check_output_folder(destination, overwrite=overwrite, marker=marker)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, _umask_mode(0o777))  # mkdtemp makes 0700; give the usual folder mode
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.replace(old, dest)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file path beside ``destination``; renamed into place on success."""
    dest = Path(destination).resolve()
    if dest.is_dir():
        raise OutputError(f"output {destination} is a folder; give a file path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, _umask_mode(0o666))  # mkstemp makes 0600; give the usual file mode
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(model: ir.Model, out_path: str | os.PathLike, *, external_data: bool = True,
               inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Save ``model`` to ``out_path`` (weights in ``<name>.data``): both files appear, or neither.

    Both are written to a temp folder beside ``out_path`` first; then the data file and the model
    are renamed into place, the data file's previous version restored if the model's rename fails.
    ``inputs``: paths the output must not overlap (:func:`refuse_overlap`).
    """
    out = Path(out_path).resolve()
    data = f"{out.name}.data" if external_data else None
    targets = [out] + ([out.parent / data] if data else [])
    refuse_overlap([Path(out_path)] + ([Path(out_path).parent / data] if data else []), inputs)
    for target in targets:
        if target.is_dir():
            raise OutputError(f"output {target} is a folder; give a file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        ir.save(model, tmp / out.name, external_data=data)
        for name in os.listdir(tmp):
            os.chmod(tmp / name, _umask_mode(0o666))
        if data and (tmp / data).exists():
            data_dest = out.parent / data
            backup = tmp / ".previous.data"
            had = data_dest.exists()
            if had:
                os.replace(data_dest, backup)
            os.replace(tmp / data, data_dest)
            try:
                os.replace(tmp / out.name, out)
            except BaseException:
                if had:
                    os.replace(backup, data_dest)
                else:
                    data_dest.unlink(missing_ok=True)
                raise
        else:
            os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextlib.contextmanager
def package_lock(package_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive OS lock on a package folder while the body changes the package.

    ``flock`` on the folder itself (no lock file is left behind, even by a refused write): writers
    into one package run one after the other. The manifest is replaced atomically (rename), so
    readers need no lock and always see a whole manifest.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock available
        yield
        return
    try:
        fd = os.open(package_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise OutputError(f"{package_dir}: cannot lock the package ({_first_line(exc)})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
